"""Data parallelism on CPU (gloo): FSDP2, HSDP, activation checkpointing, a two-"node" launch and compile all
reproduce the losses of one process training the same global batch (DESIGN.md layout invariance).

The reference is one process with 4 micro-batches of 1 sequence; the parallel runs are torchrun launches of
this file (see ``main``), which trains with the real Trainer and writes the exact logged losses to
``losses.json`` (the console prints 4 decimals). Runs use fp32, a 6M model with a 512-token vocabulary over
hand-written random shards, seq_len 32, so each launch takes seconds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import read_losses, run_trainer, tiny_run_args, write_random_shards

from dlm_titan.config import Parallelism, load_config
from dlm_titan.distributed import resolve_parallel_dims
from dlm_titan.errors import UserError

VOCAB = 512
STEPS = 5
TOL = 1e-6  # relative; fp32 losses of ~6 differ only by summation order
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def train_args(data: Path, dump: Path, *extra: str) -> list[str]:
    return tiny_run_args(data, dump, VOCAB, STEPS, 4, 1, 0, *extra)


def assert_close(losses: dict[int, float], reference: dict[int, float], tol: float = TOL) -> None:
    assert sorted(losses) == sorted(reference) == list(range(1, STEPS + 1))
    for step, ref in reference.items():
        assert abs(losses[step] - ref) <= tol * abs(ref), f"step {step}: {losses[step]!r} vs {ref!r}"
    # The steps must differ from each other, or equality would say nothing about training.
    assert len({round(v, 4) for v in reference.values()}) == STEPS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def torchrun(nnodes: int, nproc: int, endpoint: str, argv: list[str], **env_extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env_extra}
    env.pop("WORLD_SIZE", None)
    cmd = [*TORCHRUN, "--nnodes", str(nnodes), "--nproc_per_node", str(nproc), "--rdzv_backend", "c10d",
           "--rdzv_endpoint", endpoint, "--rdzv_id", "dlm_titan_test", __file__, *argv]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(*procs: subprocess.Popen) -> None:
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_random_shards(tmp_path_factory.mktemp("shards"), VOCAB)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict[int, float]:
    """One process, 4 micro-batches of 1 sequence per step."""
    return run_trainer(train_args(data, tmp_path_factory.mktemp("ref")))


@pytest.fixture(scope="module")
def fsdp_losses(data, tmp_path_factory) -> dict[int, float]:
    """FSDP over 2 processes on one node, 2 micro-batches each (keeps no gathered params: "always")."""
    dump = tmp_path_factory.mktemp("fsdp")
    argv = train_args(data, dump, "--parallelism.fsdp_reshard_after_forward", "always")
    finish(torchrun(1, 2, "localhost:0", argv))
    return read_losses(dump)


@pytest.mark.multiprocess
def test_fsdp_two_ranks_equal_one_process(fsdp_losses, reference):
    assert_close(fsdp_losses, reference)


@pytest.mark.multiprocess
def test_ddp_2x1_equals_fsdp_1x2(data, tmp_path, fsdp_losses):
    """Replicate 2 x shard 1: plain replication through DDP's reducer (summing comm hook, no sync on the first
    micro-batch of each step) equals FSDP over the same 2 ranks."""
    argv = train_args(data, tmp_path, "--parallelism.data_parallel_replicate_degree", "-1",
                      "--parallelism.data_parallel_shard_degree", "1")
    finish(torchrun(1, 2, "localhost:0", argv))
    assert_close(read_losses(tmp_path), fsdp_losses)


@pytest.mark.multiprocess
def test_hsdp_2x2_equals_one_process(data, tmp_path, reference):
    """Replicate 2 x shard 2 over 4 ranks (HSDP: gradients reduce-scattered within each pair, then all-reduced
    across the pairs), one micro-batch each, with the default reshard policy (gathered parameters kept)."""
    argv = train_args(data, tmp_path, "--parallelism.data_parallel_replicate_degree", "2")
    finish(torchrun(1, 4, "localhost:0", argv))
    assert_close(read_losses(tmp_path), reference)


@pytest.mark.parametrize("form", [("1", "-1"), ("-1", "1")], ids=["fsdp", "ddp"])
@pytest.mark.multiprocess
def test_triton_adamw_on_two_ranks_equals_one_process(data, tmp_path, reference, form):
    """The Triton AdamW (run by triton's CPU interpreter) on FSDP's DTensor shards and on DDP's bucket-view
    gradients, with clipping (max_norm 1, grad norms ~5) folded into the update, equals one process with the
    foreach AdamW."""
    pytest.importorskip("triton")
    argv = train_args(data, tmp_path, "--optimizer.implementation", "triton",
                      "--parallelism.data_parallel_replicate_degree", form[0],
                      "--parallelism.data_parallel_shard_degree", form[1])
    finish(torchrun(1, 2, "localhost:0", argv, TRITON_INTERPRET="1"))
    assert_close(read_losses(tmp_path), reference)


@pytest.mark.multiprocess
def test_two_nodes_on_localhost_equal_one_process(data, tmp_path, reference):
    """Two torchrun launches of one process each, joined by a c10d rendezvous (--nnodes 2)."""
    endpoint = f"localhost:{free_port()}"
    argv = train_args(data, tmp_path)
    finish(torchrun(2, 1, endpoint, argv), torchrun(2, 1, endpoint, argv))
    assert_close(read_losses(tmp_path), reference)


@pytest.mark.parametrize("mode,option", [("full", "op"), ("selective", "op"), ("selective", "2")])
@pytest.mark.slow
def test_activation_checkpointing_keeps_losses(data, tmp_path, reference, mode, option):
    argv = train_args(data, tmp_path, "--activation_checkpoint.mode", mode,
                      "--activation_checkpoint.selective_ac_option", option)
    assert_close(run_trainer(argv), reference)


@pytest.mark.slow
def test_compiled_block_equals_eager():
    """torch.compile (Inductor) of a two-block model: loss and every gradient match eager within 1e-5, and both
    blocks run one graph (the first block's zero pending add looks like the second's real one).

    Blocks of width 32 keep Inductor's cold CPU compile (two C++ kernels files) to under a minute."""
    from dlm_kernels import masked_linear_cross_entropy
    from torch._dynamo.utils import counters

    from dlm_titan.config import Compile
    from dlm_titan.models import ModelArgs, TransEncoder
    from dlm_titan.parallelize import apply_compile

    counters.clear()
    args = ModelArgs(n_layers=2, n_heads=2, dim=32, ffn_dim=64, vocab_size=64)
    models = []
    for compiled in (False, True):
        with torch.device("meta"):
            model = TransEncoder(args, max_seq_len=16, attn_backend="math")
        apply_compile(model, Compile(enable=compiled))
        model.to_empty(device="cpu")
        model.init_weights(seed=1)
        models.append(model)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 65, (2, 16), generator=gen)
    targets = torch.randint(0, 64, (2, 16), generator=gen)
    weights = torch.rand(2, 16, generator=gen) * (torch.rand(2, 16, generator=gen) < 0.5)
    losses = []
    for model in models:
        loss = model(tokens, targets, weights,
                     loss_fn=lambda h, w, y, tw: masked_linear_cross_entropy(h, w, y, tw, impl="torch"))
        loss.backward()
        losses.append(loss.detach())
    assert models[1].layers["0"]._compiled_call_impl is not None
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    for (name, p_eager), (_, p_comp) in zip(models[0].named_parameters(), models[1].named_parameters()):
        g_eager, g_comp = p_eager.grad, p_comp.grad
        assert g_eager.norm() > 0, name
        # Relative to the gradient's norm: fused kernels reorder sums, so tiny entries differ more.
        assert (g_comp - g_eager).norm() <= 1e-5 * g_eager.norm(), name


