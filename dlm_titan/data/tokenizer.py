"""SentencePiece tokenizer wrapper (lit-gpt's ``Tokenizer.encode(text, bos=False, eos=True)`` convention)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import sentencepiece as spm

from dlm_titan.errors import UserError


def embedded_tokenizer_path() -> str | None:
    """The tokenizer shipped in ``dlm_titan/assets``, or None if this install lacks it."""
    try:
        from dlm_titan.assets import EMBEDDED_TOKENIZER_PATH
    except ImportError:
        return None
    path = str(EMBEDDED_TOKENIZER_PATH)
    return path if os.path.isfile(path) else None


def resolve_tokenizer_path(path: str) -> str:
    """``path``, or for ``""`` the embedded tokenizer; UserError if the file is missing."""
    if not path:
        embedded = embedded_tokenizer_path()
        if embedded is None:
            raise UserError("the embedded tokenizer (dlm_titan/assets/tokenizer.model) is missing from this "
                            "install; set data.tokenizer_path to a SentencePiece .model file")
        return embedded
    if not os.path.isfile(path):
        raise UserError(f"tokenizer {path} does not exist; set data.tokenizer_path / --tokenizer_path to a "
                        "SentencePiece .model file")
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Tokenizer:
    """A SentencePiece model: ``encode(text, bos=False, eos=True)``, ``decode(ids)``, ids of BOS/EOS."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.processor = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise UserError(f"tokenizer {path} is not a SentencePiece model ({e}); pass a .model file") from None
        self.vocab_size: int = self.processor.vocab_size()
        self.bos_id: int = self.processor.bos_id()
        self.eos_id: int = self.processor.eos_id()

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if eos and self.eos_id < 0:
            raise UserError(f"tokenizer {self.path} has no EOS piece; documents need one (train it with eos_id)")
        if bos and self.bos_id < 0:
            raise UserError(f"tokenizer {self.path} has no BOS piece")
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode(self, text: str, bos: bool = False, eos: bool = True) -> list[int]:
        """Token ids of ``text``, with BOS/EOS added as asked (documents are tokens + EOS)."""
        return self._wrap(self.processor.encode(text), bos, eos)

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = True,
                     num_threads: int = -1) -> list[list[int]]:
        """:meth:`encode` of many texts in one SentencePiece call (``num_threads`` -1 = all cores)."""
        return [self._wrap(ids, bos, eos) for ids in self.processor.encode(texts, num_threads=num_threads)]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (ids outside the vocabulary, e.g. the mask id, are dropped)."""
        return self.processor.decode([i for i in ids if 0 <= i < self.vocab_size])


def load_tokenizer(path: str = "", max_vocab_size: int | None = None) -> Tokenizer:
    """Load ``path`` (``""`` = the embedded tokenizer); UserError if its vocabulary exceeds ``max_vocab_size``."""
    tok = Tokenizer(resolve_tokenizer_path(path))
    if max_vocab_size is not None and tok.vocab_size > max_vocab_size:
        raise UserError(f"tokenizer {tok.path} has {tok.vocab_size} tokens, more than model.vocab_size="
                        f"{max_vocab_size}; raise model.vocab_size to at least {tok.vocab_size} or use a "
                        "smaller tokenizer")
    return tok


def check_tokenizer_fits(data_cfg: Any, vocab_size: int) -> None:
    """UserError if the data's tokenizer has more tokens than the model.

    Checked when ``data.tokenizer_path`` is set, or for the embedded corpus (``data.path = ""``, tokenized with
    the embedded tokenizer). User shards with no tokenizer configured are guarded by the shard id check alone.
    """
    path = data_cfg.tokenizer_path
    if not path and (getattr(data_cfg, "path", "") or embedded_tokenizer_path() is None):
        return
    load_tokenizer(path, max_vocab_size=vocab_size)


def check_shard_manifests(data_cfg: Any, data_path: str, vocab_size: int, prefixes: list[str]) -> None:
    """UserError if a preparation manifest in ``data_path`` (``{split}_{corpus}_manifest.json``, beside its shards
    ``{split}_{corpus}_*.bin``) of shards that ``prefixes`` select records a tokenizer with more tokens than the
    model, or one other than ``data.tokenizer_path`` when that is set. Checked at start, where the shards' own id
    check (each shard's first read) could come hours into a run; shards without a manifest rely on that check
    alone, and an unreadable manifest is ignored (it is only preparation's bookkeeping)."""
    configured = data_cfg.tokenizer_path
    sha = file_sha256(configured) if configured and os.path.isfile(configured) else None
    for path in sorted(Path(data_path).glob("*_manifest.json")):
        stem = path.name[: -len("_manifest.json")]
        if not any(stem.startswith(p) or p.startswith(stem + "_") for p in prefixes):
            continue  # another preparation sharing the folder: not read by this run
        try:
            recorded = json.loads(path.read_text()).get("tokenizer")
        except (OSError, ValueError, AttributeError):
            continue
        if not isinstance(recorded, dict):
            continue
        made = f"the shards of {path.name} in {data_path} were made with tokenizer {recorded.get('file')}"
        tokens = recorded.get("vocab_size")
        if isinstance(tokens, int) and tokens > vocab_size:
            raise UserError(f"{made} of {tokens} tokens, more than model.vocab_size={vocab_size}; raise "
                            "model.vocab_size or prepare the data with a smaller tokenizer")
        if sha is not None and recorded.get("sha256") not in (None, sha):
            raise UserError(f"{made} (sha256 {str(recorded['sha256'])[:12]}...), not data.tokenizer_path {configured} "
                            f"(sha256 {sha[:12]}...); point data.tokenizer_path at the tokenizer the shards were made "
                            "with")


def tokenizer_fingerprint(path: str) -> dict:
    """What a manifest records about the tokenizer: file name, sha256, vocabulary size, BOS/EOS ids."""
    tok = Tokenizer(path)
    return {"file": Path(path).name, "sha256": file_sha256(path), "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id}
