"""The masked-diffusion forward process of SMDM, with noise keyed by sample identity.

For each sequence, t ~ U(0, 1), p = (1 - eps) t + eps, and each token is replaced by the mask id with
probability p. The training loss is sum over masked tokens of CE / p, divided by the number of tokens of the
whole optimizer step. The noise of a sequence (its t and its per-token uniforms) comes from a generator keyed
by (seed, stream, step, global index of the sequence in the step): it differs across sequences, ranks and
steps, repeats exactly after a restart, and does not depend on how the global batch is split over ranks and
micro-batches. Noise is drawn on the CPU so it is also the same on every device type.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Noise streams, all defined here so their keys never collide: training, validation, SSL crop lengths, and
# evaluation MC samples (dlm_titan.likelihood).
TRAIN_STREAM, VALIDATION_STREAM, SSL_STREAM, EVAL_STREAM = 0, 1, 2, 5


def noise_generator(seed: int, stream: int, step: int, index: int, *, stratify_offset: bool = False) -> torch.Generator:
    """A CPU generator keyed by (seed, stream, step, index), keys mixed by numpy's SeedSequence. The step's
    stratification offset gets a key of its own (one element longer, so it equals no sequence's key)."""
    key = [seed, stream, step, index] + ([1] if stratify_offset else [])
    state = np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


@dataclass
class Noise:
    """Noise of a micro-batch: t per sequence [B] and token uniforms [B, L]; token i is masked iff u_i < p."""

    t: torch.Tensor
    uniforms: torch.Tensor

    def mask_prob(self, eps: float) -> torch.Tensor:
        return (1.0 - eps) * self.t + eps


def sample_noise(
    positions: torch.Tensor,
    seq_len: int,
    *,
    seed: int,
    step: int,
    stream: int = TRAIN_STREAM,
    t_sampling: str = "uniform",
    num_positions: int = 1,
) -> Noise:
    """Draws the noise of the sequences at ``positions`` (global indices within the step's batch).

    Args:
        positions: global index of each sequence in the step's batch, [B].
        seq_len: tokens per sequence.
        seed, step, stream: the rest of the noise key.
        t_sampling: "uniform" draws t from the sequence's own generator (SMDM); "stratified" sets
            t_j = (u + j / num_positions) mod 1 with u shared by the step, spreading t over the global batch.
        num_positions: size of the global batch (the stratification period).
    """
    ts, uniforms = [], []
    for j in positions.tolist():
        gen = noise_generator(seed, stream, step, j)
        ts.append(torch.rand((), generator=gen))
        uniforms.append(torch.rand(seq_len, generator=gen))
    t = torch.stack(ts)
    if t_sampling == "stratified":
        offset = torch.rand((), generator=noise_generator(seed, stream, step, 0, stratify_offset=True))
        t = torch.remainder(offset + positions.to(torch.float32) / num_positions, 1.0)
    return Noise(t=t, uniforms=torch.stack(uniforms))


def ssl_length(seed: int, step: int, first_position: int, seq_len: int, ssl_ratio: float) -> int:
    """SMDM's stochastic sequence length: with probability ssl_ratio a micro-batch is cropped to a length
    uniform in 1..seq_len. Keyed by (seed, step, first position of the micro-batch) so every rank can compute
    every micro-batch's length, and so the step's token count, before any forward."""
    if ssl_ratio <= 0:
        return seq_len
    gen = noise_generator(seed, SSL_STREAM, step, first_position)
    if torch.rand((), generator=gen).item() >= ssl_ratio:
        return seq_len
    return int(torch.randint(1, seq_len + 1, (), generator=gen).item())


@dataclass
class MaskedBatch:
    """Model input (clean tokens with masked ones replaced by mask_id), the clean targets, per-token loss
    weights (1 / (p * token_count) at masked positions, exactly 0 elsewhere) and the flat indices of the masked
    positions (so the loss needs no device-to-host sync to find them)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    token_weights: torch.Tensor
    masked_index: torch.Tensor
    num_masked: int


def forward_process(
    tokens: torch.Tensor, noise: Noise, *, eps: float, mask_id: int, token_count: int
) -> MaskedBatch:
    """Masks ``tokens`` [B, L] with ``noise`` and weights the masked positions for the loss.

    The sum of token_weights * CE over the step is SMDM's loss: sum over masked tokens of CE / p, divided by
    ``token_count``, the number of tokens in the whole optimizer step (all micro-batches, all ranks).
    """
    p = noise.mask_prob(eps).to(tokens.device)[:, None]
    masked = noise.uniforms[:, : tokens.shape[1]].to(tokens.device) < p
    inputs = torch.where(masked, torch.full_like(tokens, mask_id), tokens)
    weights = torch.where(masked, 1.0 / (p * token_count), torch.zeros((), device=tokens.device))
    masked_index = torch.nonzero(masked.flatten()).squeeze(1)
    return MaskedBatch(
        inputs=inputs, targets=tokens, token_weights=weights.float(), masked_index=masked_index, num_masked=masked_index.numel()
    )