@pytest.mark.parametrize(
    "replicate,shard,world,message",
    [
        (3, -1, 4, "does not divide the world size 4"),
        (1, 3, 4, "must equal the world size (4)"),
        (2, 4, 4, "must equal the world size (4)"),
        (-1, -1, 4, "are both -1"),
        (-1, 3, 4, "data_parallel_shard_degree = 3 does not divide the world size 4"),
    ],
)
def test_bad_degrees_name_the_fix(replicate, shard, world, message):
    cfg = Parallelism(data_parallel_replicate_degree=replicate, data_parallel_shard_degree=shard)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_parallel_dims(cfg, world, rank=0)


def test_degrees_resolve_to_the_forms():
    dims = resolve_parallel_dims(Parallelism(), 8, rank=3)
    assert (dims.replicate, dims.shard, dims.form) == (1, 8, "fsdp")
    dims = resolve_parallel_dims(Parallelism(data_parallel_replicate_degree=2), 8, rank=0)
    assert (dims.replicate, dims.shard, dims.form) == (2, 4, "hsdp")
    dims = resolve_parallel_dims(Parallelism(data_parallel_replicate_degree=8), 8, rank=0)
    assert (dims.replicate, dims.shard, dims.form) == (8, 1, "ddp")
    dims = resolve_parallel_dims(Parallelism(data_parallel_replicate_degree=-1, data_parallel_shard_degree=1), 8, 0)
    assert (dims.replicate, dims.shard, dims.form, dims.sharded) == (8, 1, "ddp", False)
    assert resolve_parallel_dims(Parallelism(), 1, rank=0).form == "single"


