"""Activation checkpointing, torch.compile, float8 and data parallelism (FSDP2/HSDP or DDP), applied in this order
to a meta-device model.

Each ``apply_*`` takes the model and its own config section and changes the model in place, adding no wrapper
modules: parameter names stay those of the plain model (they key init, checkpoints and exports), whichever of
these were applied.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

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

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _flash_attn_ops() -> frozenset:
    """flash-attn's forward as a torch op, which flash-attn (>= 2.7) registers when imported (the "flash_attn"
    attention backend imports it as the model is built, before AC applies); empty without flash-attn. Not saved,
    the selective "op" policy recomputed attention in backward under that backend."""
    try:
        return frozenset({torch.ops.flash_attn._flash_attn_forward.default})
    except (AttributeError, RuntimeError):  # no such namespace or op registered
        return frozenset()


def _selective_context_fn(save_ops: frozenset):
    """SAC's context_fn: keep the outputs of ``save_ops``, recompute the rest."""

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in save_ops else CheckpointPolicy.PREFER_RECOMPUTE

    def context_fn():
        return create_selective_checkpoint_contexts(policy)

    return context_fn


def _checkpoint_forward(block: nn.Module, save_ops: frozenset | None) -> None:
    """Makes ``block`` recompute its forward in backward (all of it, or all but ``save_ops``' outputs), by replacing
    its forward in place instead of wrapping it in a module: parameter names (which key init, checkpoints and
    exports) stay unchanged."""
    forward = block.forward
    # Dynamo accepts a context_fn only when it is a real policy, so full AC passes none.
    options = {"context_fn": _selective_context_fn(save_ops)} if save_ops is not None else {}

    def checkpointed_forward(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **options, **kwargs)

    block.forward = checkpointed_forward


def apply_ac(model: nn.Module, ac_cfg) -> None:
    """Activation checkpointing of blocks.

    "full" recomputes every block in backward; "selective" either keeps only matmul and attention outputs
    (option "op") or fully checkpoints every Nth block (option "N").
    """
    if ac_cfg.mode == "none":
        return
    option = str(ac_cfg.selective_ac_option)  # "op" or a positive integer: checked when the config loads
    every = 1
    if ac_cfg.mode == "selective" and option != "op":
        every = int(option)
    per_op = ac_cfg.mode == "selective" and option == "op"
    save_ops = frozenset(_SAVE_OPS) | _flash_attn_ops() if per_op else None
    for i, block in enumerate(model.layers.values()):
        if per_op or i % every == 0:
            _checkpoint_forward(block, save_ops)


def apply_compile(model: nn.Module, compile_cfg, cudagraphs: bool = False) -> None:
    """Compiles each block on its own (fullgraph). Blocks share one graph, so compile time does not grow with
    depth; FSDP's hooks run outside it. The head and loss stay eager (the fused loss is a Triton kernel).

    Args:
        model: the TransEncoder.
        compile_cfg: the compile section (``enable``).
        cudagraphs: replay each block's forward and backward as CUDA graphs (CUDAGraph trees, torch.compile's
            "reduce-overhead" mode). Their heuristic would start a new generation (freeing the previous
            outputs) at every block called under no_grad, while the next block still reads them, so every model
            call marks a new step instead. That assumes one backward, if any, per model call before the next
            call, as in training (each micro-batch's forward then backward), validation and sampling.
    """
    if not compile_cfg.enable:
        return
    compile_blocks(model, mode="reduce-overhead" if cudagraphs else None)
    if cudagraphs:
        model.register_forward_pre_hook(_mark_cudagraph_step)


def compile_blocks(model: nn.Module, *, mode: str | None = None, dynamic: bool | None = None) -> None:
    """Compiles each transformer block on its own (fullgraph; the blocks share one graph).

    Args:
        model: the TransEncoder.
        mode: torch.compile's mode (None = default).
        dynamic: None = torch.compile's default (a recompile marks a changed dimension dynamic); True for
            inference on many sequence lengths and batch sizes (lm-eval requests), so one graph serves them all.
    """
    for block in model.layers.children():
        block.compile(fullgraph=True, mode=mode, dynamic=dynamic)


