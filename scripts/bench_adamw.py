"""The Triton AdamW step (``dlm_kernels.adamw``) at a flavor's parameter shapes on one GPU: its time and bandwidth
for several tiles (elements per program, warps), against plain streaming kernels of the same card as a ceiling.

Bandwidth is the step's minimum traffic over its time: 28 bytes per fp32 parameter (reads p, grad, m, v; writes
p, m, v). The ceilings: ``torch.add`` of two flat fp32 buffers into a third (12 B per element, the same mix of
reads and writes as AdamW's 4:3) and a copy (8 B). The tile the trainer uses is ``dlm_titan.optim``'s default; a
tile that beats it on one card may lose on another (it was chosen on an H200), so compare on the card you train on.

    python -m scripts.bench_adamw --flavor 1028M --tiles 1024,4 2048,8 4096,8
"""

from __future__ import annotations

import argparse
import functools

import torch
from dlm_kernels.adamw import AdamWLaunch

from dlm_titan.models.flavors import get_model_args
from dlm_titan.models.transformer import TransEncoder
from scripts.bench_loss import time_ms
from scripts.cli import HelpFormatter

BYTES_PER_PARAM = 28


def parameter_shapes(flavor: str) -> list[torch.Size]:
    """The shapes of a flavor's parameters (the AR model: vocab_size embedding rows), built on the meta device."""
    with torch.device("meta"):
        model = TransEncoder(get_model_args(flavor), causal=True)
    return [p.shape for p in model.parameters()]


def parse_tile(text: str) -> tuple[int, int]:
    """``"1024,4"`` -> (1024, 4)."""
    block, warps = (int(x) for x in text.split(","))
    return block, warps


def bench_tiles(shapes: list[torch.Size], tiles: list[tuple[int, int]], iters: int) -> dict[tuple[int, int], float]:
    """Milliseconds of one AdamW step (with a clip coefficient) over tensors of ``shapes``, per tile."""
    params = [torch.randn(s, device="cuda") for s in shapes]
    grads = [torch.randn(s, device="cuda") * 1e-3 for s in shapes]
    exp_avgs, exp_avg_sqs = ([torch.zeros(s, device="cuda") for s in shapes] for _ in range(2))
    steps = [torch.tensor(1.0) for _ in shapes]
    scale = torch.ones(1, device="cuda")
    times = {}
    for block, warps in tiles:
        step = functools.partial(AdamWLaunch(block, warps), params, grads, exp_avgs, exp_avg_sqs, steps, lr=2e-4,
                                 beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_scale=scale)
        times[(block, warps)] = time_ms(step, iters, warmup=3)
    return times


def streaming_ceilings(numel: int, iters: int) -> dict[str, float]:
    """TB/s of ``torch.add`` (12 B per element) and of a copy (8 B) over ``numel`` fp32 elements."""
    a, b, c = (torch.empty(numel, device="cuda") for _ in range(3))
    add_ms = time_ms(lambda: torch.add(a, b, out=c), iters, warmup=3)
    copy_ms = time_ms(lambda: c.copy_(a), iters, warmup=3)
    return {"add": 12 * numel / add_ms / 1e9, "copy": 8 * numel / copy_ms / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--flavor", default="1028M", help="model flavor whose parameter shapes are stepped")
    parser.add_argument("--tiles", nargs="+", type=parse_tile, default=[(1024, 4), (2048, 4), (2048, 8), (4096, 8)],
                        help="BLOCK,WARPS pairs to time")
    parser.add_argument("--iters", type=int, default=20, help="timed steps per tile")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: bench_adamw needs a CUDA GPU (the Triton AdamW kernel runs on CUDA only)")
    shapes = parameter_shapes(args.flavor)
    numel = sum(s.numel() for s in shapes)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.flavor}: {numel:,} fp32 parameters",
          flush=True)
    for (block, warps), ms in bench_tiles(shapes, args.tiles, args.iters).items():
        print(f"AdamW tile {block} x {warps} warps: {ms:.2f} ms, {BYTES_PER_PARAM * numel / ms / 1e9:.2f} TB/s")
    ceilings = streaming_ceilings(numel, args.iters)
    print(f"ceilings: torch.add {ceilings['add']:.2f} TB/s, copy {ceilings['copy']:.2f} TB/s")


if __name__ == "__main__":
    main()
