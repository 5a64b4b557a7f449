"""Tokenizer kinds: a HF tokenizer.json (bare or in a model folder with tokenizer_config.json), a folder holding a
SentencePiece tokenizer.model, their BOS/EOS rules, and model.vocab_size following the tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as HF
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from dlm_titan.data import load_tokenizer, prepare_split, resolve_vocab_size
from dlm_titan.data.tokenizer import check_shard_manifests, embedded_tokenizer_path
from dlm_titan.errors import UserError

TEXTS = ["the cat sat on the mat", "a dog ran far away", "Sing, O goddess, the anger of Achilles!",
         "  code:\n\tx = 1  # two spaces"]


def train_bpe(specials: list[str], vocab_size: int = 300) -> HF:
    """A byte-level BPE trained here (so decode(encode(x)) == x), with Llama-style BOS added by its
    post-processor (which documents must not get)."""
    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20, trainer=trainer)
    if "<s>" in specials or "<|doc_start|>" in specials:
        bos = specials[0]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 0)])
    return tok


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A HF model folder: tokenizer.json whose EOS is a non-conventional name given by tokenizer_config.json
    (an AddedToken dict, as transformers writes it) and BOS by special_tokens_map.json."""
    folder = tmp_path_factory.mktemp("hf_model")
    train_bpe(["<|doc_start|>", "<|doc_end|>", "</s>"]).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"__type": "AddedToken", "content": "<|doc_end|>", "special": True}}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|doc_start|>"}))
    return folder


def test_hf_folder_round_trip(hf_folder: Path):
    ref = HF.from_file(str(hf_folder / "tokenizer.json"))
    eos, bos = ref.token_to_id("<|doc_end|>"), ref.token_to_id("<|doc_start|>")
    assert ref.encode("a cat").ids[0] == bos  # its own post-processor adds BOS ...
    for path in (hf_folder, hf_folder / "tokenizer.json"):  # the folder and its file are one tokenizer
        tok = load_tokenizer(str(path))
        assert (tok.kind, tok.eos_id, tok.bos_id) == ("huggingface", eos, bos)  # config, not the "</s>" guess
        assert tok.vocab_size == max(ref.get_vocab().values()) + 1 == ref.get_vocab_size()
        for text in TEXTS:
            ids = tok.encode(text)
            assert ids == ref.encode(text, add_special_tokens=False).ids + [eos]  # ... documents never get it
            assert tok.decode(ids) == text  # EOS (special) and the mask id are dropped
            assert tok.decode(ids + [tok.vocab_size]) == text
        assert tok.encode("a cat", bos=True, eos=False) == [bos] + ref.encode("a cat", add_special_tokens=False).ids


