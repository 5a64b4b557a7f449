"""Bad input to the trainer's config path that ended in a traceback or left files behind: each is refused with one
line (exit 2) before anything is written, or leaves no trace of the refused start."""

import os

import pytest
import torch
from harness import user_error_line

from dlm_titan import run_lock, train
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


@pytest.mark.parametrize("folder", ["..", "../x", "a/../../x", "ckpt/../../x", "ABSOLUTE"])
def test_a_checkpoint_folder_outside_the_dump_folder_is_refused(folder, tmp_path, capsys):
    """checkpoint.folder "..", "../x" or an absolute path saved outside the dump folder, where its run.lock does not
    keep a second trainer (another dump folder, the same checkpoint folder) from saving over this run's steps."""
    dump = tmp_path / "runs" / "a"
    folder = str(tmp_path / "ckpt") if folder == "ABSOLUTE" else folder  # inside tmp_path should the check fail
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


def test_an_absolute_checkpoint_folder_inside_the_dump_folder_is_accepted(tmp_path, monkeypatch):
    """An absolute checkpoint.folder under the dump folder (as a relative dump folder resolves it) was refused as
    lying outside it."""
    monkeypatch.chdir(tmp_path)
    inside = str(tmp_path / "runs" / "a" / "ckpt")
    for dump in ("runs/a", str(tmp_path / "runs" / "a")):
        argv = ["--checkpoint.enable", "--checkpoint.folder", inside, "--job.dump_folder", dump]
        assert load_config(argv).checkpoint.folder == inside
    assert refused(["--checkpoint.enable", "--checkpoint.folder", str(tmp_path / "runs" / "ab"),
                    "--job.dump_folder", "runs/a"]).startswith("--checkpoint.folder")


@pytest.mark.parametrize("recorded", ["../ckpt", "ABSOLUTE"])
def test_checkpoints_recorded_outside_the_dump_folder_name_a_fix_that_is_accepted(recorded, tmp_path, capsys):
    """A dump folder whose config.toml records a checkpoint folder outside it (saved before that was refused): the
    rerun's error said to resume with that --checkpoint.folder, which the config check refuses."""
    dump = tmp_path / "runs" / "a"
    recorded = str(tmp_path / "ckpt") if recorded == "ABSOLUTE" else recorded
    step_dir = dump / recorded / "step-2"
    step_dir.mkdir(parents=True)
    dump.mkdir(parents=True, exist_ok=True)
    (step_dir / "complete.json").write_text("{}")
    (step_dir / ".metadata").write_text("")
    (dump / "config.toml").write_text(f'[checkpoint]\nenable = true\nfolder = "{recorded}"\n')
    line = user_error_line(capsys, train.main, [*TINY_RUN, "--checkpoint.enable", "--job.dump_folder", str(dump)])
    assert "outside the dump folder" in line and f"move that folder into {dump} and resume with" in line, line
    assert f"--checkpoint.folder {recorded}" not in line


def test_a_start_refused_after_the_lock_leaves_no_trace_of_itself(tmp_path, capsys):
    """Bad input found while the Trainer is built (here validation shards that do not exist) left the dump folder
    it had made, holding run.lock (and, with TensorBoard on, tb/ with an event file)."""
    bad = [*TINY_RUN, "--metrics.enable_tensorboard", "--validation.enable", "--data.val_prefix", "no_such_prefix"]
    line = user_error_line(capsys, train.main, [*bad, "--job.dump_folder", str(tmp_path / "runs" / "new")])
    assert "no shard matches prefix 'no_such_prefix'" in line, line
    assert list(tmp_path.iterdir()) == []  # the dump folder and the parent it made are gone
    # what existed before stays: an empty dump folder, and another folder's lock file with its holder record
    (tmp_path / "empty").mkdir()
    user_error_line(capsys, train.main, [*bad, "--job.dump_folder", str(tmp_path / "empty")])
    assert list((tmp_path / "empty").iterdir()) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / run_lock.LOCK_FILE).write_text("{}\n")
    user_error_line(capsys, train.main, [*bad, "--job.dump_folder", str(tmp_path / "old")])
    assert [p.name for p in (tmp_path / "old").iterdir()] == [run_lock.LOCK_FILE]


