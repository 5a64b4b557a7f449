"""Export a checkpoint after the fact: ``model.safetensors`` + ``config.json`` (see dlm_titan/checkpoint/export.py).

    python -m scripts.export_checkpoint outputs/debug/checkpoint/step-100 --dtype float32
    python -m scripts.export_checkpoint outputs/debug            # newest complete checkpoint of a dump folder

The source is a DCP ``step-N`` folder (model weights only are read; any world size), a dump folder (its newest
complete checkpoint) or an export folder (to change its dtype). The default destination is
``{dump_folder}/export-step-N``. Load the result with ``dlm_titan.checkpoint.export.load_model``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dlm_titan.checkpoint.export import DTYPES, read_model_weights, write_export
from dlm_titan.errors import UserError, report
from scripts.cli import HelpFormatter

_NOT_SHAPE = ("dtype", "step", "format")  # config.json fields that describe the file, not the model


def default_destination(source: Path, step: int) -> Path:
    """``{dump_folder}/export-step-N`` for a step folder (``dump/checkpoint/step-N``) or a dump folder."""
    dump = source.parent.parent if source.name.startswith("step-") else source
    return dump / f"export-step-{step}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("source", type=Path, help="step-N checkpoint, dump folder, or export folder")
    parser.add_argument("--out", type=Path, default=None, help="export folder (default: {dump_folder}/export-step-N)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="weights dtype")
    args = parser.parse_args(argv)
    try:
        cfg, state = read_model_weights(args.source)
        step = int(cfg.get("step", 0))
        out = args.out or default_destination(args.source, step)
        if out.resolve() == args.source.resolve():
            raise UserError(f"--out {out} is the source folder; choose another destination")
        shape = {k: v for k, v in cfg.items() if k not in _NOT_SHAPE}
        write_export(state, shape, out, args.dtype, step)
    except UserError as e:
        return report(e)
    print(f"exported step {step} of {args.source} ({cfg.get('flavor')}, {args.dtype}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
