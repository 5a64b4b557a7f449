"""Config: CLI > TOML > defaults, unknown keys, type checks, round trip through the saved TOML."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dlm_titan.config import JobConfig, load_config, to_toml
from dlm_titan.data import write_shard
from dlm_titan.errors import UserError


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def test_precedence_cli_over_toml_over_defaults(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 50\nseq_len = 128\n[optimizer]\nlr = 1e-3\n")
    cfg = load_config(["--job.config_file", path, "--training.steps", "7"])
    assert cfg.training.steps == 7  # CLI beats TOML
    assert cfg.training.seq_len == 128  # TOML beats default
    assert cfg.optimizer.lr == 1e-3
    assert cfg.training.global_batch_size == JobConfig().training.global_batch_size  # default kept
    assert cfg.job.config_file == path


def test_defaults_without_file():
    cfg = load_config([])
    assert cfg == JobConfig()


def test_unknown_toml_key_names_it(tmp_path):
    path = write(tmp_path, "[training]\nstepz = 5\n")
    with pytest.raises(UserError, match=r"\[training\]\.stepz.*steps"):
        load_config(["--job.config_file", path])


def test_unknown_toml_section_names_it(tmp_path):
    path = write(tmp_path, "[trainer]\nsteps = 5\n")
    with pytest.raises(UserError, match=r"\[trainer\]"):
        load_config(["--job.config_file", path])


def test_unknown_cli_key_names_it():
    with pytest.raises(UserError, match="--training.stepz.*--training.steps"):
        load_config(["--training.stepz", "5"])


def test_missing_config_file():
    with pytest.raises(UserError, match="not found: nope.toml"):
        load_config(["--job.config_file", "nope.toml"])


def test_toml_type_and_choice_errors(tmp_path):
    with pytest.raises(UserError, match=r"\[training\]\.steps must be of type int"):
        load_config(["--job.config_file", write(tmp_path, '[training]\nsteps = "many"\n')])
    with pytest.raises(UserError, match="t_sampling"):
        load_config(["--job.config_file", write(tmp_path, '[diffusion]\nt_sampling = "sobol"\n')])


def test_toml_int_for_float_and_list_for_tuple(tmp_path):
    cfg = load_config(["--job.config_file", write(tmp_path, "[optimizer]\nlr = 1\nbetas = [0.8, 0.9]\n")])
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.betas == (0.8, 0.9)


def test_saved_toml_round_trips(tmp_path):
    cfg = load_config(["--training.steps", "3", "--data.train_prefixes", "a", "b", "--data.train_weights", "0.3", "0.7",
                       "--compile.enable", "--job.description", 'quote " and \\ slash'])
    path = write(tmp_path, to_toml(cfg))
    again = load_config(["--job.config_file", path])
    again.job.config_file = cfg.job.config_file
    assert again == cfg


def test_mismatched_prefixes_and_weights():
    with pytest.raises(UserError, match="one weight per prefix"):
        load_config(["--data.train_prefixes", "a", "b"])


def test_shipped_configs_load():
    for name, flavor in [("debug", "6M"), ("170m", "170M"), ("1b", "1028M")]:
        cfg = load_config(["--job.config_file", f"train_configs/{name}.toml"])
        assert cfg.model.flavor == flavor
    cfg = load_config(["--job.config_file", "train_configs/170m.toml"])
    t = cfg.training
    assert (t.global_batch_size, t.local_batch_size, t.seq_len, t.seed, t.max_norm) == (256, 8, 2048, 3407, 1.0)
    assert (cfg.optimizer.lr, cfg.lr_scheduler.min_lr, cfg.optimizer.weight_decay) == (2e-4, 2e-5, 0.1)
    assert cfg.optimizer.betas == (0.9, 0.95)


def test_cudagraphs_refuse_random_lengths_and_are_inert_without_compile():
    with pytest.raises(UserError, match="ssl_ratio.*--compile.no_cudagraphs"):
        load_config(["--compile.enable", "--compile.cudagraphs", "--diffusion.ssl_ratio", "0.01"])
    assert load_config(["--compile.enable", "--compile.cudagraphs"]).compile.cudagraphs
    # Without compile there is nothing to replay: the shipped 170M config still runs with --compile.no_enable.
    cfg = load_config(
        ["--job.config_file", "train_configs/170m.toml", "--compile.no_enable", "--diffusion.ssl_ratio", "0.01"]
    )
    assert cfg.compile.cudagraphs and not cfg.compile.enable


@pytest.mark.parametrize("flags, message", [
    (["--optimizer.lr", "0"], "--optimizer.lr must be > 0, got 0.0"),
    (["--optimizer.lr", "-1e-3"], "--optimizer.lr must be > 0"),
    (["--optimizer.betas", "0.9", "1.5"], "--optimizer.betas must be two numbers in [0, 1)"),
    (["--optimizer.eps", "0"], "--optimizer.eps must be > 0"),
    (["--optimizer.weight_decay", "-0.1"], "--optimizer.weight_decay must be >= 0"),
    (["--diffusion.eps", "2.0"], "--diffusion.eps must be in (0, 1)"),
    (["--training.gc_freq", "0"], "--training.gc_freq must be >= 1"),
    (["--metrics.log_freq", "0"], "--metrics.log_freq must be >= 1"),
    (["--lr_scheduler.min_lr", "1.0"], "--lr_scheduler.min_lr (1.0) must not exceed the peak --optimizer.lr (0.0002)"),
])
def test_out_of_range_values_name_the_flag(flags, message):
    """Values that would divide by zero mid-run, make torch's AdamW raise, or silently train at a floor above
    the peak lr are refused when the config loads."""
    with pytest.raises(UserError) as raised:
        load_config(flags)
    assert message in str(raised.value), str(raised.value)


def test_range_checks_also_cover_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[metrics]\nlog_freq = 0\n")
    with pytest.raises(UserError, match="--metrics.log_freq must be >= 1, got 0"):
        load_config(["--job.config_file", str(path)])
    path.write_text("[optimizer]\nbetas = [0.9]\n")
    with pytest.raises(UserError, match="--optimizer.betas must be two numbers"):
        load_config(["--job.config_file", str(path)])


def test_a_constant_schedule_ignores_min_lr():
    """min_lr is the decay's floor: with no decay a peak lr below the default floor is fine."""
    cfg = load_config(["--optimizer.lr", "1e-5", "--lr_scheduler.decay_type", "constant"])
    assert cfg.optimizer.lr == 1e-5


