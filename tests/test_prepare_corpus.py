"""scripts.prepare_corpus: a tokenizer.json trained here -> parquet / jsonl.zst / json.gz / datasets folders ->
exact shards -> 20 training steps; int32 shards above 65,535 tokens; bad inputs are one line, exit 2, and leave
nothing a re-run or the loader would trust."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from tokenizers import Tokenizer as HF
from tokenizers import models, pre_tokenizers, trainers

from dlm_titan.data import build_val_loader, general_corpus, prepare_split
from dlm_titan.data import readers as readers_mod
from dlm_titan.errors import UserError
from scripts import prepare_corpus
from tests.harness import run_trainer, tiny_run_args

REPO = Path(__file__).resolve().parents[1]
CHUNK = 64


def words_docs(seed: int, n: int, vocab: list[str]) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(vocab, size=rng.integers(3, 40))) for _ in range(n)]


WORDS = "the a cat dog sat ran on far mat away big small red blue one two three".split()


@pytest.fixture(scope="module")
def tok_json(tmp_path_factory) -> str:
    """A BPE tokenizer.json trained here with the tokenizers library; EOS is "</s>" (found by its name)."""
    folder = tmp_path_factory.mktemp("tok")
    tok = HF(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(words_docs(0, 200, WORDS), trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    return str(folder / "tokenizer.json")


def reference(tok_path: str, docs: list[str]) -> list[int]:
    """Documents as tokens + EOS, straight from the tokenizers library."""
    ref = HF.from_file(tok_path)
    eos = ref.token_to_id("</s>")
    return [t for d in docs for t in ref.encode(d, add_special_tokens=False).ids + [eos]]


def read_stream(folder: Path, prefix: str, code: int = 8) -> np.ndarray:
    """A stream's tokens, read by hand from its shards' bytes (header per DESIGN.md)."""
    dtype = {8: "<u2", 4: "<i4"}[code]
    parts = []
    for path in sorted(folder.glob(f"{prefix}_*.bin")):
        raw = path.read_bytes()
        magic, version, got, n = struct.unpack("<7sQBQ", raw[:24])
        assert (magic, version, got) == (b"LITPKDS", 1, code) and len(raw) == 24 + np.dtype(dtype).itemsize * n
        parts.append(np.frombuffer(raw[24:], dtype=dtype))
    return np.concatenate(parts)


def prepare_cli(src: Path | str, tok: str, dst: Path, prefix: str, *extra: str) -> SimpleNamespace:
    """``python -m scripts.prepare_corpus ...`` run in this process: (returncode, stdout, stderr)."""
    args = ["--source_path", str(src), "--tokenizer_path", tok, "--destination_path", str(dst), "--prefix", prefix,
            "--chunk_size", str(CHUNK), "--num_workers", "2", *extra]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = prepare_corpus.main(args)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.mark.slow
def test_parquet_and_jsonl_zst_to_twenty_training_steps(tmp_path: Path, tok_json: str):
    """Parquet (two files, column "body") and jsonl.zst sources through the CLI give exactly the tokenizers
    library's ids, and the real trainer trains 20 steps on the two as a mixture, with the tokenizer.json as
    data.tokenizer_path (checked against the manifests) and the model vocabulary set to the tokenizer's."""
    docs = {name: words_docs(seed, 30, WORDS) for seed, name in enumerate(["p0", "p1", "z"], 1)}
    (tmp_path / "pq").mkdir()
    for name in ("p0", "p1"):
        pq.write_table(pa.table({"id": list(range(30)), "body": docs[name]}), tmp_path / "pq" / f"{name}.parquet")
    (tmp_path / "zst" / "train").mkdir(parents=True)
    lines = "".join(json.dumps({"text": d, "meta": {"x": 1}}) + "\n" for d in docs["z"]).encode()
    (tmp_path / "zst" / "train" / "z.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    data = tmp_path / "data"

    done = prepare_cli(tmp_path / "pq", tok_json, data, "train_slim", "--text_field", "body")
    assert done.returncode == 0, done.stderr
    assert "train_slim: 2 files, 60 documents" in done.stdout
    done = prepare_cli(tmp_path / "zst", tok_json, data, "train_star", "--split", "train")
    assert done.returncode == 0, done.stderr
    for stream, name in enumerate(["p0", "p1"]):
        assert read_stream(data, f"train_slim_{stream:06d}").tolist() == reference(tok_json, docs[name])
    assert read_stream(data, "train_star_000000").tolist() == reference(tok_json, docs["z"])
    manifest = json.loads((data / "train_slim_manifest.json").read_text())
    assert manifest["corpus"] == "corpus" and manifest["text_field"] == "body" and manifest["dtype"] == "uint16"
    vocab = HF.from_file(tok_json).get_vocab_size()
    assert manifest["tokenizer"]["vocab_size"] == vocab and manifest["totals"]["documents"] == 60

    losses = run_trainer(tiny_run_args(data, tmp_path / "dump", vocab, 20, 4, 4, 0, "--data.tokenizer_path", tok_json,
                                       "--data.train_prefixes", "train_slim", "train_star",
                                       "--data.train_weights", "0.5", "0.5"))
    assert sorted(losses) == list(range(1, 21)) and all(math.isfinite(v) for v in losses.values())
    # the MDM loss of a uniform guess is ln(vocab) per token; after 20 steps it predicts better than that
    assert np.mean([losses[s] for s in range(16, 21)]) < math.log(vocab) - 0.3, losses


@pytest.mark.multiprocess
def test_json_gz_glob_txt_and_datasets_folders(tmp_path: Path, tok_json: str):
    docs = words_docs(5, 12, WORDS)
    (tmp_path / "raw").mkdir()
    with gzip.open(tmp_path / "raw" / "a.json.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[:6])
    (tmp_path / "raw" / "b.txt").write_text(docs[6])
    (tmp_path / "raw" / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[7:]))
    m = prepare_split(str(tmp_path / "raw" / "*.j*"), tok_json, str(tmp_path / "g"), "train",
                      corpus=general_corpus(), prefix="train_slim", chunk_size=CHUNK)
    assert sorted(m["inputs"]) == ["a.json.gz", "c.jsonl"]  # the glob, not the .txt beside them
    assert read_stream(tmp_path / "g", "train_slim_000000").tolist() == reference(tok_json, docs[:6])
    m = prepare_split(str(tmp_path / "raw"), tok_json, str(tmp_path / "t"), "train", corpus=general_corpus(),
                      prefix="train_slim", chunk_size=CHUNK)
    assert m["inputs"]["b.txt"]["documents"] == 1
    assert read_stream(tmp_path / "t", "train_slim_000001").tolist() == reference(tok_json, [docs[6]])

    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    m = prepare_split(str(tmp_path / "ds"), tok_json, str(tmp_path / "d"), "train", corpus=general_corpus(),
                      prefix="train_slim", chunk_size=CHUNK, num_workers=2)
    assert m["totals"]["inputs"] == 2 and m["totals"]["documents"] == 12
    both = [read_stream(tmp_path / "d", f"train_slim_{s:06d}").tolist() for s in range(2)]
    assert both[0] + both[1] == reference(tok_json, docs)  # shards of the arrow files, in order
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:3]}),
                          "test": datasets.Dataset.from_dict({"text": docs[3:5]})}).save_to_disk(str(tmp_path / "dd"))
    done = prepare_cli(tmp_path / "dd", tok_json, tmp_path / "v", "validation", "--split", "test")
    assert done.returncode == 0, done.stderr
    assert read_stream(tmp_path / "v", "validation_000000").tolist() == reference(tok_json, docs[3:5])
    bad = prepare_cli(tmp_path / "dd", tok_json, tmp_path / "v", "validation", "--split", "dev")
    assert bad.returncode == 2 and "has splits ['train', 'test'], not 'dev'" in bad.stderr


