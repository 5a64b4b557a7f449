"""The reveal rule of dlm_titan's masked diffusion samplers, in one place.

Standalone: needs only torch and numpy. dlm_titan.sampling imports it from here, and every exported Hugging Face
model folder carries a copy next to modeling_dlm_titan.py, which imports it relatively; so the sampler of the
trainer and the one of the exported model are the same code. See dlm_titan.sampling for the rule in words.
"""

from __future__ import annotations

import numpy as np
import torch


def row_generators(seeds: list[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per sample, so a sample's noise does not depend on its batch (keys mixed by SeedSequence)."""
    keys = [int(np.random.SeedSequence([s]).generate_state(1, dtype=np.uint64)[0] >> 1) for s in seeds]
    return [torch.Generator(device=device).manual_seed(k) for k in keys]


def uniform(shape: tuple[int, ...], generators: list[torch.Generator], device: torch.device) -> torch.Tensor:
    """float64 uniforms [B, *shape]: row b from generators[b]."""
    return torch.stack([torch.rand(shape, dtype=torch.float64, device=device, generator=g) for g in generators])


def gumbel_argmax(logits: torch.Tensor, temperature: float, generators: list[torch.Generator]) -> torch.Tensor:
    """A token per position of ``logits`` [B, N, V] drawn from softmax(logits / temperature) by Gumbel-max in
    float64 (argmax at temperature 0); row b's noise comes from generators[b].

    argmax(l / T + G) with G = -log(-log u) equals SMDM's argmax(exp(l) / (-log u)^T) without overflowing exp.
    float64 keeps the draw exact for low-probability tokens (float32 Gumbel noise saturates near u = 1). Each
    row's largest logit is shifted to 0 before dividing: at a tiny T the others then go to -inf and the argmax
    wins, where l / T sent every logit of one sign to the same +-inf and the first of them won.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    u = uniform(tuple(logits.shape[1:]), generators, logits.device)
    shifted = logits.double() - logits.double().amax(dim=-1, keepdim=True)
    return (shifted / temperature - torch.log(-torch.log(u))).argmax(dim=-1)


def transfer_counts(n: int, steps: int) -> list[int]:
    """Tokens revealed at each step of the linear schedule: floor(n (i+1)/steps) - floor(n i/steps); sums to n."""
    return [n * (i + 1) // steps - n * i // steps for i in range(steps)]


def reveal_stochastic(candidates: torch.Tensor, t: float, s: float, generators: list[torch.Generator]) -> torch.Tensor:
    """Each candidate (a masked position of the current block) is revealed with probability 1 - s/t."""
    u = uniform(tuple(candidates.shape[1:]), generators, candidates.device)
    return candidates & (u < 1.0 - s / t)


def reveal_confident(candidates: torch.Tensor, confidence: torch.Tensor, k: int) -> torch.Tensor:
    """The k candidates of each row with the highest confidence (top-k within each sample)."""
    reveal = torch.zeros_like(candidates)
    if k == 0:
        return reveal
    scores = torch.where(candidates, confidence, torch.full_like(confidence, -1.0))
    reveal.scatter_(1, scores.topk(k, dim=1).indices, True)
    return reveal & candidates


def reveal_step(span: torch.Tensor, logits: torch.Tensor, mask_id: int, algorithm: str, temperature: float,
                t: float, s: float, count: int, generators: list[torch.Generator]) -> torch.Tensor:
    """One reverse step on the current block: a token drawn for every position, some masked ones revealed.

    Args:
        span: the block's token ids [B, N] (masked positions hold ``mask_id``).
        logits: float32 logits of the block [B, N, V].
        mask_id: the mask token id.
        algorithm: "stochastic" (reveal with probability 1 - s/t) or "confidence" (the ``count`` most probable).
        temperature: Gumbel-max temperature; 0 = argmax.
        t: the step's start time (stochastic only).
        s: the step's end time (stochastic only).
        count: tokens revealed per row (confidence only).
        generators: one per row; the token draws come first, then the stochastic reveal's uniforms.

    Returns:
        The block's new token ids [B, N].
    """
    x0 = gumbel_argmax(logits, temperature, generators)
    candidates = span == mask_id
    if algorithm == "stochastic":
        reveal = reveal_stochastic(candidates, t, s, generators)
    else:
        confidence = torch.softmax(logits.double(), dim=-1).gather(-1, x0[..., None]).squeeze(-1)
        reveal = reveal_confident(candidates, confidence, count)
    return torch.where(reveal, x0.to(span.dtype), span)