def test_the_check_before_torchrun_leaves_no_trace(tmp_path, monkeypatch):
    """run_train.sh's check (DLM_TITAN_CHECK_ONLY) made the dump folder and its run.lock: a start then refused
    under torchrun found a lock file it had not made, and left both."""
    monkeypatch.setenv("DLM_TITAN_CHECK_ONLY", "1")
    assert train.main([*TINY_RUN, "--job.dump_folder", str(tmp_path / "out")]) == 0
    assert list(tmp_path.iterdir()) == []


def test_a_lock_file_unlinked_before_it_is_locked_is_not_held(tmp_path, monkeypatch):
    """A refused start unlinks its lock file while holding it: a run that had opened that file and locks it after
    must not count as holding the folder (a third run would lock a new run.lock beside it)."""
    folder = tmp_path / "out"
    folder.mkdir()
    lockf = run_lock.fcntl.lockf
    calls = []

    def unlinked_first(fd, op):
        calls.append(fd)
        if len(calls) == 1:
            (folder / run_lock.LOCK_FILE).unlink()  # what a refused start's release(tidy=True) does
        return lockf(fd, op)

    monkeypatch.setattr(run_lock.fcntl, "lockf", unlinked_first)
    lock = run_lock.RunLock(folder)
    lock.acquire()
    try:
        assert len(calls) == 2  # the stale file dropped, a new one locked
        held, there = os.fstat(lock._fd), os.stat(folder / run_lock.LOCK_FILE)
        assert (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)
    finally:
        lock.release()


def test_a_refused_start_keeps_a_lock_file_another_run_made(tmp_path, monkeypatch):
    """A lock taken on its second try holds a file that another run made: the refused start's tidying must leave it.
    Whether acquire had created the lock file stuck from the first try, so the tidying unlinked the other run's
    file (and its holder record)."""
    folder = tmp_path / "out"
    lockf = run_lock.fcntl.lockf
    calls = []

    def replaced_first(fd, op):
        calls.append(fd)
        if len(calls) == 1:  # the file this run made is replaced by one another run made and has left
            (folder / run_lock.LOCK_FILE).unlink()
            (folder / run_lock.LOCK_FILE).write_text('{"pid": 1, "host": "other"}\n')
        return lockf(fd, op)

    monkeypatch.setattr(run_lock.fcntl, "lockf", replaced_first)
    with pytest.raises(UserError, match="refused"), run_lock.hold_dump_folder(folder, rank=0):
        raise UserError("refused")
    assert len(calls) == 2 and [p.name for p in folder.iterdir()] == [run_lock.LOCK_FILE]


def test_a_refused_start_keeps_a_lock_file_put_in_place_of_its_own(tmp_path):
    """Where locks are node-local (NFS local_lock=all) another node's run can replace run.lock while this one holds
    its own: the refused start's tidying unlinked whatever file was at the path, that run's included."""
    folder = tmp_path / "out"
    with pytest.raises(UserError, match="refused"), run_lock.hold_dump_folder(folder, rank=0):
        (folder / run_lock.LOCK_FILE).unlink()
        (folder / run_lock.LOCK_FILE).write_text('{"pid": 1, "host": "other"}\n')
        raise UserError("refused")
    assert (folder / run_lock.LOCK_FILE).read_text() == '{"pid": 1, "host": "other"}\n'


def test_a_lock_file_that_is_a_dangling_symlink_is_locked_through_it(tmp_path):
    """run.lock as a symlink to a file not yet there was locked through it (its target made); the exclusive create
    that tells whether a run made the lock file refused the symlink, and the lock "kept disappearing" 10 times."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / run_lock.LOCK_FILE).symlink_to(tmp_path / "target")
    with pytest.raises(UserError, match="refused"), run_lock.hold_dump_folder(folder, rank=0):
        assert (tmp_path / "target").is_file()
        raise UserError("refused")
    assert (folder / run_lock.LOCK_FILE).is_symlink()  # not this run's to remove
