"""Fixed-noise validation of the MDM loss, and per-sequence losses of training steps.

Validation estimates the MDM loss (SMDM's ELBO bound on the negative log-likelihood per token) on held-out
windows. The noise is fixed: the masks of validation sequence ``j`` in Monte-Carlo pass ``k`` come from the
generator keyed by (validation.seed, VALIDATION_STREAM, step=k, position=j), with ``j`` the window's global
index in the validation set. So every evaluation of a run, and every run with the same seed, sees the same t
and masks whatever the world size, and checkpoints compare without estimator noise.

t is stratified per sequence over the ``K = mc_samples`` passes: t_jk = (u_j + k / K) mod 1, with u_j the t
that sample_noise draws for (j, k=0). Each sequence's K estimates thus cover [0, 1) evenly (SMDM's
low-discrepancy eval t, applied per sequence so it does not depend on how many sequences are evaluated).

With x_jk = sum over masked tokens of CE / p, divided by the sequence length, the reported loss is the mean of
x_jk over all (sequence, pass) pairs of all ranks (sums of weighted CE and of token counts, all-reduced), and
its standard error is std(x_jk) / sqrt(#pairs). That is the i.i.d. formula; the stratification of t makes the
true error somewhat smaller, so it is conservative.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from dlm_kernels.reference import per_token_weighted_cross_entropy

from dlm_titan.diffusion import VALIDATION_STREAM, Noise, forward_process, sample_noise
from dlm_titan.distributed import all_reduce_sum
from dlm_titan.metrics import T_BUCKET_PREFIX, LossByTimeBins
from dlm_titan.saved_config import saved_config

# Tags read by other tools (the isoFLOP sweep reads "validation/loss"): do not rename.
LOSS_TAG, PPL_TAG, STDERR_TAG = "validation/loss", "validation/ppl_bound", "validation/stderr"
# Logits rows materialized at once: 1024 x 32000 fp32 is 131 MB, small next to a training step's activations.
CHUNK_ROWS = 1024


# Per-row ``w_i * CE_i`` (no gradients, logits only for masked rows), the loss validation's forwards compute.
per_token_weighted_ce = functools.partial(per_token_weighted_cross_entropy, chunk_rows=CHUNK_ROWS)


class SequenceLossTap:
    """Wraps a training loss (``masked_linear_cross_entropy``) and, while ``armed``, also keeps the
    per-token terms ``w_i CE_i`` of each call, so a training step yields per-sequence losses (for the loss-by-t
    metrics) without a second forward. The loss computes those terms anyway: armed costs one ``[N]`` write.
    The trainer arms it on logged steps.
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor]):
        self.loss_fn = loss_fn
        self.armed = False
        self._recorded: list[torch.Tensor] = []

    def __call__(self, hidden, weight, targets, token_weights, **kwargs) -> torch.Tensor:
        if not self.armed:
            return self.loss_fn(hidden, weight, targets, token_weights, **kwargs)
        loss, terms = self.loss_fn(hidden, weight, targets, token_weights, per_token=True, **kwargs)
        self._recorded.append(terms)
        return loss

    def take(self, batch_size: int) -> torch.Tensor:
        """Per-sequence sums ``[batch_size]`` of the weighted CE recorded since the last take (one forward of
        ``batch_size`` sequences), then forgets them."""
        if len(self._recorded) != 1:
            raise RuntimeError(f"expected one recorded forward, have {len(self._recorded)}")
        per_token = self._recorded.pop()
        return per_token.view(batch_size, -1).sum(1)


@dataclasses.dataclass
class ValidationResult:
    """Loss (mean of x_jk), exp(loss) and standard error over ``pairs`` (sequence, pass) estimates."""

    loss: float
    ppl_bound: float
    stderr: float
    sequences: int
    mc_samples: int
    tokens: int
    seconds: float
    loss_by_t: dict[str, float]

    def scalars(self) -> dict[str, float]:
        return {LOSS_TAG: self.loss, PPL_TAG: self.ppl_bound, STDERR_TAG: self.stderr,
                "validation/time_s": self.seconds, **self.loss_by_t}

    def summary(self) -> str:
        return (f"loss {self.loss:.4f} +- {self.stderr:.4f} (std. error), ppl bound {self.ppl_bound:.2f}; "
                f"{self.sequences} sequences x {self.mc_samples} noise draws, {self.tokens:,} tokens, "
                f"{self.seconds:.1f}s")


