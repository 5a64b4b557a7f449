"""Build the small offline corpus shipped in ``dlm_titan/assets/corpus`` (SlimPajama layout).

Sources are redistributable texts from Debian bookworm packages, fetched with ``apt-get download`` (no other
network access) and unpacked with ``dpkg-deb -x`` into a temporary folder:

- ``bible-kjv-text`` (King James Bible, public domain), decoded with the ``bible`` program of ``bible-kjv``;
  one document per group of five chapters, labelled ``RedPajamaBook``.
- ``python3.11-doc`` (the Python 3.11 documentation, PSF License): one document per HTML page, main body
  converted to plain text with the stdlib ``html.parser``; labelled ``RedPajamaCommonCrawl`` because these are
  web pages (docs.python.org) of the kind CommonCrawl holds.
- ``libpython3.11-minimal`` + ``libpython3.11-stdlib`` (the CPython standard library, PSF License): one
  document per ``.py`` file, labelled ``RedPajamaGithub`` as SlimPajama labels source code.

Output: ``{train,validation}/chunk1/example_{train,holdout}_{i}.jsonl.zst`` with records exactly
``{"text": ..., "meta": {"redpajama_set_name": ...}}``, the Debian copyright files under ``licenses/``, and
``SOURCES.md`` with package versions, licences and counts. Everything is sorted and compressed at a fixed zstd
level, so a rerun with the same package versions writes identical bytes.

Usage::

    python -m scripts.build_embedded_corpus [--output dlm_titan/assets/corpus] [--deb_dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import zstandard
from tqdm import tqdm

from scripts.cli import HelpFormatter

# Pinned so that a rebuild reads the same bytes. Debian's security archive only keeps the newest point release:
# if a pinned version is gone, pass --any_version (and commit the new corpus, tokenizer and SOURCES.md together).
PACKAGES = {
    "bible-kjv-text": "4.38",
    "bible-kjv": "4.38",  # only its `bible` decoder is used; none of its files enter the corpus
    "python3.11-doc": "3.11.2-6+deb12u9",
    "libpython3.11-minimal": "3.11.2-6+deb12u9",
    "libpython3.11-stdlib": "3.11.2-6+deb12u9",
}
ZSTD_LEVEL = 19
VALIDATION_FRACTION = 0.03
MIN_VALIDATION_DOCS = 2
TRAIN_FILE_BYTES = 4_000_000  # raw JSONL bytes per train file before starting the next one
MIN_DOC_CHARS = 200
CHAPTERS_PER_BIBLE_DOC = 5

# fmt: off
KJV_BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1 Samuel",
    "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
    "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel",
    "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah",
    "Haggai", "Zechariah", "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
    "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians",
    "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James", "1 Peter",
    "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation",
)
# fmt: on

# Index-like pages of the Sphinx build carry no prose: link lists and the search page.
SKIPPED_DOC_PAGES = re.compile(r"^(genindex.*|py-modindex|search|contents)\.html$")


@dataclass(frozen=True)
class Doc:
    """One corpus document before the split."""

    doc_id: str
    set_name: str
    text: str


# ----------------------------------------------------------------------------------------------------------
# Fetching packages


def fetch_packages(deb_dir: Path, any_version: bool) -> dict[str, str]:
    """Download the .deb files into deb_dir (unless already there); return package -> version."""
    versions = {}
    for pkg, version in PACKAGES.items():
        if not list(deb_dir.glob(f"{pkg}_*.deb")):
            _apt_download(pkg if any_version else f"{pkg}={version}", deb_dir)
        (deb,) = sorted(deb_dir.glob(f"{pkg}_*.deb"))
        versions[pkg] = _deb_field(deb, "Version")
        if versions[pkg] != version and not any_version:
            sys.exit(
                f"error: {deb} is version {versions[pkg]}, expected {version}; pass --any_version to accept it"
            )
    return versions


def _apt_download(spec: str, deb_dir: Path) -> None:
    """`apt-get download spec` into deb_dir; runs `apt-get update` once if the lists lack it."""
    for attempt in range(2):
        done = subprocess.run(["apt-get", "download", spec], cwd=deb_dir, capture_output=True, text=True)
        if done.returncode == 0:
            return
        if attempt == 0:
            print("apt-get download failed; running apt-get update once", flush=True)
            subprocess.run(["apt-get", "update"], check=True, capture_output=True)
    sys.exit(f"error: `apt-get download {spec}` failed: {done.stderr.strip()}; try --any_version")


def _deb_field(deb: Path, field: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), field], check=True, capture_output=True, text=True
    ).stdout.strip()


def unpack(deb_dir: Path, root: Path) -> None:
    """Unpack every pinned package into root/<package>."""
    for pkg in PACKAGES:
        (deb,) = sorted(deb_dir.glob(f"{pkg}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root / pkg)], check=True)


# ----------------------------------------------------------------------------------------------------------
# Bible


def bible_docs(root: Path) -> list[Doc]:
    """The KJV as documents of CHAPTERS_PER_BIBLE_DOC chapters each, with book and chapter headings."""
    verses = _read_kjv(root)
    by_chapter: dict[tuple[int, int], list[str]] = {}
    for book, chapter, verse, text in verses:
        by_chapter.setdefault((book, chapter), []).append(f"{verse} {text}")
    docs = []
    for book, name in enumerate(KJV_BOOKS):
        chapters = sorted(c for b, c in by_chapter if b == book)
        for start in range(0, len(chapters), CHAPTERS_PER_BIBLE_DOC):
            group = chapters[start : start + CHAPTERS_PER_BIBLE_DOC]
            parts = [f"{name} {c}\n\n" + "\n".join(by_chapter[(book, c)]) for c in group]
            doc_id = f"kjv/{book + 1:02d}-{name}/{group[0]:03d}-{group[-1]:03d}"
            docs.append(Doc(doc_id, "RedPajamaBook", "\n\n".join(parts) + "\n"))
    return docs


def _read_kjv(root: Path) -> list[tuple[int, int, int, str]]:
    """(book index, chapter, verse, text) for every verse, via `bible -f Gen1:1-Rev22:21`."""
    exe = root / "bible-kjv/usr/bin/bible"
    data_dir = root / "bible-kjv-text/usr/lib"
    done = subprocess.run([str(exe), "-f", "-p", str(data_dir), "Gen1:1-Rev22:21"], capture_output=True)
    if done.returncode != 0:
        sys.exit(f"error: {exe} failed ({done.stderr.decode().strip()}); it needs libreadline8 installed")
    pattern = re.compile(r"^(\w+?)(\d+):(\d+) (.*)$")
    abbrevs: list[str] = []
    verses = []
    for line in done.stdout.decode("ascii").splitlines():
        if not line.strip():
            continue
        abbrev, chapter, verse, text = pattern.match(line).groups()
        if not abbrevs or abbrevs[-1] != abbrev:
            abbrevs.append(abbrev)
        verses.append((len(abbrevs) - 1, int(chapter), int(verse), text.strip()))
    assert len(abbrevs) == len(KJV_BOOKS) and len(verses) == 31102, (len(abbrevs), len(verses))
    return verses


# ----------------------------------------------------------------------------------------------------------
# Python documentation (HTML -> text)

# fmt: off
_BLOCK_TAGS = {
    "p", "div", "section", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "dl", "ul", "ol", "pre",
    "table", "tr", "blockquote", "br", "hr", "figure", "figcaption", "caption",
}
# fmt: on


class _SphinxBodyText(HTMLParser):
    """Plain text of a Sphinx page's `<div role="main">`: paragraphs split by blank lines, `<pre>` verbatim."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self._line: list[str] = []
        self._main_depth = 0  # open <div>s inside the main body; 0 = outside it
        self._pre_depth = 0
        self._cell_depth = 0  # inside <td>/<th>: cells of a row share one line, joined by " | "
        self._skip_tag: str | None = None  # inside a headerlink anchor, <script> or <style>

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if not self._main_depth:
            if tag == "div" and attr.get("role") == "main":
                self._main_depth = 1
            return
        if tag == "div":
            self._main_depth += 1
        if self._skip_tag:
            return
        if tag in ("script", "style") or (tag == "a" and "headerlink" in (attr.get("class") or "")):
            self._skip_tag = tag
            return
        if tag in ("td", "th"):
            self._cell_depth += 1
            if self._line:
                self._line.append(" | ")
        elif tag in _BLOCK_TAGS:
            self._block_break()
        if tag == "pre":
            self._pre_depth += 1
        elif tag == "li" and "".join(self._line) != "- ":  # an item whose first child is a nested list
            self._line.append("- ")

    def handle_endtag(self, tag: str) -> None:
        if not self._main_depth:
            return
        if self._skip_tag:
            if tag == self._skip_tag:
                self._skip_tag = None
            if tag == "div":
                self._main_depth -= 1
            return
        if tag in ("td", "th"):
            self._cell_depth -= 1
        elif tag in _BLOCK_TAGS:
            self._block_break()
        if tag == "pre":
            self._pre_depth -= 1
        if tag == "div":
            self._main_depth -= 1

    def handle_data(self, data: str) -> None:
        if self._main_depth and not self._skip_tag:
            self._line.append(data if self._pre_depth else re.sub(r"\s+", " ", data))

    def _block_break(self) -> None:
        if self._cell_depth and not self._pre_depth:
            self._line.append(" ")  # a paragraph inside a table cell stays on the row's line
        else:
            self._flush()

    def _flush(self) -> None:
        raw = "".join(self._line)
        if raw == "- ":  # a list bullet whose item starts with a paragraph: keep it for that paragraph
            return
        self._line = []
        if self._pre_depth:
            text = "\n".join(line.rstrip() for line in raw.strip("\n").split("\n"))
        else:
            text = re.sub(r" {2,}", " ", raw).strip()
        if text.strip():
            self.blocks.append(text)


