"""AdamW, gradient clipping and the SMDM learning-rate schedule (linear warmup, then cosine to min_lr), a pure
function of the step and the current config."""

from __future__ import annotations

import math

import torch
from dlm_kernels.adamw import AdamWLaunch, adamw_reference, adamw_runs_on
from dlm_kernels.triton_utils import interpreter_active

from dlm_titan.errors import UserError
from dlm_titan.flops import smdm_warmup_steps

# Elements per program of the Triton AdamW launch, and its warps. H200, clip + step of 170M / 1028M (219M / 1142M
# fp32 parameters): 1024/4 1.74 / 8.91 ms, 2048/4 1.83 / 9.32, 2048/8 1.79 / 9.16, 4096/8 1.90 / 9.65 (PyTorch's
# clip_grad_norm_ + fused AdamW: 2.56 / 13.16). The interpreter (CPU tests) runs one program at a time in Python,
# so there fewer, larger programs are faster.
_ADAMW_BLOCK, _ADAMW_WARPS = (65536, 4) if interpreter_active() else (1024, 4)


class TritonAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose step is one Triton launch per parameter group (:mod:`dlm_kernels.adamw`).

    The same math, state (``step`` on the CPU, ``exp_avg``, ``exp_avg_sq``) and so the same checkpoints as
    ``torch.optim.AdamW`` (without amsgrad or maximize). ``step(grad_scale=c)`` multiplies every gradient by the
    one-element tensor ``c`` inside the update: :func:`clip_grad_norm` hands it the clip coefficient instead of
    scaling the gradients in place. Parameters may be DTensors (FSDP2): the kernel updates their local shards.
    Tensors the kernel cannot take (not fp32, misaligned, or on a device triton cannot run on) get the same math
    in PyTorch; ``tensors_by_kernel`` and ``tensors_by_pytorch`` count the updates of each kind.
    """

    def __init__(self, params, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 block: int = _ADAMW_BLOCK, num_warps: int = _ADAMW_WARPS):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False, fused=False)
        self.block, self.num_warps = block, num_warps
        self._launches: list[AdamWLaunch] = []  # one per parameter group
        self.tensors_by_kernel = 0
        self.tensors_by_pytorch = 0

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.AdamW``'s, with step counts kept on the CPU (a state dict of PyTorch's fused AdamW holds
        them on the GPU, where reading them for the bias corrections would sync every step) and this optimizer's
        own kernel flags."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.update(foreach=False, fused=False)
        for state in self.state.values():
            if "step" in state and state["step"].device.type != "cpu":
                state["step"] = state["step"].detach().to("cpu", torch.float32)

    @torch.no_grad()
    def step(self, closure=None, grad_scale: torch.Tensor | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        while len(self._launches) < len(self.param_groups):
            self._launches.append(AdamWLaunch(self.block, self.num_warps))
        for group, launch in zip(self.param_groups, self._launches):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    zeros = torch.zeros_like
                    self.state[p].update(step=torch.tensor(0.0), exp_avg=zeros(p), exp_avg_sq=zeros(p))
            states = [self.state[p] for p in params]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1.0)
            beta1, beta2 = group["betas"]
            hyper = dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"], grad_scale=grad_scale)
            tensors = [[_local(t) for t in row] for row in (params, [p.grad for p in params],
                       [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states])]
            left = launch(*tensors, steps, **hyper)  # leaves out tensors on devices triton cannot run on
            for i in left:  # PyTorch math, tensor by tensor
                adamw_reference(*(row[i] for row in tensors), step=int(steps[i]), **hyper)
            self.tensors_by_pytorch += len(left)
            self.tensors_by_kernel += len(params) - len(left)
        return loss


def _local(x: torch.Tensor) -> torch.Tensor:
    return x.to_local() if hasattr(x, "to_local") else x


def build_optimizer(model: torch.nn.Module, optimizer_cfg, device_type: str) -> torch.optim.AdamW:
    """AdamW over every parameter with weight decay on all of them, as SMDM (norms and embeddings included).

    Args:
        optimizer_cfg: the ``optimizer`` section.
        device_type: "cuda" picks the Triton kernel (PyTorch's fused one without triton) under "auto".
    """
    impl = optimizer_cfg.implementation
    device = torch.device(device_type)
    if impl == "auto":
        impl = ("triton" if adamw_runs_on(device) else "fused") if device_type == "cuda" else "foreach"
    hyper = dict(lr=optimizer_cfg.lr, betas=tuple(optimizer_cfg.betas), eps=optimizer_cfg.eps,
                 weight_decay=optimizer_cfg.weight_decay)
    if impl == "triton":
        if not adamw_runs_on(device):
            raise UserError(f"optimizer.implementation = triton cannot run on {device_type} (it needs a CUDA GPU "
                            "and triton); use --optimizer.implementation auto")
        return TritonAdamW(model.parameters(), **hyper)
    return torch.optim.AdamW(model.parameters(), fused=impl == "fused", foreach=impl == "foreach", **hyper)


def clip_grad_norm(
    parameters: list[torch.nn.Parameter], max_norm: float, optimizer: torch.optim.Optimizer
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The total gradient 2-norm of ``parameters`` (a plain tensor over the whole model) and clipping to ``max_norm``.

    As ``torch.nn.utils.clip_grad_norm_`` (coefficient ``min(1, max_norm / (norm + 1e-6))``, no host sync), except
    that for a :class:`TritonAdamW` the gradients are left as they are and the coefficient is returned, for
    ``optimizer.step(grad_scale=...)`` to apply inside the update. ``max_norm <= 0`` means no clipping.

    Returns:
        ``(norm, grad_scale)``; ``grad_scale`` is None when the gradients were scaled here or need no scaling.
    """
    foreach = any(p.grad is not None and p.grad.device.type == "cuda" for p in parameters)
    if not isinstance(optimizer, TritonAdamW):
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else float("inf"), foreach=foreach)
        return _full(norm), None
    norm = _full(torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None], foreach=foreach))
    return norm, (max_norm / (norm + 1e-6)).clamp_(max=1.0) if max_norm > 0 else None


