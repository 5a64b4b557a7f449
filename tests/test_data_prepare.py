"""prepare_slim_pajama / prepare_starcoder: exact tokens vs SentencePiece, worker-count invariance, manifest,
re-runs, bad inputs, and the embedded-corpus cache."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm
import zstandard
from harness import train_tiny_sentencepiece

from dlm_titan.data import (
    STARCODER,
    build_train_loader,
    build_val_loader,
    load_tokenizer,
    prepare_split,
    resolve_data_path,
)
from dlm_titan.data import embedded as embedded_mod
from dlm_titan.data import prepare as prepare_mod
from dlm_titan.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CHUNK = 100


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    return train_tiny_sentencepiece(tmp_path_factory.mktemp("tok"))


def random_docs(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join("".join(rng.choice(list("abcdefghij kl\nmnop"), size=rng.integers(1, 9)))
                     for _ in range(rng.integers(1, 60))) for _ in range(n)]


def jsonl(docs: list[tuple[str, str]]) -> bytes:
    return "".join(json.dumps({"text": t, "meta": {"redpajama_set_name": s}}) + "\n" for t, s in docs).encode()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, list[tuple[str, str]]]]:
    """SlimPajama layout with a .jsonl.zst, a .jsonl and a .txt input; returns docs per input (sorted order)."""
    root = tmp_path_factory.mktemp("corpus")
    sets = ["RedPajamaC4", "RedPajamaGithub", "RedPajamaBook"]
    a = [(t, sets[i % 3]) for i, t in enumerate(random_docs(1, 40))]
    b = [(t, sets[(i + 1) % 3]) for i, t in enumerate(random_docs(2, 25))]
    c = random_docs(3, 1)[0] * 3
    v = [(t, "RedPajamaC4") for t in random_docs(4, 10)]
    for sub in ("train/chunk1", "train/chunk2", "validation/chunk1"):
        (root / sub).mkdir(parents=True)
    (root / "train/chunk1/a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(a)))
    (root / "train/chunk2/b.jsonl").write_bytes(jsonl(b))
    (root / "train/chunk2/c.txt").write_text(c)
    (root / "validation/chunk1/v.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(v)))
    return root, {"chunk1/a.jsonl.zst": a, "chunk2/b.jsonl": b, "chunk2/c.txt": [(c, "")], "v": v}


def read_stream(folder: Path, prefix: str) -> tuple[np.ndarray, list[int]]:
    """Tokens of a stream's shards in order, read by hand, and each shard's header chunk_size."""
    tokens, sizes = [], []
    for path in sorted(folder.glob(f"{prefix}_*.bin")):
        raw = path.read_bytes()
        magic, version, code, n = struct.unpack("<7sQBQ", raw[:24])
        assert (magic, version, code) == (b"LITPKDS", 1, 8) and len(raw) == 24 + 2 * n
        tokens.append(np.frombuffer(raw[24:], dtype="<u2"))
        sizes.append(n)
    return np.concatenate(tokens), sizes


def reference(tokenizer: str, docs: list[tuple[str, str]]) -> list[int]:
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    return [t for text, _ in docs for t in sp.encode(text) + [sp.eos_id()]]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_prepare_tokens_exact_and_worker_invariant(tmp_path: Path, corpus, tokenizer):
    root, docs = corpus
    one, two = tmp_path / "one", tmp_path / "two"
    m1 = prepare_split(str(root), tokenizer, str(one), "train", chunk_size=CHUNK, num_workers=1)
    prepare_split(str(root), tokenizer, str(two), "train", chunk_size=CHUNK, num_workers=2)
    assert snapshot(one) == snapshot(two)  # same names, same bytes, same manifest

    for stream, rel in enumerate(["chunk1/a.jsonl.zst", "chunk2/b.jsonl", "chunk2/c.txt"]):
        tokens, sizes = read_stream(one, f"train_slimpajama_{stream:06d}")
        want = reference(tokenizer, docs[rel])
        assert tokens.tolist() == want  # documents = tokens + EOS, nothing dropped, no padding
        assert all(s == CHUNK for s in sizes[:-1]) and 0 < sizes[-1] <= CHUNK  # last chunk: true length
        assert m1["inputs"][rel]["tokens"] == len(want) and m1["inputs"][rel]["documents"] == len(docs[rel])

    assert m1["tokenizer"]["sha256"] == hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest()
    assert m1["tokenizer"]["vocab_size"] == 300
    all_docs = docs["chunk1/a.jsonl.zst"] + docs["chunk2/b.jsonl"] + docs["chunk2/c.txt"]
    for name in ("RedPajamaC4", "RedPajamaGithub", "RedPajamaBook"):
        mine = [d for d in all_docs if d[1] == name]
        assert m1["sets"][name] == {"documents": len(mine), "tokens": len(reference(tokenizer, mine))}
    assert m1["sets"]["unlabelled"]["documents"] == 1  # the .txt file is one document
    assert m1["totals"]["tokens"] == len(reference(tokenizer, all_docs))


def test_skip_github_and_validation_split(tmp_path: Path, corpus, tokenizer):
    root, docs = corpus
    m = prepare_split(str(root), tokenizer, str(tmp_path), "train", chunk_size=CHUNK, skip_github=True)
    kept = [d for d in docs["chunk1/a.jsonl.zst"] if d[1] != "RedPajamaGithub"]
    assert read_stream(tmp_path, "train_slimpajama_000000")[0].tolist() == reference(tokenizer, kept)
    assert "RedPajamaGithub" not in m["sets"]
    assert m["totals"]["skipped_documents"] == sum(d[1] == "RedPajamaGithub" for rel in
                                                  ("chunk1/a.jsonl.zst", "chunk2/b.jsonl") for d in docs[rel])
    prepare_split(str(root), tokenizer, str(tmp_path), "validation", chunk_size=CHUNK)
    tokens, _ = read_stream(tmp_path, "validation_slimpajama_000000")
    assert tokens.tolist() == reference(tokenizer, docs["v"])


def test_rerun_skips_done_inputs_and_redoes_broken_ones(tmp_path: Path, corpus, tokenizer, monkeypatch):
    root, _ = corpus
    prepare_split(str(root), tokenizer, str(tmp_path), "train", chunk_size=CHUNK, percentage=0.5)
    assert sorted({p.name[:23] for p in tmp_path.glob("*.bin")}) == [
        "train_slimpajama_000000", "train_slimpajama_000001"]  # ceil(3 * 0.5) = 2 of 3 inputs
    prepare_split(str(root), tokenizer, str(tmp_path), "train", chunk_size=CHUNK)
    before = snapshot(tmp_path)
    calls = []
    real = prepare_mod.process_input
    monkeypatch.setattr(prepare_mod, "process_input", lambda job, progress: calls.append(job.relpath) or
                        real(job, progress))
    prepare_split(str(root), tokenizer, str(tmp_path), "train", chunk_size=CHUNK)
    assert calls == []
    (tmp_path / "train_slimpajama_000001_0000000000.bin").unlink()
    (tmp_path / "train_slimpajama_000001_0000000001.bin").write_bytes(b"LITPKDS")  # a broken leftover
    prepare_split(str(root), tokenizer, str(tmp_path), "train", chunk_size=CHUNK)
    assert calls == ["chunk2/b.jsonl"] and snapshot(tmp_path) == before
    with pytest.raises(UserError, match="another chunk_size"):
        prepare_split(str(root), tokenizer, str(tmp_path), "train", chunk_size=CHUNK + 1)


def test_rerun_refuses_a_changed_file_list(tmp_path: Path, corpus, tokenizer):
    root, _ = corpus
    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    for name in ("chunk2/b.jsonl", "chunk2/c.txt"):
        (src / "train" / Path(name).name).write_bytes((root / "train" / name).read_bytes())
    prepare_split(str(src), tokenizer, str(tmp_path / "out"), "train", chunk_size=CHUNK)
    (src / "train" / "a.jsonl").write_text('{"text": "new"}\n')  # sorts first: every stream index moves
    with pytest.raises(UserError, match="b.jsonl was input 0, now 1"):
        prepare_split(str(src), tokenizer, str(tmp_path / "out"), "train", chunk_size=CHUNK)


def test_starcoder_source(tmp_path: Path, tokenizer):
    src = tmp_path / "src"
    src.mkdir()
    code = random_docs(7, 5)
    (src / "part.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in code))
    m = prepare_split(str(src), tokenizer, str(tmp_path / "out"), "train", chunk_size=CHUNK, corpus=STARCODER)
    tokens, _ = read_stream(tmp_path / "out", "train_starcoder_000000")
    assert tokens.tolist() == reference(tokenizer, [(t, "") for t in code])
    assert (tmp_path / "out" / "train_starcoder_manifest.json").exists() and m["corpus"] == "starcoder"

    (src / "part.jsonl").unlink()
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        (src / "part.parquet").write_bytes(b"PAR1")
        with pytest.raises(UserError, match="part.parquet: reading parquet needs pyarrow"):
            prepare_split(str(src), tokenizer, str(tmp_path / "pq"), "train", corpus=STARCODER)
    else:
        pq.write_table(pa.table({"content": code}), src / "part.parquet")
        prepare_split(str(src), tokenizer, str(tmp_path / "pq"), "train", chunk_size=CHUNK, corpus=STARCODER)
        assert read_stream(tmp_path / "pq", "train_starcoder_000000")[0].tolist() == tokens.tolist()


def test_bad_inputs_name_the_file(tmp_path: Path, tokenizer):
    with pytest.raises(UserError, match=f"source folder {tmp_path / 'nope'} does not exist"):
        prepare_split(str(tmp_path / "nope"), tokenizer, str(tmp_path / "o"), "train")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match=f"source folder {tmp_path / 'empty' / 'train'} holds no"):
        prepare_split(str(tmp_path / "empty"), tokenizer, str(tmp_path / "o"), "train")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text('{"text": "fine"}\n')
    (bad / "x.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(UserError, match=f"{bad / 'x.jsonl'}:2: not valid JSON"):
        prepare_split(str(bad), tokenizer, str(tmp_path / "o"), "train")
    done = json.loads((tmp_path / "o" / "train_slimpajama_manifest.json").read_text())["inputs"]
    assert list(done) == ["a.jsonl"]  # the input finished before the error is kept for a re-run
    (bad / "x.jsonl").write_text('{"content": "code"}\n')
    with pytest.raises(UserError, match=f"{bad / 'x.jsonl'}:1: record has no string field 'text'"):
        prepare_split(str(bad), tokenizer, str(tmp_path / "o"), "train", num_workers=2)
    with pytest.raises(UserError, match="tokenizer .*missing.model does not exist"):
        prepare_split(str(bad), str(tmp_path / "missing.model"), str(tmp_path / "o"), "train")


def test_unreadable_inputs_and_outputs_name_the_file(tmp_path: Path, tokenizer):
    """Corrupt zstd, non-UTF-8 text, a damaged manifest and a destination that is a file: one UserError each,
    naming the file (not a zstandard, codec or JSON traceback)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl.zst").write_bytes(b"\x00\x01 not zstd at all" * 10)
    with pytest.raises(UserError, match=f"{src / 'a.jsonl.zst'}: not a readable zstd file"):
        prepare_split(str(src), tokenizer, str(tmp_path / "o1"), "train")
    (src / "a.jsonl.zst").unlink()
    (src / "b.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match=f"{src / 'b.jsonl'}: not UTF-8 text"):
        prepare_split(str(src), tokenizer, str(tmp_path / "o2"), "train")
    (src / "b.jsonl").write_text('{"text": "fine"}\n')
    out = tmp_path / "o3"
    prepare_split(str(src), tokenizer, str(out), "train")
    (out / "train_slimpajama_manifest.json").write_text('{"inputs": {')
    with pytest.raises(UserError, match="train_slimpajama_manifest.json is not a valid manifest"):
        prepare_split(str(src), tokenizer, str(out), "train")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file; pass a folder"):
        prepare_split(str(src), tokenizer, str(tmp_path / "file"), "train")


def test_training_checks_the_manifest_tokenizer_at_start(tmp_path: Path, corpus, tokenizer):
    """Shards prepared with a 300-piece tokenizer: a 256-token model, or another tokenizer named as
    data.tokenizer_path, is refused when the loader is built, before any shard is read."""
    from dlm_titan.config import Data

    out = tmp_path / "out"
    prepare_split(str(corpus[0]), tokenizer, str(out), "train")
    other = tmp_path / "other"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["zz yy xx ww"] * 50 + ["a b c d e f g"] * 50),
                                   model_prefix=str(other), vocab_size=30, model_type="bpe", minloglevel=2)

    def build(vocab: int, tokenizer_path: str = ""):
        cfg = Data(path=str(out), train_prefixes=["train_slimpajama"], tokenizer_path=tokenizer_path, num_workers=0)
        return build_train_loader(cfg, data_path=str(out), seq_len=8, local_batch_size=2, global_batch_size=2,
                                  dp_rank=0, dp_world_size=1, seed=0, vocab_size=vocab)

    with pytest.raises(UserError, match="made with tokenizer tiny.model of 300 tokens, more than model.vocab_size=256"):
        build(256)
    with pytest.raises(UserError, match=f"not data.tokenizer_path {other}.model"):
        build(512, f"{other}.model")
    build(512, tokenizer)  # the shards' own tokenizer
    build(300)
    # another preparation in the same folder, which this run's prefix does not select, is not its business
    (out / "train_starcoder_manifest.json").write_text(json.dumps({"tokenizer": {"file": "big.model",
                                                                                "vocab_size": 99999}}))
    build(300)


