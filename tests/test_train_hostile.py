"""Hostile input to the training entry points (run_train.sh, dlm_titan.train, the config): each mistake ends in one
line ``error: ...`` naming the problem and the fix, with exit code 2, instead of a traceback, tyro's boxed message
or a run that silently does something else."""

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from dlm_kernels import fused_supported

from dlm_titan import run_lock, train
from dlm_titan.config import Float8, load_config, to_toml
from dlm_titan.errors import UserError
from dlm_titan.models import get_model_args
from dlm_titan.parallelize import apply_float8
from dlm_titan.train import resolve_steps

ROOT = Path(__file__).resolve().parents[1]


def refused(argv: list[str]) -> str:
    with pytest.raises(UserError) as raised:
        load_config(argv)
    return str(raised.value)


@pytest.mark.parametrize("argv", [["--job.config_file", ""], ["--job.config_file="], ["--job.config_file", "  "]])
def test_empty_config_file_is_refused_not_read_as_no_file(argv, tmp_path):
    """``--job.config_file "$CFG"`` with CFG unset trained the defaults (1000 steps of 256 x 2048) silently."""
    message = refused([*argv, "--job.dump_folder", str(tmp_path)])
    assert message.startswith("--job.config_file is empty"), message


def test_config_file_followed_by_another_option_needs_a_path(tmp_path):
    message = refused(["--job.config_file", "--training.steps", "3", "--job.dump_folder", str(tmp_path)])
    assert message.startswith("--job.config_file needs a path"), message


def test_repeated_config_file_reads_the_last_one_as_recorded(tmp_path):
    """tyro records the last --job.config_file; the TOML read must be that one too, not the first."""
    first, last = tmp_path / "first.toml", tmp_path / "last.toml"
    first.write_text("[training]\nsteps = 11\n")
    last.write_text("[training]\nsteps = 22\n")
    cfg = load_config(["--job.config_file", str(first), "--job.config_file", str(last),
                       "--job.dump_folder", str(tmp_path / "out")])
    assert cfg.job.config_file == str(last) and cfg.training.steps == 22


@pytest.mark.parametrize("argv", [["--compile.enable", "false"], ["--job.print_config", "False"],
                                  ["--checkpoint.enable", "1"], ["--compile.enable=false"],
                                  ["--metrics.enable_tensorboard=true"], ["--compile.no_enable", "true"]])
def test_boolean_switch_given_a_value_names_both_switches(argv, tmp_path):
    """tyro's switches take no value: "--compile.enable false" met a boxed "Unrecognized options: false"."""
    message = refused([*argv, "--job.dump_folder", str(tmp_path)])
    flag = argv[0].split("=")[0]
    section, key = flag.replace(".no_", ".").split(".")
    assert message == f"{flag} takes no value: write {section}.{key} to turn it on, {section}.no_{key} to turn it off"


def test_boolean_switches_still_work(tmp_path):
    cfg = load_config(["--compile.enable", "--job.no_print_config", "--training.steps", "1",
                       "--job.dump_folder", str(tmp_path)])
    assert cfg.compile.enable and not cfg.job.print_config and cfg.training.steps == 1


def test_saved_config_with_control_characters_reads_back(tmp_path):
    """A newline in job.description made the saved config.toml invalid TOML: not a valid --job.config_file, and
    readers of the dump folder (checkpoint_folder_of) fell back to defaults."""
    description = 'line one\nline "two"\ttab \\ back\x01\x7f é'
    cfg = load_config(["--job.description", description, "--checkpoint.folder", "ckpt",
                       "--job.dump_folder", str(tmp_path / "out")])
    saved = tmp_path / "config.toml"
    saved.write_text(to_toml(cfg))
    assert tomllib.loads(saved.read_text())["job"]["description"] == description
    again = load_config(["--job.config_file", str(saved)])
    assert again.job.description == description and again.checkpoint.folder == "ckpt"


@pytest.mark.parametrize("folder", ["", "   "])
def test_empty_dump_folder_is_refused(folder):
    """Path("") is the working directory: the run wrote run.lock, config.toml, checkpoint/ and tb/ into it."""
    assert refused(["--job.dump_folder", folder]).startswith("--job.dump_folder is empty")


def test_dump_folder_name_too_long_is_one_line(tmp_path):
    folder = str(tmp_path / ("x" * 300))
    message = refused(["--job.dump_folder", folder])
    assert message.startswith(f"--job.dump_folder {folder} cannot be used (File name too long)"), message