def _mark_cudagraph_step(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: a model call starts a new CUDA-graph step (the previous call's graph outputs may be
    overwritten from here on)."""
    torch.compiler.cudagraph_mark_step_begin()


def _float8_worth_it(module: nn.Module, fqn: str, min_dim: int) -> bool:
    if not isinstance(module, nn.Linear) or fqn.split(".")[-1] == "output":
        return False
    dims = (module.in_features, module.out_features)
    return min(dims) >= min_dim and all(d % 16 == 0 for d in dims)


def unaligned_tokens(training_cfg, ssl_ratio: float) -> bool:
    """Whether a micro-batch's token count can be off a multiple of 16: local_batch_size x seq_len, or
    local_batch_size x any cropped length under ``ssl_ratio`` > 0 (lengths 1..seq_len)."""
    batch = training_cfg.local_batch_size
    return bool(batch * training_cfg.seq_len % 16) or (ssl_ratio > 0 and bool(batch % 16))


def apply_float8(model: nn.Module, float8_cfg, device_type: str, min_dim: int = 1024,
                 pad_inner_dim: bool = False) -> int:
    """Converts block linears to torchao float8 training and returns how many were converted.

    Skipped: the output head (its loss needs precise logits) and layers with a dim below ``min_dim`` or not a
    multiple of 16, where the scaling casts cost more than the float8 matmul saves (measured on H100: a
    SwiGLU MLP at d=768 ran 0.84x, at d=1792 1.31x). So SMDM models below d=1024 (up to 231M) keep bf16.

    Args:
        pad_inner_dim: zero-pad the inner dimension of each float8 matmul to a multiple of 16, which
            ``torch._scaled_mm`` requires; a weight gradient's inner dimension is the micro-batch's token count
            (:func:`unaligned_tokens`). Off where it is always aligned: the padding copies every operand.
    """
    if not float8_cfg.enable:
        return 0
    # The device first: on a CPU, installing torchao (the other message's fix) would only lead to this one.
    if device_type != "cuda" or torch.cuda.get_device_capability() < (8, 9):
        raise UserError("float8.enable needs a CUDA GPU with float8 matmuls (compute capability >= 8.9: H100, L40S, "
                        "RTX 4090); disable it with --float8.no_enable")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise UserError('float8.enable needs torchao: pip install ".[float8]" (or torchao>=0.10)') from None
    config = Float8LinearConfig.from_recipe_name(float8_cfg.recipe)
    if pad_inner_dim:
        config = replace(config, pad_inner_dim=True)
    convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: _float8_worth_it(m, fqn, min_dim))
    return sum(type(m).__name__ == "Float8Linear" for m in model.modules())


def fsdp_groups(model: nn.Module) -> list[nn.Module | list[nn.Module]]:
    """The FSDP parameter groups, in forward order: each block, the embedding, and norm + head together."""
    return [model.tok_embeddings, *model.layers.values(), [model.norm, model.output]]


def fsdp_mixed_precision(training_cfg, device_type: str):
    """FSDP's mixed-precision policy: on GPU, parameters gathered in training.mixed_precision_param and gradients
    reduced in training.mixed_precision_reduce; float32 both on CPU.

    training.dtype = "float32" asks for float32 compute, and under FSDP the gathered parameters' dtype is the
    compute dtype (no autocast runs there): they stay float32 whatever mixed_precision_param says. Gathered in the
    default bf16, such a run computed in bf16 under FSDP while one GPU or DDP computed in float32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device_type != "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    param = "float32" if training_cfg.dtype == "float32" else training_cfg.mixed_precision_param
    return MixedPrecisionPolicy(param_dtype=_DTYPES[param], reduce_dtype=_DTYPES[training_cfg.mixed_precision_reduce])


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, training_cfg, reshard_after_forward: str, device_type: str) -> bool:
    """Shards the embedding, each block, the final norm + head (one group) and the root with FSDP2.

    A 2-D (dp_replicate, dp_shard) mesh gives HSDP (the trainer uses :func:`apply_ddp` when the shard dimension
    is 1). Mixed precision (bf16 compute parameters, fp32 gradient reduction; see :func:`fsdp_mixed_precision`)
    applies on GPU only. Gradients are reduced as plain sums (divide factor 1, SUM collectives): the trainer
    already divides the loss by the global token count of the step.

    Args:
        reshard_after_forward: "always" frees gathered parameters after each group's forward (least memory,
            a second all-gather in backward); "never" keeps them until backward (one all-gather per step,
            2 bytes a parameter more memory, 6 with several micro-batches: see set_gradient_sync);
            "default" reshards every group except the last block and the head, whose backward comes right
            after their forward.

    Returns:
        whether micro-batches may accumulate without gradient sync (see :func:`set_gradient_sync`): only when
        gathered parameters are kept ("never").
    """
    from torch.distributed.fsdp import fully_shard

    mp = fsdp_mixed_precision(training_cfg, device_type)
    groups = fsdp_groups(model)
    for i, group in enumerate(groups):
        last_two = i >= len(groups) - 2
        reshard = reshard_after_forward == "always" or (reshard_after_forward == "default" and not last_two)
        fully_shard(group, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward == "always")
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            # Plain SUM collectives: NCCL's PREMUL_SUM(1.0) would be a no-op scale, and gloo has no PREMUL_SUM.
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)
    # Keeping gathered parameters also means accumulating micro-batches locally (see set_gradient_sync).
    return reshard_after_forward == "never"