def test_auto_reshard_rule():
    from dlm_titan.models import get_model_args
    from dlm_titan.parallelize import resolve_reshard

    for flavor in ("6M", "170M", "1028M", "2121M"):  # every SMDM size keeps gathered parameters
        assert resolve_reshard("auto", get_model_args(flavor, 32000).total_params()) == "never"
    assert resolve_reshard("auto", 7_000_000_000) == "default"
    assert resolve_reshard("always", 1) == "always"


@pytest.mark.parametrize("option", ["every", "0", "-2"])
def test_bad_selective_option_is_a_user_error(option):
    """Checked with the other ranges when the config loads, only for selective checkpointing."""
    with pytest.raises(UserError, match='--activation_checkpoint.selective_ac_option must be "op" or a positive'):
        load_config(["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option",
                     option])
    assert load_config(["--activation_checkpoint.selective_ac_option", option]).activation_checkpoint.mode == "none"


def test_gradients_stay_allocated_only_where_something_holds_them():
    """DDP's bucket views, and CUDA-graphed backward passes accumulating over micro-batches, need gradients
    zeroed in place; one graphed micro-batch, plain runs and FSDP set them to None (no zero fill, no add)."""
    from dlm_titan.train import keeps_gradients

    assert keeps_gradients("ddp", cudagraphs=False, micro_batches=1)
    assert keeps_gradients("ddp", cudagraphs=True, micro_batches=1)
    assert keeps_gradients("single", cudagraphs=True, micro_batches=2)
    assert not keeps_gradients("single", cudagraphs=True, micro_batches=1)
    assert not keeps_gradients("single", cudagraphs=False, micro_batches=4)
    assert not keeps_gradients("fsdp", cudagraphs=False, micro_batches=2)


def test_cudagraphs_are_ignored_on_cpu_and_refused_with_fsdp(monkeypatch):
    from torch.distributed.device_mesh import DeviceMesh

    from dlm_titan.models import build_model
    from dlm_titan.parallelize import parallelize_model

    cfg = load_config(["--model.flavor", "6M", "--compile.enable", "--compile.cudagraphs"])
    model = build_model(cfg.model, 32, torch.device("meta"))
    assert parallelize_model(model, cfg, None, torch.device("cpu")).cudagraphs is False
    assert not model._forward_pre_hooks  # no CUDA-graph step marks either
    # On a GPU with a sharded mesh (a stand-in: only its shape is read before the check) it is a UserError.
    mesh = DeviceMesh.__new__(DeviceMesh)
    monkeypatch.setattr(DeviceMesh, "shape", property(lambda self: (1, 2)))
    with pytest.raises(UserError, match="cannot replay FSDP-sharded blocks"):
        parallelize_model(build_model(cfg.model, 32, torch.device("meta")), cfg, mesh, torch.device("cuda"))


if __name__ == "__main__":  # a torchrun worker: train with the given CLI arguments
    run_trainer(sys.argv[1:])
