"""Export weights as a Hugging Face model folder (see dlm_titan/interop/hf_export.py), loadable with
``transformers.AutoModelForMaskedLM.from_pretrained(DIR, trust_remote_code=True)`` (an autoregressive run's, with
``training.objective = "ar"``: ``AutoModelForCausalLM``) and by every dlm_titan script.

    python -m scripts.export_checkpoint outputs/debug/checkpoint/step-100 --dtype float32
    python -m scripts.export_checkpoint outputs/debug            # newest complete checkpoint of a dump folder
    python -m scripts.export_checkpoint smdm/mdm-170M-1e19.safetensors --tokenizer_path Llama-2-7b-hf \
        --out smdm-170m                                              # SMDM's release, with Llama-2's tokenizer
    python -m scripts.export_checkpoint TinyLlama-1.1B --out tinyllama-mdm               # a Llama folder

The source is a DCP ``step-N`` folder (model weights only; any world size), a dump folder (its newest complete
checkpoint), an export folder (either kind, e.g. to change its dtype), an SMDM/lit-gpt state dict
(``.safetensors``, ``.pth``, ``.pt``; the flavor is inferred from its shapes unless ``--flavor`` names it) or a
Llama-family Hugging Face folder (``LlamaForCausalLM``: its shape, GQA and rope_theta kept, the mask-token row
added). The default destination is ``{dump_folder}/export-step-N`` for dlm_titan checkpoints; other sources need
``--out``. The tokenizer files come from ``--tokenizer_path`` (one that cannot be shipped is an error), else from
the dump folder's config.toml, else from the source folder's own tokenizer; a folder without tokenizer files gets
none (with a warning: no tokenizer is guessed). An SMDM/lit-gpt file carries no tokenizer and is refused without
``--tokenizer_path``: SMDM's released models use Llama-2's, and the embedded tokenizer has its 32,000 pieces but
other ids.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dlm_titan.checkpoint.eval_tokenizer import (
    load_checked_tokenizer,
    recorded_tokenizer_hashes,
    refuse_litgpt_without_tokenizer,
)
from dlm_titan.checkpoint.export import DTYPES, read_model_weights
from dlm_titan.checkpoint.write_errors import STORAGE_FULL_ERRNOS
from dlm_titan.data.tokenizer import embedded_tokenizer_path
from dlm_titan.errors import UserError, report
from dlm_titan.interop.formats import interop_kind, read_interop
from dlm_titan.interop.hf_export import CONFIG_FILE, write_hf_folder
from dlm_titan.interop.hf_format import TEMPLATES, is_dlm_titan_hf_config
from dlm_titan.interop.hf_tokenizer import TOKENIZER_FILES
from dlm_titan.interop.safetensors_io import INDEX, SINGLE, is_weights_file_name
from dlm_titan.saved_config import RUN_CONFIG_FILE, read_toml
from scripts.cli import HelpFormatter

_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
_EXPORT_NAMES = {CONFIG_FILE, SINGLE, INDEX, "README.md", *TEMPLATES, *TOKENIZER_FILES}
"""What an export writes into its folder (besides shards); an earlier export's folder holds nothing else."""


def dump_folder_of(source: Path) -> Path | None:
    """The dump folder of a step folder (``dump/checkpoint/step-N``) or a dump folder; None for other sources."""
    dump = source.parent.parent if source.name.startswith("step-") else source
    return dump if (dump / RUN_CONFIG_FILE).is_file() else None


def default_destination(source: Path, step: int) -> Path:
    """``{dump_folder}/export-step-N`` for a dlm_titan checkpoint; UserError for other sources."""
    dump = dump_folder_of(source)
    if dump is None:
        raise UserError(f"{source} is not in a dlm_titan dump folder; choose the destination with --out DIR")
    return dump / f"export-step-{step}"


def default_tokenizer(source: Path) -> str | None:
    """The run's ``data.tokenizer_path`` (dump folder's config.toml; "" = the embedded tokenizer), else the source
    folder's own tokenizer file; None (no tokenizer) for another folder or a file (an SMDM/lit-gpt file is refused
    without --tokenizer_path before this)."""
    dump = dump_folder_of(source)
    if dump is not None:
        try:
            return str(read_toml(dump / RUN_CONFIG_FILE).get("data", {}).get("tokenizer_path", ""))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {dump / RUN_CONFIG_FILE} ({e}); pass --tokenizer_path") from None
    return str(source) if source.is_dir() and any((source / name).is_file() for name in _TOKENIZER_FILES) else None