def _full(norm: torch.Tensor) -> torch.Tensor:
    """FSDP's norm is a DTensor of per-shard partial sums: their total."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def resolve_warmup_steps(warmup_steps: int, total_steps: int) -> int:
    """The warmup a run of ``total_steps`` uses: ``warmup_steps``, or SMDM's max(1% of steps, 100) for -1; never
    longer than the run. The one home of this rule (the trainer, its start-up line and scaling.plan_run use it)."""
    warmup = smdm_warmup_steps(total_steps) if warmup_steps < 0 else warmup_steps
    return min(warmup, total_steps)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float, decay_type: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (1-based): step / warmup during warmup, then a
    decay from 1 to min_ratio that ends exactly at ``total`` and stays there."""
    if step <= warmup:
        return step / max(warmup, 1)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if decay_type == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay_type == "linear":
        shape = 1.0 - progress
    else:
        shape = 1.0
    return min_ratio + (1.0 - min_ratio) * shape


# Optimizer group entries the config sets (optimizer section); "lr" is the schedule's.
_CONFIG_HYPERPARAMETERS = ("betas", "eps", "weight_decay")


class LRSchedule:
    """The optimizer's hyper-parameters as a pure function of (step, this run's config).

    The lr of optimizer step ``s`` is ``peak_lr * lr_factor(s, ...)`` of this run's config; betas, eps and weight
    decay are the config's. The state (what checkpoints hold) is the number of steps taken; the schedule and the
    values in force when it was saved travel with it for the record only. So a resume follows the config it is
    given: ``--training.steps`` extends or shortens the schedule from the saved step on, a new ``--optimizer.lr``
    or ``--optimizer.weight_decay`` takes effect at the next step. :meth:`load_state_dict` (called after the
    optimizer's state is loaded, which restores the saved groups) puts the config's values back into the
    optimizer's groups and notes in :attr:`resume_notes` each one that differs from the checkpoint's.

    Interface of ``torch.optim.lr_scheduler.LRScheduler`` as the trainer uses it: ``step``, ``get_last_lr``,
    ``state_dict``, ``load_state_dict``; ``last_epoch`` (torch's name, which checkpoints of LambdaLR also hold) is
    the number of optimizer steps taken.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr_cfg, peak_lr: float, total_steps: int):
        self.optimizer = optimizer
        self.peak_lr, self.total_steps = peak_lr, total_steps
        self.warmup = resolve_warmup_steps(lr_cfg.warmup_steps, total_steps)
        self.min_lr, self.decay_type = lr_cfg.min_lr, lr_cfg.decay_type
        # The optimizer was built from this run's config: its groups hold the config's values now.
        self.hyperparameters = {k: optimizer.param_groups[0][k] for k in _CONFIG_HYPERPARAMETERS}
        self.last_epoch = 0
        self.resume_notes: list[str] = []
        self._apply()

    def lr_at(self, step: int) -> float:
        """The lr of optimizer step ``step`` (1-based)."""
        return self.peak_lr * lr_factor(step, self.warmup, self.total_steps, self.min_lr / self.peak_lr,
                                        self.decay_type)

    def get_last_lr(self) -> list[float]:
        """The lr of each group for the next optimizer step (the one in force now)."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def step(self) -> None:
        """Moves on by one optimizer step (call after each, applied or skipped)."""
        self.last_epoch += 1
        self._apply()

    def _apply(self) -> None:
        lr = self.lr_at(self.last_epoch + 1)
        for group in self.optimizer.param_groups:
            group.update(self.hyperparameters, lr=lr)

    def schedule(self) -> dict:
        """The schedule and constant hyper-parameters in force, keyed by their config names."""
        return {"optimizer.lr": self.peak_lr, "training.steps": self.total_steps,
                "lr_scheduler.warmup_steps": self.warmup, "lr_scheduler.min_lr": self.min_lr,
                "lr_scheduler.decay_type": self.decay_type,
                **{f"optimizer.{k}": _jsonable(v) for k, v in self.hyperparameters.items()}}

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "schedule": self.schedule()}

    def load_state_dict(self, state: dict) -> None:
        """Restores the step count only; notes where this run's values differ from the checkpoint's and puts them
        into the optimizer's groups (which the optimizer's own load has just set to the checkpoint's)."""
        saved = dict(state.get("schedule") or _legacy_schedule(state, self.optimizer))
        self.last_epoch = int(state["last_epoch"])
        self.resume_notes = _differences(saved, self.schedule())
        self._apply()


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _legacy_schedule(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """What a checkpoint saved with torch's LambdaLR tells of its schedule: the peak lr, and (from the optimizer's
    groups, loaded just before) its constant hyper-parameters."""
    saved = {f"optimizer.{k}": _jsonable(optimizer.param_groups[0][k]) for k in _CONFIG_HYPERPARAMETERS
             if k in optimizer.param_groups[0]}
    if state.get("base_lrs"):
        saved["optimizer.lr"] = state["base_lrs"][0]
    return saved


def _differences(saved: dict, current: dict) -> list[str]:
    """One line per value that this run's config changes from the checkpoint's."""
    changed = [f"{key} {current[key]} (checkpoint: {saved[key]})" for key in current
               if key in saved and saved[key] != current[key]]
    if not changed:
        return []
    return ["resumed with this run's config, which differs from the checkpoint's: " + ", ".join(changed)]


def build_lr_scheduler(optimizer: torch.optim.Optimizer, lr_cfg, peak_lr: float, total_steps: int) -> LRSchedule:
    """The run's :class:`LRSchedule`, stepped once per optimizer step; its step count is saved with checkpoints.
    Build it right after the optimizer (it takes the config's betas, eps and weight decay from its groups)."""
    return LRSchedule(optimizer, lr_cfg, peak_lr, total_steps)
