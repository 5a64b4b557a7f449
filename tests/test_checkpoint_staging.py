"""StateStager: the CPU copy an async save writes, taken at save time, in buffers reused across saves."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from dlm_titan.checkpoint.staging import StateStager


def _state(scale: float, rows: int = 3) -> dict:
    return {
        "model": {"w": torch.full((rows, 4), scale), "b": torch.arange(4.0) * scale},
        "optimizer": {"state.w.exp_avg": torch.full((rows, 4), 2 * scale)},
        "train_state": torch.tensor([1, 2, 3], dtype=torch.uint8),
        "groups": [{"lr": 0.1, "betas": (0.9, 0.95)}],
    }


def test_stage_copies_values_at_save_time_into_reused_buffers():
    stager = StateStager(pin_memory=False)
    live = _state(1.0)
    staged = stager.stage(live)
    stager.synchronize()
    live["model"]["w"].add_(100)  # training goes on after the save started
    assert torch.equal(staged["model"]["w"], torch.full((3, 4), 1.0))
    assert staged["groups"] == [{"lr": 0.1, "betas": (0.9, 0.95)}] and isinstance(staged["groups"][0]["betas"], tuple)
    assert staged["model"]["w"].data_ptr() != live["model"]["w"].data_ptr()

    again = stager.stage(_state(5.0))
    assert again["model"]["w"].data_ptr() == staged["model"]["w"].data_ptr()  # the same buffer, new values
    assert torch.equal(again["optimizer"]["state.w.exp_avg"], torch.full((3, 4), 10.0))

    grown = stager.stage(_state(7.0, rows=5))  # a new shape gets a new buffer
    assert grown["model"]["w"].shape == (5, 4) and torch.equal(grown["model"]["w"], torch.full((5, 4), 7.0))


def test_reserved_buffers_are_the_ones_staged_into():
    stager = StateStager(pin_memory=False)
    stager.reserve(_state(0.0))
    staged = stager.stage(_state(3.0))  # waits for the reserving thread
    reserved = stager._buffers[".model.w"]
    assert staged["model"]["w"].data_ptr() == reserved.data_ptr()
    assert torch.equal(staged["model"]["b"], torch.arange(4.0) * 3)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_dtensor_shards_are_staged_on_the_cpu_with_their_spec(device):
    """A DTensor (FSDP2's parameters and optimizer state) is staged as a DTensor of the same spec whose local shard
    is the CPU buffer: never a copy back on the mesh's device (on CUDA, pinned copies on a side stream)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                            rank=0, world_size=1)
    try:
        mesh = init_device_mesh(device, (1,))
        live = distribute_tensor(torch.arange(24.0, device=device).reshape(6, 4), mesh, [Shard(0)])
        stager = StateStager(pin_memory=device == "cuda")
        staged = stager.stage({"model": {"w": live}})["model"]["w"]
        stager.synchronize()
        assert staged.placements == live.placements and staged.shape == live.shape
        assert staged.device_mesh == mesh and staged.to_local().device.type == "cpu"
        assert staged.to_local().data_ptr() == stager._buffers[".model.w"].data_ptr()
        assert torch.equal(staged.to_local(), live.to_local().cpu())
        if device == "cuda":
            assert staged.to_local().is_pinned()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
