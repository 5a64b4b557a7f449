"""Config: CLI > TOML > defaults, unknown keys, type checks, round trip through the saved TOML."""

import pytest

from dlm_titan.config import JobConfig, load_config, to_toml
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
