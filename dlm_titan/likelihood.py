"""Likelihoods of a masked diffusion model: the ELBO by Monte Carlo, and the likelihood of one left-to-right
unmasking order; both batched over many texts.

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

Left to right (SMDM's ``nll_type=chain_rule``): sum_i log p(x_i | context, x_<i, masks at >= i), one sequence
per target token. This is the exact log-likelihood of ONE generation order (reveal the tokens left to right, one
per step), not the model's log-likelihood: the model generates in random orders, and the ELBO is the average over
orders of this same quantity, so one fixed order can score far worse than the ELBO bound (e.g. 520 nats against
an ELBO of 304.6 on the same text). It is not an upper or a lower bound on -log p(x).

Batching: every text expands into sequences of its own length (K noisy copies, or one copy per target token).
The model has no attention mask, so only sequences of equal length share a forward: texts are sorted by length
and their sequences packed into forwards of at most ``batch_size`` rows. A text's noise is keyed by the text
(:func:`text_key`) or an explicit key, never by its position in a batch, so results do not depend on batching
(up to float rounding of differently shaped matrix products).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlm_titan.diffusion import EVAL_STREAM, forward_process, sample_noise

Tokens = list[int] | torch.Tensor


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


@dataclass
class _Rows:
    """Sequences of one length to score: masked inputs, clean targets, per-position CE weights (0 = not
    scored), prompt lengths (the clean context, masked in CFG's unconditional pass) and the output slot of each
    row's weighted CE sum."""

    inputs: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    prompt_len: torch.Tensor
    slots: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def split(self, n: int) -> tuple[_Rows, _Rows]:
        fields = (self.inputs, self.targets, self.weights, self.prompt_len, self.slots)
        return _Rows(*(f[:n] for f in fields)), _Rows(*(f[n:] for f in fields))

    @staticmethod
    def cat(parts: list[_Rows]) -> _Rows:
        names = ("inputs", "targets", "weights", "prompt_len", "slots")
        return _Rows(*(torch.cat([getattr(p, k) for p in parts]) for k in names))


def text_key(tokens: Tokens) -> int:
    """A noise key derived from the token ids, so a text's MC noise does not depend on request order."""
    ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    return zlib.crc32(",".join(map(str, ids)).encode())


def _as_row(tokens: Tokens | None) -> torch.Tensor:
    if tokens is None:
        return torch.zeros(0, dtype=torch.long)
    return torch.as_tensor(tokens, dtype=torch.long).reshape(-1).cpu()


def _logits_at(model: torch.nn.Module, x: torch.Tensor, prompt_len: torch.Tensor, rows: torch.Tensor,
               cols: torch.Tensor, cfg_scale: float, mask_id: int) -> torch.Tensor:
    """Float32 logits [M, V] of canvas ``x`` [B, L] at positions (rows, cols) only, with unsupervised CFG (the
    unconditional copy has its prompt masked) when cfg_scale > 0. A TransEncoder applies its output head to those
    positions alone; any other module (token ids -> logits) runs whole."""
    batch = x.shape[0]
    if cfg_scale > 0:
        prompt = torch.arange(x.shape[1], device=x.device)[None, :] < prompt_len[:, None]
        x = torch.cat([x, torch.where(prompt, torch.full_like(x, mask_id), x)])
    if hasattr(model, "hidden_states") and hasattr(model, "output"):
        hidden = model.hidden_states(x)
        pick = lambda r: model.output(hidden[r, cols]).float()  # noqa: E731
    else:
        logits = model(x)
        pick = lambda r: logits[r, cols].float()  # noqa: E731
    if cfg_scale <= 0:
        return pick(rows)
    cond, uncond = pick(rows), pick(rows + batch)
    return uncond + (cfg_scale + 1.0) * (cond - uncond)


def _forward(model: torch.nn.Module, rows: _Rows, out: torch.Tensor, *, cfg_scale: float, mask_id: int) -> None:
    """Adds each row's sum of weight * CE over its scored positions to ``out[slot]`` (no device-to-host sync: the
    scored positions are found on the CPU, where the rows are built)."""
    r, c = rows.weights.nonzero(as_tuple=True)
    weight, target, slot = (_to(t, out.device) for t in (rows.weights[r, c], rows.targets[r, c], rows.slots[r]))
    x, plen, r, c = (_to(t, out.device) for t in (rows.inputs, rows.prompt_len, r, c))
    logits = _logits_at(model, x, plen, r, c, cfg_scale, mask_id)
    ce = F.cross_entropy(logits, target, reduction="none")
    out.index_add_(0, slot, (ce * weight).to(out.dtype))


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``; to CUDA through pinned memory without waiting for the GPU, so the CPU builds
    the next batch's noise while the GPU runs this one (a copy from pageable memory synchronizes the stream)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _score(model: torch.nn.Module, lengths: Sequence[int], make_rows: Callable[[int], _Rows], num_slots: int, *,
           batch_size: int, cfg_scale: float, mask_id: int, progress: Callable[[int], None] | None) -> torch.Tensor:
    """Weighted CE sums [num_slots] (float64, CPU) of the rows of every text, texts taken longest first.

    ``make_rows(i)`` builds text i's rows (all of length ``lengths[i]``) when its turn comes, so only about one
    batch of rows exists at a time; rows of texts of equal length fill forwards of ``batch_size`` rows.
    ``progress(n)`` is called as n more texts are done.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out = torch.zeros(num_slots, dtype=torch.float64, device=_device(model))
    for length_group in _by_length(lengths):
        pending: list[_Rows] = []
        done: list[int] = []  # rows that end each pending text, counted from the buffer's start
        for i in length_group:
            rows = make_rows(i)
            if not len(rows):  # nothing to score (an empty target)
                if progress is not None:
                    progress(1)
                continue
            pending.append(rows)
            done.append(sum(map(len, pending)))
            while sum(map(len, pending)) >= batch_size:
                pending, done = _run_first(model, pending, done, batch_size, out, cfg_scale, mask_id, progress)
        while pending:
            pending, done = _run_first(model, pending, done, batch_size, out, cfg_scale, mask_id, progress)
    return out.cpu()


def _run_first(model, pending: list[_Rows], done: list[int], batch_size: int, out: torch.Tensor, cfg_scale: float,
               mask_id: int, progress) -> tuple[list[_Rows], list[int]]:
    """Runs the first ``batch_size`` pending rows (or all of them); returns what is left."""
    rows = _Rows.cat(pending)
    now, rest = rows.split(min(batch_size, len(rows)))
    _forward(model, now, out, cfg_scale=cfg_scale, mask_id=mask_id)
    finished = sum(1 for d in done if d <= len(now))
    if progress is not None and finished:
        progress(finished)
    return ([rest] if len(rest) else []), [d - len(now) for d in done[finished:]]


def _by_length(lengths: Sequence[int]) -> Iterator[list[int]]:
    """Indices grouped by length, longest group first (an out-of-memory shows at once), in order within."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    for n in sorted(groups, reverse=True):
        yield groups[n]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _elbo_rows(ctx: torch.Tensor, tgt: torch.Tensor, key: int, first_slot: int, *, mc_samples: int, eps: float,
               seed: int, stream: int, t_sampling: str, mask_id: int) -> _Rows:
    """The ``mc_samples`` noisy copies of one text: sequence k of a training step of K copies (noise keyed by
    ``key`` as the step), the context clean, masked target positions weighted 1/p."""
    k, n, plen = mc_samples, tgt.numel(), ctx.numel()
    noise = sample_noise(torch.arange(k), n, seed=seed, step=key, stream=stream, t_sampling=t_sampling,
                         num_positions=k)
    mb = forward_process(tgt.expand(k, n), noise, eps=eps, mask_id=mask_id, token_count=1)
    whole = torch.cat([ctx, tgt]).expand(k, -1)
    inputs = torch.cat([ctx.expand(k, -1), mb.inputs], dim=1)
    weights = torch.cat([torch.zeros(k, plen), mb.token_weights], dim=1)
    return _Rows(inputs, whole, weights, torch.full((k,), plen), first_slot + torch.arange(k))


