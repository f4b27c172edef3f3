"""Build a CPU corpus of English technical prose (~40M+ GPT-2 tokens) from pinned Debian documentation packages.

    apt-get update && python data/debian_corpus.py --out data/debian

Each package below is fetched at its pinned version with `apt-get download` (no install, no root needed
beyond apt's lists), unpacked with `dpkg-deb -x`, and the listed files are read as documents: reStructuredText,
POD, AsciiDoc and Sphinx `_sources` as they are, HTML as its visible text (no scripts, styles, navigation bars
or sidebars). Identical documents are kept once. The documents are shuffled with --seed; whole documents go to
the val shard until it holds at least --val_tokens tokens, so no document is split between val and train.
Then data/prepare.py writes `debian_val_000000.bin` and `debian_train_*.bin`. The same Debian release and seed
give the same shards. The Python documentation (the bundled sample's source) is left out on purpose.
"""
import argparse
import fnmatch
import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
from html.parser import HTMLParser

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prepare  # noqa: E402
from prepare import DataError  # noqa: E402

# package: (pinned version, file patterns inside the package, format). Debian 12 ("bookworm").
PACKAGES = {
    "linux-doc-6.1": ("6.1.192-2", ["usr/share/doc/linux-doc-6.1/Documentation/*.rst.gz"], "text"),
    "perl-doc": ("5.36.0-7+deb12u4", ["usr/share/perl/5.36.0/pod/*.pod"], "text"),
    "postgresql-doc-15": ("15.20-0+deb12u1", ["usr/share/doc/postgresql-doc-15/html/*.html"], "html"),
    "git-doc": ("1:2.39.5-0+deb12u3", ["usr/share/doc/git-doc/*.txt"], "text"),
    "debian-reference-en": ("2.100", ["usr/share/debian-reference/*.en.html"], "html"),
    "debian-handbook": ("11.20220922", ["usr/share/doc/debian-handbook/html/en-US/*.html"], "html"),
    "debian-policy": ("4.6.2.0", ["usr/share/doc/debian-policy/policy.html/_sources/*.txt"], "text"),
    "developers-reference": ("12.18", ["usr/share/developers-reference/_sources/*.txt"], "text"),
    "r-doc-html": ("4.2.2.20221110-2", ["usr/share/R/doc/manual/*.html"], "html"),
    "octave-doc": ("7.3.0-2", ["usr/share/doc/octave/*.html/*.html"], "html"),
    "llvm-15-doc": ("1:15.0.6-4", ["usr/share/doc/llvm-15-doc/html/_sources/*.txt"], "text"),
    "clang-15-doc": ("1:15.0.6-4", ["usr/share/doc/clang-15/html/_sources/*.txt"], "text"),
    "cmake-doc": ("3.25.1-1", ["usr/share/doc/cmake-data/html/_sources/*.txt"], "text"),
    "python-django-doc": ("3:3.2.25-0+deb12u7", ["usr/share/doc/python-django-doc/html/*.html"], "html"),
    "sqlite3-doc": ("3.40.1-2+deb12u2", ["usr/share/doc/sqlite3/*.html"], "html"),
    "qtbase5-doc-html": ("5.15.8+dfsg-11+deb12u3", ["usr/share/qt5/doc/*.html"], "html"),
    "erlang-doc": ("1:25.2.3+dfsg-1+deb12u4", ["usr/share/doc/erlang-doc/*.html"], "html"),
    "rust-doc": ("1.63.0+dfsg1-2", ["usr/share/doc/rust-doc/html/*.html"], "html"),
}
SKIP_DIRS = ("/translations/", "/devicetree/bindings/")  # other languages; YAML schemas
MIN_CHARS = 200  # index stubs and empty pages carry no prose