def test_parallel_prepare_records_every_finished_input_before_raising():
    """With several workers, an input that fails must not hide inputs that finished in the same poll: they are
    recorded (and so skipped by a re-run) before the error propagates. Both futures of the parallel run's
    collector are done at the first poll, the failing one first."""
    bad, good = Future(), Future()
    bad.set_exception(UserError("bad: not valid JSON"))
    good.set_result(("good", {"tokens": 1}))
    counters = (SimpleNamespace(value=0), SimpleNamespace(value=0))
    done = {}
    bar = SimpleNamespace(update=lambda n: None, set_postfix=lambda **k: None)
    with pytest.raises(UserError, match="bad: not valid JSON"):
        prepare_mod._collect([bad, good], bar, counters, lambda rel, entry: done.setdefault(rel, entry))
    assert done == {"good": {"tokens": 1}}


@pytest.mark.multiprocess
def test_cli_user_error_is_one_line_exit_2(tmp_path: Path, tokenizer):
    (tmp_path / "src").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.prepare_slim_pajama", "--source_path", str(tmp_path / "src"),
         "--tokenizer_path", tokenizer, "--destination_path", str(tmp_path / "out"), "--split", "train"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: source folder ")
    assert str(tmp_path / "src") in proc.stderr


def test_tokenizer_wrapper_and_vocab_limit(tmp_path: Path, tokenizer):
    tok = load_tokenizer(tokenizer)
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    assert tok.encode("abc def") == sp.encode("abc def") + [sp.eos_id()]
    assert tok.encode("abc", bos=True, eos=False) == [sp.bos_id()] + sp.encode("abc")
    assert tok.decode(tok.encode("abc def")) == "abc def" and tok.vocab_size == 300
    with pytest.raises(UserError, match="has 300 tokens, more than model.vocab_size=200"):
        load_tokenizer(tokenizer, max_vocab_size=200)
    (tmp_path / "train_slimpajama_0.bin").write_bytes(struct.pack("<7sQBQ", b"LITPKDS", 1, 8, 8) + bytes(16))
    c = SimpleNamespace(train_prefixes=["train_slim"], train_weights=[1.0], tokenizer_path=tokenizer,
                        num_workers=0)
    with pytest.raises(UserError, match="more than model.vocab_size=256"):
        build_train_loader(c, data_path=str(tmp_path), seq_len=3, local_batch_size=1, global_batch_size=1,
                           dp_rank=0, dp_world_size=1, seed=0, vocab_size=256)


