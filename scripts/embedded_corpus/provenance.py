"""Provenance of the corpus: the Debian copyright files and the generated ``SOURCES.md``."""

from __future__ import annotations

import shutil
from pathlib import Path

from scripts.embedded_corpus.bible import CHAPTERS_PER_BIBLE_DOC
from scripts.embedded_corpus.debian import PACKAGES
from scripts.embedded_corpus.doc import Doc
from scripts.embedded_corpus.split import MIN_DOC_CHARS, MIN_VALIDATION_DOCS, VALIDATION_FRACTION

# Corpus file name under licenses/ -> path of the Debian copyright file in the unpacked packages.
LICENCE_FILES = {
    "bible-kjv-text.copyright": "bible-kjv-text/usr/share/doc/bible-kjv-text/copyright",
    "python3.11.copyright": "libpython3.11-minimal/usr/share/doc/libpython3.11-minimal/copyright",
}

# Set name -> (what, source packages, licence, document shape), as written in SOURCES.md.
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
    """Write out/SOURCES.md: provenance, licences and per split/set document and byte counts.

    Args:
        out: Corpus folder.
        versions: Package name -> version, for every package of PACKAGES.
        splits: Split name -> its documents, as written.
    """
    lines = _header_lines(versions) + _set_lines() + _count_lines(splits)
    (out / "SOURCES.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _header_lines(versions: dict[str, str]) -> list[str]:
    """Title, layout and split rule, and the package version table."""
    return [
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
    ]


def _set_lines() -> list[str]:
    """One section per set of SOURCE_NOTES: what it is, where it comes from, licence, document shape."""
    lines = ["## Sets", ""]
    for set_name, (what, origin, licence, shape) in SOURCE_NOTES.items():
        lines += [
            f"### {set_name}: {what}",
            "",
            f"- Source: {origin}",
            f"- Licence: {licence}",
            f"- Shape: {shape}",
            "",
        ]
    return lines


def _count_lines(splits: dict[str, list[Doc]]) -> list[str]:
    """Documents and UTF-8 bytes per split and set, then per split in all."""
    lines = ["## Counts", "", "| split | set | documents | UTF-8 bytes |", "|---|---|---|---|"]
    for split_name, docs in splits.items():
        for set_name in sorted(SOURCE_NOTES):
            members = [d for d in docs if d.set_name == set_name]
            n_bytes = sum(len(d.text.encode("utf-8")) for d in members)
            lines.append(f"| {split_name} | {set_name} | {len(members)} | {n_bytes:,} |")
        n_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
        lines.append(f"| {split_name} | all | {len(docs)} | {n_bytes:,} |")
    return lines


def copy_licences(root: Path, out: Path) -> None:
    """Copy the Debian copyright files of LICENCE_FILES into out/licenses.

    Args:
        root: Folder with the unpacked packages.
        out: Corpus folder.
    """
    (out / "licenses").mkdir(parents=True, exist_ok=True)
    for name, rel in LICENCE_FILES.items():
        shutil.copyfile(root / rel, out / "licenses" / name)
