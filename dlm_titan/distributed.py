"""Process group, device, determinism and the data-parallel mesh for torchrun (NCCL on GPU, gloo on CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dlm_titan.errors import UserError


@dataclass
class ParallelDims:
    """Data-parallel layout: replicate x shard = world size.

    shard = world size is FSDP; replicate > 1 with shard > 1 is HSDP; shard = 1 is plain replication (DDP: each
    rank keeps whole parameters and all-reduces gradients).
    """

    replicate: int
    shard: int
    world_size: int
    rank: int

    @property
    def dp_enabled(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """Whether FSDP2 shards parameters (FSDP or HSDP); plain replication uses DDP."""
        return self.dp_enabled and self.shard > 1

    @property
    def form(self) -> str:
        """Short name for logs: "single", "ddp", "fsdp" or "hsdp"."""
        if not self.dp_enabled:
            return "single"
        if self.shard == 1:
            return "ddp"
        return "fsdp" if self.replicate == 1 else "hsdp"


def init_distributed() -> tuple[int, int, torch.device]:
    """Joins the torchrun process group when launched with more than one process.

    Returns:
        (rank, world_size, device): cuda:LOCAL_RANK when CUDA is present, else cpu.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; start at most that "
                "many processes per node (torchrun --nproc_per_node, NGPU in run_train.sh)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return rank, world_size, device


def check_local_devices(processes: int) -> None:
    """Refuses more processes on this node than it has GPUs (none to check without CUDA: CPU ranks share the host).

    run_train.sh's check before torchrun calls it with NGPU: each process past the GPUs otherwise printed its own
    "local rank N has no GPU" line once started, beside the others it stopped.
    """
    if torch.cuda.is_available() and processes > (gpus := torch.cuda.device_count()):
        raise UserError(f"NGPU={processes} processes on this node, but it sees {gpus} GPU{'s' * (gpus != 1)} "
                        f"(CUDA_VISIBLE_DEVICES included); set NGPU (torchrun --nproc_per_node) to at most {gpus}")


def set_determinism(enabled: bool, model_cfg, device: torch.device) -> None:
    """Deterministic kernels, so that two runs of one config and layout give bitwise-equal losses.

    Noise and data are already keyed by (seed, step, global sample index), so what remains is the kernels:
    deterministic algorithms everywhere, a fixed cuBLAS workspace, no cuDNN autotuning, Inductor without
    on-device benchmarking, and the flash attention backend instead of cuDNN (torch's cuDNN attention backward
    has no deterministic mode). Changes ``model_cfg.attn_backend`` from "auto"/"cudnn" to "flash" on CUDA; a model
    built afterwards with "flash_attn" calls flash-attn's deterministic backward (models.attention reads the switch).
    """
    if not enabled:
        return
    # Must be set before the first cuBLAS handle is created; the trainer calls this before building anything.
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config, "deterministic"):
        inductor_config.deterministic = True
    if device.type == "cuda" and model_cfg.attn_backend in ("auto", "cudnn"):
        model_cfg.attn_backend = "flash"


def resolve_parallel_dims(parallelism_cfg, world_size: int, rank: int) -> ParallelDims:
    """Checks data_parallel_replicate_degree x data_parallel_shard_degree against the world size.

    Raises:
        UserError: degrees both -1, or not multiplying to the world size; the message names the fix.
    """
    replicate = parallelism_cfg.data_parallel_replicate_degree
    shard = parallelism_cfg.data_parallel_shard_degree
    # Each degree is >= 1 or -1, checked when the config loads (dlm_titan.config); here only what the world size
    # decides.
    if replicate == -1 and shard == -1:
        raise UserError("parallelism.data_parallel_replicate_degree and data_parallel_shard_degree are both -1; set "
                        "one of them (shard 1 = plain replication with DDP, replicate 1 = FSDP)")
    fixed, other = ("replicate", replicate) if shard == -1 else ("shard", shard)
    if -1 in (replicate, shard) and world_size % other:
        raise UserError(
            f"parallelism.data_parallel_{fixed}_degree = {other} does not divide the world size {world_size}; "
            f"use a divisor of {world_size}"
        )
    if shard == -1:
        shard = world_size // replicate
    if replicate == -1:
        replicate = world_size // shard
    if replicate * shard != world_size:
        raise UserError(
            f"data_parallel_replicate_degree ({replicate}) x data_parallel_shard_degree ({shard}) = "
            f"{replicate * shard} must equal the world size ({world_size}); {_degree_fix(replicate, shard, world_size)}"
        )
    return ParallelDims(replicate=replicate, shard=shard, world_size=world_size, rank=rank)


def _degree_fix(replicate: int, shard: int, world_size: int) -> str:
    """The fix for degrees whose product is not the world size: infer the one whose -1 keeps the other valid (and
    plain replication plain). "Set the shard degree to -1" was said whatever the degrees: for replicate 4 x shard 1
    on 2 ranks that was refused next (4 does not divide 2), and for DDP's shard 1 it turned the run into HSDP."""
    if shard == 1 or (world_size % shard == 0 and world_size % replicate):
        return "set --parallelism.data_parallel_replicate_degree -1 to infer it"
    if world_size % replicate == 0:
        return "set --parallelism.data_parallel_shard_degree -1 to infer it"
    return (f"set --parallelism.data_parallel_shard_degree -1 and a data_parallel_replicate_degree that divides "
            f"{world_size}")


def build_mesh(dims: ParallelDims, device: torch.device) -> DeviceMesh | None:
    """A 2-D (dp_replicate, dp_shard) mesh, or None for a single process."""
    if not dims.dp_enabled:
        return None
    return init_device_mesh(device.type, (dims.replicate, dims.shard), mesh_dim_names=("dp_replicate", "dp_shard"))


def new_host_group() -> dist.ProcessGroup | None:
    """A new gloo group of all ranks for small host-side agreements (per-step flags, barriers) that must neither
    touch the GPU's stream nor interleave with other collectives; None for one process. Collective."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.new_group(backend="gloo")
    return None


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks (identity for one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
