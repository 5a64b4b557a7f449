"""dlm_kernels: Triton kernels with their PyTorch twins: the fused masked-diffusion linear cross-entropy
(re-exported here), a multi-tensor AdamW (:mod:`dlm_kernels.adamw`), a fused residual add + RMSNorm
(:mod:`dlm_kernels.add_rms_norm`) and RoPE of a fused QKV projection with a one-kernel backward
(:mod:`dlm_kernels.rope`).

Standalone: imports torch and, when installed, triton; never dlm_titan. Importable without CUDA or triton.
"""

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