class VisibleText(HTMLParser):
    """The text a reader sees: no <script>, <style>, <head>, navigation bars, sidebars or footers."""
    HIDDEN_TAGS = {"script", "style", "head", "nav", "footer", "header", "noscript", "svg"}
    HIDDEN_CLASSES = ("nav", "sidebar", "toc", "footer", "related", "breadcrumb", "menu")
    VOID_TAGS = {"br", "img", "meta", "link", "input", "hr", "area", "base", "col", "embed", "source", "wbr"}
    BLOCK_TAGS = {"p", "div", "li", "tr", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd", "table", "br", "section"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.hidden_tag, self.hidden_depth = [], None, 0

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCK_TAGS:
            self.parts.append("\n")
        if tag in self.VOID_TAGS:
            return
        if self.hidden_tag:  # count only the hiding element's own tag: unclosed <p> or <li> inside it cannot unbalance it
            self.hidden_depth += tag == self.hidden_tag
            return
        classes = " ".join(v or "" for k, v in attrs if k in ("class", "id", "role")).lower()
        if tag in self.HIDDEN_TAGS or any(c in classes for c in self.HIDDEN_CLASSES):
            self.hidden_tag, self.hidden_depth = tag, 1

    def handle_endtag(self, tag):
        if tag == self.hidden_tag:
            self.hidden_depth -= 1
            if not self.hidden_depth:
                self.hidden_tag = None
        if tag in self.BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.hidden_tag:
            self.parts.append(data)

    def text(self):
        lines = (" ".join(line.split()) for line in "".join(self.parts).splitlines())
        return "\n".join(line for line in lines if line)


def html_to_text(html):
    parser = VisibleText()
    parser.feed(html)
    parser.close()
    return parser.text()


def read_document(path, fmt):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        raw = f.read()
    return html_to_text(raw) if fmt == "html" else raw.strip()


def fetch_package(name, version, work):
    """Download and unpack one pinned package; its unpacked root."""
    root = os.path.join(work, name)
    if os.path.isdir(root):
        return root
    debs = os.path.join(work, "debs")
    os.makedirs(debs, exist_ok=True)
    result = subprocess.run(["apt-get", "download", f"{name}={version}"], cwd=debs, capture_output=True, text=True)
    if result.returncode:
        raise DataError(f"apt-get download {name}={version} failed ({result.stderr.strip().splitlines()[-1:]});"
                         " run apt-get update, on Debian 12")
    deb = next(os.path.join(debs, f) for f in os.listdir(debs) if f.startswith(name + "_"))
    subprocess.run(["dpkg-deb", "-x", deb, root + ".tmp"], check=True)
    os.replace(root + ".tmp", root)
    return root


def package_documents(root, patterns, fmt):
    """(path, text) of each matching file under root, in sorted order (fnmatch: a * also spans folders)."""
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if any(d in "/" + rel for d in SKIP_DIRS):
                continue
            if any(fnmatch.fnmatch(rel, p) for p in patterns):
                yield rel, read_document(path, fmt)


def collect(work):
    """Every package's documents, deduplicated, with a per-package count."""
    docs, seen, counts = [], set(), {}
    for name, (version, patterns, fmt) in PACKAGES.items():
        root = fetch_package(name, version, work)
        n_chars = n_docs = 0
        for rel, text in package_documents(root, patterns, fmt):
            digest = hashlib.sha1(text.encode()).digest()
            if len(text) < MIN_CHARS or digest in seen:
                continue
            seen.add(digest)
            docs.append(dict(package=name, path=rel, text=text))
            n_docs, n_chars = n_docs + 1, n_chars + len(text)
        if not n_docs:
            raise DataError(f"{name}={version}: no document matched {patterns}")
        counts[name] = (version, n_docs, n_chars)
    return docs, counts


def write_corpus(docs, out, name, val_tokens, shard_tokens, work, seed):
    """Shuffle the documents, give whole ones to val until it holds val_tokens, and write the shards."""
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    val_count = val_docs = 0
    while val_count < val_tokens and val_docs < len(docs):
        val_count += len(prepare.tokenize(docs[val_docs]["text"]))
        val_docs += 1
    os.makedirs(work, exist_ok=True)
    inputs = []
    for split, part in (("val", docs[:val_docs]), ("train", docs[val_docs:])):
        inputs.append(os.path.join(work, f"{name}_{split}.jsonl"))
        with open(inputs[-1], "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in part)
    return val_docs, prepare.prepare(inputs, out, name, val_count, shard_tokens)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "debian"))
    p.add_argument("--name", default="debian")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "debian_corpus"), help="downloaded and unpacked packages")
    p.add_argument("--val_tokens", type=int, default=1_000_000, help="at least this many tokens of whole documents go to val")
    p.add_argument("--shard_tokens", type=int, default=100_000_000)
    p.add_argument("--seed", type=int, default=0, help="document order")
    args = p.parse_args(argv)
    try:
        docs, counts = collect(args.work)
        val_docs, written = write_corpus(docs, args.out, args.name, args.val_tokens, args.shard_tokens, args.work, args.seed)
    except (DataError, OSError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, (version, n_docs, n_chars) in counts.items():
        print(f"{name}={version}: {n_docs} documents, {n_chars:,} characters")
    print(f"{len(docs)} documents: {val_docs} in val ({written[0][1]:,} tokens), the rest in train")
    for path, n in written:
        print(f"{path}: {n:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
