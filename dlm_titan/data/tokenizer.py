"""Tokenizers: a SentencePiece ``.model``, a Hugging Face ``tokenizer.json``, or a folder holding either.

Which file: a folder (e.g. a downloaded Hugging Face model folder such as Llama-2's) is read through its
``tokenizer.model`` (SentencePiece) when it has one, as lit-gpt does in TinyLlama/SMDM, else through its
``tokenizer.json``. A file ending in ``.json`` is read with the ``tokenizers`` library, any other file as a
SentencePiece model.

Special tokens:

- SentencePiece: BOS and EOS are the model's own ``bos_id`` / ``eos_id`` pieces.
- ``tokenizer.json``: BOS and EOS are the ``bos_token`` / ``eos_token`` named in ``tokenizer_config.json``
  beside it, else in ``special_tokens_map.json`` beside it, else the first conventional token present in its
  vocabulary (EOS: ``</s>``, ``<|endoftext|>``, ``<|end_of_text|>``, ``<eos>``; BOS: ``<s>``,
  ``<|begin_of_text|>``, ``<bos>``). Its own post-processor (e.g. Llama's added BOS) is never applied, and
  special-token strings inside a document are encoded as plain text (as SentencePiece does).

Documents are ``tokens + EOS`` with no BOS (lit-gpt's ``encode(bos=False, eos=True)``); a tokenizer without EOS
can not prepare data. ``vocab_size`` is the largest token id + 1 (added tokens included); the diffusion mask
id is ``model.vocab_size``, never one of the tokenizer's tokens (the ``<|mdm_mask|>`` token that dlm_titan's
Hugging Face export adds at that id is not counted). ``-1`` stands for an absent BOS/EOS.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import sentencepiece as spm

from dlm_titan.errors import UserError

from .identity import selected_manifests

SPECIAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")
CONVENTIONAL = {
    "eos_token": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"),
    "bos_token": ("<s>", "<|begin_of_text|>", "<bos>"),
}
MASK_TOKEN = "<|mdm_mask|>"  # the name of the mask id (= model.vocab_size) in an exported tokenizer.json
DEFAULT_VOCAB_SIZE = 32000  # SMDM's (Llama-2's) vocabulary: model.vocab_size when nothing says otherwise
_KINDS = "a SentencePiece .model, a Hugging Face tokenizer.json, or a folder holding either"


def embedded_tokenizer_path() -> str | None:
    """The tokenizer shipped in ``dlm_titan/assets``, or None if this install lacks it."""
    try:
        from dlm_titan.assets import EMBEDDED_TOKENIZER_PATH
    except ImportError:
        return None
    path = str(EMBEDDED_TOKENIZER_PATH)
    return path if os.path.isfile(path) else None


def resolve_tokenizer_path(path: str) -> str:
    """The tokenizer file that ``path`` names: ``""`` = the embedded tokenizer, a folder = its
    ``tokenizer.model`` or else its ``tokenizer.json``, a file = itself; UserError if there is none."""
    if not path:
        embedded = embedded_tokenizer_path()
        if embedded is None:
            raise UserError("the embedded tokenizer (dlm_titan/assets/tokenizer.model) is missing from this "
                            f"install; set data.tokenizer_path to {_KINDS}")
        return embedded
    if os.path.isdir(path):
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise UserError(f"tokenizer folder {path} holds neither tokenizer.model nor tokenizer.json; point "
                        f"data.tokenizer_path / --tokenizer_path at {_KINDS}")
    if not os.path.isfile(path):
        raise UserError(f"tokenizer {path} does not exist; set data.tokenizer_path / --tokenizer_path to {_KINDS} "
                        "(nothing is downloaded: fetch a hub tokenizer first, e.g. `hf download "
                        "meta-llama/Llama-2-7b-hf tokenizer.json tokenizer_config.json --local-dir DIR`)")
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _SentencePiece:
    """Backend of a SentencePiece ``.model``."""

    def __init__(self, path: str):
        try:
            self.processor = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise UserError(f"tokenizer {path} is not a SentencePiece model ({e}); pass {_KINDS}") from None
        self.vocab_size: int = self.processor.vocab_size()
        self.bos_id: int = self.processor.bos_id()
        self.eos_id: int = self.processor.eos_id()

    def encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        return self.processor.encode(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)


def _named_token(value: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _configured_tokens(folder: Path) -> dict[str, str]:
    """``bos_token`` / ``eos_token`` named by the HF config files in ``folder`` (the first file wins)."""
    found: dict[str, str] = {}
    for name in SPECIAL_FILES:
        file = folder / name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{file} is not valid JSON ({e}); repair it or remove it") from None
        for key in CONVENTIONAL:
            token = _named_token(config.get(key)) if isinstance(config, dict) else None
            if token is not None:
                found.setdefault(key, token)
    return found


class _HuggingFace:
    """Backend of a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tokenizer = HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises plain Exception for unreadable or malformed files
            raise UserError(f"tokenizer {path} is not a Hugging Face tokenizer.json ({str(e).strip()}); "
                            f"pass {_KINDS}") from None
        # special-token strings in a document are plain text, as SentencePiece treats them (a "</s>" in a web page
        # must not become EOS)
        self.tokenizer.encode_special_tokens = True
        # dlm_titan's Hugging Face export registers the mask token at id = model.vocab_size: the model's extra
        # embedding row, not a token of the data
        ids = [i for token, i in self.tokenizer.get_vocab(with_added_tokens=True).items() if token != MASK_TOKEN]
        self.vocab_size = max(ids) + 1 if ids else 0
        configured = _configured_tokens(Path(path).parent)
        self.bos_id = self._special_id(path, "bos_token", configured)
        self.eos_id = self._special_id(path, "eos_token", configured)

    def _special_id(self, path: str, key: str, configured: dict[str, str]) -> int:
        if key in configured:
            token_id = self.tokenizer.token_to_id(configured[key])
            if token_id is None:
                raise UserError(f"the {key} {configured[key]!r} named beside {path} is not in its vocabulary; "
                                "fix tokenizer_config.json / special_tokens_map.json")
            return token_id
        for token in CONVENTIONAL[key]:
            token_id = self.tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        return -1

    def encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        if num_threads == 1:  # a data-prep worker process: no Rayon thread pool
            return [self.tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class Tokenizer:
    """A tokenizer of any supported kind: ``encode(text, bos=False, eos=True)``, ``decode(ids)``, BOS/EOS ids.

    Args:
        path: a tokenizer file (see :func:`resolve_tokenizer_path` for folders and ``""``).
    """

    def __init__(self, path: str):
        self.path = path
        self.kind = "huggingface" if path.endswith(".json") else "sentencepiece"
        self.backend = _HuggingFace(path) if self.kind == "huggingface" else _SentencePiece(path)
        self.vocab_size: int = self.backend.vocab_size
        self.bos_id: int = self.backend.bos_id
        self.eos_id: int = self.backend.eos_id

    def require_eos(self) -> None:
        """UserError unless the tokenizer has an EOS token (documents end with one)."""
        if self.eos_id < 0:
            fix = ("name eos_token in a tokenizer_config.json beside it" if self.kind == "huggingface"
                   else "train it with eos_id")
            raise UserError(f"tokenizer {self.path} has no EOS token, which ends every document; {fix} or use "
                            "another tokenizer")

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if eos:
            self.require_eos()
        if bos and self.bos_id < 0:
            raise UserError(f"tokenizer {self.path} has no BOS token")
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode(self, text: str, bos: bool = False, eos: bool = True) -> list[int]:
        """Token ids of ``text``, with BOS/EOS added as asked (documents are tokens + EOS)."""
        return self.encode_batch([text], bos, eos)[0]

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = True,
                     num_threads: int = -1) -> list[list[int]]:
        """:meth:`encode` of many texts in one call (``num_threads`` -1 = all cores, 1 = this thread only)."""
        return [self._wrap(list(ids), bos, eos) for ids in self.backend.encode_batch(texts, num_threads)]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (ids outside the vocabulary, e.g. the mask id, and special tokens are dropped)."""
        return self.backend.decode([i for i in ids if 0 <= i < self.vocab_size])


def load_tokenizer(path: str = "", max_vocab_size: int | None = None) -> Tokenizer:
    """Load ``path`` (``""`` = the embedded tokenizer); UserError if its vocabulary exceeds ``max_vocab_size``."""
    tok = Tokenizer(resolve_tokenizer_path(path))
    if max_vocab_size is not None and tok.vocab_size > max_vocab_size:
        raise UserError(f"tokenizer {tok.path} has {tok.vocab_size} tokens, more than model.vocab_size="
                        f"{max_vocab_size}; raise model.vocab_size to at least {tok.vocab_size} or use a "
                        "smaller tokenizer")
    return tok


def _uses_embedded_tokenizer(data_cfg: Any) -> bool:
    """The embedded corpus (``data.path = ""``) with no tokenizer named is tokenized by the embedded one."""
    return not data_cfg.tokenizer_path and not getattr(data_cfg, "path", "")


def check_tokenizer_fits(data_cfg: Any, vocab_size: int) -> None:
    """UserError if the data's tokenizer has more tokens than the model.

    Checked when ``data.tokenizer_path`` is set, or for the embedded corpus (``data.path = ""``, tokenized with
    the embedded tokenizer). User shards with no tokenizer configured are guarded by the shard id check alone.
    """
    if data_cfg.tokenizer_path or (_uses_embedded_tokenizer(data_cfg) and embedded_tokenizer_path() is not None):
        load_tokenizer(data_cfg.tokenizer_path, max_vocab_size=vocab_size)


def _recorded_tokenizers(data_path: str, prefixes: list[str]) -> list[tuple[Path, dict]]:
    """(path, recorded tokenizer) of each readable manifest whose shards ``prefixes`` select (see
    :func:`dlm_titan.data.identity.selected_manifests`) and that records one."""
    return [(path, manifest["tokenizer"]) for path, manifest in selected_manifests(data_path, prefixes)
            if isinstance(manifest.get("tokenizer"), dict)]


def check_shard_manifests(data_cfg: Any, data_path: str, vocab_size: int, prefixes: list[str]) -> None:
    """UserError if a preparation manifest of shards that ``prefixes`` select records a tokenizer with more tokens
    than the model, or one other than ``data.tokenizer_path`` when that is set, or if two of them record different
    tokenizers (the same id would stand for different text in different sources). Checked at start, where the
    shards' own id check (each shard's first read) could come hours into a run; shards without a manifest rely on
    that check alone."""
    configured = data_cfg.tokenizer_path
    sha = file_sha256(resolve_tokenizer_path(configured)) if configured else None
    first: tuple[Path, dict] | None = None  # the first manifest that records a tokenizer hash
    for path, recorded in _recorded_tokenizers(data_path, prefixes):
        made = f"the shards of {path.name} in {data_path} were made with tokenizer {recorded.get('file')}"
        if recorded.get("sha256") is not None:
            if first is not None and recorded["sha256"] != first[1]["sha256"]:
                raise UserError(f"{made} (sha256 {str(recorded['sha256'])[:12]}...), those of {first[0].name} with "
                                f"{first[1].get('file')} (sha256 {str(first[1]['sha256'])[:12]}...): the same token id "
                                "would mean different text; prepare every source and the validation set with one "
                                "tokenizer")
            first = first or (path, recorded)
        tokens = recorded.get("vocab_size")
        if isinstance(tokens, int) and tokens > vocab_size:
            raise UserError(f"{made} of {tokens} tokens, more than model.vocab_size={vocab_size}; raise "
                            "model.vocab_size or prepare the data with a smaller tokenizer")
        if sha is not None and recorded.get("sha256") not in (None, sha):
            raise UserError(f"{made} (sha256 {str(recorded['sha256'])[:12]}...), not data.tokenizer_path {configured} "
                            f"(sha256 {sha[:12]}...); point data.tokenizer_path at the tokenizer the shards were made "
                            "with")


def resolve_vocab_size(configured: int, data_cfg: Any, data_path: str = "") -> int:
    """The model's vocabulary: ``configured`` (``model.vocab_size``) when > 0; for 0, the tokenizer's.

    The tokenizer is ``data.tokenizer_path``, or the embedded one (32000) for the embedded corpus. With shards of
    one's own and no tokenizer named, it is the largest vocabulary recorded by the preparation manifests of the
    selected ``data.train_prefixes`` in ``data_path`` (default ``data.path``), else 32000 (SMDM's).
    """
    if configured < 0:
        raise UserError(f"model.vocab_size={configured} must be > 0, or 0 to follow the tokenizer")
    if configured > 0:
        return configured
    if data_cfg.tokenizer_path or _uses_embedded_tokenizer(data_cfg):
        return load_tokenizer(data_cfg.tokenizer_path).vocab_size
    recorded = [r.get("vocab_size") for _, r in _recorded_tokenizers(data_path or data_cfg.path,
                                                                     list(data_cfg.train_prefixes))]
    return max((v for v in recorded if isinstance(v, int)), default=DEFAULT_VOCAB_SIZE)


def tokenizer_fingerprint(path: str) -> dict:
    """What a manifest records about the tokenizer: file name, sha256, vocabulary size, BOS/EOS ids."""
    tok = Tokenizer(path)
    return {"file": Path(path).name, "sha256": file_sha256(path), "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id}
