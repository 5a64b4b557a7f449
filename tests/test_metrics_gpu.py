"""GPU tests of logging without stalls (skipped without CUDA): a logged step's metrics reach the host without the
host waiting for the GPU, and a log step of real training queues no device sync."""

import pytest
import torch
from harness import tiny_run_args, write_random_shards

from dlm_titan.config import load_config
from dlm_titan.metrics import LossByTimeBins
from dlm_titan.transfers import HostCopy

pytestmark = pytest.mark.gpu


def test_host_copy_queues_behind_the_work_without_waiting_for_it():
    x = torch.arange(4.0, device="cuda")
    # Warm up: the first pinned buffer comes from cudaHostAlloc and a kernel's first launch loads its module,
    # and either may wait for the GPU. Training reaches its log steps warm.
    torch.cuda._sleep(1000)
    HostCopy({"y": x * 3}).read()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(3e8))  # ~0.1-0.2 s of GPU work queued ahead of the values
    copy = HostCopy({"y": x * 3, "n": torch.tensor(5)})
    assert not torch.cuda.current_stream().query()  # construction returned while the GPU was still busy
    out = copy.read()
    assert out["y"].tolist() == [0.0, 3.0, 6.0, 9.0] and out["n"].item() == 5
    assert torch.cuda.current_stream().query()  # read() waited for the work it depends on


def test_t_buckets_take_host_noise_levels_without_a_sync():
    buckets = LossByTimeBins(torch.device("cuda"))
    losses = torch.tensor([1.0, 2.0, 4.0], device="cuda")
    torch.cuda._sleep(1000)  # warm, as in the test above
    buckets.add(torch.tensor([0.5, 0.5, 0.5]), losses)  # caches a pinned buffer (the first one's allocation syncs)
    buckets.take()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(3e8))
    buckets.add(torch.tensor([0.05, 0.08, 0.95]), losses)  # t on the host, as the trainer samples it
    totals = buckets.take()
    assert not torch.cuda.current_stream().query()
    assert totals.tolist() == [[3.0] + [0.0] * 8 + [4.0], [2.0] + [0.0] * 8 + [1.0]]


def test_training_and_log_steps_never_wait_for_the_gpu(tmp_path):
    """With CUDA's sync debug mode set to raise, steps 3-8 of a bf16 run (logging every other step, so the loss
    tap is armed) queue their work and their metrics' copies without one synchronizing call."""
    from dlm_titan.train import Trainer

    (tmp_path / "data").mkdir()
    data = write_random_shards(tmp_path / "data", vocab=512)
    argv = tiny_run_args(data, tmp_path / "out", 512, 8, 4, 2, 0, "--metrics.log_freq", "2", "--training.dtype", "auto")
    trainer = Trainer(load_config(argv))
    assert trainer.metrics.defer

    def strict(fn):
        def run(*args):
            if trainer.step <= 2:  # the first steps create optimizer state and kernel tables
                return fn(*args)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return run

    trainer.train_step, trainer.metrics.start_log = strict(trainer.train_step), strict(trainer.metrics.start_log)
    logged = {}
    log = trainer.metrics.log
    trainer.metrics.log = lambda step, metrics: (logged.update({step: metrics}), log(step, metrics))
    trainer.train()
    assert sorted(logged) == [1, 2, 4, 6, 8]
    assert trainer.metrics.window_mark is not None  # windows timed with CUDA events
    assert all(0 < m["tokens_per_s"] < 1e9 and m["step_time_s"] > 0 for m in logged.values())
