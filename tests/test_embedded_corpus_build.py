"""The embedded corpus builder (scripts/embedded_corpus) on hand-made inputs, without apt or network.

The writers are also run on the records of the committed corpus: they must give back its files byte for byte,
so a change to the JSON lines, the file cut, the zstd settings or SOURCES.md shows up here and not only at the
next rebuild (which needs apt and is run by hand).
"""

import io
import json
import re
from pathlib import Path

import zstandard

from dlm_titan.assets import EMBEDDED_CORPUS_DIR
from scripts.embedded_corpus.bible import parse_verses, verse_docs
from scripts.embedded_corpus.doc import Doc
from scripts.embedded_corpus.provenance import LICENCE_FILES, copy_licences, write_sources_md
from scripts.embedded_corpus.python_sources import python_doc_docs, stdlib_docs
from scripts.embedded_corpus.shards import TRAIN_FILE_BYTES, write_split


def _committed_docs(split_name: str, pattern: str = "*.jsonl.zst") -> list[Doc]:
    """The committed records of a split as Docs, in file order (ids are not stored; the writers ignore them)."""
    docs = []
    for path in sorted((EMBEDDED_CORPUS_DIR / split_name / "chunk1").glob(pattern)):
        with path.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
            for line in io.TextIOWrapper(reader, encoding="utf-8"):
                record = json.loads(line)
                docs.append(Doc("?", record["meta"]["redpajama_set_name"], record["text"]))
    return docs


def test_write_split_gives_back_the_committed_files(tmp_path):
    validation = _committed_docs("validation")
    (written,) = write_split(validation, tmp_path / "v", "example_holdout", 1 << 62)
    assert (
        written.read_bytes()
        == (EMBEDDED_CORPUS_DIR / "validation/chunk1/example_holdout_0.jsonl.zst").read_bytes()
    )
    # The first train file alone: its documents fill exactly one file of TRAIN_FILE_BYTES.
    first_train = _committed_docs("train", "example_train_0.jsonl.zst")
    (written,) = write_split(first_train, tmp_path / "t", "example_train", TRAIN_FILE_BYTES)
    assert (
        written.read_bytes() == (EMBEDDED_CORPUS_DIR / "train/chunk1/example_train_0.jsonl.zst").read_bytes()
    )


def test_write_sources_md_gives_back_the_committed_file(tmp_path):
    committed = (EMBEDDED_CORPUS_DIR / "SOURCES.md").read_text(encoding="utf-8")
    versions = dict(re.findall(r"^\| ([a-z][\w.+-]*) \| (\d[\w.+~-]*) \|$", committed, flags=re.M))
    assert set(versions) == {
        "bible-kjv-text",
        "bible-kjv",
        "python3.11-doc",
        "libpython3.11-minimal",
        "libpython3.11-stdlib",
    }
    splits = {name: _committed_docs(name) for name in ("train", "validation")}
    write_sources_md(tmp_path, versions, splits)
    assert (tmp_path / "SOURCES.md").read_text(encoding="utf-8") == committed


def test_write_split_cuts_files_after_the_byte_budget(tmp_path):
    docs = [Doc("a", "S", "naïve"), Doc("b", "T", 'say "hi"\n'), Doc("c", "S", "x")]
    lines = [
        '{"text": "naïve", "meta": {"redpajama_set_name": "S"}}\n',  # 56 UTF-8 bytes: ï is not escaped
        '{"text": "say \\"hi\\"\\n", "meta": {"redpajama_set_name": "T"}}\n',
        '{"text": "x", "meta": {"redpajama_set_name": "S"}}\n',
    ]
    assert len(lines[0].encode("utf-8")) == 56
    # The first file reaches 56 >= 56 bytes after one document; the second passes 56 after its first too.
    paths = write_split(docs, tmp_path / "out", "example_train", 56)
    assert [p.name for p in paths] == [f"example_train_{i}.jsonl.zst" for i in range(3)]
    for path, line in zip(paths, lines, strict=True):
        raw = line.encode("utf-8")
        assert zstandard.ZstdDecompressor().decompress(path.read_bytes()) == raw
        assert path.read_bytes() == zstandard.ZstdCompressor(level=19).compress(raw)
    # One byte more budget: the first file takes two documents (56 < 57, then over it).
    paths = write_split(docs, tmp_path / "out2", "example_train", 57)
    raws = [zstandard.ZstdDecompressor().decompress(p.read_bytes()).decode("utf-8") for p in paths]
    assert raws == [lines[0] + lines[1], lines[2]]


