"""Reverse-process samplers of SMDM (``eval/gen_model_answer.py::diff_sample``), made exact per sample.

The canvas is ``[prompt, mask x length]``. Each step runs the model once on the whole canvas, draws a token for
every masked position of the current block (Gumbel-max in float64: temperature 0 is argmax, 1 samples the model's
distribution), and reveals some of them:

- ``"stochastic"`` (SMDM ``origin``): going from time t to s (linspace(1, 0, steps + 1)) each masked position is
  revealed independently with probability 1 - s/t, so the last step reveals all. SMDM's grid ends at t = 1e-5
  and its last step reveals whatever is left: the same last step, the other times shifted by under 1e-5.
- ``"confidence"`` (after SMDM ``greddy``): the masked positions with the highest model probability of their
  drawn token are revealed, ``floor(n (i + 1) / steps) - floor(n i / steps)`` of them at step i for a block of
  n tokens (a linear schedule in exact integers). This count is ours, not SMDM's: SMDM reveals
  ``int(n_masked (1 - s/t))`` of the still-masked positions per step and the rest at the last step. The top-k is
  taken within each sample; SMDM ranks the flattened batch jointly, which lets one sample's confident tokens
  starve another's.

Options: unsupervised classifier-free guidance (SMDM: the unconditional pass sees the prompt masked, logits =
uncond + (cfg + 1)(cond - uncond), both passes in one batched forward), semi-autoregressive blocks (the
generated span is filled block after block, ``steps`` forward passes per block, later blocks staying masked),
and stopping at EOS (blocks after the one where every sample produced EOS are not run; everything after EOS
is returned as EOS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dlm_titan.errors import UserError
from dlm_titan.interop.templates.diffusion_rule import (
    gumbel_argmax,
    reveal_step,
    row_generators,
    transfer_counts,
)

# The reveal rule lives in a standalone module that exported model folders carry too; its pieces are
# re-exported here, where the trainer-side code imports them.
__all__ = ["ALGORITHMS", "SamplerConfig", "generate", "group_by_length", "guided_logits", "gumbel_argmax",
           "row_generators", "sample", "transfer_counts", "truncate_at_eos"]

ALGORITHMS = ("confidence", "stochastic")


@dataclass
class SamplerConfig:
    """How to generate.

    Attributes:
        length: tokens generated after the prompt (SMDM's ``context_length`` was the total; this is not).
        steps: forward passes per block.
        block_length: semi-autoregressive block size; 0 = one block of ``length``.
        algorithm: "confidence" (highest-confidence unmasking) or "stochastic" (reveal with prob 1 - s/t).
        temperature: Gumbel-max temperature; 0 = argmax.
        cfg_scale: unsupervised classifier-free guidance strength; 0 = off.
        stop_at_eos: skip blocks once every sample has produced EOS, and pad after EOS with EOS.
        seed: seeds the sampling noise (token draws and reveal order).
    """

    length: int = 128
    steps: int = 64
    block_length: int = 0
    algorithm: str = "confidence"
    temperature: float = 0.0
    cfg_scale: float = 0.0
    stop_at_eos: bool = True
    seed: int = 0

    def blocks(self) -> int:
        """Number of semi-AR blocks; UserError if the options are inconsistent."""
        if self.algorithm not in ALGORITHMS:
            raise UserError(f"unknown sampling algorithm {self.algorithm!r}; use one of {', '.join(ALGORITHMS)}")
        if self.length < 1 or self.steps < 1:
            raise UserError(f"length ({self.length}) and steps ({self.steps}) must be at least 1")
        # not (x >= 0) also refuses NaN; inf is refused too: -inf (vocab-limited) logits / inf are NaN, which
        # argmax picks, so tokens beyond the tokenizer would come out
        if not all(v >= 0 and math.isfinite(v) for v in (self.temperature, self.cfg_scale)):
            raise UserError(f"temperature ({self.temperature}) and cfg_scale ({self.cfg_scale}) must be finite "
                            "and >= 0")
        block = self.block_length or self.length
        if block < 1 or self.length % block:
            raise UserError(f"length ({self.length}) must be a multiple of block_length ({self.block_length}); "
                            f"e.g. --block_length {_divisor_near(self.length, block)}")
        if self.algorithm == "confidence" and self.steps > block:
            raise UserError(f"steps ({self.steps}) exceed the block of {block} tokens: confidence sampling reveals "
                            f"at least one token per step; use --steps {block} or fewer")
        return self.length // block


def _divisor_near(n: int, target: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - target))


def guided_logits(
    model: torch.nn.Module, x: torch.Tensor, prompt_mask: torch.Tensor, cfg_scale: float, mask_id: int
) -> torch.Tensor:
    """Float32 logits of canvas ``x`` [B, L]; with cfg_scale > 0, unsupervised CFG in the same forward call.

    The unconditional copy has every position of ``prompt_mask`` replaced by the mask token (SMDM's
    unsupervised CFG needs no model trained with prompt dropout).
    """
    if cfg_scale <= 0:
        return model(x).float()
    uncond = torch.where(prompt_mask, torch.full_like(x, mask_id), x)
    cond_logits, uncond_logits = model(torch.cat([x, uncond])).float().chunk(2)
    return uncond_logits + (cfg_scale + 1.0) * (cond_logits - uncond_logits)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    cfg: SamplerConfig,
    *,
    mask_id: int,
    eos_id: int | None = None,
    vocab_limit: int | None = None,
    row_seeds: list[int] | None = None,
) -> torch.Tensor:
    """Generates ``cfg.length`` tokens after each row of ``prompt`` [B, P] (all prompts of one length).

    Args:
        model: maps token ids [B, L] to logits [B, L, V] (the mask id is never predicted).
        prompt: prompt token ids, on the model's device.
        cfg: sampler options.
        mask_id: the mask token id (vocab_size).
        eos_id: end-of-text id for ``stop_at_eos``; None disables stopping.
        vocab_limit: ids >= this are never sampled (a tokenizer smaller than the model's head).
        row_seeds: a noise seed per row (default cfg.seed + row index); equal seeds and prompts give equal
            samples whatever the rest of the batch.

    Returns:
        [B, P + length] token ids: the prompt unchanged, then the generated tokens; never the mask id.
    """
    num_blocks = cfg.blocks()
    block = cfg.length // num_blocks
    batch, plen = prompt.shape
    x = torch.cat([prompt, torch.full((batch, cfg.length), mask_id, dtype=prompt.dtype, device=prompt.device)], 1)
    prompt_mask = torch.zeros_like(x, dtype=torch.bool)
    prompt_mask[:, :plen] = True
    generators = row_generators(row_seeds or [cfg.seed + r for r in range(batch)], x.device)
    times = torch.linspace(1.0, 0.0, cfg.steps + 1, dtype=torch.float64).tolist()
    counts = transfer_counts(block, cfg.steps)
    stop = cfg.stop_at_eos and eos_id is not None
    for b in range(num_blocks):
        span = slice(plen + b * block, plen + (b + 1) * block)
        for i in range(cfg.steps):
            logits = guided_logits(model, x, prompt_mask, cfg.cfg_scale, mask_id)[:, span]
            if vocab_limit is not None and vocab_limit < logits.shape[-1]:
                logits[..., vocab_limit:] = float("-inf")
            x[:, span] = reveal_step(x[:, span], logits, mask_id, cfg.algorithm, cfg.temperature, times[i],
                                     times[i + 1], counts[i], generators)
        if stop and bool((x[:, plen:] == eos_id).any(dim=1).all()):
            break
    if stop:
        x[:, plen:] = _pad_after_eos(x[:, plen:], eos_id)
    return x


def _pad_after_eos(generated: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Replaces every token after a row's first EOS (and any unrevealed mask there) by EOS."""
    after = (generated == eos_id).long().cumsum(dim=1) > 0
    return torch.where(after, torch.full_like(generated, eos_id), generated)


def truncate_at_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    """``tokens`` up to (not including) the first EOS."""
    return tokens[: tokens.index(eos_id)] if eos_id is not None and eos_id in tokens else tokens


def group_by_length(prompts: list[list[int]]) -> dict[int, list[int]]:
    """The indices of the prompts of each length (a model without an attention mask runs one length per batch);
    UserError if a prompt is empty."""
    if any(len(p) == 0 for p in prompts):
        raise UserError("a prompt has no tokens; pass at least one token (e.g. the EOS id to start a document)")
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    return groups


def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    cfg: SamplerConfig,
    *,
    mask_id: int,
    eos_id: int | None = None,
    vocab_limit: int | None = None,
    device: torch.device | str = "cpu",
) -> list[list[int]]:
    """Continuations of a batch of prompts of any lengths (cut before EOS when ``cfg.stop_at_eos``).

    The model has no attention mask, so padding would change what it sees: prompts are grouped by length and
    each group runs as one batch. Prompt i samples with seed ``cfg.seed + i``, so its continuation does not
    depend on the other prompts, and copies of one prompt give different samples at temperature > 0.
    """
    out: list[list[int]] = [[] for _ in prompts]
    for plen, rows in group_by_length(prompts).items():
        prompt = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=device)
        x = sample(model, prompt, cfg, mask_id=mask_id, eos_id=eos_id, vocab_limit=vocab_limit,
                   row_seeds=[cfg.seed + i for i in rows])
        for i, seq in zip(rows, x[:, plen:].tolist(), strict=True):
            out[i] = truncate_at_eos(seq, eos_id) if cfg.stop_at_eos else seq
    return out