@torch.no_grad()
def elbo_batch(
    model: torch.nn.Module,
    texts: Sequence[tuple[Tokens | None, Tokens]],
    *,
    mask_id: int,
    keys: Sequence[int] | None = None,
    mc_samples: int = 128,
    batch_size: int = 32,
    eps: float = 1e-3,
    seed: int = 0,
    stream: int = EVAL_STREAM,
    t_sampling: str = "stratified",
    cfg_scale: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> list[ElboEstimate]:
    """MC estimates of the negative ELBO of each (context, target) pair, their samples packed into forwards.

    Text i's MC sample k is the training estimator's noise for sequence k of a step with ``mc_samples``
    sequences: ``sample_noise(arange(K), len(target), seed=seed, step=keys[i], stream=stream,
    t_sampling=t_sampling, num_positions=K)`` applied by ``forward_process`` with ``token_count=1``.

    Args:
        model: token ids [B, L] -> logits [B, L, V] (a TransEncoder computes logits at masked positions only).
        texts: (context, target) pairs: the context stays clean and unscored (None or [] = no context).
        mask_id: the mask token id.
        keys: the noise key (the training step of the noise) of each text; default :func:`text_key` of
            context + target, so equal texts get equal noise wherever they sit in a run.
        mc_samples: K, MC samples per text.
        batch_size: sequences per forward (rows of texts of equal total length share forwards).
        eps: p = (1 - eps) t + eps (see the module docstring); 1e-3 = the training estimator.
        seed, stream: the rest of the noise key.
        t_sampling: "stratified" (t_k = (u + k/K) mod 1) or "uniform".
        cfg_scale: unsupervised CFG (the context masked in the unconditional pass), as SMDM's lm-eval code.
        progress: called with the number of texts finished after each forward.
    """
    pairs = [(_as_row(c), _as_row(t)) for c, t in texts]
    keys = [text_key(torch.cat(p)) for p in pairs] if keys is None else list(keys)

    def make_rows(i: int) -> _Rows:
        ctx, tgt = pairs[i]
        return _elbo_rows(ctx, tgt, keys[i], i * mc_samples, mc_samples=mc_samples, eps=eps, seed=seed,
                          stream=stream, t_sampling=t_sampling, mask_id=mask_id)

    sums = _score(model, [c.numel() + t.numel() for c, t in pairs], make_rows, len(pairs) * mc_samples,
                  batch_size=batch_size, cfg_scale=cfg_scale, mask_id=mask_id, progress=progress)
    return [_estimate(sums[i * mc_samples : (i + 1) * mc_samples], t.numel()) for i, (_, t) in enumerate(pairs)]


def _estimate(samples: torch.Tensor, num_tokens: int) -> ElboEstimate:
    k = samples.numel()
    std_err = samples.std().item() / math.sqrt(k) if k > 1 else float("nan")
    return ElboEstimate(nll=samples.mean().item(), std_err=std_err, num_tokens=num_tokens, samples=samples)


def elbo(
    model: torch.nn.Module,
    target: Tokens,
    *,
    mask_id: int,
    context: Tokens | None = None,
    mc_samples: int = 128,
    batch_size: int = 32,
    eps: float = 1e-3,
    seed: int = 0,
    step: int | None = None,
    stream: int = EVAL_STREAM,
    t_sampling: str = "stratified",
    cfg_scale: float = 0.0,
) -> ElboEstimate:
    """MC estimate of the negative ELBO of one ``target`` given a clean ``context``: :func:`elbo_batch` of one
    text, its noise keyed by ``step`` (None = :func:`text_key` of context + target)."""
    return elbo_batch(model, [(context, target)], mask_id=mask_id, keys=None if step is None else [step],
                      mc_samples=mc_samples, batch_size=batch_size, eps=eps, seed=seed, stream=stream,
                      t_sampling=t_sampling, cfg_scale=cfg_scale)[0]


def _left_to_right_rows(ctx: torch.Tensor, tgt: torch.Tensor, first_slot: int, mask_id: int) -> _Rows:
    """Copy i of the text has the target masked from position i on and is scored (weight 1) at position i."""
    n, plen = tgt.numel(), ctx.numel()
    order = torch.arange(n)
    seq = torch.where(order[None, :] >= order[:, None], torch.tensor(mask_id), tgt.expand(n, n))
    weights = torch.zeros(n, plen + n)
    weights[order, plen + order] = 1.0
    whole = torch.cat([ctx, tgt]).expand(n, -1)
    return _Rows(torch.cat([ctx.expand(n, -1), seq], dim=1), whole, weights, torch.full((n,), plen),
                 first_slot + order)


@torch.no_grad()
def left_to_right_logprob_batch(
    model: torch.nn.Module,
    texts: Sequence[tuple[Tokens | None, Tokens]],
    *,
    mask_id: int,
    batch_size: int = 32,
    cfg_scale: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """Per-token log p(x_i | context, x_<i, masks at positions >= i), float64 [n], of each (context, target):
    the log-likelihood of revealing the target left to right, one token per step. One fixed order only: not
    the model's likelihood (see the module docstring). A target of n tokens costs n sequences, packed with
    other texts' of equal length into forwards of ``batch_size`` rows."""
    pairs = [(_as_row(c), _as_row(t)) for c, t in texts]
    starts = [0]
    for _, t in pairs:
        starts.append(starts[-1] + t.numel())

    def make_rows(i: int) -> _Rows:
        return _left_to_right_rows(*pairs[i], starts[i], mask_id)

    ce = _score(model, [c.numel() + t.numel() for c, t in pairs], make_rows, starts[-1], batch_size=batch_size,
                cfg_scale=cfg_scale, mask_id=mask_id, progress=progress)
    return [-ce[starts[i] : starts[i + 1]] for i in range(len(pairs))]


def left_to_right_logprob(model: torch.nn.Module, target: Tokens, *, mask_id: int, context: Tokens | None = None,
                          batch_size: int = 32, cfg_scale: float = 0.0) -> torch.Tensor:
    """:func:`left_to_right_logprob_batch` of one text: per-token log-probabilities, float64 [n]; their sum is
    the log-likelihood of the left-to-right unmasking order (not log p(target))."""
    return left_to_right_logprob_batch(model, [(context, target)], mask_id=mask_id, batch_size=batch_size,
                                       cfg_scale=cfg_scale)[0]


# SMDM's name (``nll_type=chain_rule``), kept for callers of the earlier API.
chain_rule_logprob = left_to_right_logprob
