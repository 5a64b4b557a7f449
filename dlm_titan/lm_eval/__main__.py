"""``python -m dlm_titan.lm_eval``: lm-eval's own command line, with model ``dlm_titan`` registered.

Every lm-eval flag works (``--tasks``, ``--limit``, ``--include_path``, ``--output_path``, ``--log_samples``,
``--gen_kwargs``, ...)::

    python -m dlm_titan.lm_eval --model dlm_titan \\
        --model_args pretrained=outputs/170m,nll_type=mc,mc_samples=128,cfg_scale=0 \\
        --tasks hellaswag --batch_size 256 --output_path results --log_samples
    torchrun --nproc_per_node 8 -m dlm_titan.lm_eval --model dlm_titan --model_args pretrained=outputs/170m \\
        --tasks hellaswag --batch_size 256     # data parallel: the one-process scores, 8 GPUs

Bad model_args or paths end with one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

import sys

from dlm_titan.distributed import shutdown
from dlm_titan.errors import UserError, report


def main() -> int:
    try:
        from lm_eval.__main__ import cli_evaluate

        import dlm_titan.lm_eval.model  # noqa: F401  (registers the model "dlm_titan")
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("lm_eval"):
            raise
        return report(UserError('lm-eval is not installed; pip install -e ".[dev]" (or pip install lm-eval)'))
    try:
        cli_evaluate()
    except UserError as e:
        return report(e)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
