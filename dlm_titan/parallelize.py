"""Activation checkpointing, torch.compile, float8 and FSDP2/HSDP, applied in this order to a meta-device model.

Each ``apply_*`` takes the model and its own config section and changes the model in place; block names are
kept (no wrapper prefixes), so checkpoints do not depend on which of these were applied.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from dlm_titan.errors import UserError

# Ops whose outputs selective AC keeps: the matmuls and attention (expensive to recompute). Norms, RoPE,
# SiLU and the residual adds are recomputed, which costs little time and most of the activation memory.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}
if hasattr(torch.ops.aten, "_scaled_mm"):
    _SAVE_OPS.add(torch.ops.aten._scaled_mm.default)


def _op_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: nn.Module, ac_cfg) -> None:
    """Wraps blocks for activation checkpointing: "full" recomputes every block, "selective" either keeps
    matmul/attention outputs ("op") or checkpoints every Nth block (an integer)."""
    if ac_cfg.mode == "none":
        return
    every = 1
    option = str(ac_cfg.selective_ac_option)
    if ac_cfg.mode == "selective" and option != "op":
        if not option.isdigit() or int(option) < 1:
            raise UserError(f'activation_checkpoint.selective_ac_option must be "op" or a positive integer, got {option!r}')
        every = int(option)
    for i, (name, block) in enumerate(model.layers.named_children()):
        if ac_cfg.mode == "selective" and option == "op":
            wrapped = checkpoint_wrapper(
                block, context_fn=lambda: create_selective_checkpoint_contexts(_op_policy), preserve_rng_state=False
            )
        elif i % every == 0:
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            continue
        model.layers.register_module(name, wrapped)


def apply_compile(model: nn.Module, compile_cfg) -> None:
    """Compiles each block on its own (fullgraph): all blocks share one graph, so compile time does not grow
    with depth. The head and loss stay eager (the loss gathers a data-dependent number of rows)."""
    if not compile_cfg.enable:
        return
    for block in model.layers.children():
        block.compile(fullgraph=True)


def apply_float8(model: nn.Module, float8_cfg, min_dim: int = 1024) -> None:
    """Converts block linears to torchao float8 training. Skipped: the output head (its loss needs precise
    logits) and layers whose dims are below ``min_dim`` or not multiples of 16, where scaling costs more than
    float8 matmuls save (measured on H100: 0.84x at d=768, 1.31x at d=1792)."""
    if not float8_cfg.enable:
        return
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise UserError('float8.enable needs torchao: pip install ".[float8]"') from None
    config = Float8LinearConfig.from_recipe_name(float8_cfg.recipe)

    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or fqn.endswith("output"):
            return False
        dims = (module.in_features, module.out_features)
        return min(dims) >= min_dim and all(d % 16 == 0 for d in dims)

    convert_to_float8_training(model, config=config, module_filter_fn=keep)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, training_cfg, parallelism_cfg, device_type: str) -> None:
    """Shards each block, the embedding, the final norm + head (one group) and the root with FSDP2.

    A 2-D (dp_replicate, dp_shard) mesh gives HSDP. Mixed precision (bf16 params, fp32 reduce) is used on
    GPU only. The gradient divide factor is 1: the trainer already divides the loss by the global token
    count of the step, so reduced gradients must be plain sums.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    mp = MixedPrecisionPolicy(
        param_dtype=dtypes[training_cfg.mixed_precision_param] if device_type == "cuda" else torch.float32,
        reduce_dtype=dtypes[training_cfg.mixed_precision_reduce] if device_type == "cuda" else torch.float32,
    )
    policy = parallelism_cfg.fsdp_reshard_after_forward
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away by backward: keep them by default.
        reshard = policy == "always" or (policy == "default" and i < len(blocks) - 1)
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model.tok_embeddings, mesh=mesh, mp_policy=mp, reshard_after_forward=policy != "never")
    fully_shard([model.norm, model.output], mesh=mesh, mp_policy=mp, reshard_after_forward=policy == "always")
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=policy == "always")
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)


def parallelize_model(model: nn.Module, cfg, mesh: DeviceMesh | None, device_type: str) -> None:
    """Applies AC, compile, float8 and (with a mesh) FSDP2, in that order."""
    apply_ac(model, cfg.activation_checkpoint)
    apply_compile(model, cfg.compile)
    apply_float8(model, cfg.float8)
    if mesh is not None:
        apply_fsdp(model, mesh, cfg.training, cfg.parallelism, device_type)


def count_wrapped(model: nn.Module) -> dict[str, int]:
    """Numbers of checkpoint-wrapped and compiled blocks, for the start-up summary."""
    counts: dict[str, int] = defaultdict(int)
    for block in model.layers.children():
        counts["ac"] += int(type(block).__name__ == "CheckpointWrapper")
        counts["compiled"] += int(getattr(block, "_compiled_call_impl", None) is not None)
    return dict(counts)
