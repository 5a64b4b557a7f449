"""dlm_kernels: Triton kernels with their PyTorch twins: the fused masked-diffusion linear cross-entropy
(re-exported here), a multi-tensor AdamW (:mod:`dlm_kernels.adamw`), a fused residual add + RMSNorm
(:mod:`dlm_kernels.add_rms_norm`) and RoPE of a fused QKV projection with a one-kernel backward
(:mod:`dlm_kernels.rope`).

Standalone: imports torch and, when installed, triton; never dlm_titan. Importable without CUDA or triton
(:mod:`dlm_kernels.triton_utils` holds what the Triton modules share: the optional import, where kernels run,
launch-configuration arithmetic).

This folder is installed as ``dlm_kernels``; under its folder name ``kernels`` (found first whenever the
repository root is on ``sys.path``: pytest, ``python -m ...`` from the root) it hands over to the unrelated
PyPI package ``kernels`` instead, see :func:`_hand_over_folder_name`.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _hand_over_folder_name() -> None:
    """Make ``import kernels`` give the PyPI package ``kernels``, never this folder.

    transformers (which depends on the PyPI ``kernels`` since version 5) decides that its hub-kernels integration is usable
    from ``importlib.util.find_spec("kernels")``, which finds this folder when the repository root is on
    ``sys.path``, and from the ``kernels`` distribution's version metadata, which comes from the real package.
    It then runs ``from kernels import CUDAProperties, ...``. So the module bound to ``kernels`` is replaced by
    the real package, found on the other ``sys.path`` entries (the import system returns whatever
    ``sys.modules["kernels"]`` holds once this file has run). Without the real package, ``kernels`` stays an
    empty module without ``__version__``, which transformers reads as "hub kernels not available".
    """
    root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    others = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", others)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("kernels", None)
        raise


if __name__ == "kernels":
    _hand_over_folder_name()
else:
    from .masked_ce import IMPLS, fused_supported, masked_linear_cross_entropy, resolve_impl
    from .masked_ce_fused import fused_masked_linear_cross_entropy
    from .reference import chunked_weighted_cross_entropy, masked_linear_cross_entropy_reference

    __all__ = [
        "IMPLS",
        "chunked_weighted_cross_entropy",
        "fused_masked_linear_cross_entropy",
        "fused_supported",
        "masked_linear_cross_entropy",
        "masked_linear_cross_entropy_reference",
        "resolve_impl",
    ]
