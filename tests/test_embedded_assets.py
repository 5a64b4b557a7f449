"""The embedded corpus and tokenizer: SlimPajama layout, record shape, disjoint splits, LLaMA-like tokenizer.

Also checks the pure parts of the two build scripts (HTML to text, dedup and split, tokenizer determinism) on
small hand-written inputs; the full build needs apt and is run by hand.
"""

import io
import json
import re
from pathlib import Path

import pytest
import sentencepiece as spm
import zstandard

from dlm_titan.assets import EMBEDDED_CORPUS_DIR, EMBEDDED_TOKENIZER_PATH
from scripts.embedded_corpus.doc import Doc
from scripts.embedded_corpus.sphinx_text import html_to_text
from scripts.embedded_corpus.split import clean, split
from scripts.train_tokenizer import corpus_files, train

# fmt: off
SLIMPAJAMA_SETS = {
    "RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub", "RedPajamaBook", "RedPajamaArXiv",
    "RedPajamaWikipedia", "RedPajamaStackExchange",
}
# fmt: on


def _read_records(path: Path) -> list[dict]:
    # Stream-decode like a SlimPajama reader: frames need not store their content size.
    with path.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
        return [json.loads(line) for line in io.TextIOWrapper(reader, encoding="utf-8")]


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {
        name: [
            r
            for path in sorted(EMBEDDED_CORPUS_DIR.glob(f"{name}/chunk*/*.jsonl.zst"))
            for r in _read_records(path)
        ]
        for name in ("train", "validation")
    }


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(EMBEDDED_TOKENIZER_PATH))


def test_corpus_files_follow_slimpajama_layout():
    files = sorted(p.relative_to(EMBEDDED_CORPUS_DIR).as_posix() for p in EMBEDDED_CORPUS_DIR.rglob("*.zst"))
    assert files, f"no .zst files under {EMBEDDED_CORPUS_DIR}"
    stems = {"train": "example_train", "validation": "example_holdout"}
    for rel in files:
        match = re.fullmatch(r"(train|validation)/chunk\d+/(\w+)_\d+\.jsonl\.zst", rel)
        assert match and match[2] == stems[match[1]], rel
    assert {rel.split("/")[0] for rel in files} == {"train", "validation"}
    assert 2e6 < sum((EMBEDDED_CORPUS_DIR / rel).stat().st_size for rel in files) < 10e6


def test_every_record_has_exactly_the_slimpajama_fields(splits):
    for records in splits.values():
        assert records
        for record in records:
            assert set(record) == {"text", "meta"}
            assert set(record["meta"]) == {"redpajama_set_name"}
            assert isinstance(record["text"], str) and record["text"].strip()
            assert record["meta"]["redpajama_set_name"] in SLIMPAJAMA_SETS


def test_splits_are_disjoint_and_cover_every_set(splits):
    train_texts = {r["text"] for r in splits["train"]}
    val_texts = [r["text"] for r in splits["validation"]]
    assert not train_texts.intersection(val_texts)
    assert len(set(val_texts)) == len(val_texts)
    sets = {name: {r["meta"]["redpajama_set_name"] for r in records} for name, records in splits.items()}
    assert sets["train"] == sets["validation"] == {"RedPajamaBook", "RedPajamaCommonCrawl", "RedPajamaGithub"}
    val_bytes = sum(len(t.encode("utf-8")) for t in val_texts)
    train_bytes = sum(len(t.encode("utf-8")) for t in train_texts)
    assert val_bytes > 300_000 and train_bytes > 10_000_000
    assert 0.01 < val_bytes / (val_bytes + train_bytes) < 0.06


def test_sources_md_counts_match_the_files(splits):
    """SOURCES.md is generated; its table must describe the committed files, not an older build."""
    table = (EMBEDDED_CORPUS_DIR / "SOURCES.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (train|validation) \| (\w+) \| (\d+) \| ([\d,]+) \|$", table, flags=re.M)
    assert rows
    for split_name, set_name, n_docs, n_bytes in rows:
        members = [
            r["text"] for r in splits[split_name] if set_name in ("all", r["meta"]["redpajama_set_name"])
        ]
        assert (len(members), sum(len(t.encode("utf-8")) for t in members)) == (
            int(n_docs),
            int(n_bytes.replace(",", "")),
        )
    for licence in ("bible-kjv-text.copyright", "python3.11.copyright"):
        assert (EMBEDDED_CORPUS_DIR / "licenses" / licence).stat().st_size > 500


def test_tokenizer_has_llama_special_ids(sp):
    assert sp.vocab_size() == 32000
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.piece_to_id("<0x0A>") == 3 + 0x0A  # byte fallback pieces follow the specials, as in LLaMA
    assert [sp.id_to_piece(i) for i in sp.encode("year 20250")][-5:] == ["2", "0", "2", "5", "0"]