def apply_ddp(model: nn.Module, device: torch.device, bucket_cap_mb: int, reduce_dtype: str = "float32") -> None:
    """Plain replication (shard degree 1) through DDP's C++ reducer: whole fp32 parameters on every rank,
    gradients all-reduced in buckets that start while backward still runs; compute in bf16 by autocast.

    Why not FSDP with a shard dimension of 1: its per-group Python hooks cost ~1 ms of host time a block, and a
    small model's GPU work per block is about as short, so the host falls behind and ranks drift apart (docs/training.md,
    "Parallelism"). DDP's hooks run in C++ and its buckets (``bucket_cap_mb``) are few. Buffers (the RoPE
    table) are constants, so they are not broadcast before every forward.

    Composable ``replicate`` keeps the module (and parameter names) as they are; it builds the reducer at the
    first forward, after the weights are initialised. The comm hook sums gradients instead of averaging them
    (the trainer already divides the loss by the global token count of the step), in ``reduce_dtype``
    (training.mixed_precision_reduce on GPU).
    """
    from torch.distributed._composable.replicate import replicate

    replicate(model, device_id=device, bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=True,
              broadcast_buffers=False)
    model.register_comm_hook(_DTYPES[reduce_dtype], _sum_gradients)


def _sum_gradients(dtype: torch.dtype, bucket):  # DDP rejects a return annotation that is a string
    """DDP comm hook: all-reduces a gradient bucket as a plain sum in ``dtype``; returns a future of the bucket."""
    grads = bucket.buffer()
    wire = grads if grads.dtype == dtype else grads.to(dtype)
    work = dist.all_reduce(wire, op=dist.ReduceOp.SUM, async_op=True)

    def unpack(fut):
        if wire is not grads:
            grads.copy_(fut.value()[0])
        return grads

    return work.get_future().then(unpack)


def set_gradient_sync(model: nn.Module, last_micro_batch: bool) -> None:
    """Gradient accumulation without communication, for models that keep whole parameters between micro-batches
    (DDP, and FSDP with "never" reshard: :attr:`ParallelPlan.accumulate_without_sync`): on every micro-batch but
    the last of a step, skip the gradient reduction (FSDP sums unsharded gradients in the fp32 reduce dtype and
    keeps the gathered parameters after backward). A step then costs one gradient reduction (and under FSDP one
    all-gather) whatever its number of micro-batches, for 6 bytes a parameter more memory under FSDP.

    Call before each micro-batch's forward, only for such models.
    """
    model.set_requires_gradient_sync(last_micro_batch)
    if hasattr(model, "set_reshard_after_backward"):
        model.set_reshard_after_backward(last_micro_batch)


# Up to this many parameters, "auto" keeps gathered parameters from forward to backward (see resolve_reshard).
AUTO_NO_RESHARD_MAX_PARAMS = 3_000_000_000


def resolve_reshard(policy: str, num_params: int) -> str:
    """The FSDP reshard-after-forward policy that "auto" means for a model of ``num_params`` parameters.

    Measured on 2 and 4 H200s (docs/performance.md): keeping gathered bf16 parameters ("never") was the
    fastest sharded form at 170M and 1028M, and with it micro-batches accumulate without communication. It
    costs 2 bytes a parameter (plus 4 for the fp32 gradient sums while accumulating), which stays small next
    to 80 GB up to a few billion parameters; beyond that "default" frees all but the last block.
    """
    if policy != "auto":
        return policy
    return "never" if num_params <= AUTO_NO_RESHARD_MAX_PARAMS else "default"


