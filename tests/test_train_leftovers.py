"""Bad input to the trainer's config path that ended in a traceback or left files behind: each is refused with one
line (exit 2) before anything is written, or leaves no trace of the refused start."""

import os

import pytest
import torch
from harness import user_error_line

from dlm_titan import train
from dlm_titan.config import load_config
from dlm_titan.errors import UserError

TINY_RUN = ["--training.steps", "1", "--training.seq_len", "32", "--training.global_batch_size", "2",
            "--training.local_batch_size", "2", "--data.num_workers", "0", "--job.no_print_config",
            "--metrics.no_enable_tensorboard"]


def refused(argv: list[str]) -> str:
    with pytest.raises(UserError) as raised:
        load_config(argv)
    return str(raised.value)


@pytest.mark.parametrize("argv, start", [
    (["--optimizer.lr", "3.5e37"], "--optimizer.lr 3.5e+37 overflows float32 in AdamW's first update"),
    (["--optimizer.lr", "4e38"], "--optimizer.lr 4e+38 overflows float32"),
    (["--optimizer.lr", "1e-50"], "--optimizer.lr 1e-50 is below float32's smallest normal value"),
    (["--optimizer.eps", "1e-50"], "--optimizer.eps must be representable in float32"),
    (["--optimizer.eps", "1e39"], "--optimizer.eps must be representable in float32"),
    (["--optimizer.lr", "1", "--lr_scheduler.min_lr", "0", "--optimizer.weight_decay", "1e300"],
     "--optimizer.weight_decay 1e+300 with --optimizer.lr 1.0 overflows float32"),
    (["--optimizer.betas", "0.99999999", "0.95"], "--optimizer.betas (0.99999999, 0.95) round to 1.0 in float32"),
    (["--training.max_norm", "1e-300"], "--training.max_norm 1e-300 rounds to 0 in float32"),
])
def test_optimizer_values_beyond_float32_are_refused(argv, start, tmp_path):
    """lr 3.5e37 is finite in Python but its first AdamW step size lr / (1 - beta1) is not in float32: PyTorch's
    AdamW raised "value cannot be converted to type float without overflow" from the first step (a traceback);
    eps, betas and max_norm that round to 0 or 1 in float32 trained without learning or into nan."""
    message = refused([*argv, "--job.dump_folder", str(tmp_path / "out")])
    assert message.startswith(start), message
    assert not (tmp_path / "out").exists()


def test_the_largest_accepted_lr_takes_a_float32_adamw_step():
    """The bound is the real one: the largest lr accepted steps PyTorch's AdamW; 3.5e37 did not."""
    cfg = load_config(["--optimizer.lr", "3.4e37", "--optimizer.betas", "0.9", "0.95"])
    param = torch.nn.Parameter(torch.ones(4))
    param.grad = torch.ones(4)
    torch.optim.AdamW([param], lr=cfg.optimizer.lr, betas=cfg.optimizer.betas, foreach=True).step()
    assert torch.isfinite(param).all()
    too_large = torch.nn.Parameter(torch.ones(4))
    too_large.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="overflow"):
        torch.optim.AdamW([too_large], lr=3.5e37, betas=cfg.optimizer.betas, foreach=True).step()


@pytest.mark.parametrize("key", ["--job.dump_folder", "--data.path", "--data.train_prefixes"])
def test_a_command_line_value_that_is_not_utf8_is_one_line_before_anything_is_written(key, tmp_path, capsys):
    """Bytes that are not UTF-8 reach sys.argv as lone surrogates; writing them into config.toml was a
    UnicodeEncodeError traceback, after the dump folder and its run.lock had been made."""
    name = os.fsdecode(b"\xffrun")  # as Python decodes such bytes from the command line
    value = name if key == "--data.train_prefixes" else str(tmp_path / name)
    argv = [*TINY_RUN, "--job.dump_folder", str(tmp_path / "out"), key, value]  # the last dump folder wins
    line = user_error_line(capsys, train.main, argv)
    shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    assert "\\xffrun" in shown
    assert line == (f"error: {key} {shown} is not UTF-8 (the run records its config as UTF-8 TOML); rename it to a "
                    "UTF-8 name, or give a symlink with one")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("folder", ["..", "../x", "a/../../x", "ckpt/../../x", "/abs/ckpt"])
def test_a_checkpoint_folder_outside_the_dump_folder_is_refused(folder, tmp_path, capsys):
    """checkpoint.folder "..", "../x" or an absolute path saved outside the dump folder, where its run.lock does not
    keep a second trainer (another dump folder, the same checkpoint folder) from saving over this run's steps."""
    dump = tmp_path / "runs" / "a"
    line = user_error_line(capsys, train.main, [*TINY_RUN, "--checkpoint.enable", "--checkpoint.folder", folder,
                                                "--job.dump_folder", str(dump)])
    assert line == (f"error: --checkpoint.folder {folder} lies outside --job.dump_folder {dump}, whose run.lock guards "
                    "the checkpoints; give a folder inside it (e.g. --checkpoint.folder checkpoint), and to save "
                    "elsewhere choose a --job.dump_folder there")
    assert list(tmp_path.iterdir()) == []
    # unused without checkpointing, and a folder inside the dump folder is as before
    load_config(["--checkpoint.no_enable", "--checkpoint.folder", folder, "--job.dump_folder", str(dump)])
    assert load_config(["--checkpoint.enable", "--checkpoint.folder", "ckpt/step_dirs",
                        "--job.dump_folder", str(dump)]).checkpoint.folder == "ckpt/step_dirs"