def test_embedded_corpus_prepared_once_and_shared(tmp_path: Path, corpus, tokenizer, monkeypatch):
    root, docs = corpus
    monkeypatch.setattr(embedded_mod, "embedded_corpus_dir", lambda: root)
    monkeypatch.setattr(embedded_mod, "EMBEDDED_CHUNK_SIZE", 64)
    monkeypatch.setenv("DLM_TITAN_CACHE", str(tmp_path / "cache"))
    calls = []
    real = embedded_mod.prepare_split
    monkeypatch.setattr(embedded_mod, "prepare_split", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    cfg = SimpleNamespace(path="", tokenizer_path=tokenizer, train_prefixes=["train_slim"], train_weights=[1.0],
                          val_prefix="validation", num_workers=0)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_data_path(cfg))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and calls == ["train", "validation"]  # two "ranks", one preparation
    path = Path(results[0])
    assert path.parent == tmp_path / "cache" and path.name.startswith("embedded-")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()) == [path.name]  # no temp left
    assert resolve_data_path(cfg) == str(path) and len(calls) == 2  # cached
    direct = tmp_path / "direct"
    for split in ("train", "validation"):
        prepare_split(str(root), tokenizer, str(direct), split, chunk_size=64)
    assert snapshot(path) == snapshot(direct)  # the same code path as the script
    batch = next(iter(build_train_loader(cfg, data_path=str(path), seq_len=15, local_batch_size=2,
                                         global_batch_size=4, dp_rank=0, dp_world_size=1, seed=0,
                                         vocab_size=300)))
    assert batch["input"].shape == (2, 16) and int(batch["input"].max()) < 300
    val = build_val_loader(cfg, data_path=str(path), seq_len=15, local_batch_size=2, dp_rank=0, dp_world_size=1)
    n_tokens = len(reference(tokenizer, docs["v"]))
    n_windows = n_tokens // 64 * (64 // 16) + n_tokens % 64 // 16  # windows never cross shards
    assert len(list(val)) == n_windows // 2