def check_destination(out: Path, source: Path) -> None:
    """UserError for an ``--out`` that would overwrite the source or turn a run's folder into an export (whose
    config.json would then shadow the newest checkpoint of a dump folder for every reader)."""
    if out.resolve() == source.resolve():
        raise UserError(f"--out {out} is the source; choose another destination")
    if (out / RUN_CONFIG_FILE).is_file() or (out / ".metadata").is_file():
        raise UserError(f"--out {out} is a dlm_titan dump or checkpoint folder; export into a folder of its own "
                        "(default: {dump_folder}/export-step-N)")
    foreign = foreign_content(out)
    if foreign is not None:
        raise UserError(f"--out {out} is no dlm_titan export folder (it holds {foreign}); exporting there would "
                        "overwrite or remove its config.json, README.md, weights and tokenizer files: export into a "
                        "new or empty folder, or into an earlier export's")


def foreign_content(out: Path) -> str | None:
    """What in an existing destination an earlier dlm_titan export did not write (None: nothing), e.g. another
    model's folder or a folder of the user's own files. Hidden entries (a git clone's ``.git``) and the
    temporary files of an export that was killed are an export folder's too."""
    if not out.is_dir():
        return None
    config = out / CONFIG_FILE
    if config.is_file():
        try:
            content = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            content = None
        if not (isinstance(content, dict) and (is_dlm_titan_hf_config(content) or content.get("format") == "dlm_titan")):
            return f"a {CONFIG_FILE} that no dlm_titan export wrote"
    for entry in sorted(out.iterdir()):
        name = entry.name.removesuffix(".tmp")
        if not (entry.name.startswith(".") or name in _EXPORT_NAMES or is_weights_file_name(name)):
            return f"{entry.name}, which no export writes"
    return None


def training_tokenizer(source: Path, tokenizer: str | None, vocab_size: int, explicit: bool) -> str | None:
    """``tokenizer`` when the checkpoint ``source`` records no tokenizer or this one (the sha256 its training shards'
    manifests record): a tokenizer of the right size but other ids would be shipped without a word, e.g. the
    embedded default of a run whose config.toml names no data.tokenizer_path. Another one is a UserError when
    ``explicit`` (--tokenizer_path), else None (no tokenizer files) with a warning naming the fix."""
    if tokenizer is None or not (recorded := recorded_tokenizer_hashes(source)):
        return tokenizer
    try:
        load_checked_tokenizer(str(source), tokenizer or str(embedded_tokenizer_path() or ""), vocab_size,
                               recorded=recorded)
    except UserError as e:
        if explicit:
            raise
        print(f"warning: the export has no tokenizer: {e}", file=sys.stderr)
        return None
    return tokenizer


def export(source: Path, out: Path | None, dtype: str, flavor: str | None, tokenizer_path: str | None) -> tuple[dict, Path]:
    """Reads ``source`` and writes the folder; returns (model config, destination)."""
    if flavor and interop_kind(source) != "litgpt":
        raise UserError(f"--flavor applies to SMDM/lit-gpt state dict files only, not to {source}")
    refuse_litgpt_without_tokenizer(source, tokenizer_path)  # before its weights are read
    read = read_interop(source, flavor)
    cfg, state = read if read is not None else read_model_weights(source)
    step = int(cfg.get("step", 0))
    out = out or default_destination(source, step)
    check_destination(out, source)
    tokenizer = default_tokenizer(source) if tokenizer_path is None else tokenizer_path
    tokenizer = training_tokenizer(source, tokenizer, int(cfg["vocab_size"]), explicit=tokenizer_path is not None)
    info = {"flavor": cfg.get("flavor"), "step": step, "tokens_seen": cfg.get("tokens_seen") or None}
    write_hf_folder(state, cfg, out, dtype, info, tokenizer, tokenizer_required=tokenizer_path is not None)
    return cfg, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("source", type=Path, help="step-N checkpoint, dump folder, export folder, SMDM/lit-gpt "
                        "state dict or Llama folder")
    parser.add_argument("--out", type=Path, default=None, help="destination folder (default: "
                        "{dump_folder}/export-step-N for dlm_titan checkpoints)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="weights dtype")
    parser.add_argument("--flavor", default=None, help="SMDM flavor of a lit-gpt state dict (default: inferred "
                        "from its shapes)")
    parser.add_argument("--tokenizer_path", default=None, help="tokenizer to ship (default: the run's "
                        "data.tokenizer_path, else the source folder's own; required for an SMDM/lit-gpt file: "
                        "Llama-2's for SMDM's released models)")
    args = parser.parse_args(argv)
    try:
        cfg, out = export(args.source, args.out, args.dtype, args.flavor, args.tokenizer_path)
    except UserError as e:
        return report(e)
    except OSError as e:  # a full, read-only or failing disk under the destination: its cause, not a traceback
        if e.errno not in STORAGE_FULL_ERRNOS:
            raise
        return report(UserError(f"writing the export failed: {e.strerror} ({e.filename}); the source is intact and "
                                "the destination holds no config.json, so it loads as no model: free space (or fix "
                                "the filesystem) and rerun the same command"))
    print(f"exported step {cfg.get('step', 0)} of {args.source} ({cfg.get('flavor') or 'custom shape'}, "
          f"{args.dtype}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