def test_tokenizer_round_trips_validation_docs_and_indented_code(sp, splits):
    code = (
        "class Stack:\n"
        "    def push(self, x):\n"
        "        if x is None:\n"
        "\t\traise ValueError('none')  # tab-indented\n"
        "        self._items.append(x)   \n"
        "\n\n"
        "    # naïve → Ünïcödé 景太郎 😀\n"
    )
    texts = [r["text"] for r in splits["validation"]] + [code, "  leading spaces", "trailing  \n\n"]
    for text, ids in zip(texts, sp.encode(texts), strict=True):
        assert sp.decode(ids) == text
        assert 0 not in ids  # byte fallback: nothing is unknown
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in sp.encode(texts))
    assert n_bytes / n_tokens > 3.0  # a trained vocabulary, not byte fallback (which gives <= 1)


def test_html_to_text_keeps_main_body_and_code_indentation():
    html = """<html><head><script>var x = 1;</script></head><body>
    <div class="sphinxsidebar">Navigation junk</div>
    <div class="body" role="main"><section><h1>Title<a class="headerlink" href="#t">¶</a></h1>
    <p>Some   <code>inline</code>
    text.</p><div class="highlight"><pre><span class="k">def</span> f():
    return  1
</pre></div><ul><li><p>one</p></li><li>two</li></ul>
    <table><tr><th><p>a</p></th><th>b</th></tr><tr><td>1</td><td><p>2</p></td></tr></table>
    </section></div><div class="footer">Footer junk</div></body></html>"""
    expected = "Title\n\nSome inline text.\n\ndef f():\n    return  1\n\n- one\n\n- two\n\na | b\n\n1 | 2\n"
    assert html_to_text(html) == expected


def test_clean_and_split_are_disjoint_stratified_and_deterministic():
    docs = [Doc(f"{s}/{i:03d}", s, f"{s} document {i} " + "x" * 300) for s in ("A", "B") for i in range(100)]
    docs += [Doc("A/dup", "A", docs[0].text), Doc("B/short", "B", "too short")]
    kept = clean(docs[::-1])
    assert sorted(d.doc_id for d in kept) == sorted(d.doc_id for d in docs[:200])
    parts = split(kept)
    assert split(list(reversed(kept))) == parts
    val_ids = {d.doc_id for d in parts["validation"]}
    assert not val_ids & {d.doc_id for d in parts["train"]}
    assert len(parts["train"]) + len(val_ids) == 200
    assert {s: sum(d.set_name == s for d in parts["validation"]) for s in "AB"} == {"A": 3, "B": 3}


def test_train_tokenizer_is_deterministic(tmp_path):
    lines = [f"def function_{i}(value):\n    return value * {i} + {i * i}\n" for i in range(400)]
    records = "".join(
        json.dumps({"text": t, "meta": {"redpajama_set_name": "RedPajamaGithub"}}) + "\n" for t in lines
    )
    (tmp_path / "train/chunk1").mkdir(parents=True)
    (tmp_path / "train/chunk1/example_train_0.jsonl.zst").write_bytes(zstandard.compress(records.encode()))
    files = corpus_files(tmp_path)
    assert len(files) == 1
    first, second = train(files, vocab_size=320), train(files, vocab_size=320)
    assert first == second
    sp = spm.SentencePieceProcessor(model_proto=first)
    assert sp.vocab_size() == 320 and sp.decode(sp.encode(lines[7])) == lines[7]


def test_first_use_of_the_embedded_corpus_says_so_with_a_progress_bar(tmp_path, monkeypatch, capfd):
    from dlm_titan.data import embedded

    corpus = tmp_path / "corpus"
    for split_name in ("train", "validation"):
        folder = corpus / split_name / "chunk1"
        folder.mkdir(parents=True)
        record = {"text": f"a {split_name} document", "meta": {"redpajama_set_name": "RedPajamaC4"}}
        (folder / "example_0.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
            (json.dumps(record) + "\n").encode()))
    monkeypatch.setattr(embedded, "embedded_corpus_dir", lambda: corpus)
    monkeypatch.setenv("DLM_TITAN_CACHE", str(tmp_path / "cache"))
    path = embedded.prepare_embedded()
    err = capfd.readouterr().err
    assert err.count("first use of the embedded corpus") == 1 and str(path) in err
    assert err.count("files to do") >= 2  # tqdm's bar of each split, shown though stderr is not a terminal
    assert sorted(p.name for p in path.iterdir() if p.suffix == ".bin")  # shards were written
    assert embedded.prepare_embedded() == path
    assert capfd.readouterr().err == ""  # cached: silent
