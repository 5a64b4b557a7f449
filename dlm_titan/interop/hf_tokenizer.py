"""The tokenizer of a Hugging Face model folder: ``tokenizer.json`` + ``tokenizer_config.json`` that
``AutoTokenizer.from_pretrained(folder)`` reads offline (``tokenizers`` only, no SentencePiece needed there) and
that encode text exactly as dlm_titan's :class:`~dlm_titan.data.tokenizer.Tokenizer` did for training.

``tokenizer(text).input_ids`` is training's ``encode(text, bos=False, eos=False)``: no BOS, no EOS (training ends
every document with EOS), and special-token strings in the text are plain text. The diffusion mask token
``<|mdm_mask|>`` is registered at id ``vocab_size`` (the model's, not the tokenizer's).

Sources: a SentencePiece BPE model (the embedded tokenizer) is converted: its pieces and scores become a BPE
vocabulary and merges (a piece's merges rank by its score, as SentencePiece merges the best-scored pair first), its
dummy prefix a ``Prepend("▁")`` normalizer (SentencePiece adds it even before a leading space, which the
``Metaspace`` pre-tokenizer would not); its user-defined symbols added tokens matched in the normalized text, where
SentencePiece cuts them out (a model with both is refused: that normalizer would prefix the symbols' own text
too). A ``tokenizer.json`` is copied without its post-processor (training never applied it, e.g. Llama's added BOS).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dlm_titan.data.tokenizer import MASK_TOKEN, Tokenizer, load_tokenizer
from dlm_titan.errors import UserError

_SPIECE_SPACE = "\u2581"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
"""What :func:`tokenizer_files` gives (the export writes them)."""


def _added(token_id: int, content: str, special: bool = True) -> dict[str, Any]:
    """An added token: a special one is matched in the raw text; a SentencePiece user-defined symbol (``special``
    False) in the normalized text, where SentencePiece cuts it out (spaces already "▁" there)."""
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": not special, "special": special}


def _sentencepiece_json(path: str) -> dict[str, Any]:
    """tokenizer.json of a SentencePiece BPE model (identity normalization, as the embedded tokenizer)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    norm = proto.normalizer_spec
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        raise UserError(f"tokenizer {path} is a SentencePiece {pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)} "
                        "model; the Hugging Face export converts BPE models only (train one with --model_type bpe)")
    if norm.name not in ("identity", "") or norm.remove_extra_whitespaces:
        raise UserError(f"tokenizer {path} normalizes text ({norm.name}, remove_extra_whitespaces="
                        f"{norm.remove_extra_whitespaces}); the Hugging Face export converts identity-normalized "
                        "SentencePiece models only")
    user = [i for i, p in enumerate(proto.pieces) if p.type == p.USER_DEFINED]
    if user and norm.add_dummy_prefix:
        shown = ", ".join(proto.pieces[i].piece for i in user[:3]) + (", ..." if len(user) > 3 else "")
        raise UserError(f"tokenizer {path} has user-defined symbols ({shown}) and a dummy prefix: the tokenizers "
                        "library cannot cut them out as SentencePiece does, so no tokenizer.json would encode as "
                        "training did; load the .model with sentencepiece")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    special = [i for i, p in enumerate(proto.pieces) if p.type in (p.CONTROL, p.UNKNOWN)]
    unk = next((i for i, p in enumerate(proto.pieces) if p.type == p.UNKNOWN), None)
    normalizers = [{"type": "Replace", "pattern": {"String": " "}, "content": _SPIECE_SPACE}]
    decoders = [{"type": "Replace", "pattern": {"String": _SPIECE_SPACE}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    if norm.add_dummy_prefix:
        normalizers.insert(0, {"type": "Prepend", "prepend": _SPIECE_SPACE})
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [_added(i, proto.pieces[i].piece) for i in special]
        + [_added(i, proto.pieces[i].piece, special=False) for i in user],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": None if unk is None else proto.pieces[unk].piece,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": bool(proto.trainer_spec.byte_fallback), "ignore_merges": False,
                  "vocab": vocab, "merges": _bpe_merges(proto, vocab)},
    }