def test_bible_listing_becomes_documents_of_five_chapters_per_book():
    listing = "Gen1:1 In the beginning \n\nGen1:2 And the earth\n" + "".join(
        f"Gen{c}:1 Verse of chapter {c}\n" for c in range(2, 7)
    )
    listing += "Exo1:1 Now these\n1Sa1:1 Now there was\n"
    verses = parse_verses(listing)
    assert verses[:2] == [(0, 1, 1, "In the beginning"), (0, 1, 2, "And the earth")]
    assert verses[-2:] == [(1, 1, 1, "Now these"), (2, 1, 1, "Now there was")]
    docs = verse_docs(verses)
    assert [d.doc_id for d in docs] == [
        "kjv/01-Genesis/001-005",
        "kjv/01-Genesis/006-006",
        "kjv/02-Exodus/001-001",
        "kjv/03-Leviticus/001-001",  # the book index, not the abbreviation, names the book
    ]
    assert {d.set_name for d in docs} == {"RedPajamaBook"}
    assert docs[0].text == (
        "Genesis 1\n\n1 In the beginning\n2 And the earth\n\n"
        "Genesis 2\n\n1 Verse of chapter 2\n\nGenesis 3\n\n1 Verse of chapter 3\n\n"
        "Genesis 4\n\n1 Verse of chapter 4\n\nGenesis 5\n\n1 Verse of chapter 5\n"
    )
    assert docs[1].text == "Genesis 6\n\n1 Verse of chapter 6\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_python_doc_pages_skip_index_search_and_sphinx_internals(tmp_path):
    html = tmp_path / "python3.11-doc/usr/share/doc/python3.11/html"
    page = '<div class="sidebar">nav</div><div role="main"><h1>{}</h1><p>Body  text.</p></div>'
    for rel in ("index.html", "library/os.html", "genindex-A.html", "search.html", "contents.html"):
        _write(html / rel, page.format(rel))
    _write(html / "_static/page.html", page.format("static"))
    docs = python_doc_docs(tmp_path)
    assert [(d.doc_id, d.set_name, d.text) for d in docs] == [
        ("python3.11-doc/index.html", "RedPajamaCommonCrawl", "index.html\n\nBody text.\n"),
        ("python3.11-doc/library/os.html", "RedPajamaCommonCrawl", "library/os.html\n\nBody text.\n"),
    ]


def test_stdlib_files_skip_generated_and_architecture_specific_modules(tmp_path):
    minimal = tmp_path / "libpython3.11-minimal/usr/lib/python3.11"
    stdlib = tmp_path / "libpython3.11-stdlib/usr/lib/python3.11"
    _write(minimal / "os.py", "import sys\n")
    _write(minimal / "_sysconfigdata__linux_x86_64-linux-gnu.py", "build_time_vars = {}\n")
    _write(stdlib / "json/__init__.py", "  # indentation kept\n")
    _write(
        stdlib / "encodings/cp037.py", '""" Python Character Mapping Codec generated with gencodec.py. """\n'
    )
    _write(stdlib / "pydoc_data/topics.py", "topics = {}\n")
    (stdlib / "os_link.py").symlink_to(minimal / "os.py")
    docs = stdlib_docs(tmp_path)
    assert [(d.doc_id, d.set_name, d.text) for d in docs] == [
        ("cpython3.11/Lib/json/__init__.py", "RedPajamaGithub", "  # indentation kept\n"),
        ("cpython3.11/Lib/os.py", "RedPajamaGithub", "import sys\n"),
    ]


def test_copy_licences_writes_each_copyright_file_under_its_corpus_name(tmp_path):
    for name, rel in LICENCE_FILES.items():
        _write(tmp_path / "root" / rel, f"copyright of {name}\n")
    copy_licences(tmp_path / "root", tmp_path / "corpus")
    assert {p.name: p.read_text() for p in (tmp_path / "corpus/licenses").iterdir()} == {
        "bible-kjv-text.copyright": "copyright of bible-kjv-text.copyright\n",
        "python3.11.copyright": "copyright of python3.11.copyright\n",
    }