def test_bare_tokenizer_json_conventional_eos_and_missing_eos(tmp_path: Path):
    train_bpe(["<s>", "</s>"]).save(str(tmp_path / "tok.json"))
    tok = load_tokenizer(str(tmp_path / "tok.json"))
    ref = HF.from_file(str(tmp_path / "tok.json"))
    assert (tok.eos_id, tok.bos_id) == (ref.token_to_id("</s>"), ref.token_to_id("<s>"))

    (tmp_path / "no_eos").mkdir()
    train_bpe(["<pad>"]).save(str(tmp_path / "no_eos" / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path / "no_eos"))
    assert tok.eos_id == -1
    with pytest.raises(UserError, match="has no EOS token, which ends every document; name eos_token"):
        tok.encode("a cat")
    (tmp_path / "no_eos" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|none|>"}))
    with pytest.raises(UserError, match="eos_token '<|none|>' named beside .* is not in its vocabulary"):
        load_tokenizer(str(tmp_path / "no_eos"))
    (tmp_path / "no_eos" / "tokenizer_config.json").write_text("{")
    with pytest.raises(UserError, match="tokenizer_config.json is not valid JSON"):
        load_tokenizer(str(tmp_path / "no_eos"))


def test_folder_prefers_sentencepiece_model(tmp_path: Path, hf_folder: Path):
    """A folder with both files (Llama-2's) is read through tokenizer.model, as lit-gpt in TinyLlama/SMDM."""
    embedded = embedded_tokenizer_path()
    assert embedded is not None
    folder = tmp_path / "llama"
    shutil.copytree(hf_folder, folder)
    shutil.copy(embedded, folder / "tokenizer.model")
    tok = load_tokenizer(str(folder))
    sp = spm.SentencePieceProcessor(model_file=embedded)
    assert (tok.kind, tok.path, tok.vocab_size, tok.eos_id) == ("sentencepiece", str(folder / "tokenizer.model"),
                                                                32000, sp.eos_id())
    assert tok.encode(TEXTS[2]) == sp.encode(TEXTS[2]) + [sp.eos_id()]


def test_bad_tokenizer_paths(tmp_path: Path):
    with pytest.raises(UserError, match="tokenizer folder .* holds neither tokenizer.model nor tokenizer.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(UserError, match="meta-llama/Llama-2-7b-hf does not exist; .*nothing is downloaded"):
        load_tokenizer("meta-llama/Llama-2-7b-hf")
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(UserError, match="is not a Hugging Face tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "x.model").write_bytes(b"garbage")
    with pytest.raises(UserError, match="is not a SentencePiece model"):
        load_tokenizer(str(tmp_path / "x.model"))


def test_manifest_check_accepts_the_folder_of_the_shards_tokenizer(tmp_path: Path, hf_folder: Path):
    """Shards made with a folder's tokenizer.json pass the start-of-training check with the folder or the file
    as data.tokenizer_path; another tokenizer is refused."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(TEXTS[0])
    by_folder = prepare_split(str(src), str(hf_folder), str(tmp_path / "a"), "train", prefix="train_slim")
    by_file = prepare_split(str(src), str(hf_folder / "tokenizer.json"), str(tmp_path / "b"), "train",
                            prefix="train_slim")
    assert by_folder["tokenizer"] == by_file["tokenizer"]
    assert (tmp_path / "a" / "train_slim_000000_0000000000.bin").read_bytes() == \
           (tmp_path / "b" / "train_slim_000000_0000000000.bin").read_bytes()
    for configured in (str(hf_folder), str(hf_folder / "tokenizer.json")):
        check_shard_manifests(SimpleNamespace(tokenizer_path=configured), str(tmp_path / "a"), 400, ["train_slim"])
    with pytest.raises(UserError, match="made with tokenizer tokenizer.json .*not data.tokenizer_path"):
        check_shard_manifests(SimpleNamespace(tokenizer_path=embedded_tokenizer_path()), str(tmp_path / "a"),
                              32000, ["train_slim"])


def test_vocab_size_follows_the_tokenizer_unless_set(tmp_path: Path, hf_folder: Path):
    def data(path: str = "", tokenizer_path: str = "") -> SimpleNamespace:
        return SimpleNamespace(path=path, tokenizer_path=tokenizer_path, train_prefixes=["train_slim"])

    n = HF.from_file(str(hf_folder / "tokenizer.json")).get_vocab_size()
    assert resolve_vocab_size(0, data(tokenizer_path=str(hf_folder))) == n
    assert resolve_vocab_size(1000, data(tokenizer_path=str(hf_folder))) == 1000  # set: kept
    assert resolve_vocab_size(0, data()) == 32000  # the embedded corpus and tokenizer
    shards = tmp_path / "shards"
    shards.mkdir()
    assert resolve_vocab_size(0, data(str(shards))) == 32000  # own shards, nothing recorded: SMDM's
    (shards / "train_slim_manifest.json").write_text(json.dumps({"tokenizer": {"vocab_size": 50277}}))
    (shards / "train_star_manifest.json").write_text(json.dumps({"tokenizer": {"vocab_size": 99999}}))
    assert resolve_vocab_size(0, data(str(shards))) == 50277  # the selected prefix's preparation only
    with pytest.raises(UserError, match="model.vocab_size=-1 must be > 0, or 0 to follow the tokenizer"):
        resolve_vocab_size(-1, data())


def test_special_strings_in_text_and_an_exported_mask_token(tmp_path: Path, hf_folder: Path):
    """A "</s>" written inside a document is text, not EOS (SentencePiece's behaviour); the <|mdm_mask|> token that
    dlm_titan's export registers at id = model.vocab_size is not a token of the data, so the vocabulary stays."""
    sp = spm.SentencePieceProcessor(model_file=embedded_tokenizer_path())
    embedded = load_tokenizer("")
    assert embedded.encode("a </s> b", eos=False) == sp.encode("a </s> b") and sp.eos_id() not in sp.encode("</s>")
    tok = load_tokenizer(str(hf_folder))
    ids = tok.encode("x <|doc_end|> y </s>", eos=False)
    assert tok.eos_id not in ids and tok.decode(ids) == "x <|doc_end|> y </s>"

    spec = json.loads((hf_folder / "tokenizer.json").read_text())
    n = tok.vocab_size
    spec["added_tokens"].append({"id": n, "content": "<|mdm_mask|>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    exported = load_tokenizer(str(tmp_path / "tokenizer.json"), max_vocab_size=n)
    assert exported.vocab_size == n and HF.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size() == n + 1
    assert n not in exported.encode("<|mdm_mask|>")
