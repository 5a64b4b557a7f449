"""Review tests of the parallel layer, the model's attention backends and shape checks, peak FLOP/s and the
launchers (run_train.sh, scripts/slurm_train.sh, driven with a stand-in for python, srun and scontrol)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dlm_titan.distributed import resolve_parallel_dims
from dlm_titan.errors import UserError
from dlm_titan.flops import peak_flops
from dlm_titan.models import build_model_from_config
from dlm_titan.models.attention import Attention, resolve_attn_backend, rope_cache
from dlm_titan.models.flavors import ModelArgs
from dlm_titan.optim import lr_factor

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- attention backends


def _reference_attention(attn: Attention, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Softmax attention written out (no SDPA), GPT-NeoX rotation, from the module's own weights."""
    b, length, dim = x.shape
    h, kv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = (x @ attn.wqkv.weight.T).split([h * hd, kv * hd, kv * hd], dim=-1)
    q, k, v = (t.view(b, length, -1, hd) for t in (q, k, v))
    cos, sin = rope[0][None, :, None, :], rope[1][None, :, None, :]

    def rotate(t):
        half = t.shape[-1] // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin

    q, k = rotate(q), rotate(k)
    k, v = (t.repeat_interleave(h // kv, dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / hd**0.5
    out = torch.einsum("bhqk,bkhd->bqhd", F.softmax(scores, dim=-1), v)
    return out.reshape(b, length, dim) @ attn.wo.weight.T


@pytest.mark.parametrize("n_kv_heads", [0, 2])
def test_flash_backend_on_cpu_takes_float32(n_kv_heads):
    """CPU's flash SDPA kernel takes fp32: it was rerouted to the memory-efficient kernel, which has no CPU
    implementation ("No viable backend" RuntimeError)."""
    torch.manual_seed(0)
    attn = Attention(64, 4, backend=resolve_attn_backend("flash", torch.device("cpu")), n_kv_heads=n_kv_heads)
    x, rope = torch.randn(2, 8, 64), rope_cache(8, 16, 10000.0)
    torch.testing.assert_close(attn(x, rope), _reference_attention(attn, x, rope), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cudnn", "efficient", "flash_attn"])
def test_cuda_only_backends_refused_on_cpu_in_one_line(backend):
    """These have no CPU kernel: refused when the model is built, not by a traceback in the first forward."""
    with pytest.raises(UserError, match="no CPU kernel"):
        resolve_attn_backend(backend, torch.device("cpu"))
    cfg = {"n_layers": 1, "n_heads": 2, "dim": 16, "ffn_dim": 32, "vocab_size": 10, "max_seq_len": 8}
    with pytest.raises(UserError, match="no CPU kernel"):
        build_model_from_config(cfg, "cpu", attn_backend=backend)


@pytest.mark.parametrize("backend", ["auto", "math", "flash"])
def test_cpu_backends_pass(backend):
    assert resolve_attn_backend(backend, torch.device("cpu")) == ("math" if backend == "auto" else backend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_attn_backend_float32_uses_sdpa(monkeypatch):
    """flash-attn takes bf16/fp16 only: in fp32 the layer uses SDPA's memory-efficient kernel, as for SDPA's
    flash and cuDNN backends (a stand-in package fails if called)."""

    def refuse(*args, **kwargs):
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=refuse))
    torch.manual_seed(0)
    attn = Attention(64, 4, backend="flash_attn", n_kv_heads=2).cuda()
    x, rope = torch.randn(2, 8, 64, device="cuda"), rope_cache(8, 16, 10000.0, device=torch.device("cuda"))
    torch.testing.assert_close(attn(x, rope), _reference_attention(attn, x, rope), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- model shape


@pytest.mark.parametrize("field", ["n_heads", "dim", "n_layers", "ffn_dim", "vocab_size"])
def test_model_shape_zero_or_negative_refused(field):
    """A config.json / checkpoint with n_heads 0 raised ZeroDivisionError; dim 0 built a model of empty tensors."""
    shape = {"n_layers": 2, "n_heads": 4, "dim": 64, "ffn_dim": 128, "vocab_size": 100}
    for bad in (0, -4):
        with pytest.raises(UserError, match="must all be >= 1"):
            ModelArgs(**{**shape, field: bad})


def test_gqa_heads_not_dividing_refused():
    with pytest.raises(UserError, match="n_heads divisible by n_kv_heads"):
        ModelArgs(2, 6, 96, 128, n_kv_heads=4)


# ---------------------------------------------------------------- peak FLOP/s, schedule, parallel degrees


def test_peak_flops_h200_nvl():
    """NVIDIA's H200 NVL datasheet: 1,671 TFLOP/s bf16 with 2:4 sparsity, so 835.5 dense (the SXM H200: 1,979
    sparse, 989 dense). Its device name contains "H200", which matched the SXM value."""
    assert peak_flops("NVIDIA H200 NVL") == 835e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA GH200 480GB") == 989e12


@pytest.mark.parametrize("warmup,total", [(0, 10), (10, 10), (3, 10), (100, 1000)])
def test_lr_factor_edges(warmup, total):
    """First step > 0, peak at the end of warmup, min_ratio exactly at the last step and after it."""
    assert 0 < lr_factor(1, warmup, total, 0.1, "cosine") <= 1
    if warmup:
        assert lr_factor(warmup, warmup, total, 0.1, "cosine") == 1.0
    if warmup < total:
        assert lr_factor(total, warmup, total, 0.1, "cosine") == pytest.approx(0.1)
        assert lr_factor(total + 5, warmup, total, 0.1, "cosine") == pytest.approx(0.1)


@pytest.mark.parametrize("replicate,shard,world,match", [
    (-1, -1, 4, "both -1"),
    (-1, 3, 4, "does not divide"),
    (3, -1, 4, "does not divide"),
    (1, 3, 4, "must equal the world size"),
    (2, 2, 8, "must equal the world size"),
    (1, 2, 1, "must equal the world size"),
])
def test_parallel_degrees_refused(replicate, shard, world, match):
    cfg = types.SimpleNamespace(data_parallel_replicate_degree=replicate, data_parallel_shard_degree=shard)
    with pytest.raises(UserError, match=match):
        resolve_parallel_dims(cfg, world, 0)


@pytest.mark.parametrize("replicate,shard,world,expect,form", [
    (1, -1, 8, (1, 8), "fsdp"), (-1, 1, 8, (8, 1), "ddp"), (2, -1, 8, (2, 4), "hsdp"), (1, -1, 1, (1, 1), "single"),
])
def test_parallel_degrees_resolved(replicate, shard, world, expect, form):
    cfg = types.SimpleNamespace(data_parallel_replicate_degree=replicate, data_parallel_shard_degree=shard)
    dims = resolve_parallel_dims(cfg, world, 0)
    assert (dims.replicate, dims.shard, dims.form) == (*expect, form)


# ---------------------------------------------------------------- launchers

_FAKE_PYTHON = """#!/usr/bin/env bash
# Records each call: check-only flag, WORLD_SIZE, PRECHECKED, then the arguments, one record per line.
{ printf 'check=%s ws=%s pre=%s' "${DLM_TITAN_CHECK_ONLY:-}" "${WORLD_SIZE:-}" "${DLM_TITAN_PRECHECKED:-}"
  for a in "$@"; do printf '\\x1f%s' "$a"; done; printf '\\n'; } >> "$CALLS"
if [[ -n "${DLM_TITAN_CHECK_ONLY:-}" ]]; then exit "${CHECK_RC:-0}"; fi
exit 0
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _launch(tmp_path: Path, script: str, args: list[str], **env: str) -> tuple[int, list[tuple[str, list[str]]]]:
    """Runs a launcher with the stand-ins; returns its exit code and the recorded calls (header, arguments)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    python = _executable(bin_dir / "fake_python", _FAKE_PYTHON)
    # scontrol: the first name, then the others a moment later (a reader that stops after one line kills it by SIGPIPE)
    _executable(bin_dir / "scontrol", "#!/usr/bin/env bash\necho node1; sleep 0.2\n"
                                      "for i in $(seq 2 $SLURM_NNODES); do echo node$i; done\n")
    # srun: one task per node, run one after the other.
    _executable(bin_dir / "srun", '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                  'for i in $(seq $SLURM_NNODES); do "$@" || exit $?; done\n')
    calls = tmp_path / "calls.txt"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DLM_TITAN", "NGPU", "NNODES", "SLURM"))}
    full_env = {**base, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(python), "CALLS": str(calls), **env}
    proc = subprocess.run(["bash", str(REPO / script), *args], env=full_env, capture_output=True, text=True,
                          timeout=60)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return proc.returncode, [(line.split("\x1f")[0], line.split("\x1f")[1:]) for line in lines]


def test_run_train_multi_gpu_checks_then_torchrun_with_quoted_args(tmp_path):
    args = ["--job.description", "two words", "--training.steps", "5"]
    rc, calls = _launch(tmp_path, "run_train.sh", args, NGPU="4")
    assert rc == 0
    assert [header for header, _ in calls] == ["check=1 ws=4 pre=", "check= ws= pre="]
    check_args, torchrun_args = calls[0][1], calls[1][1]
    assert check_args == ["-m", "dlm_titan.train", "--job.config_file", "train_configs/debug.toml", *args]
    assert torchrun_args[:2] == ["-m", "dlm_titan.launch"]  # torchrun, ending with the trainers' exit codes
    assert torchrun_args[torchrun_args.index("--nproc_per_node") + 1] == "4"
    assert torchrun_args[-len(args) - 4:] == check_args[-len(args) - 4:]


def test_run_train_failed_check_exits_2_without_torchrun(tmp_path):
    rc, calls = _launch(tmp_path, "run_train.sh", ["--job.config_file", "x.toml"], NGPU="2", CHECK_RC="2")
    assert rc == 2
    assert [header for header, _ in calls] == ["check=1 ws=2 pre="]
    assert calls[0][1][2:] == ["--job.config_file", "x.toml"]  # CONFIG_FILE's default not added


def test_run_train_check_only_runs_no_trainers(tmp_path):
    """DLM_TITAN_CHECK_ONLY=1 with several GPUs: the check alone, for the whole world size; torchrun was started
    too (every rank inheriting the check-only flag)."""
    rc, calls = _launch(tmp_path, "run_train.sh", [], NGPU="8", NNODES="2", DLM_TITAN_CHECK_ONLY="1")
    assert rc == 0
    assert [header for header, _ in calls] == ["check=1 ws=16 pre="]


def test_slurm_checks_once_per_job_not_per_node(tmp_path):
    """Every node ran its own config check at the same moment, each taking the dump folder's lock: on a shared
    filesystem one node's check could find another's lock, exit 2 and (--kill-on-bad-exit) end the job."""
    env = {"SLURM_NNODES": "3", "SLURM_JOB_NODELIST": "node[1-3]", "SLURM_JOB_ID": "77", "SLURM_GPUS_ON_NODE": "2",
           "DLM_TITAN_ROOT": str(REPO)}
    rc, calls = _launch(tmp_path, "scripts/slurm_train.sh", ["--training.steps", "3"], **env)
    assert rc == 0
    headers = [header for header, _ in calls]
    assert headers == ["check=1 ws=6 pre="] + ["check= ws= pre=1"] * 3
    for _, torchrun_args in calls[1:]:
        assert torchrun_args[torchrun_args.index("--nnodes") + 1] == "3"
        assert torchrun_args[torchrun_args.index("--rdzv_endpoint") + 1] == "node1:29500"
        assert torchrun_args[torchrun_args.index("--rdzv_id") + 1] == "77"
        assert torchrun_args[-2:] == ["--training.steps", "3"]


def test_slurm_bad_config_ends_job_with_exit_2_before_srun(tmp_path):
    env = {"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_ID": "1", "DLM_TITAN_ROOT": str(REPO),
           "CHECK_RC": "2"}
    rc, calls = _launch(tmp_path, "scripts/slurm_train.sh", [], **env)
    assert rc == 2
    assert [header for header, _ in calls] == ["check=1 ws=16 pre="]
