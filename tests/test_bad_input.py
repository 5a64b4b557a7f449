"""Bad values in the config are one line naming the key and the fix, exit code 2, before anything is built or
written: non-finite floats (every float key), out-of-range integers, unreadable config files, a dump folder that
is a file or lies under one, and a seq_len whose start-up buffers cannot fit in memory."""

import math
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from dlm_titan.config import JobConfig, load_config
from dlm_titan.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def refused(flags: list[str]) -> str:
    with pytest.raises(UserError) as raised:
        load_config(flags)
    return str(raised.value)


def float_keys() -> list[tuple[str, object]]:
    """Every float-valued key of the config, found from the dataclasses' type hints, with its type."""
    keys = []
    for section, cls in typing.get_type_hints(JobConfig).items():
        for key, hint in typing.get_type_hints(cls).items():
            if hint is float or float in typing.get_args(hint):
                keys.append((f"{section}.{key}", hint))
    return keys


def test_every_float_key_is_found():
    names = {k for k, _ in float_keys()}
    assert {"optimizer.lr", "optimizer.eps", "optimizer.betas", "training.max_norm", "training.flops_budget",
            "data.train_weights", "diffusion.eps", "lr_scheduler.min_lr"} <= names


@pytest.mark.parametrize("bad", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("key, hint", float_keys())
def test_non_finite_floats_are_refused_for_every_key(key, hint, bad):
    """inf / nan pass most range checks (nan compares false with everything): an infinite AdamW eps stops all
    learning, a nan max_norm turns clipping off, an infinite lr or budget ends in a traceback."""
    values = ["0.9", bad] if typing.get_origin(hint) is tuple else [bad]
    message = refused([f"--{key}", *values])
    assert message.startswith(f"--{key} must be finite"), message


def test_non_finite_floats_in_toml_are_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[optimizer]\neps = inf\n")
    assert refused(["--job.config_file", str(path)]).startswith("--optimizer.eps must be finite")
    path.write_text("[data]\ntrain_weights = [nan]\n")
    assert refused(["--job.config_file", str(path)]).startswith("--data.train_weights must be finite")


@pytest.mark.parametrize("flags, message", [
    (["--training.seed", "-1"], "--training.seed must be in [0, 4294967295], got -1"),
    (["--training.seed", str(2**32)], "--training.seed must be in [0, 4294967295]"),
    (["--lr_scheduler.warmup_steps", "-7"], "--lr_scheduler.warmup_steps must be >= 0, or -1"),
    (["--training.flops_budget", "-1e18"], "--training.flops_budget must be >= 0"),
    (["--data.train_weights", "0"], "--data.train_weights must be >= 0 with a positive sum"),
    (["--data.train_prefixes", "a", "b", "--data.train_weights", "1", "-1"], "--data.train_weights must be >= 0"),
    (["--data.num_workers", "-1"], "--data.num_workers must be >= 0"),
    (["--model.vocab_size", "-1"], "--model.vocab_size must be >= 0 (0 = the tokenizer's vocabulary), got -1"),
    (["--parallelism.data_parallel_shard_degree", "0"], "--parallelism.data_parallel_shard_degree must be >= 1 or -1"),
    (["--parallelism.data_parallel_replicate_degree", "-2"],
     "--parallelism.data_parallel_replicate_degree must be >= 1 or -1"),
    (["--parallelism.ddp_bucket_cap_mb", "0"], "--parallelism.ddp_bucket_cap_mb must be >= 1"),
    (["--checkpoint.write_threads", "0"], "--checkpoint.write_threads must be >= 1"),
    (["--checkpoint.keep_latest_k", "-1"], "--checkpoint.keep_latest_k must be >= 0"),
    (["--checkpoint.load_step", "-2"], "--checkpoint.load_step must be >= 0, or -1"),
    (["--validation.enable", "--validation.freq", "0"], "--validation.freq must be >= 1, got 0"),
    (["--validation.enable", "--validation.steps", "0"], "--validation.steps must be >= 1, or -1"),
    (["--validation.enable", "--validation.steps", "-2"], "--validation.steps must be >= 1, or -1"),
    (["--validation.enable", "--validation.mc_samples", "0"], "--validation.mc_samples must be >= 1"),
    (["--validation.enable", "--validation.seed", "-5"], "--validation.seed must be in [0, 4294967295]"),
])
def test_out_of_range_integers_name_the_key(flags, message):
    assert message in refused(flags)


def test_values_of_a_disabled_feature_are_not_checked():
    """Validation's and profiling's values only matter when they are on (as before, where they were built)."""
    cfg = load_config(["--validation.freq", "0", "--validation.mc_samples", "0", "--profiling.profile_freq", "0"])
    assert (cfg.validation.freq, cfg.validation.mc_samples, cfg.profiling.profile_freq) == (0, 0, 0)


def test_unreadable_config_files(tmp_path):
    assert "is a folder" in refused(["--job.config_file", str(tmp_path)])
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[training]\nsteps = 3\n")
    assert refused(["--job.config_file", str(binary)]).startswith(f"config file {binary} is not UTF-8 text")
    broken = tmp_path / "broken.toml"
    broken.write_text("[training\nsteps = 3\n")
    assert "is not valid TOML" in refused(["--job.config_file", str(broken)])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_config_file_without_read_permission(tmp_path):
    locked = tmp_path / "locked.toml"
    locked.write_text("[training]\nsteps = 3\n")
    locked.chmod(0)
    assert "cannot read config file" in refused(["--job.config_file", str(locked)])


def test_dump_folder_that_is_or_lies_under_a_file(tmp_path):
    file = tmp_path / "a_file"
    file.write_text("keep me")
    assert refused(["--job.dump_folder", str(file)]).startswith(f"--job.dump_folder {file} is a file, not a folder")
    under = file / "run" / "deeper"
    assert f"cannot be created: {file} is a file" in refused(["--job.dump_folder", str(under)])
    assert file.read_text() == "keep me"
    fresh = tmp_path / "new" / "run"
    assert load_config(["--job.dump_folder", str(fresh)]).job.dump_folder == str(fresh)
    assert not (tmp_path / "new").exists(), "checking the dump folder creates nothing"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_dump_folder_without_write_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    assert "is not writable" in refused(["--job.dump_folder", str(locked / "run")])


def test_seq_len_beyond_memory_names_the_limit():
    """10**12 positions: the RoPE table alone is 512 TB. One line naming the limit, not an allocator traceback."""
    message = refused(["--training.seq_len", str(10**12)])
    assert message.startswith("--training.seq_len 1000000000000 needs at least") and "GiB of memory" in message
    limit = int(message.rsplit("at most ", 1)[1].rstrip(")").replace(",", ""))
    assert 1_000_000 < limit < 10**12
    assert load_config(["--training.seq_len", str(limit)]).training.seq_len == limit
    assert "needs at least" in refused(["--training.seq_len", str(limit + 1)])


def test_vocab_size_beyond_memory_names_the_limit():
    message = refused(["--model.vocab_size", str(10**12)])
    assert message.startswith("--model.vocab_size 1000000000000 needs at least") and "GiB of memory" in message
    limit = int(message.rsplit("at most ", 1)[1].rstrip(")").replace(",", ""))
    assert load_config(["--model.vocab_size", str(limit)]).model.vocab_size == limit
    assert "needs at least" in refused(["--model.vocab_size", str(limit + 1)])


def test_memory_lower_bounds_hold_for_every_flavor():
    """config_checks.py counts 2 x 4 x 64 bytes per position for the RoPE table (the head dim of every flavor is >= 64)
    and 2 x 4 x 256 bytes per vocabulary entry for the embedding and head (every flavor is >= 256 wide)."""
    from dlm_titan.config_checks import _ROPE_BYTES_PER_POSITION, _VOCAB_BYTES_PER_ENTRY
    from dlm_titan.models import build_model
    from dlm_titan.models.attention import rope_cache
    from dlm_titan.models.flavors import FLAVORS, get_model_args

    shapes = [get_model_args(name) for name in FLAVORS]
    assert min(a.head_dim for a in shapes) >= 64 and min(a.dim for a in shapes) >= 256
    table = rope_cache(16, 64, 10000.0)
    assert table.numel() * table.element_size() == 16 * _ROPE_BYTES_PER_POSITION
    model = build_model(JobConfig().model, 16, torch.device("cpu"))  # the 6M flavor, 256 wide, on the meta device
    vocab_params = sum(p.numel() * 4 for name, p in model.named_parameters() if p.shape[0] >= model.args.vocab_size)
    assert vocab_params >= model.args.vocab_size * _VOCAB_BYTES_PER_ENTRY


@pytest.mark.parametrize("flags, key", [
    (["--optimizer.eps", "inf"], "--optimizer.eps"),
    (["--training.max_norm", "nan"], "--training.max_norm"),
    (["--training.seq_len", str(10**12)], "--training.seq_len"),
])
def test_trainer_entry_point_prints_one_line_and_returns_2(flags, key, capsys):
    from dlm_titan.train import main

    assert main(flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {key}"), err


@pytest.mark.multiprocess
def test_real_cli_exit_code(tmp_path):
    """The real command line: exit code 2 and one stderr line; the file in the dump folder's place is untouched."""
    file = tmp_path / "a_file"
    file.write_text("keep me")
    result = subprocess.run([sys.executable, "-m", "dlm_titan.train", "--optimizer.lr", "inf"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --optimizer.lr must be finite"), \
        result.stderr
    result = subprocess.run([sys.executable, "-m", "dlm_titan.train", "--job.dump_folder", str(file)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "is a file, not a folder" in lines[0], result.stderr
    assert file.read_text() == "keep me"


def test_finite_values_still_load():
    cfg = load_config(["--optimizer.eps", "1e-6", "--training.max_norm", "0", "--training.seed", "0",
                       "--lr_scheduler.warmup_steps", "0", "--training.flops_budget", "0"])
    assert math.isfinite(cfg.optimizer.eps) and cfg.training.max_norm == 0.0
