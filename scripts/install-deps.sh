#!/usr/bin/env bash
# Install every Debian 12 package moecpt needs to build, test and run.
# Idempotent; needs root (or sudo). No network besides Debian's mirrors.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config
  libtorch-dev                 # LibTorch 1.13 (CPU): tensors and autograd
  libopenblas0-pthread         # fast BLAS for LibTorch (reference BLAS is ~10x slower)
  libtomlplusplus-dev libcli11-dev nlohmann-json3-dev
  libsentencepiece-dev         # tokenizer
  libgtest-dev libbenchmark-dev
  libgloo-dev                  # c10d process groups on CPU
  chromium                     # headless check of the study report (tests)
  python3-torch                # independent PyTorch references (tests) and the eager peer (bench/)
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "moecpt: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