def test_dump_folder_in_a_symlink_loop_is_one_line(tmp_path):
    """stat of a symlink loop says "missing", so the config check passes it; the lock's mkdir then failed."""
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    load_config(["--job.dump_folder", str(loop / "run")])  # passes the check: the loop is not seen as a file
    with pytest.raises(UserError, match=r"cannot be created \(Too many levels of symbolic links\)"):
        run_lock.RunLock(loop / "run").acquire()


def test_dump_folder_on_a_read_only_filesystem_is_one_line(tmp_path, monkeypatch):
    """EROFS (not a PermissionError) from creating the folder or its lock file was a traceback."""
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(UserError, match=r"cannot be created \(Read-only file system\)"):
        run_lock.RunLock(tmp_path / "new").acquire()
    monkeypatch.undo()
    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(UserError, match=r"is not writable \(Read-only file system on run.lock\)"):
        run_lock.RunLock(tmp_path).acquire()


@pytest.mark.parametrize("var, value", [("NGPU", "0"), ("NGPU", "abc"), ("NGPU", "-2"), ("NGPU", "2x"),
                                        ("NNODES", "0"), ("NNODES", "two")])
def test_run_train_sh_refuses_a_bad_process_count(var, value):
    """NGPU=0 was a ZeroDivisionError traceback of the config check; NGPU=abc a bash 'unbound variable'."""
    env = {**os.environ, var: value}
    result = subprocess.run(["./run_train.sh", "--training.steps", "1"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"error: {var}={value} must be a positive integer (the number of "
                                          f"{'processes on this node' if var == 'NGPU' else 'nodes'}), e.g. {var}=1"]


def test_flops_budget_below_one_step_names_the_least_budget(tmp_path):
    """The message named no number: the user had to work out 6 N B L to fix the budget."""
    tiny = ["--training.seq_len", "32", "--training.global_batch_size", "2", "--training.local_batch_size", "2",
            "--job.dump_folder", str(tmp_path)]
    args = get_model_args("6M", 32000)
    with pytest.raises(UserError) as raised:
        resolve_steps(load_config(["--training.flops_budget", "1e9", *tiny]), args)
    least = re.search(r"\((\d+) FLOPs\); raise --training.flops_budget to at least that", str(raised.value))
    assert least, raised.value
    assert resolve_steps(load_config(["--training.flops_budget", least[1], *tiny]), args) == 1


TINY_RUN = ["--training.steps", "1", "--training.seq_len", "32", "--training.global_batch_size", "2",
            "--training.local_batch_size", "2", "--data.num_workers", "0", "--job.no_print_config",
            "--metrics.no_enable_tensorboard"]


@pytest.mark.skipif(fused_supported(torch.device("cpu")), reason="TRITON_INTERPRET=1 runs the fused loss on a CPU")
def test_fused_loss_on_cpu_is_one_line_at_start(tmp_path, capsys):
    """The kernel's ValueError came as a traceback (exit 1) from the first step's forward."""
    code = train.main([*TINY_RUN, "--diffusion.loss_impl", "fused", "--job.dump_folder", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ['error: diffusion.loss_impl = "fused" cannot run on cpu (it needs triton and a CUDA '
                                 'GPU); use --diffusion.loss_impl auto or torch'], err


def fake_checkpoint(dump: Path, folder: str = "checkpoint", step: int = 2) -> Path:
    """A step folder that reads as complete (its marker and DCP metadata exist), and the run's saved config."""
    step_dir = dump / folder / f"step-{step}"
    step_dir.mkdir(parents=True)
    (step_dir / "complete.json").write_text("{}")
    (step_dir / ".metadata").write_text("")
    (dump / "config.toml").write_text(f'[checkpoint]\nenable = true\nfolder = "{folder}"\n')
    return step_dir


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint.no_enable"], "with checkpoint.enable off, would not resume: add --checkpoint.enable"),
    (["--checkpoint.enable", "--checkpoint.folder", "other"], "resume them with --checkpoint.folder ckpt,"),
])
@pytest.mark.parametrize("check_only", [False, True])
def test_a_run_that_would_not_resume_the_dump_folders_checkpoints_is_refused(flags, message, check_only, tmp_path,
                                                                             capsys, monkeypatch):
    """Without --checkpoint.enable (or with another checkpoint.folder) a rerun trained from step 0 beside the
    checkpoints without a word, replacing the dump folder's config.toml, export and TensorBoard history."""
    dump = tmp_path / "out"
    fake_checkpoint(dump, "ckpt")
    saved = (dump / "config.toml").read_text()
    if check_only:  # run_train.sh's check before torchrun
        monkeypatch.setenv("DLM_TITAN_CHECK_ONLY", "1")
    code = train.main([*TINY_RUN, *flags, "--job.dump_folder", str(dump)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert (dump / "config.toml").read_text() == saved and not (dump / "other").exists()


def test_a_dump_folder_without_complete_checkpoints_still_trains_without_them(tmp_path, capsys):
    dump = tmp_path / "out"
    step_dir = fake_checkpoint(dump)
    (step_dir / "complete.json").unlink()  # an interrupted save: nothing to resume
    assert train.main([*TINY_RUN, "--checkpoint.no_enable", "--job.dump_folder", str(dump)]) == 0
    assert "step: 1" in capsys.readouterr().out


def test_ctrl_c_is_one_line_and_keeps_the_saved_checkpoints(tmp_path, capsys, monkeypatch):
    """Ctrl-C printed a KeyboardInterrupt traceback (exit 1), under torchrun once per rank."""
    step = train.Trainer.train_step

    def interrupted_at_step_2(self, n):
        if n == 2:
            raise KeyboardInterrupt
        return step(self, n)

    monkeypatch.setattr(train.Trainer, "train_step", interrupted_at_step_2)
    dump = tmp_path / "out"
    code = train.main([*TINY_RUN, "--training.steps", "3", "--checkpoint.enable", "--checkpoint.interval", "1",
                       "--job.dump_folder", str(dump)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and len(err) == 1 and err[0].startswith("error: interrupted; complete checkpoints"), err
    assert (dump / "checkpoint" / "step-1" / "complete.json").is_file()


def test_negative_checkpoint_interval_is_refused(tmp_path):
    """A negative interval passed and saved only at the end, as 0 does, without a word."""
    assert refused(["--checkpoint.interval", "-5", "--job.dump_folder", str(tmp_path)]) == \
        "--checkpoint.interval must be >= 0 (0 saves only at the end), got -5"
    assert load_config(["--checkpoint.interval", "0", "--job.dump_folder", str(tmp_path)]).checkpoint.interval == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's message")
def test_float8_on_a_cpu_says_it_needs_a_gpu_not_torchao(monkeypatch):
    """On a CPU without torchao the message said to install torchao, whose install only led to "needs a CUDA GPU"."""
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed, whatever this machine has
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match=r"^float8.enable needs a CUDA GPU .*--float8.no_enable$"):
        apply_float8(model, Float8(enable=True), "cpu")


@pytest.mark.parametrize("key, feature", [("profiling.save_traces_folder", "profiling.enable_profiling"),
                                          ("metrics.save_tb_folder", "metrics.enable_tensorboard"),
                                          ("checkpoint.folder", "checkpoint.enable")])
def test_a_file_in_the_place_of_an_output_folder_is_refused_at_start(key, feature, tmp_path):
    """The profiler's trace folder as a file was a NotADirectoryError traceback at the first trace; TensorBoard's
    turned TensorBoard off after a warning."""
    (tmp_path / "taken").write_text("keep")
    section, switch = feature.split(".")
    message = refused([f"--{feature}", f"--{key}", "taken", "--job.dump_folder", str(tmp_path)])
    assert message == f"--{key}: {tmp_path / 'taken'} is a file, not a folder; move it away or choose another --{key}"
    assert (tmp_path / "taken").read_text() == "keep"
    # the feature off: its folder is not checked
    load_config([f"--{section}.no_{switch}", f"--{key}", "taken", "--job.dump_folder", str(tmp_path)])


def test_a_config_file_with_a_byte_order_mark_loads(tmp_path):
    """A UTF-8 BOM (Windows editors write one) was "not valid TOML: Invalid statement (at line 1, column 1)"."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf[training]\nsteps = 7\n")
    assert load_config(["--job.config_file", str(path), "--job.dump_folder", str(tmp_path / "out")]).training.steps == 7


def test_a_nonfinite_stop_without_checkpointing_saves_nothing(tmp_path, capsys):
    """on_nonfinite = "stop" with checkpoint.enable off wrote checkpoint/step-N anyway, and the error line said
    "nothing saved"; the stray checkpoint then made a rerun without checkpoints refuse the folder."""
    dump = tmp_path / "out"
    diverging = ["--optimizer.lr", "1e30", "--lr_scheduler.warmup_steps", "0", "--lr_scheduler.min_lr", "0",
                 "--training.max_norm", "0", "--training.on_nonfinite", "stop"]
    code = train.main([*TINY_RUN, *diverging, "--training.steps", "4", "--checkpoint.no_enable",
                       "--job.dump_folder", str(dump)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: stopped at step") and "nothing saved" in err[-1], err
    assert not (dump / "checkpoint").exists()
