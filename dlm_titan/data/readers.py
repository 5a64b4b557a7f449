"""Corpus readers: which files a source holds, and the documents of each file.

A source is a folder (``{source}/{split}`` when that exists, else the folder itself, searched recursively), a
glob of files, one file, or a Hugging Face ``datasets`` folder written by ``save_to_disk`` (a ``Dataset``, or a
``DatasetDict`` whose ``{split}`` is read). Each file is one input of the preparation (one stream of shards).

Documents per file kind:

- ``.jsonl``, ``.jsonl.zst``, ``.json.gz``, ``.jsonl.gz``: one JSON record per line; the document is its text
  field (blank lines are skipped; a record without a string text field is an error naming file and line).
- ``.parquet`` (pyarrow): the text column, one document per row.
- ``.arrow`` files of a ``datasets`` folder (needs the ``datasets`` extra): the text column, one per row.
- ``.txt``: the whole file is one document.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from dlm_titan.errors import UserError

JSON_LINES = (".jsonl", ".jsonl.zst", ".json.gz", ".jsonl.gz")
DATASETS_EXTRA = 'pip install -e ".[datasets]"'


@dataclass(frozen=True)
class Corpus:
    """How to read one kind of corpus.

    Attributes:
        name: recorded in the manifest and, for the named corpora, the output name (``train_slimpajama_...``).
        text_field: JSON field / parquet or datasets column holding the document.
        set_field: dotted path of the JSON field naming the document's subset, or "" for none.
        extensions: accepted input file endings (a ``datasets`` folder is accepted by every corpus).
    """

    name: str
    text_field: str
    set_field: str
    extensions: tuple[str, ...]

    def settings(self) -> dict:
        """What a manifest records about the corpus, so a re-run with other settings is refused."""
        if self.name != GENERAL_NAME:
            return {"corpus": self.name}  # manifests of the named corpora never recorded the fixed field
        return {"corpus": self.name, "text_field": self.text_field}


GENERAL_NAME = "corpus"
SLIMPAJAMA = Corpus("slimpajama", "text", "meta.redpajama_set_name", (".jsonl", ".jsonl.zst", ".txt"))
STARCODER = Corpus("starcoder", "content", "", (".parquet", ".jsonl", ".jsonl.zst"))


def general_corpus(text_field: str = "text") -> Corpus:
    """Any corpus of jsonl / jsonl.zst / json.gz / parquet / txt files (or a ``datasets`` folder)."""
    if not text_field:
        raise UserError("--text_field must name the field that holds each document's text")
    return Corpus(GENERAL_NAME, text_field, "", (*JSON_LINES, ".parquet", ".txt"))


def import_datasets():
    """The ``datasets`` module, or UserError naming the extra that installs it."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"reading a Hugging Face datasets folder needs the datasets package: {DATASETS_EXTRA}"
                        ) from None
    return datasets


