"""Likelihoods of a masked diffusion model: the ELBO by Monte Carlo, and the exact chain-rule likelihood.

ELBO (continuous time, linear schedule): -log p(x) <= E_{t ~ U(0,1)} E_{x_t} [ sum over masked i of
-log p(x_i | x_t) / t ]. One MC sample is exactly one draw of the training loss estimator on the text (the same
:func:`~dlm_titan.diffusion.sample_noise` and :func:`~dlm_titan.diffusion.forward_process`, with p = (1 - eps) t
+ eps), and the K samples of a text are the K "sequences" of a step, so ``t_sampling="stratified"`` spreads
their t over [0, 1) as SMDM's lm-eval code does. eps (default 1e-3, the training value) caps the weight 1/p at
1/eps: with eps = 0 the estimator is unbiased for the bound but its variance is infinite (the weight 1/t times a
mask of probability t has second moment ~ integral of 1/t). With eps > 0 it estimates (1/(1-eps)) times the
integral of the bound's integrand over [eps, 1], which exceeds the bound by about eps * (bound - its integrand at
t = 0) when revealing context helps the model (a relative bias below eps). A context (prompt) stays clean and
only the target is masked.

Chain rule (SMDM ``nll_type=chain_rule``): log p(x) = sum_i log p(x_i | context, x_<i, masks at >= i), one
forward per target token (batched): the exact likelihood of the left-to-right sampler built from the model.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlm_titan.diffusion import EVAL_STREAM, Noise, forward_process, sample_noise
from dlm_titan.sampling import guided_logits


@dataclass
class ElboEstimate:
    """Monte-Carlo estimate of the negative ELBO (an upper bound on -log p, in nats) of one text.

    Attributes:
        nll: mean over MC samples of sum over masked tokens of CE / p (nats for the whole target).
        std_err: standard error of ``nll`` treating the samples as independent (stratified t makes the true
            error smaller, so this is conservative).
        num_tokens: target tokens scored.
        samples: the per-sample values [K] (float64, CPU).
    """

    nll: float
    std_err: float
    num_tokens: int
    samples: torch.Tensor


def text_key(tokens: list[int] | torch.Tensor) -> int:
    """A noise key derived from the token ids, so a text's MC noise does not depend on request order."""
    ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    return zlib.crc32(",".join(map(str, ids)).encode())


def _as_row(tokens: list[int] | torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if tokens is None:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.as_tensor(tokens, dtype=torch.long, device=device).reshape(-1)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def elbo(
    model: torch.nn.Module,
    target: list[int] | torch.Tensor,
    *,
    mask_id: int,
    context: list[int] | torch.Tensor | None = None,
    mc_samples: int = 128,
    batch_size: int = 32,
    eps: float = 1e-3,
    seed: int = 0,
    step: int | None = None,
    stream: int = EVAL_STREAM,
    t_sampling: str = "stratified",
    cfg_scale: float = 0.0,
) -> ElboEstimate:
    """MC estimate of the negative ELBO of ``target`` given a clean ``context``.

    MC sample k is the training estimator's noise for sequence k of a step with ``mc_samples`` sequences:
    ``sample_noise(arange(K), len(target), seed=seed, step=step, stream=stream, t_sampling=t_sampling,
    num_positions=K)`` applied by ``forward_process`` with ``token_count=1``.

    Args:
        model: token ids [B, L] -> logits [B, L, V].
        target: the scored tokens.
        mask_id: the mask token id.
        context: clean tokens before the target (never masked, never scored).
        mc_samples: K, the number of MC samples.
        batch_size: MC samples per forward.
        eps: p = (1 - eps) t + eps (see the module docstring); 1e-3 = the training estimator.
        seed, step, stream: the noise key; ``step=None`` derives it from the tokens (:func:`text_key`).
        t_sampling: "stratified" (t_k = (u + k/K) mod 1) or "uniform".
        cfg_scale: unsupervised CFG (the context masked in the unconditional pass), as SMDM's lm-eval code.
    """
    device = _device(model)
    ctx, tgt = _as_row(context, device), _as_row(target, device)
    n = tgt.numel()
    if step is None:
        step = text_key(torch.cat([ctx, tgt]))
    noise = sample_noise(torch.arange(mc_samples), n, seed=seed, step=step, stream=stream, t_sampling=t_sampling,
                         num_positions=mc_samples)
    values = []
    for start in range(0, mc_samples, batch_size):
        part = Noise(t=noise.t[start : start + batch_size], uniforms=noise.uniforms[start : start + batch_size])
        values.append(_masked_nll(model, ctx, tgt, part, eps=eps, mask_id=mask_id, cfg_scale=cfg_scale))
    samples = torch.cat(values).double().cpu()
    std_err = samples.std().item() / math.sqrt(mc_samples) if mc_samples > 1 else float("nan")
    return ElboEstimate(nll=samples.mean().item(), std_err=std_err, num_tokens=n, samples=samples)


def _masked_nll(
    model: torch.nn.Module, ctx: torch.Tensor, tgt: torch.Tensor, noise: Noise, *, eps: float, mask_id: int,
    cfg_scale: float,
) -> torch.Tensor:
    """Per MC sample: sum over masked target positions of CE / p, as float32 [k]."""
    k, n = noise.t.numel(), tgt.numel()
    mb = forward_process(tgt.expand(k, n), noise, eps=eps, mask_id=mask_id, token_count=1)
    inputs = torch.cat([ctx.expand(k, -1), mb.inputs], dim=1)
    prompt_mask = torch.zeros_like(inputs, dtype=torch.bool)
    prompt_mask[:, : ctx.numel()] = True
    logits = guided_logits(model, inputs, prompt_mask, cfg_scale, mask_id)[:, ctx.numel() :]
    ce = F.cross_entropy(logits.reshape(k * n, -1), mb.targets.reshape(-1), reduction="none").view(k, n)
    return (ce * mb.token_weights).sum(dim=1)


@torch.no_grad()
def chain_rule_logprob(
    model: torch.nn.Module,
    target: list[int] | torch.Tensor,
    *,
    mask_id: int,
    context: list[int] | torch.Tensor | None = None,
    batch_size: int = 32,
    cfg_scale: float = 0.0,
) -> torch.Tensor:
    """Per-token log p(x_i | context, x_<i, masks at positions >= i), float64 [n]; their sum is log p(target).

    Copy i of the input has the target masked from position i on and is scored at position i, so a target of
    n tokens costs n sequences (``batch_size`` per forward).
    """
    device = _device(model)
    ctx, tgt = _as_row(context, device), _as_row(target, device)
    n, plen = tgt.numel(), ctx.numel()
    out = []
    for start in range(0, n, batch_size):
        rows = torch.arange(start, min(start + batch_size, n), device=device)
        seq = tgt.expand(rows.numel(), n).clone()
        seq[torch.arange(n, device=device)[None, :] >= rows[:, None]] = mask_id
        inputs = torch.cat([ctx.expand(rows.numel(), -1), seq], dim=1)
        prompt_mask = torch.zeros_like(inputs, dtype=torch.bool)
        prompt_mask[:, :plen] = True
        logits = guided_logits(model, inputs, prompt_mask, cfg_scale, mask_id)
        scored = logits[torch.arange(rows.numel(), device=device), plen + rows].double()
        out.append(torch.log_softmax(scored, dim=-1).gather(1, tgt[rows][:, None]).squeeze(1))
    return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.float64)