def test_datasets_folder_without_datasets_names_the_extra(tmp_path: Path, tok_json: str, monkeypatch):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data.arrow"}]}))
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(UserError, match=r'needs the datasets package: pip install -e "\.\[datasets\]"'):
        prepare_split(str(tmp_path / "ds"), tok_json, str(tmp_path / "o"), "train", corpus=general_corpus())
    assert not (tmp_path / "o").exists()
    assert readers_mod.DATASETS_EXTRA == 'pip install -e ".[datasets]"'


def test_vocab_above_65535_writes_and_reads_int32_shards(tmp_path: Path):
    """A 70,001-token WordLevel tokenizer: shards get dtype code 4 and int32 bytes with the ids of the words
    (known by construction), and the training loader reads those ids back."""
    vocab = {f"w{i}": i for i in range(70000)} | {"</s>": 70000}
    tok = HF(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "big.json"))
    ids = np.random.default_rng(0).integers(0, 70000, size=(8, 9))
    ids[0, :3] = [69999, 65535, 65536]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text("".join(json.dumps({"text": " ".join(f"w{i}" for i in row)}) + "\n"
                                                      for row in ids))
    m = prepare_split(str(tmp_path / "src"), str(tmp_path / "big.json"), str(tmp_path / "out"), "train",
                      corpus=general_corpus(), prefix="train_slim", chunk_size=40)
    assert m["dtype"] == "int32" and m["tokenizer"]["vocab_size"] == 70001
    want = np.concatenate([np.append(row, 70000) for row in ids])  # each document: its words, then EOS
    assert read_stream(tmp_path / "out", "train_slim_000000", code=4).tolist() == want.tolist()

    cfg = SimpleNamespace(val_prefix="train_slim", train_prefixes=["train_slim"], train_weights=[1.0],
                          tokenizer_path="", num_workers=0)
    loader = build_val_loader(cfg, data_path=str(tmp_path / "out"), seq_len=9, local_batch_size=1, dp_rank=0,
                              dp_world_size=1, vocab_size=70001)
    rows = [row for batch in loader for row in batch["input"].tolist()]
    shard_windows = [want[s + w * 10 : s + w * 10 + 10].tolist() for s in range(0, len(want), 40)
                     for w in range(min(40, len(want) - s) // 10)]  # windows never cross a shard
    assert rows == shard_windows and rows[0][:3] == [69999, 65535, 65536]


def failing_run(src: Path, tok: str, dst: Path, message: str, *extra: str) -> None:
    """The CLI fails with one line naming ``message``, exit 2."""
    done = prepare_cli(src, tok, dst, "train_slim", *extra)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
        done.stderr


@pytest.mark.slow
def test_bad_inputs_are_one_line_and_leave_nothing_trusted(tmp_path: Path, tok_json: str):
    """A missing text field, a corrupt parquet file and a gzip stream cut short each fail after shards of the bad
    input were written: those shards are removed (the loader would read them) and the manifest records only the
    inputs that finished, so a re-run after the fix does only the bad input and matches a clean run."""
    good = words_docs(8, 40, WORDS)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in good[:10]))
    many = "".join(json.dumps({"text": d}) + "\n" for d in good[10:] * 40)  # > 1024 documents: one batch written
    (src / "b.jsonl").write_text(many + '{"body": "x"}\n')
    out = tmp_path / "out"
    failing_run(src, tok_json, out, f"{src / 'b.jsonl'}:1201: record has no string field 'text'", "--num_workers", "1")

    def trusted() -> tuple[list[str], list[str]]:
        """(recorded inputs, streams with shards on disk); with nothing left over, the two match."""
        manifest = json.loads((out / "train_slim_manifest.json").read_text())["inputs"]
        assert not list(out.glob("*.tmp"))
        return sorted(manifest), sorted({p.name[:17] for p in out.glob("*.bin")})

    assert trusted() == (["a.jsonl"], ["train_slim_000000"])  # b's flushed shards are gone
    (src / "b.jsonl").write_text(many)
    blob = gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in good * 40).encode())
    (src / "c.json.gz").write_bytes(blob[: len(blob) * 3 // 4])  # cut short: an EOFError deep in the file
    failing_run(src, tok_json, out, f"{src / 'c.json.gz'}: can not be read", "--num_workers", "1")
    assert trusted() == (["a.jsonl", "b.jsonl"], ["train_slim_000000", "train_slim_000001"])
    (src / "b.jsonl").write_text(many + "\n")  # changed: redone, in parallel with c, which fails
    (out / "train_slim_manifest.json").write_text(json.dumps(
        {k: v for k, v in json.loads((out / "train_slim_manifest.json").read_text()).items() if k != "inputs"}
        | {"inputs": {}}))
    failing_run(src, tok_json, out, f"{src / 'c.json.gz'}: can not be read")  # 2 workers: b may or may not finish
    recorded, streams = trusted()
    assert "c.json.gz" not in recorded and streams == [f"train_slim_{['a.jsonl', 'b.jsonl'].index(r):06d}"
                                                       for r in recorded]  # c's worker was stopped mid-file
    (src / "c.json.gz").unlink()
    (src / "d.parquet").write_bytes(b"PAR1 not really parquet")
    failing_run(src, tok_json, out, f"{src / 'd.parquet'}: not a readable parquet file")
    (src / "d.parquet").unlink()
    pq.write_table(pa.table({"content": good[:2]}), src / "d.parquet")
    failing_run(src, tok_json, out, "d.parquet: has no column 'text' (columns: content); pass --text_field")
    (src / "d.parquet").unlink()
    clean = prepare_cli(src, tok_json, tmp_path / "clean", "train_slim")
    assert clean.returncode == 0 and prepare_cli(src, tok_json, out, "train_slim").returncode == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == \
           {p.name: p.read_bytes() for p in (tmp_path / "clean").iterdir()}


@pytest.mark.multiprocess
def test_tokenizer_without_eos_and_bad_options(tmp_path: Path):
    tok = HF(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    tok.save(str(tmp_path / "no_eos.json"))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text('{"text": "a b"}\n')
    done = subprocess.run([sys.executable, "-m", "scripts.prepare_corpus", "--source_path", str(tmp_path / "src"),
                           "--tokenizer_path", str(tmp_path / "no_eos.json"), "--destination_path",
                           str(tmp_path / "out"), "--prefix", "train_slim"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: tokenizer ") and "no_eos.json has no EOS token, which ends every " \
        "document; name eos_token in a tokenizer_config.json beside it" in done.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written
    failing_run(tmp_path / "src", str(tmp_path / "nope.json"), tmp_path / "out", "nope.json does not exist")
    failing_run(tmp_path / "src", "", tmp_path / "out", "--prefix '../up' must be a file-name part", "--prefix", "../up")
    failing_run(tmp_path / "src" / "*.parquet", "", tmp_path / "out", f"{tmp_path / 'src' / '*.parquet'} matches no "
                ".jsonl/")
    failing_run(tmp_path / "src", "", tmp_path / "out", "--text_field must name", "--text_field", "")
    assert not (tmp_path / "out").exists()