def _datasets_files(folder: Path, split: str) -> tuple[Path, list[str]] | None:
    """(root, arrow files) of a ``save_to_disk`` folder, or None if ``folder`` is not one."""
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{folder / 'dataset_dict.json'} is damaged ({e}); save the dataset again") from None
        if split not in splits:
            raise UserError(f"datasets folder {folder} has splits {splits}, not {split!r}; pass --split with one")
        folder = folder / split
    elif not (folder / "state.json").is_file() or not (folder / "dataset_info.json").is_file():
        return None
    import_datasets()
    try:
        files = [f["filename"] for f in json.loads((folder / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{folder / 'state.json'} is damaged ({e}); save the dataset again") from None
    return folder, sorted(files)


def _glob_root(pattern: str) -> Path:
    """The deepest folder of ``pattern`` without glob characters."""
    parts = Path(pattern).parts
    fixed = parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]
    return Path(*fixed) if fixed else Path(".")


def find_inputs(source_path: str, split: str, corpus: Corpus) -> tuple[Path, list[str]]:
    """Input files, sorted, relative to the root they are found under (see the module docstring)."""
    accepted = "/".join(corpus.extensions)
    if glob.has_magic(source_path):
        root = _glob_root(source_path)
        files = sorted(str(Path(p).relative_to(root)) for p in glob.glob(source_path, recursive=True)
                       if Path(p).is_file() and p.endswith(corpus.extensions))
        if not files:
            raise UserError(f"--source_path {source_path} matches no {accepted} file")
        return root, files
    source = Path(source_path)
    if source.is_file():
        if not source.name.endswith(corpus.extensions):
            raise UserError(f"--source_path {source} is not a {accepted} file")
        return source.parent, [source.name]
    if not source.is_dir():
        raise UserError(f"source folder {source} does not exist; pass --source_path with the corpus folder")
    found = _datasets_files(source, split)
    if found is not None:
        return found
    root = source / split if (source / split).is_dir() else source
    found = _datasets_files(root, split)
    if found is not None:
        return found
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                   if p.is_file() and p.name.endswith(corpus.extensions))
    if not files:
        raise UserError(f"source folder {root} holds no {accepted} files; pass --source_path with SlimPajama's "
                        f"layout ({split}/chunk*/*.jsonl.zst), a folder or glob of such files, or a datasets folder")
    return root, files


def iter_documents(path: Path, corpus: Corpus) -> Iterator[tuple[str, str]]:
    """(text, set name) of every document of one input file; UserError naming the file when it can not be read
    (not UTF-8, a damaged zstd/gzip/parquet/arrow file)."""
    try:
        yield from _iter_documents(path, corpus)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8 or remove "
                        "it") from None
    except zstandard.ZstdError as e:
        raise UserError(f"{path}: not a readable zstd file ({e}); download it again or remove it") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a cut gzip stream an EOFError
        raise UserError(f"{path}: can not be read ({e}); download it again or remove it") from None


def _iter_documents(path: Path, corpus: Corpus) -> Iterator[tuple[str, str]]:
    name = path.name
    if name.endswith(".txt"):
        yield path.read_text(encoding="utf-8"), ""
    elif name.endswith(".parquet"):
        yield from _iter_table(path, corpus, _parquet_batches)
    elif name.endswith(".arrow"):
        yield from _iter_table(path, corpus, _datasets_batches)
    else:
        yield from _iter_json_lines(path, corpus)


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    raw = open(path, "rb")
    if path.name.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return io.TextIOWrapper(raw, encoding="utf-8")


def _field(record: dict, dotted: str) -> object:
    value: object = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _iter_json_lines(path: Path, corpus: Corpus) -> Iterator[tuple[str, str]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line") from None
            text = record.get(corpus.text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno}: record has no string field {corpus.text_field!r}; pass "
                                "--text_field with the field that holds the text")
            subset = _field(record, corpus.set_field) if corpus.set_field else ""
            yield text, subset if isinstance(subset, str) else ""


def _parquet_batches(path: Path, field: str) -> tuple[list[str], Iterator[list]]:
    """(column names, batches of the text column) of a parquet file."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    return names, (b.column(0).to_pylist() for b in pf.iter_batches(columns=[field])) if field in names else iter(())


def _datasets_batches(path: Path, field: str) -> tuple[list[str], Iterator[list]]:
    """(column names, batches of the text column) of one arrow file of a ``save_to_disk`` folder."""
    dataset = import_datasets().Dataset.from_file(str(path))
    names = list(dataset.column_names)
    if field not in names:
        return names, iter(())
    return names, (b[field] for b in dataset.select_columns([field]).iter(batch_size=1024))


def _iter_table(path: Path, corpus: Corpus, batches) -> Iterator[tuple[str, str]]:
    """Documents of a columnar file: one per row of the text column; UserError for a damaged file, a missing
    column or a row without text."""
    try:
        import pyarrow as pa
    except ImportError:
        raise UserError(f"{path}: reading {path.suffix[1:]} needs pyarrow (pip install pyarrow), or convert the "
                        f"files to .jsonl with a {corpus.text_field!r} field") from None
    field = corpus.text_field
    try:
        names, column = batches(path, field)
        if field not in names:
            raise UserError(f"{path}: has no column {field!r} (columns: {', '.join(names)}); pass --text_field "
                            "with the column that holds the text")
        row = 0
        for texts in column:
            for text in texts:
                if not isinstance(text, str):
                    raise UserError(f"{path}: row {row} of column {field!r} is {type(text).__name__}, not text")
                yield text, ""
                row += 1
    except pa.ArrowException as e:
        raise UserError(f"{path}: not a readable {path.suffix[1:]} file ({e}); write it again or remove it") from None