def html_to_text(html: str) -> str:
    """Main body text of one Sphinx HTML page."""
    parser = _SphinxBodyText()
    parser.feed(html)
    parser.close()
    parser._flush()
    return "\n\n".join(parser.blocks) + "\n"


def python_doc_docs(root: Path) -> list[Doc]:
    """One document per HTML page of the Python 3.11 documentation, sorted by path."""
    html_root = root / "python3.11-doc/usr/share/doc/python3.11/html"
    docs = []
    for path in sorted(html_root.rglob("*.html")):
        rel = path.relative_to(html_root).as_posix()
        if rel.startswith("_") or SKIPPED_DOC_PAGES.match(rel):
            continue
        text = html_to_text(path.read_text(encoding="utf-8"))
        docs.append(Doc(f"python3.11-doc/{rel}", "RedPajamaCommonCrawl", text))
    return docs


# ----------------------------------------------------------------------------------------------------------
# CPython standard library


def stdlib_docs(root: Path) -> list[Doc]:
    """One document per .py file of the Debian stdlib packages, minus generated files, sorted by path."""
    files = {}
    for pkg in ("libpython3.11-minimal", "libpython3.11-stdlib"):
        lib = root / pkg / "usr/lib/python3.11"
        for path in lib.rglob("*.py"):
            if path.is_symlink() or path.name.startswith("_sysconfigdata"):
                continue  # build-machine data that differs between architectures, not library code
            files[path.relative_to(lib).as_posix()] = path
    docs = []
    for rel in sorted(files):
        text = files[rel].read_text(encoding="utf-8")
        # Generated data, not code: gencodec.py charmap tables, and pydoc's copy of the documentation text
        # (which would leak the docs set into the code set).
        if "gencodec.py" in text or rel == "pydoc_data/topics.py":
            continue
        docs.append(Doc(f"cpython3.11/Lib/{rel}", "RedPajamaGithub", text))
    return docs