class Validator:
    """Evaluates the MDM loss of ``model`` on ``loader`` with fixed, stratified noise; every rank must call
    :meth:`run` together (one all-reduce at the end).

    Args:
        model: a TransEncoder (possibly FSDP-wrapped); its forwards compute per-token CE (``loss_fn``).
        loader: re-iterable validation micro-batches ``{"input": [b, >= seq_len], "position": [b]}``; each
            iteration must start a new pass in the same order (see dlm_titan.data.build_val_loader).
        steps: micro-batches per rank per evaluation; -1 = the whole loader.
        mc_samples: noise draws (passes) per sequence.
        seed: validation noise seed.
        seq_len: tokens per sequence; eps: mask-probability floor p = (1 - eps) t + eps; mask_id: mask token.
        device: where the model runs; autocast: context for the forward (the trainer's).
    """

    def __init__(self, model: torch.nn.Module, loader: Iterable[dict[str, torch.Tensor]], *, steps: int,
                 mc_samples: int, seed: int, seq_len: int, eps: float, mask_id: int, device: torch.device,
                 autocast: contextlib.AbstractContextManager | None = None):
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        self.model, self.loader = model, loader
        self.steps, self.mc_samples, self.seed = steps, mc_samples, seed
        self.seq_len, self.eps, self.mask_id, self.device = seq_len, eps, mask_id, device
        self.autocast = autocast if autocast is not None else contextlib.nullcontext()

    def noise(self, positions: torch.Tensor) -> list[Noise]:
        """Noise of every pass k for the sequences at ``positions``: masks keyed by (seed, k, position), t
        stratified over the passes (pass 0 keeps sample_noise's own t)."""
        draws = [sample_noise(positions, self.seq_len, seed=self.seed, step=k, stream=VALIDATION_STREAM)
                 for k in range(self.mc_samples)]
        u = draws[0].t
        return [Noise(t=torch.remainder(u + k / self.mc_samples, 1.0), uniforms=d.uniforms) for k, d in enumerate(draws)]

    @torch.no_grad()
    def run(self) -> ValidationResult:
        start = time.perf_counter()
        # [sum of x * L (weighted CE), tokens, sum of x, sum of x^2, pairs], float64 so sums stay exact enough
        stats = torch.zeros(5, dtype=torch.float64, device=self.device)
        buckets = LossByTimeBins(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            batches = self.loader if self.steps < 0 else itertools.islice(self.loader, self.steps)
            for batch in batches:
                self._evaluate(batch, stats, buckets)
        finally:
            self.model.train(was_training)
        loss_by_t = buckets.scalars(prefix=T_BUCKET_PREFIX + "validation_t")
        wce, tokens, x_sum, x2_sum, pairs = all_reduce_sum(stats).tolist()
        if pairs == 0:
            raise RuntimeError("validation saw no sequences")
        loss = wce / tokens
        var = max(x2_sum - x_sum * x_sum / pairs, 0.0) / (pairs - 1) if pairs > 1 else float("nan")
        return ValidationResult(
            loss=loss, ppl_bound=math.exp(min(loss, 700.0)), stderr=math.sqrt(var / pairs),
            sequences=int(pairs) // self.mc_samples, mc_samples=self.mc_samples, tokens=int(tokens),
            seconds=time.perf_counter() - start, loss_by_t=loss_by_t,
        )

    def _evaluate(self, batch: dict[str, torch.Tensor], stats: torch.Tensor, buckets: LossByTimeBins) -> None:
        tokens = batch["input"][:, : self.seq_len]
        positions = batch["position"]
        b, length = tokens.shape
        for noise in self.noise(positions):
            # token_count = length: the per-sequence sums of the weighted CE are then x_jk directly
            mb = forward_process(tokens, noise, eps=self.eps, mask_id=self.mask_id, token_count=length)
            inputs, targets, weights = (x.to(self.device, non_blocking=True) for x in (mb.inputs, mb.targets, mb.token_weights))
            with self.autocast:
                per_token = self.model(inputs, targets, weights, loss_fn=per_token_weighted_ce)
            x = per_token.view(b, length).sum(1).double()
            stats += torch.stack([x.sum() * length, x.new_tensor(b * length), x.sum(), (x * x).sum(), x.new_tensor(b)])
            buckets.add(noise.t, x)


def build_validator(cfg: Any, model: torch.nn.Module, data_path: str, dp_rank: int, dp_world_size: int,
                    device: torch.device, autocast: contextlib.AbstractContextManager | None = None) -> Validator | None:
    """The run's Validator from its config, or None when validation is off. The validation loader reads in
    the training process (num_workers = 0): an evaluation reads little, and idle workers would hold memory."""
    v = cfg.validation
    if not v.enable:
        return None
    from dlm_titan.data import build_val_loader

    # freq, mc_samples and steps are range-checked when the config loads (dlm_titan.config).
    loader = build_val_loader(
        dataclasses.replace(cfg.data, num_workers=0), data_path=data_path, seq_len=cfg.training.seq_len,
        local_batch_size=cfg.training.local_batch_size, dp_rank=dp_rank, dp_world_size=dp_world_size,
        vocab_size=cfg.model.vocab_size,
    )
    steps = v.steps if v.steps > 0 and v.steps < len(loader) else -1
    return Validator(model, loader, steps=steps, mc_samples=v.mc_samples, seed=v.seed, seq_len=cfg.training.seq_len,
                     eps=cfg.diffusion.eps, mask_id=cfg.model.vocab_size, device=device, autocast=autocast)


def coverage_change(cfg: Any, validator: Any, saved_layout: dict[str, Any] | None, step: int) -> str | None:
    """The warning for a resume whose evaluations read another number of windows than the saving run's did, else
    None (also when that run did not validate: there is nothing to compare with).

    ``validation.steps`` counts micro-batches per rank (-1: every whole round of local_batch_size x ranks), so under
    another world size or local_batch_size an evaluation reads other windows: its losses after the resume do not
    compare with those before, while the training losses continue exactly.

    Args:
        cfg: this run's config; its dump folder's config.toml, not yet rewritten, is the saving run's.
        validator: this run's Validator or NextTokenValidator (None: validation off).
        saved_layout: the resumed checkpoint's loader layout (None: no resume).
        step: the resumed step, named in the warning.
    """
    if validator is None or not saved_layout:
        return None
    saved = saved_config(cfg.job.dump_folder).get("validation", {})
    if saved.get("enable") is False:
        return None
    saved_steps = saved.get("steps")
    saved_steps = saved_steps if isinstance(saved_steps, int) else cfg.validation.steps
    dataset = validator.loader.dataset  # ValBatches: the windows, this run's local batch (b) and ranks (W)
    windows, per_round = dataset.source.num_windows, dataset.b * dataset.W
    local_batch, ranks = saved_layout["local_batch_size"], saved_layout["dp_world_size"]
    before = _windows_read(windows, saved_steps, int(local_batch) * int(ranks))
    now = _windows_read(windows, cfg.validation.steps, per_round)
    if before == now:
        return None
    keep = (f"--validation.steps {before // per_round} covers the same windows" if before % per_round == 0 else
            f"no validation.steps covers the same {before} with local_batch_size x ranks = {per_round}")
    return (f"validation now reads {now} windows per evaluation (validation.steps x local_batch_size x ranks), the "
            f"run that saved step {step} read {before} ({local_batch} x {ranks} ranks): validation losses before and "
            f"after this resume are not comparable; {keep}")


def _windows_read(windows: int, steps: int, per_round: int) -> int:
    """Windows one evaluation reads: ``steps`` rounds of ``per_round`` (local_batch_size x ranks), -1 = all whole
    rounds, as ValBatches and ``validation.steps`` split them."""
    rounds = windows // per_round
    return (min(steps, rounds) if steps > 0 else rounds) * per_round

