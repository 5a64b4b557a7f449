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
level, so a rerun with the same package versions writes identical bytes. The steps live in
``scripts/embedded_corpus/``; this script only chains them.

Usage::

    python -m scripts.build_embedded_corpus [--output dlm_titan/assets/corpus] [--deb_dir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from scripts.cli import HelpFormatter
from scripts.embedded_corpus.bible import bible_docs
from scripts.embedded_corpus.debian import PACKAGES, fetch_packages, unpack
from scripts.embedded_corpus.doc import Doc
from scripts.embedded_corpus.provenance import copy_licences, write_sources_md
from scripts.embedded_corpus.python_sources import python_doc_docs, stdlib_docs
from scripts.embedded_corpus.shards import TRAIN_FILE_BYTES, write_split
from scripts.embedded_corpus.split import clean, split


def build(output: Path, deb_dir: Path, any_version: bool) -> None:
    """Fetch, convert, split and write the corpus into output (replacing its split folders).

    Args:
        output: Corpus folder to write.
        deb_dir: Folder for (or with already downloaded) .deb files.
        any_version: Accept whatever package versions apt offers instead of the pinned ones.
    """
    with tempfile.TemporaryDirectory(prefix="dlm_corpus_") as tmp:
        root = Path(tmp)
        print(f"fetching {len(PACKAGES)} Debian packages into {deb_dir}", flush=True)
        versions = fetch_packages(deb_dir, any_version)
        unpack(deb_dir, root)
        splits = split(clean(read_docs(root)))
        written = write_corpus(output, root, versions, splits)
    for path in written:
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    for name, members in splits.items():
        print(f"{name}: {len(members)} documents, {sum(len(d.text) for d in members):,} characters")


def read_docs(root: Path) -> list[Doc]:
    """Documents of every source, printing the count of each.

    Args:
        root: Folder with the unpacked packages.

    Returns:
        The Bible, Python documentation and standard library documents, in that order.
    """
    docs = []
    for name, reader in tqdm(
        [("bible", bible_docs), ("python docs", python_doc_docs), ("stdlib", stdlib_docs)],
        desc="reading sources",
    ):
        found = reader(root)
        print(f"  {name}: {len(found)} documents", flush=True)
        docs += found
    return docs


def write_corpus(
    output: Path, root: Path, versions: dict[str, str], splits: dict[str, list[Doc]]
) -> list[Path]:
    """Replace the split folders of output and write the shards, licences and SOURCES.md.

    Args:
        output: Corpus folder.
        root: Folder with the unpacked packages (for their copyright files).
        versions: Package name -> version, for SOURCES.md.
        splits: ``{"train": [...], "validation": [...]}`` from split().

    Returns:
        The shard files written: train files, then the single validation file.
    """
    for folder in ("train", "validation"):
        shutil.rmtree(output / folder, ignore_errors=True)
    written = write_split(splits["train"], output / "train/chunk1", "example_train", TRAIN_FILE_BYTES)
    # 1 << 62: no size limit, so validation is always the single file example_holdout_0.
    written += write_split(splits["validation"], output / "validation/chunk1", "example_holdout", 1 << 62)
    copy_licences(root, output)
    write_sources_md(output, versions, splits)
    return written


def main(argv: list[str] | None = None) -> None:
    """Parse the flags and build the corpus, in a temporary .deb folder unless --deb_dir is given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument(
        "--output", type=Path, default=Path("dlm_titan/assets/corpus"), help="corpus folder to write"
    )
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