# ----------------------------------------------------------------------------------------------------------
# Split and write


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def clean(docs: list[Doc]) -> list[Doc]:
    """Drop short documents and exact duplicate texts (keeping the first by id), so splits stay disjoint."""
    seen: set[str] = set()
    kept = []
    for doc in sorted(docs, key=lambda d: d.doc_id):
        if len(doc.text.strip()) < MIN_DOC_CHARS or doc.text in seen:
            continue
        seen.add(doc.text)
        kept.append(doc)
    return kept


def split(docs: list[Doc]) -> dict[str, list[Doc]]:
    """Per set, the docs with the smallest id hashes go to validation; each split is ordered by id hash."""
    out: dict[str, list[Doc]] = {"train": [], "validation": []}
    for set_name in sorted({d.set_name for d in docs}):
        members = sorted((d for d in docs if d.set_name == set_name), key=lambda d: _hash(d.doc_id))
        n_val = max(MIN_VALIDATION_DOCS, round(VALIDATION_FRACTION * len(members)))
        out["validation"] += members[:n_val]
        out["train"] += members[n_val:]
    for name in out:  # mix the sets within each file, as SlimPajama is shuffled
        out[name].sort(key=lambda d: _hash("order/" + d.doc_id))
    return out


def _jsonl_line(doc: Doc) -> bytes:
    record = {"text": doc.text, "meta": {"redpajama_set_name": doc.set_name}}
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def write_split(docs: list[Doc], folder: Path, stem: str, file_bytes: int) -> list[Path]:
    """Write docs as `folder/{stem}_{i}.jsonl.zst`, starting a new file after file_bytes raw bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[list[bytes]] = [[]]
    size = 0
    for doc in docs:
        if size >= file_bytes:
            groups.append([])
            size = 0
        line = _jsonl_line(doc)
        groups[-1].append(line)
        size += len(line)
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0)
    paths = []
    for i, lines in enumerate(groups):
        path = folder / f"{stem}_{i}.jsonl.zst"
        path.write_bytes(compressor.compress(b"".join(lines)))
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------
# Licences and SOURCES.md

LICENCE_FILES = {
    "bible-kjv-text.copyright": "bible-kjv-text/usr/share/doc/bible-kjv-text/copyright",
    "python3.11.copyright": "libpython3.11-minimal/usr/share/doc/libpython3.11-minimal/copyright",
}

SOURCE_NOTES = {
    "RedPajamaBook": (
        "King James Version of the Bible (1611)",
        "bible-kjv-text (text), decoded by `bible -f` from bible-kjv",
        "Public domain (copyright expired; Debian main). Debian copyright file: licenses/bible-kjv-text.copyright. "
        "Note: in the United Kingdom the KJV is under a perpetual Crown patent.",
        f"{CHAPTERS_PER_BIBLE_DOC} chapters per document; `Book C` heading, then `verse text` lines.",
    ),
    "RedPajamaCommonCrawl": (
        "Python 3.11 documentation (docs.python.org web pages)",
        "python3.11-doc, HTML pages under /usr/share/doc/python3.11/html",
        "PSF License Version 2 (code examples also Zero-Clause BSD). Debian copyright file: "
        "licenses/python3.11.copyright.",
        'One document per page: the `<div role="main">` body as plain text (stdlib html.parser), '
        "`<pre>` blocks verbatim; index, search and contents pages skipped. Labelled CommonCrawl because "
        "these are web pages.",
    ),
    "RedPajamaGithub": (
        "CPython 3.11 standard library source code",
        "libpython3.11-minimal + libpython3.11-stdlib, /usr/lib/python3.11/**/*.py",
        "PSF License Version 2 (a few files carry additional permissive notices, all listed in "
        "licenses/python3.11.copyright).",
        "One document per .py file, unchanged; gencodec.py charmap tables, pydoc_data/topics.py (a copy of "
        "the docs text) and the architecture-specific _sysconfigdata files skipped.",
    ),
}


def write_sources_md(out: Path, versions: dict[str, str], splits: dict[str, list[Doc]]) -> None:
    """SOURCES.md: provenance, licences and per split/set document and byte counts."""
    lines = [
        "# Embedded corpus: sources and licences",
        "",
        "Built by `python -m scripts.build_embedded_corpus` from Debian bookworm packages; do not edit by hand.",
        'Layout as SlimPajama: `{split}/chunk1/*.jsonl.zst`, records `{"text", "meta": {"redpajama_set_name"}}`.',
        f"Split: per set, the {VALIDATION_FRACTION:.1%} of documents (at least {MIN_VALIDATION_DOCS}) with the "
        "smallest sha256(doc id) are validation; exact duplicate texts and documents under "
        f"{MIN_DOC_CHARS} characters are dropped first, so no text is in both splits.",
        "",
        "## Packages",
        "",
        "| package | version |",
        "|---|---|",
        *(f"| {pkg} | {versions[pkg]} |" for pkg in PACKAGES),
        "",
        "## Sets",
        "",
    ]
    for set_name, (what, origin, licence, shape) in SOURCE_NOTES.items():
        lines += [
            f"### {set_name}: {what}",
            "",
            f"- Source: {origin}",
            f"- Licence: {licence}",
            f"- Shape: {shape}",
            "",
        ]
    lines += ["## Counts", "", "| split | set | documents | UTF-8 bytes |", "|---|---|---|---|"]
    for split_name, docs in splits.items():
        for set_name in sorted(SOURCE_NOTES):
            members = [d for d in docs if d.set_name == set_name]
            n_bytes = sum(len(d.text.encode("utf-8")) for d in members)
            lines.append(f"| {split_name} | {set_name} | {len(members)} | {n_bytes:,} |")
        n_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
        lines.append(f"| {split_name} | all | {len(docs)} | {n_bytes:,} |")
    (out / "SOURCES.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def copy_licences(root: Path, out: Path) -> None:
    (out / "licenses").mkdir(parents=True, exist_ok=True)
    for name, rel in LICENCE_FILES.items():
        shutil.copyfile(root / rel, out / "licenses" / name)


# ----------------------------------------------------------------------------------------------------------


def build(output: Path, deb_dir: Path, any_version: bool) -> None:
    """Fetch, convert, split and write the corpus into output (replacing its split folders)."""
    with tempfile.TemporaryDirectory(prefix="dlm_corpus_") as tmp:
        root = Path(tmp)
        print(f"fetching {len(PACKAGES)} Debian packages into {deb_dir}", flush=True)
        versions = fetch_packages(deb_dir, any_version)
        unpack(deb_dir, root)
        docs = []
        for name, reader in tqdm(
            [("bible", bible_docs), ("python docs", python_doc_docs), ("stdlib", stdlib_docs)],
            desc="reading sources",
        ):
            found = reader(root)
            print(f"  {name}: {len(found)} documents", flush=True)
            docs += found
        docs = clean(docs)
        splits = split(docs)
        for folder in ("train", "validation"):
            shutil.rmtree(output / folder, ignore_errors=True)
        written = write_split(splits["train"], output / "train/chunk1", "example_train", TRAIN_FILE_BYTES)
        written += write_split(splits["validation"], output / "validation/chunk1", "example_holdout", 1 << 62)
        copy_licences(root, output)
        write_sources_md(output, versions, splits)
    for path in written:
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    for name, members in splits.items():
        print(f"{name}: {len(members)} documents, {sum(len(d.text) for d in members):,} characters")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("dlm_titan/assets/corpus"), help="corpus folder to write")
    parser.add_argument(
        "--deb_dir",
        type=Path,
        default=None,
        help="folder for (or with already downloaded) .deb files; default: a temporary folder",
    )
    parser.add_argument(
        "--any_version",
        action="store_true",
        help="accept whatever package versions apt offers instead of the pinned ones",
    )
    args = parser.parse_args(argv)
    if args.deb_dir is None:
        with tempfile.TemporaryDirectory(prefix="dlm_debs_") as debs:
            build(args.output, Path(debs), args.any_version)
    else:
        args.deb_dir.mkdir(parents=True, exist_ok=True)
        build(args.output, args.deb_dir, args.any_version)


if __name__ == "__main__":
    main()
