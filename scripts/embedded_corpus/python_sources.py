"""Python 3.11 sources: the HTML documentation pages and the standard library's ``.py`` files."""

from __future__ import annotations

import re
from pathlib import Path

from scripts.embedded_corpus.doc import Doc
from scripts.embedded_corpus.sphinx_text import html_to_text

# Index-like pages of the Sphinx build carry no prose: link lists and the search page.
SKIPPED_DOC_PAGES = re.compile(r"^(genindex.*|py-modindex|search|contents)\.html$")


def python_doc_docs(root: Path) -> list[Doc]:
    """One document per HTML page of the Python 3.11 documentation, sorted by path.

    Args:
        root: Folder with the unpacked ``python3.11-doc`` package.

    Returns:
        The main body text of every page except Sphinx internals (``_*``) and SKIPPED_DOC_PAGES.
    """
    html_root = root / "python3.11-doc/usr/share/doc/python3.11/html"
    docs = []
    for path in sorted(html_root.rglob("*.html")):
        rel = path.relative_to(html_root).as_posix()
        if rel.startswith("_") or SKIPPED_DOC_PAGES.match(rel):
            continue
        text = html_to_text(path.read_text(encoding="utf-8"))
        docs.append(Doc(f"python3.11-doc/{rel}", "RedPajamaCommonCrawl", text))
    return docs


def stdlib_docs(root: Path) -> list[Doc]:
    """One document per .py file of the Debian stdlib packages, minus generated files, sorted by path.

    Args:
        root: Folder with the unpacked ``libpython3.11-minimal`` and ``libpython3.11-stdlib`` packages.

    Returns:
        The unchanged source of every module, keyed by its path under ``Lib/``; a path in both packages
        is read from the later one.
    """
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
