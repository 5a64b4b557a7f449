"""Can the LM-head logits GEMM carry the softmax statistics? A Triton GEMM with a log-sum-exp epilogue vs cuBLAS.

The fused loss (kernels/masked_ce_fused.py) runs cuBLAS for ``Z = X W^T`` and then a Triton pass over Z for the
log-sum-exp. This benchmark times, on one GPU, for one 4096-row chunk of the loss (``X [4096, d]``, ``W [V, d]``,
bf16): cuBLAS alone, and a persistent TMA Triton GEMM that writes Z and, optionally, per (row, column tile) the max
and the sum of ``exp(z - max)`` of its fp32 accumulator (from which ``lse_i = logsumexp_j (max_ij + log sum_ij)``).
The epilogue would spare the row kernel its first read of Z (~0.09 ms per chunk at 3 TB/s); it pays only if the
Triton GEMM stays within that of cuBLAS. Checks Z bit for bit against cuBLAS's and the log-sum-exp against
float32 math on cuBLAS's logits.

    python -m scripts.bench_lse_epilogue --dims 768 2048
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from scripts.bench_loss import time_ms
from scripts.cli import HelpFormatter

_LOG2E = tl.constexpr(1.4426950408889634)
# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps); larger tiles or more stages exceed an H100's 227 KiB of shared memory.
CONFIGS = [(128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (256, 128, 64, 3, 8)]


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row tiles sweep the columns together, so W tiles are reused from L2."""
    in_group = GROUP_M * num_pid_n
    first_m = (tile // in_group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % in_group) % size_m, (tile % in_group) // size_m


@triton.jit
def _logits_lse_kernel(x_desc, w_desc, z_desc, max_ptr, sum_ptr, M, N, K, PROGRAMS: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, LSE: tl.constexpr):
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            acc = tl.dot(x_desc.load([pid_m * BM, k]), w_desc.load([pid_n * BN, k]).T, acc)
        z_desc.store([pid_m * BM, pid_n * BN], acc.to(tl.bfloat16))
        if LSE:
            rows = pid_m * BM + tl.arange(0, BM)
            row_max = tl.max(acc, axis=1)
            row_sum = tl.sum(tl.exp2((acc - row_max[:, None]) * _LOG2E), axis=1)
            tl.store(max_ptr + rows * num_pid_n + pid_n, row_max, mask=rows < M)
            tl.store(sum_ptr + rows * num_pid_n + pid_n, row_sum, mask=rows < M)


def logits_lse(x, w, z, row_max, row_sum, config, lse: bool) -> None:
    """``z = x @ w.T`` (bf16) and, if ``lse``, the per-tile partials into ``row_max`` / ``row_sum`` [M, N/BN]."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, bk, stages, warps = config
    (m, k), n = x.shape, w.shape[0]
    programs = min(torch.cuda.get_device_properties(x.device).multi_processor_count, triton.cdiv(m, bm) * triton.cdiv(n, bn))
    _logits_lse_kernel[(programs,)](
        TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
        TensorDescriptor.from_tensor(z, [bm, bn]), row_max, row_sum, m, n, k,
        PROGRAMS=programs, BM=bm, BN=bn, BK=bk, GROUP_M=8, LSE=lse, num_stages=stages, num_warps=warps,
    )


def bench_dim(d: int, rows: int, vocab: int, iters: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, d, device="cuda", generator=g).bfloat16()
    w = (torch.randn(vocab, d, device="cuda", generator=g) * (2 / d**0.5)).bfloat16()
    z = torch.empty(rows, vocab, device="cuda", dtype=torch.bfloat16)
    ref = x @ w.t()
    ref_lse = ref.float().logsumexp(1)
    gflop = 2 * rows * vocab * d / 1e9
    ms = time_ms(lambda: torch.mm(x, w.t(), out=z), iters, 5)
    print(f"d={d} cuBLAS: {ms:.3f} ms, {gflop / ms:.0f} TFLOP/s", flush=True)
    for config in CONFIGS:
        parts = triton.cdiv(vocab, config[1])
        row_max = torch.empty(rows, parts, device="cuda")
        row_sum = torch.empty(rows, parts, device="cuda")
        for lse in (False, True):
            logits_lse(x, w, z, row_max, row_sum, config, lse)
            check = f"Z equal to cuBLAS's: {torch.equal(z, ref)}"
            if lse:
                err = ((row_max + row_sum.log()).logsumexp(1) - ref_lse).abs().max().item()
                check += f", |lse - lse(cuBLAS Z)| <= {err:.1e}"
            ms = time_ms(lambda c=config, f=lse, mx=row_max, sm=row_sum: logits_lse(x, w, z, mx, sm, c, f), iters, 5)
            print(f"d={d} Triton {'x'.join(map(str, config[:3]))} stages {config[3]} warps {config[4]}"
                  f"{' + lse epilogue' if lse else ''}: {ms:.3f} ms, {gflop / ms:.0f} TFLOP/s ({check})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[768, 2048], help="hidden sizes d")
    parser.add_argument("--rows", type=int, default=4096, help="masked rows in one chunk")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary V")
    parser.add_argument("--iters", type=int, default=30, help="timed iterations per case")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}, triton {triton.__version__}", flush=True)
    for d in args.dims:
        bench_dim(d, args.rows, args.vocab, args.iters)


if __name__ == "__main__":
    main()
