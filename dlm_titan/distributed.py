"""Process group, device and data-parallel mesh setup for torchrun (NCCL on GPU, gloo on CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dlm_titan.errors import UserError


@dataclass
class ParallelDims:
    """Data-parallel layout: replicate x shard = world size (HSDP; replicate 1 is plain FSDP)."""

    replicate: int
    shard: int
    world_size: int
    rank: int

    @property
    def dp_enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> tuple[int, int, torch.device]:
    """Joins the torchrun process group when launched with more than one process.

    Returns:
        (rank, world_size, device): cuda:LOCAL_RANK when CUDA is present, else cpu.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return rank, world_size, device


def resolve_parallel_dims(parallelism_cfg, world_size: int, rank: int) -> ParallelDims:
    """Checks data_parallel_replicate_degree x data_parallel_shard_degree against the world size."""
    replicate = parallelism_cfg.data_parallel_replicate_degree
    shard = parallelism_cfg.data_parallel_shard_degree
    if replicate < 1 or world_size % replicate:
        raise UserError(
            f"parallelism.data_parallel_replicate_degree = {replicate} does not divide the world size {world_size}"
        )
    if shard == -1:
        shard = world_size // replicate
    if shard < 1 or replicate * shard != world_size:
        raise UserError(
            f"data_parallel_replicate_degree ({replicate}) x data_parallel_shard_degree ({shard}) must equal the "
            f"world size ({world_size}); set --parallelism.data_parallel_shard_degree -1 to infer it"
        )
    return ParallelDims(replicate=replicate, shard=shard, world_size=world_size, rank=rank)


def build_mesh(dims: ParallelDims, device: torch.device) -> DeviceMesh | None:
    """A 2-D (dp_replicate, dp_shard) mesh, or None for a single process."""
    if not dims.dp_enabled:
        return None
    return init_device_mesh(device.type, (dims.replicate, dims.shard), mesh_dim_names=("dp_replicate", "dp_shard"))


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks (identity for one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Max over all ranks (identity for one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
