"""The tokenizer for evaluating a training checkpoint, refused when it is not the one the run trained on.

A ``step-N`` checkpoint (or a dump folder's newest one) carries no tokenizer file, unlike an export; its
completion marker records the training data's identity (:mod:`dlm_titan.data.identity`), including the sha256 of
the tokenizer each preparation manifest of the shards names. Evaluating such a checkpoint with another tokenizer
of the same vocabulary size (e.g. the embedded default for a run trained on a Llama-2 tokenizer) runs without an
error and gives wrong scores and text, so a tokenizer whose sha256 (computed as data preparation computes it,
:func:`~dlm_titan.data.tokenizer.tokenizer_fingerprint`) is not among the recorded ones is refused. Checkpoints
that record no tokenizer (older markers, shards prepared without a manifest) are not checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dlm_titan.checkpoint_layout import find_checkpoint, is_complete, is_dcp_folder, read_marker
from dlm_titan.data.tokenizer import (
    Tokenizer,
    embedded_tokenizer_path,
    file_sha256,
    load_tokenizer,
)
from dlm_titan.errors import UserError
from dlm_titan.interop.formats import interop_kind


def load_checked_tokenizer(checkpoint: str, tokenizer_path: str, vocab_size: int,
                           how: str = "--tokenizer_path PATH", recorded: set[str] | None = None) -> Tokenizer:
    """``tokenizer_path`` ("" = the tokenizer an export folder carries, else the embedded tokenizer), checked to
    fit ``vocab_size`` and to be the tokenizer the training run of ``checkpoint`` recorded, if it recorded one.

    Args:
        checkpoint: the dump / ``step-N`` / export folder the model was loaded from.
        tokenizer_path: the tokenizer to use, as ``--tokenizer_path``.
        vocab_size: the model's vocabulary.
        how: how the user passes a tokenizer (named in the fix).
        recorded: ``recorded_tokenizer_hashes(checkpoint)`` when the caller has read them already, so the
            checkpoint's marker is read once; None reads them here.

    Raises:
        UserError: one line naming both tokenizers and the fix, when they differ.
    """
    if not tokenizer_path and (bundled := bundled_tokenizer(checkpoint)):  # an export's own: converted from the run's
        return load_tokenizer(bundled, max_vocab_size=vocab_size)
    tok = load_tokenizer(tokenizer_path, max_vocab_size=vocab_size)
    if recorded is None:
        recorded = recorded_tokenizer_hashes(checkpoint)
    if not recorded or _is_converted_copy(Path(tok.path)):
        return tok
    sha = file_sha256(tok.path)  # what tokenizer_fingerprint records, without loading the tokenizer again
    if sha not in recorded:
        used = f"tokenizer {tokenizer_path}" if tokenizer_path else "the embedded default tokenizer"
        trained = ", ".join(f"sha256 {s[:12]}..." for s in sorted(recorded))
        raise UserError(f"checkpoint {checkpoint} was trained on shards tokenized with another tokenizer ({trained}) "
                        f"than {used} ({tok.path}, sha256 {sha[:12]}...); pass the training tokenizer "
                        f"(its data.tokenizer_path) with {how}")
    return tok


def refuse_litgpt_without_tokenizer(checkpoint: str | Path, tokenizer_path: str | None,
                                    how: str = "--tokenizer_path PATH") -> None:
    """UserError when ``checkpoint`` is an SMDM/lit-gpt state dict file and no tokenizer is named.

    Such a file carries and records no tokenizer, and the embedded default has the vocabulary size of SMDM's
    released models (Llama-2's 32,000 pieces) but other ids: their text would be encoded, decoded, scored and
    shipped with it without a word.

    Args:
        checkpoint: the model path as the user gave it.
        tokenizer_path: the tokenizer named ("" or None: none).
        how: how the user passes a tokenizer (named in the fix).
    """
    if not tokenizer_path and interop_kind(Path(checkpoint)) == "litgpt":
        raise UserError(f"{checkpoint} is an SMDM/lit-gpt state dict, which carries no tokenizer, and the embedded "
                        f"default has other ids than it trained on; pass its tokenizer with {how} (SMDM's "
                        "released models: Llama-2's tokenizer.model, as TinyLlama's)")


def bundled_tokenizer(path: str | Path) -> str:
    """The tokenizer an export folder carries, or a dump folder's ``export/`` (the run's final export): "" if
    none."""
    for folder in (Path(path), Path(path) / "export"):
        if (folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file():
            return str(folder)
    return ""


def recorded_tokenizer_hashes(checkpoint: str | Path) -> set[str]:
    """The tokenizer sha256s that the marker of the checkpoint ``load_model`` reads from ``checkpoint`` records
    (empty for an export, a Hugging Face or SMDM folder, or a marker that records none)."""
    path = Path(checkpoint)
    if not path.is_dir() or (path / "config.json").is_file():
        return set()  # an export / Hugging Face folder or a single weights file: no marker
    step_dir = path if is_dcp_folder(path) else find_checkpoint(path, warn=False)
    if step_dir is None or not is_complete(step_dir):
        return set()
    return tokenizer_hashes(read_marker(step_dir).get("data", {}))


def tokenizer_hashes(identity: dict) -> set[str]:
    """The tokenizer sha256s that the preparation manifests of a data identity (:mod:`dlm_titan.data.identity`)
    record."""
    manifests = identity.get("manifests", {}) if isinstance(identity, dict) else {}
    if not isinstance(manifests, dict):
        return set()
    return {m["tokenizer_sha256"] for m in manifests.values()
            if isinstance(m, dict) and isinstance(m.get("tokenizer_sha256"), str)}


def _is_converted_copy(tokenizer_file: Path) -> bool:
    """A tokenizer.json of a model folder (config.json beside it), e.g. a dlm_titan export's: the export converts
    the training tokenizer (and adds the mask token), so its bytes never match the recorded hash."""
    return tokenizer_file.name == "tokenizer.json" and (tokenizer_file.parent / "config.json").is_file()


def export_tokenizer(tokenizer_path: str, identity: dict) -> str | None:
    """The tokenizer a run's final export ships: ``data.tokenizer_path`` when set (the loader has checked it
    against the shards' manifests). When unset, the embedded tokenizer, unless the preparation manifests in the
    run's data ``identity`` record another one: then None (an export without tokenizer files, with a warning
    naming the fix), not the embedded tokenizer's files on a model trained on other ids."""
    if tokenizer_path:
        return tokenizer_path
    recorded = tokenizer_hashes(identity)
    embedded = embedded_tokenizer_path()
    if not recorded or (embedded is not None and file_sha256(embedded) in recorded):
        return ""
    print("warning: the final export has no tokenizer: the training shards were prepared with another tokenizer "
          "than the embedded one and data.tokenizer_path is not set; add it with python -m "
          "scripts.export_checkpoint DUMP_FOLDER --tokenizer_path PATH (and set data.tokenizer_path in later runs)",
          file=sys.stderr)
    return None

