"""GPU runs (skipped without CUDA): deterministic mode repeats bitwise; DDP over 2 GPUs (bf16 autocast, NCCL,
summing comm hook), also with CUDA-graphed blocks, reproduces one GPU training the same global batch; CUDA graphs
train like plain compile and resume exactly; compiled blocks with activation checkpointing, and FSDP's bf16
residual stream, train like plain compile on one GPU."""

from __future__ import annotations

import pytest
import torch
from harness import read_losses
from test_parallel import data, finish, run_trainer, torchrun, train_args  # noqa: F401  (data is a fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.multiprocess, pytest.mark.slow]


def test_deterministic_runs_repeat_bitwise(data, tmp_path):  # noqa: F811
    argv = ["--training.deterministic", "--training.dtype", "bfloat16", "--training.seq_len", "256",
            "--training.local_batch_size", "2", "--training.global_batch_size", "4"]
    try:
        first = run_trainer(train_args(data, tmp_path / "a", *argv))
        second = run_trainer(train_args(data, tmp_path / "b", *argv))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)  # leave the process as other tests expect it
    assert first == second
    assert len(set(first.values())) == len(first) > 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "compiled_cudagraphs"])
def test_ddp_two_gpus_equal_one_gpu(data, tmp_path, graphs):  # noqa: F811
    """Same samples and noise (layout invariance); bf16 matmuls whose gradient sums differ only in order, so the
    losses agree to ~1e-4 relative, not bitwise. With ``graphs``, the 170m.toml form: DDP with CUDA-graphed blocks
    (bucket-view gradients, 2 micro-batches per rank accumulated without sync) against one GPU, plain compile."""
    argv = ["--training.dtype", "bfloat16", "--training.seq_len", "256", "--training.local_batch_size", "2",
            "--training.global_batch_size", "8", *(["--compile.enable"] if graphs else [])]
    one = run_trainer(train_args(data, tmp_path / "one", *argv))
    ddp = ["--parallelism.data_parallel_replicate_degree", "-1", "--parallelism.data_parallel_shard_degree", "1",
           *(["--compile.cudagraphs"] if graphs else [])]
    finish(torchrun(1, 2, "localhost:0", train_args(data, tmp_path / "ddp", *argv, *ddp)))
    two = read_losses(tmp_path / "ddp")
    assert sorted(two) == sorted(one) and len(set(one.values())) == len(one) > 1
    for step, ref in one.items():
        assert abs(two[step] - ref) <= 2e-3 * abs(ref), f"step {step}: {two[step]!r} vs {ref!r}"


@pytest.mark.parametrize("micro_batches", [2, 1])
def test_cudagraphs_train_like_plain_compile(data, tmp_path, micro_batches):  # noqa: F811
    """Compiled blocks replayed as CUDA graphs, with 2 micro-batches a step (gradients accumulate into buffers
    outside the graphs' pool) or 1 (the optimizer reads the pool's gradients, set to None before the next replay),
    and validation between steps (no_grad calls of the chained blocks): the same kernels as plain compile, so the
    losses agree to bf16 noise; and no graph was skipped (replayed eagerly)."""
    from torch._dynamo.utils import counters

    argv = ["--training.dtype", "bfloat16", "--training.seq_len", "256", "--training.local_batch_size", "2",
            "--training.global_batch_size", str(2 * micro_batches), "--compile.enable", "--validation.enable",
            "--validation.freq", "2", "--validation.steps", "2", "--data.val_prefix", "train_slim"]
    plain = run_trainer(train_args(data, tmp_path / "plain", *argv))
    counters.clear()
    graphs = run_trainer(train_args(data, tmp_path / "graphs", *argv, "--compile.cudagraphs"))
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert sorted(graphs) == sorted(plain) and len(set(plain.values())) == len(plain) > 1
    for step, ref in plain.items():
        assert abs(graphs[step] - ref) <= 2e-3 * abs(ref), f"step {step}: {graphs[step]!r} vs {ref!r}"


@pytest.mark.parametrize("micro_batches", [2, 1])
def test_cudagraphs_resume_equals_uninterrupted(data, tmp_path, micro_batches):  # noqa: F811
    """Deterministic bf16 runs with CUDA graphs: a run resumed from its step-2 checkpoint repeats the uninterrupted
    losses exactly, so Adam's moments were restored, with gradients kept allocated (2 micro-batches) or handed
    over from the graphs' pool (1)."""
    argv = ["--training.deterministic", "--training.dtype", "bfloat16", "--training.seq_len", "256",
            "--training.local_batch_size", "2", "--training.global_batch_size", str(2 * micro_batches), "--compile.enable",
            "--compile.cudagraphs", "--checkpoint.enable", "--checkpoint.interval", "2"]
    try:
        full = run_trainer(train_args(data, tmp_path / "full", *argv))
        run_trainer(train_args(data, tmp_path / "resumed", *argv), stop_after=2)
        resumed = run_trainer(train_args(data, tmp_path / "resumed", *argv))
    finally:
        torch.use_deterministic_algorithms(False)  # leave the process as other tests expect it
    assert sorted(resumed) == list(range(3, len(full) + 1)) and len(full) >= 4
    assert resumed == {step: full[step] for step in resumed}


@pytest.mark.parametrize("mode,option", [("selective", "op"), ("full", "1")])
def test_compiled_activation_checkpointing_trains_like_plain_compile(data, tmp_path, mode, option):  # noqa: F811
    """Compiled blocks recomputed in backward (the fused add + RMSNorm's Triton kernels run again inside the
    recompute): the same math as plain compile, so the losses agree to bf16 noise."""
    argv = ["--training.dtype", "bfloat16", "--training.seq_len", "256", "--training.local_batch_size", "2",
            "--training.global_batch_size", "4", "--compile.enable"]
    plain = run_trainer(train_args(data, tmp_path / "plain", *argv))
    ac = run_trainer(train_args(data, tmp_path / "ac", *argv, "--activation_checkpoint.mode", mode,
                                "--activation_checkpoint.selective_ac_option", option))
    assert sorted(ac) == sorted(plain) and len(set(plain.values())) == len(plain) > 1
    for step, ref in plain.items():
        assert abs(ac[step] - ref) <= 2e-3 * abs(ref), f"step {step}: {ac[step]!r} vs {ref!r}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp_compiled_bf16_stream_trains_like_one_gpu(data, tmp_path):  # noqa: F811
    """FSDP over 2 GPUs with compiled blocks: bf16 parameters, so the residual stream and the fused norm's kernels
    run in bf16, against one GPU's autocast (fp32 stream) on the same global batch: close, not equal (bf16
    rounding of the stream), and both training."""
    argv = ["--training.dtype", "bfloat16", "--training.seq_len", "256", "--training.local_batch_size", "2",
            "--training.global_batch_size", "4", "--compile.enable"]
    one = run_trainer(train_args(data, tmp_path / "one", *argv))
    fsdp = ["--parallelism.data_parallel_replicate_degree", "1", "--parallelism.data_parallel_shard_degree", "-1"]
    finish(torchrun(1, 2, "localhost:0", train_args(data, tmp_path / "fsdp", *argv, *fsdp)))
    two = read_losses(tmp_path / "fsdp")
    assert sorted(two) == sorted(one) and len(set(one.values())) == len(one) > 1
    for step, ref in one.items():
        assert abs(two[step] - ref) <= 1e-2 * abs(ref), f"step {step}: {two[step]!r} vs {ref!r}"