@dataclass(frozen=True)
class ParallelPlan:
    """What :func:`parallelize_model` applied, for the trainer and its log.

    Attributes:
        data_parallel: a description of the data parallelism ("DDP over 4 ranks", "FSDP2, mesh ..."), or None
            for one process.
        accumulate_without_sync: micro-batches but the last of a step may skip the gradient reduction (call
            :func:`set_gradient_sync` before each forward): DDP, and FSDP keeping gathered parameters.
        compiled_blocks: blocks compiled by torch.compile (0 when off).
        cudagraphs: compiled blocks replay as CUDA graphs.
        float8_linears: linears converted to float8 training.
        ac: activation checkpointing mode.
    """

    data_parallel: str | None
    accumulate_without_sync: bool
    compiled_blocks: int
    cudagraphs: bool
    float8_linears: int
    ac: str

    def describe(self) -> str:
        """The plan as the trainer's ``parallelism:`` log line."""
        return (f"parallelism: {self.data_parallel or 'one process'}; compiled blocks {self.compiled_blocks}"
                f"{' (CUDA graphs)' if self.cudagraphs else ''}; "
                f"activation checkpointing {self.ac}; float8 linears {self.float8_linears}")


def parallelize_model(model: nn.Module, cfg, mesh: DeviceMesh | None, device: torch.device) -> ParallelPlan:
    """Applies AC, compile, float8 and data parallelism, in that order, and returns what it applied.

    Data parallelism follows the mesh: none for one process; DDP when the shard dimension is 1 (plain
    replication); else FSDP2 over the (dp_replicate, dp_shard) mesh (HSDP when both are > 1).

    Args:
        model: a TransEncoder on the meta device.
        cfg: the JobConfig (activation_checkpoint, compile, float8, training, parallelism sections).
        mesh: the (dp_replicate, dp_shard) mesh, or None for one process.
        device: this rank's device.
    """
    # CUDA graphs exist on GPUs only: a config that asks for them still runs (without them) on a CPU.
    cudagraphs = cfg.compile.enable and cfg.compile.cudagraphs and device.type == "cuda"
    if cudagraphs and mesh is not None and mesh.shape[1] > 1:
        raise UserError("--compile.cudagraphs cannot replay FSDP-sharded blocks (their gathered parameters move "
                        "every step): use plain replication (--parallelism.data_parallel_shard_degree 1) or "
                        "--compile.no_cudagraphs")
    apply_ac(model, cfg.activation_checkpoint)
    apply_compile(model, cfg.compile, cudagraphs)
    # Without padding, a micro-batch of another token count failed its first float8 backward (mid-run under
    # diffusion.ssl_ratio, at the first crop to such a length) with _scaled_mm's "divisible by 16" RuntimeError.
    float8_linears = apply_float8(model, cfg.float8, device.type,
                                  pad_inner_dim=unaligned_tokens(cfg.training, cfg.diffusion.ssl_ratio))
    reshard = resolve_reshard(cfg.parallelism.fsdp_reshard_after_forward, model.args.total_params())
    data_parallel, without_sync = None, False
    if mesh is not None and mesh.shape[1] == 1:
        reduce_dtype = cfg.training.mixed_precision_reduce if device.type == "cuda" else "float32"
        apply_ddp(model, device, cfg.parallelism.ddp_bucket_cap_mb, reduce_dtype)
        data_parallel, without_sync = f"DDP over {mesh.shape[0]} ranks", True
    elif mesh is not None:
        without_sync = apply_fsdp(model, mesh, cfg.training, reshard, device.type)
        data_parallel = f"FSDP2, mesh {tuple(mesh.shape)}, reshard after forward: {reshard}"
    return ParallelPlan(
        data_parallel=data_parallel,
        accumulate_without_sync=without_sync,
        compiled_blocks=len(model.layers) if cfg.compile.enable else 0,
        cudagraphs=cudagraphs,
        float8_linears=float8_linears,
        ac=cfg.activation_checkpoint.mode,
    )
