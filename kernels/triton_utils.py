"""What every Triton module of :mod:`dlm_kernels` shares: the optional triton import, whether (and where) the
kernels can run, and the launch-configuration arithmetic.

The package imports without triton (CPU-only installs fall back to the PyTorch twins): ``triton`` and ``tl`` are
then None and :func:`runs_on` is False everywhere. Set ``TRITON_INTERPRET=1`` before the package is imported to
run the kernels on CPU tensors (tests): triton.jit reads it when a kernel is defined, i.e. at import.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton fall back to the PyTorch references.
    triton = None
    tl = None

_INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """Whether triton imported, so that the kernels are defined."""
    return triton is not None


def interpreter_active() -> bool:
    """Whether the kernels were defined under ``TRITON_INTERPRET=1`` (they then run on CPU tensors only)."""
    return _INTERPRETED


def runs_on(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of ``device``: CUDA with triton, or CPU under the interpreter."""
    if triton is None:
        return False
    if interpreter_active():
        return device.type == "cpu"
    return device.type == "cuda"


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``): Triton block shapes must be powers of two."""
    return 1 << max(0, (n - 1).bit_length())


def warps_for(elements: int, per_warp: int = 512, most: int = 16) -> int:
    """Warps for a program over ``elements`` values: one per ``per_warp`` of them, between 1 and ``most``."""
    return max(1, min(most, elements // per_warp))


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``, the unit persistent kernels size their grids by; 2 under the
    interpreter or off CUDA (the interpreter runs programs one by one: few programs keep CPU tests short)."""
    if interpreter_active() or device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count
