"""Residual add + RMSNorm, forward and backward, on one GPU: the fused Triton op (called eagerly, and compiled as
in a training block) against torch.compile (Inductor) of the same math, at the shapes of a training step (fp32
residual stream, bf16 branch and output, as under autocast). Also sweeps the backward kernel's rows per tile and
programs per SM. Forward and forward+backward times are sums of their kernels' durations (profiler, L2 warm),
because a lone fwd+bwd through autograd takes the host longer (~0.4 ms) than the GPU, which a training step hides
behind queued work; the backward kernel sweep uses CUDA events (one launch per run).

Bandwidth is the op's minimum traffic over its time: forward reads x (4 B) and delta (2 B) and writes h (4 B) and
y (2 B) per element; backward reads dy (2 B), h (4 B) and dh_in (4 B) and writes dx (4 B) and d delta (2 B).

    python -m scripts.bench_add_rms_norm --dims 768 1792
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from dlm_kernels import add_rms_norm_triton as kernels
from dlm_kernels.add_rms_norm import add_rms_norm
from torch.profiler import ProfilerActivity, profile

from scripts.bench_loss import time_ms
from scripts.cli import HelpFormatter

EPS = 1e-5


def _compiled_reference():
    def add_norm(x, delta, weight):
        h = x + delta
        return h, F.rms_norm(h, (h.shape[-1],), weight, EPS).to(torch.bfloat16)

    return torch.compile(add_norm, fullgraph=True)


def kernel_ms(fn, iters: int, warmup: int = 5) -> float:
    """Milliseconds of GPU kernel time per ``fn()`` (profiler, summed over its kernels): its cost inside a
    training step, where the host runs ahead, even when launching it alone takes the host longer."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1000 / iters


def bench_dim(dim: int, rows: int, iters: int, sweep: bool) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, dim, device="cuda", generator=g).requires_grad_()
    delta = torch.randn(rows, dim, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = torch.ones(dim, device="cuda", requires_grad=True)
    dh_in = torch.randn(rows, dim, device="cuda", generator=g)
    dy = torch.randn(rows, dim, device="cuda", generator=g).bfloat16()
    n = rows * dim
    compiled = _compiled_reference()
    fused = lambda: add_rms_norm(x, delta, weight, EPS, torch.bfloat16)  # noqa: E731
    # As in a compiled block: Inductor launches the op's kernels from its own code, without the custom-op
    # dispatch that the eager call pays on the host.
    fused_compiled = torch.compile(lambda: add_rms_norm(x, delta, weight, EPS, torch.bfloat16), fullgraph=True)

    def fwd_bwd(fn):  # gradients returned, not accumulated into .grad (that would add a pass per run)
        h, y = fn()
        torch.autograd.grad([h, y], [x, delta, weight], [dh_in, dy])

    paths = (("compiled", lambda: compiled(x, delta, weight)), ("fused", fused), ("fused, compiled", fused_compiled))
    for name, fn in paths:
        with torch.no_grad():
            fwd = kernel_ms(fn, iters)
        total = kernel_ms(lambda f=fn: fwd_bwd(f), iters)
        print(f"d={dim} rows={rows} {name:15s}: forward {fwd:.3f} ms ({12 * n / fwd / 1e9:.2f} TB/s), "
              f"forward+backward {total:.3f} ms (backward ~{total - fwd:.3f} ms, "
              f"{16 * n / (total - fwd) / 1e9:.2f} TB/s)", flush=True)
    if not sweep:
        return
    with torch.no_grad():
        h, _, rstd = kernels.add_rms_norm_forward(x, delta, weight, EPS, torch.bfloat16)
    for block_m in (1, 2, 4, 8):
        for per_sm in (2, 4, 8):
            ms = time_ms(lambda b=block_m, p=per_sm: kernels.add_rms_norm_backward(
                dy, dh_in, h, rstd, weight, torch.float32, torch.bfloat16, block_m=b, programs_per_sm=p), iters, 5)
            print(f"d={dim} backward kernel, {block_m} rows per tile, {per_sm} programs per SM: {ms:.3f} ms "
                  f"({16 * n / ms / 1e9:.2f} TB/s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[768, 1792], help="feature widths D")
    parser.add_argument("--rows", type=int, default=16384, help="tokens of a step: local batch 8 x 2048")
    parser.add_argument("--iters", type=int, default=50, help="timed iterations per case")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the backward config sweep")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}", flush=True)
    for dim in args.dims:
        bench_dim(dim, args.rows, args.iters, args.sweep)


if __name__ == "__main__":
    main()
