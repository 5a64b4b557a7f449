"""What a checkpoint holds, as DCP state dicts: the training objects' state in, and back out.

DCP keys: ``model.*`` and ``optimizer.*`` tensors (FQN-keyed, DTensor shards under FSDP2, so any world size
can load them), and JSON in uint8 tensors for ``optimizer_groups`` (hyper-parameters), ``lr_scheduler``,
``train_state`` (step, tokens_seen, world_size, seed, last_loss) and ``dataloader.rank_R`` (each rank's loader state).
Non-tensor state is stored as JSON bytes so that DCP holds tensors only: loading unpickles nothing of ours, and
the loader state of any worker count fits one key.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

TRAIN_STATE = "train_state"  # the JSON entry holding the step and tokens_seen
BLOB_KEYS = ("optimizer_groups", "lr_scheduler", TRAIN_STATE)
"""The JSON entries every checkpoint has besides the tensors (and each rank's ``dataloader.rank_R``)."""

# Optimizer state keyed by parameter FQN ("state.<fqn>.exp_avg"), so any sharding layout can load it.
OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

# Optimizer group entries that pick a kernel, not the math: a resume keeps the running optimizer's own.
_IMPLEMENTATION_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def json_tensor(obj: Any) -> torch.Tensor:
    """``obj`` as JSON bytes in a uint8 tensor."""
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)


def from_json_tensor(t: torch.Tensor) -> Any:
    return json.loads(bytes(t.numpy().tobytes()).decode())


def tensor_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer tensors (DTensor shards under FSDP2); optimizer hyper-parameters apart, under
    ``_optim_extras``."""
    optim = _optimizer_state_dict(model, optimizer)
    return {
        "model": get_model_state_dict(model),
        "optimizer": {k: v for k, v in optim.items() if isinstance(v, torch.Tensor)},
        "_optim_extras": {k: v for k, v in optim.items() if not isinstance(v, torch.Tensor)},
    }


def _optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """DCP's flattened optimizer state dict, with Adam's state present even before the first update.

    Before any update DCP creates the state (a zero-gradient step at lr 0) only if no parameter has a
    gradient. Gradients that stay allocated (DDP's bucket views, CUDA graphs' buffers) would make it return
    an empty state: a checkpoint saved then (e.g. a stop at step 1) could not be loaded by a process whose
    state DCP does create. So they are set aside for the call and put back.
    """
    kept = {}
    if not optimizer.state:
        kept = {p: p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None}
        for param in kept:
            param.grad = None
    try:
        return get_optimizer_state_dict(model, optimizer, options=OPTIM_OPTIONS)
    finally:
        for param, grad in kept.items():
            param.grad = grad


def state_to_save(model: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler, data_loader,
                  train_state: dict[str, Any], rank: int) -> dict[str, Any]:
    """The whole state dict of one rank for DCP's save; ``train_state`` is step, tokens_seen, world_size, seed,
    last_loss."""
    state = tensor_state(model, optimizer)
    state["optimizer_groups"] = json_tensor(state.pop("_optim_extras"))
    state["lr_scheduler"] = json_tensor(lr_scheduler.state_dict())
    state[TRAIN_STATE] = json_tensor(train_state)
    # per-rank key: DCP keeps one copy of replicated tensors, but every rank's loader state is its own
    state["dataloader"] = {f"rank_{rank}": json_tensor(data_loader.state_dict())}
    return state


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, Any],
                   extras: dict[str, Any], groups: dict[str, Any]) -> None:
    """Restores the optimizer from loaded ``tensors`` and saved hyper-parameters ``groups``; ``extras`` are the
    running optimizer's own (the template): the kernel choice (optimizer.implementation) stays this run's."""
    optim_state = dict(tensors)
    for key, template in extras.items():
        saved = key in groups and key.rsplit(".", 1)[-1] not in _IMPLEMENTATION_FLAGS
        optim_state[key] = _like(groups[key], template) if saved else template
    set_optimizer_state_dict(model, optimizer, optim_state, options=OPTIM_OPTIONS)


def _like(saved: Any, template: Any) -> Any:
    """A JSON value converted back to the template's container types (tuples do not survive JSON)."""
    if isinstance(template, tuple) and isinstance(saved, list):
        return tuple(saved)
    return saved


def first_nonfinite(tensors: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor (this rank's shard of a DTensor) holding a NaN or inf, or
    None: weights a load must refuse, whatever the checksums say (a checkpoint saved from a diverged state)."""
    for name, t in tensors.items():
        local = t.to_local() if hasattr(t, "to_local") else t
        if isinstance(local, torch.Tensor) and local.is_floating_point() and not bool(torch.isfinite(local).all()):
            return name
    return None