@pytest.mark.multiprocess
def test_launcher_precheck_stops_bad_input_before_torchrun(tmp_path):
    """run_train.sh with several processes checks the config, data folder, shards and tokenizer once, before
    torchrun starts: bad input ends in one line and exit 2 (not in every rank's error and torchrun's traceback);
    a good config passes the same check."""
    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "train_slim_0000000000.bin", np.arange(33 * 16, dtype=np.uint16) % 256)
    base = ["--model.vocab_size", "256", "--training.seq_len", "32", "--training.global_batch_size", "4",
            "--training.local_batch_size", "2", "--job.dump_folder", str(tmp_path / "out")]
    env = {**os.environ, "NGPU": "2", "PYTHON": sys.executable, "DLM_TITAN_CHECK_ONLY": "1", "WORLD_SIZE": "2"}

    def check(*flags):
        return subprocess.run([sys.executable, "-m", "dlm_titan.train", *base, *flags], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)

    ok = check("--data.path", str(data))
    assert ok.returncode == 0, ok.stderr
    (data / "train_slim_0000000001.bin").write_bytes(b"LITPKDS" + b"\0" * 9)  # a header cut short
    for flags, named in [(["--data.path", str(tmp_path / "nowhere")], "is not a folder"),
                         (["--data.path", str(data)], "train_slim_0000000001.bin")]:
        bad = check(*flags)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], bad.stderr
    # the launcher runs that check and stops: torchrun is never reached
    launched = subprocess.run(["bash", "run_train.sh", *base, "--data.path", str(tmp_path / "nowhere")], cwd=root,
                              env={k: v for k, v in env.items() if k not in ("DLM_TITAN_CHECK_ONLY", "WORLD_SIZE")},
                              capture_output=True, text=True, timeout=300)
    err = launched.stderr.strip().splitlines()
    assert launched.returncode == 2 and len(err) == 1 and err[0].startswith("error: data.path"), launched.stderr