def _bpe_merges(proto: Any, vocab: dict[str, int]) -> list[list[str]]:
    """Every (left, right) pair whose concatenation is a normal piece, ranked by that piece's score (best first),
    then by the ids of left and right."""
    merges = []
    for merged_id, p in enumerate(proto.pieces):
        if p.type != p.NORMAL or len(p.piece) < 2:
            continue
        for cut in range(1, len(p.piece)):
            left, right = p.piece[:cut], p.piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-p.score, merged_id, vocab[left], vocab[right], left, right))
    return [[left, right] for *_, left, right in sorted(merges)]


def _tokenizer_json(tok: Tokenizer) -> dict[str, Any]:
    if tok.kind == "sentencepiece":
        return _sentencepiece_json(tok.path)
    spec = json.loads(Path(tok.path).read_text(encoding="utf-8"))
    spec["post_processor"] = None
    return spec


def tokenizer_files(tokenizer_path: str, vocab_size: int, max_length: int,
                    mask: bool = True) -> tuple[Tokenizer, dict[str, str]]:
    """The text of tokenizer.json, tokenizer_config.json and special_tokens_map.json, converted (UserError where
    the tokenizer cannot be), before anything is written.

    Args:
        tokenizer_path: as ``data.tokenizer_path`` ("" = the embedded tokenizer).
        vocab_size: the model's output vocabulary; the mask token gets this id.
        max_length: the training sequence length (``model_max_length``).
        mask: register the mask token (diffusion models; the autoregressive baseline has none).

    Returns:
        the dlm_titan tokenizer it was converted from, and file name -> text.
    """
    tok = load_tokenizer(tokenizer_path, max_vocab_size=vocab_size)
    spec = _tokenizer_json(tok)
    taken = {t["id"]: t["content"] for t in spec.get("added_tokens", [])}
    if vocab_size in taken and taken[vocab_size] != MASK_TOKEN:
        raise UserError(f"tokenizer {tok.path} already uses id {vocab_size} (the mask id) for {taken[vocab_size]!r}")
    spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["content"] != MASK_TOKEN]
    _pad_vocabulary(spec, vocab_size)
    if mask:
        spec["added_tokens"].append(_added(vocab_size, MASK_TOKEN))
    _check_ids(spec, vocab_size if mask else None)
    vocab = _vocab_of(spec)
    names = {i: t for t, i in vocab.items()}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
        "split_special_tokens": True, "clean_up_tokenization_spaces": False, "model_max_length": max_length,
        **({"mask_token": MASK_TOKEN} if mask else {}),
    }
    for key, token_id in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id)):
        if token_id >= 0 and token_id in names:
            config[key] = names[token_id]
    unk = spec.get("model", {}).get("unk_token")
    if unk is not None and unk in vocab:
        # as transformers' own Llama conversion names it: unk_token_id, and unknown token strings map to it
        config["unk_token"] = unk
    special = {k: v for k, v in config.items() if k in ("bos_token", "eos_token", "unk_token", "mask_token")}
    return tok, {
        "tokenizer.json": json.dumps(spec, ensure_ascii=False) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2, ensure_ascii=False) + "\n",
    }


def _pad_vocabulary(spec: dict[str, Any], vocab_size: int) -> None:
    """Placeholder special tokens ``<|unused_N|>`` for the ids between the tokenizer's last and the model's
    vocabulary: the ``tokenizers`` library numbers added tokens consecutively, so the mask token reaches id
    ``vocab_size`` only through them (ids the model's head has, which training never saw)."""
    size = max(_vocab_of(spec).values(), default=-1) + 1
    spec["added_tokens"] += [_added(i, f"<|unused_{i}|>") for i in range(size, vocab_size)]


def _check_ids(spec: dict[str, Any], mask_id: int | None) -> None:
    """The ``tokenizers`` library reads the spec back with the mask token at ``mask_id`` (a bug here otherwise)."""
    from tokenizers import Tokenizer as HFTokenizer

    if mask_id is not None and HFTokenizer.from_str(json.dumps(spec)).token_to_id(MASK_TOKEN) != mask_id:
        raise AssertionError(f"the exported tokenizer does not hold {MASK_TOKEN} at id {mask_id}")


def _vocab_of(spec: dict[str, Any]) -> dict[str, int]:
    """token -> id over the model's vocabulary (BPE, WordPiece, WordLevel: a dict; Unigram: a list) and the
    added tokens."""
    vocab = spec.get("model", {}).get("vocab", {})
    if isinstance(vocab, list):
        vocab = {entry[0]: i for i, entry in enumerate(vocab)}
    return {**vocab, **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
