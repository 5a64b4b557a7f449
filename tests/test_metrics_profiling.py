"""Profiling: traces land on the steps that are multiples of profile_freq (also after a resume), and memory
snapshots are refused with a notice off CUDA."""

import json

import pytest
import torch

from dlm_titan.config import Profiling, load_config
from dlm_titan.errors import UserError
from dlm_titan.profiling import Profiler


def run_steps(tmp_path, cfg, start_step, stop_step, log=lambda *a: None):
    x = torch.randn(16, 16)
    with Profiler(cfg, tmp_path, rank=3, device=torch.device("cpu"), start_step=start_step, log=log) as prof:
        for _ in range(start_step, stop_step):
            (x @ x).sum()
            prof.step()


def traced_steps(tmp_path, cfg):
    folder = tmp_path / cfg.save_traces_folder
    return sorted(int(p.name.split("_")[1]) for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("freq, start, stop, expected", [(3, 0, 7, [3, 6]), (4, 5, 13, [8, 12]), (1, 0, 2, [1, 2])])
def test_traces_on_multiples_of_the_freq(tmp_path, freq, start, stop, expected):
    cfg = Profiling(enable_profiling=True, profile_freq=freq)
    run_steps(tmp_path, cfg, start, stop)
    assert traced_steps(tmp_path, cfg) == expected
    trace = tmp_path / cfg.save_traces_folder / f"iteration_{expected[0]}" / "rank3_trace.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("mm" in e.get("name", "") for e in events)  # the traced step's matmul is in the trace


def test_disabled_writes_nothing(tmp_path):
    cfg = Profiling(enable_profiling=False, profile_freq=1)
    run_steps(tmp_path, cfg, 0, 3)
    assert list(tmp_path.iterdir()) == []


def test_memory_snapshot_needs_cuda(tmp_path):
    notes = []
    cfg = Profiling(enable_memory_snapshot=True, profile_freq=1)
    run_steps(tmp_path, cfg, 0, 2, log=notes.append)
    assert notes == ["warning: profiling.enable_memory_snapshot needs CUDA; no memory snapshots on this device"]
    assert not (tmp_path / cfg.save_memory_snapshot_folder).exists()


def test_bad_freq_is_a_user_error():
    """Checked with the other ranges when the config loads, only when profiling is on."""
    with pytest.raises(UserError, match="--profiling.profile_freq must be >= 1, got 0"):
        load_config(["--profiling.enable_profiling", "--profiling.profile_freq", "0"])
    with pytest.raises(UserError, match="--profiling.profile_freq must be >= 1, got 0"):
        load_config(["--profiling.enable_memory_snapshot", "--profiling.profile_freq", "0"])
    assert load_config(["--profiling.profile_freq", "0"]).profiling.profile_freq == 0


def test_trace_summary_counts_idle_device_time(tmp_path):
    """The benchmark's trace summary: kernel time by name and category, and the device's idle time between its
    first and last kernel, with overlapping kernels of two streams counted once (a hand-written trace, in us)."""
    from scripts.bench_train import summarize_trace

    def event(name, ts, dur, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    events = [
        event("nvjet_sm90_gemm", 0.0, 1000.0),
        event("ncclDevKernel_AllReduce", 500.0, 1000.0),  # overlaps the GEMM on another stream
        event("triton_poi_fused_mul", 2500.0, 500.0),  # after 1 ms of nothing
        event("Memcpy HtoD (Pinned -> Device)", 3000.0, 250.0, cat="gpu_memcpy"),
        event("aten::mm", 0.0, 9000.0, cat="cpu_op"),  # host events are not device time
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    summary = summarize_trace(path)
    assert summary["device_ms"] == pytest.approx(2.75)
    assert summary["span_ms"] == pytest.approx(3.25)
    assert summary["idle_ms"] == pytest.approx(1.0)
    assert summary["by_category_ms"] == pytest.approx({"matmul": 1.0, "nccl": 1.0, "triton": 0.5, "other": 0.25})
