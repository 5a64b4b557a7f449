"""Nothing lost, nothing silently wrong: one trainer per dump folder, checksummed checkpoints, the data a run
resumes on, a diverged run under on_nonfinite = "skip", a full disk during a save or a TensorBoard write.

Every run is the 6M model at seq_len 32 on two tiny random shards, in this process through ``main`` (so the
exit code and the printed lines are the user's), except the lock holder, which is another process.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from harness import record_losses

from dlm_titan.checkpoint.export import load_model
from dlm_titan.checkpoint_layout import MARKER, newest_complete, step_folders
from dlm_titan.data import write_shard
from dlm_titan.errors import UserError
from dlm_titan.train import Trainer, main

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 256
ARGS = ["--job.config_file", "train_configs/debug.toml", "--training.seq_len", "32", "--training.global_batch_size",
        "4", "--training.local_batch_size", "2", "--data.num_workers", "0", "--metrics.log_freq", "1",
        "--job.no_print_config", "--metrics.no_enable_tensorboard", "--model.vocab_size", str(VOCAB),
        "--checkpoint.export_dtype", "float32", "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0"]


def make_shards(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in range(2):
        write_shard(folder / f"train_slim_{n:010d}.bin", rng.integers(0, VOCAB, 33 * 64, dtype=np.uint16))
    return folder


@pytest.fixture
def shards(tmp_path) -> Path:
    return make_shards(tmp_path / "shards")


def cli(shards: Path, dump: Path, steps: int, *extra: str) -> list[str]:
    return [*ARGS, "--training.steps", str(steps), "--data.path", str(shards), "--job.dump_folder", str(dump), *extra]


def run(capfd, argv: list[str]) -> tuple[int, str]:
    """main(argv): its exit code and its stderr."""
    capfd.readouterr()
    code = main(argv)
    return code, capfd.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def losses_of(argv: list[str], stop_after: int | None = None) -> dict[int, float]:
    """Trains in this process; {step: exact loss sum}."""
    from dlm_titan.config import load_config

    trainer = Trainer(load_config(argv))
    if stop_after is not None:
        trainer.steps = stop_after
    losses = record_losses(trainer)
    trainer.train()
    return losses


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- one trainer per dump folder ---------------------------------------------------------------------------------

@pytest.mark.multiprocess
def test_a_second_trainer_on_a_dump_folder_is_refused_and_touches_nothing(shards, tmp_path, capfd):
    dump, ready = tmp_path / "out", tmp_path / "ready"
    child = f"""
import sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from dlm_titan.train import Trainer, main
step = Trainer.train_step
def held(self, s):
    if s == 3:
        Path({str(ready)!r}).write_text("x")
        time.sleep(300)
    return step(self, s)
Trainer.train_step = held
sys.exit(main({cli(shards, dump, 8, "--checkpoint.enable")!r}))
"""
    holder = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not ready.exists():
            assert holder.poll() is None, holder.stderr.read().decode()[-3000:]
            assert time.time() < deadline
            time.sleep(0.2)
        before = snapshot(dump)
        assert "checkpoint/step-2/" + MARKER in before
        code, err = run(capfd, cli(shards, dump, 8, "--checkpoint.enable", "--training.seed", "7"))
        assert code == 2
        line = one_error_line(err)
        assert f"pid {holder.pid}" in line and str(dump) in line and "--job.dump_folder" in line
        assert snapshot(dump) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (SIGKILL): its lock went with it, and the next run takes the folder over
    code, err = run(capfd, cli(shards, dump, 4, "--checkpoint.enable"))
    assert code == 0, err[-3000:]
    assert "was left by a run that has ended" in err


@pytest.mark.multiprocess
def test_the_config_pre_check_does_not_keep_the_lock(shards, tmp_path, monkeypatch, capfd):
    dump = tmp_path / "out"
    monkeypatch.setenv("DLM_TITAN_CHECK_ONLY", "1")
    code, err = run(capfd, cli(shards, dump, 4))
    assert code == 0, err
    probe = "import sys; from dlm_titan.run_lock import RunLock; RunLock(sys.argv[1]).acquire()"
    other = subprocess.run([sys.executable, "-c", probe, str(dump)], capture_output=True, text=True, timeout=120)
    assert other.returncode == 0, other.stderr


# -- damage that keeps a file's size ------------------------------------------------------------------------------

def overwrite_embedding(step_dir: Path) -> str:
    """Writes 4 KB of 0xFF over the middle of the embedding's bytes in its .distcp (size unchanged: NaNs)."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(step_dir)).read_metadata()
    index, info = next((i, s) for i, s in metadata.storage_data.items() if "embed" in i.fqn and i.fqn.startswith("model."))
    assert info.length > 3 * 4096, (index, info)
    path = step_dir / info.relative_path
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(info.offset + info.length // 2)
        f.write(b"\xff" * 4096)
    assert path.stat().st_size == size
    return path.name


@pytest.mark.slow
def test_bytes_changed_in_place_are_refused_naming_the_file_and_the_older_checkpoint(shards, tmp_path, capfd):
    dump = tmp_path / "out"
    assert run(capfd, cli(shards, dump, 4, "--checkpoint.enable"))[0] == 0
    step4 = dump / "checkpoint" / "step-4"
    marker = json.loads((step4 / MARKER).read_text())
    assert set(marker["checksums"]) == {p.name for p in step4.iterdir() if p.name != MARKER}
    name = overwrite_embedding(step4)
    code, err = run(capfd, cli(shards, dump, 6, "--checkpoint.enable"))
    assert code == 2
    line = one_error_line(err)
    assert name in line and "checksum" in line and "--checkpoint.load_step 2" in line
    assert not (dump / "checkpoint" / "step-6").exists() and (step4 / MARKER).is_file()
    with pytest.raises(UserError, match=f"{name} does not match the checksum"):
        load_model(step4)
    # weights only (initial_load_path) verify too
    code, err = run(capfd, cli(shards, tmp_path / "other", 2, "--checkpoint.enable", "--checkpoint.initial_load_path",
                               str(step4)))
    assert code == 2 and name in one_error_line(err)
    # a marker of an older save (no checksums) still loads, but NaN weights are refused, naming the tensor
    del marker["checksums"]
    (step4 / MARKER).write_text(json.dumps(marker))
    code, err = run(capfd, cli(shards, dump, 6, "--checkpoint.enable"))
    assert code == 2
    line = one_error_line(err)
    assert "non-finite" in line and "embed" in line and "--checkpoint.load_step 2" in line
    with pytest.raises(UserError, match="non-finite"):
        load_model(step4)
    # the older checkpoint named in the line resumes
    code, err = run(capfd, cli(shards, dump, 6, "--checkpoint.enable", "--checkpoint.load_step", "2"))
    assert code == 0, err[-3000:]


@pytest.mark.slow
def test_old_markers_without_checksums_resume(shards, tmp_path, capfd):
    dump = tmp_path / "out"
    reference = losses_of(cli(shards, tmp_path / "ref", 4))
    losses_of(cli(shards, dump, 4, "--checkpoint.enable"), stop_after=2)
    step2 = dump / "checkpoint" / "step-2"
    marker = json.loads((step2 / MARKER).read_text())
    for key in ("checksums", "data"):
        del marker[key]
    (step2 / MARKER).write_text(json.dumps(marker))
    assert losses_of(cli(shards, dump, 4, "--checkpoint.enable")) == {s: reference[s] for s in (3, 4)}


# -- the data a run resumes on -------------------------------------------------------------------------------------

@pytest.mark.parametrize("change", ["grown", "added"])
@pytest.mark.slow
def test_changed_shards_refuse_the_resume_unless_accepted(shards, tmp_path, capfd, change):
    dump = tmp_path / "out"
    losses_of(cli(shards, dump, 4, "--checkpoint.enable"), stop_after=2)
    first = shards / "train_slim_0000000000.bin"
    if change == "grown":  # tokens appended to a shard (re-prepared with more text)
        tokens = np.fromfile(first, dtype=np.uint16, offset=24)
        write_shard(first, np.concatenate([tokens, tokens[:500]]))
        named = "train_slim_0000000000.bin"
    else:
        shutil.copy(first, shards / "train_slim_0000000002.bin")
        named = "train_slim_0000000002.bin"
    code, err = run(capfd, cli(shards, dump, 4, "--checkpoint.enable"))
    assert code == 2
    line = one_error_line(err)
    assert "training data changed" in line and named in line and "--checkpoint.accept_data_change" in line
    assert [s for s, _ in step_folders(dump / "checkpoint")] == [2]
    code, err = run(capfd, cli(shards, dump, 4, "--checkpoint.enable", "--checkpoint.accept_data_change"))
    assert code == 0, err[-3000:]
    assert "warning: the training data changed" in err and named in err
    assert (dump / "checkpoint" / "step-4" / MARKER).is_file()


@pytest.mark.slow
def test_identical_shards_at_another_path_resume_exactly(shards, tmp_path, capfd):
    reference = losses_of(cli(shards, tmp_path / "ref", 4))
    dump = tmp_path / "out"
    losses_of(cli(shards, dump, 4, "--checkpoint.enable"), stop_after=2)
    moved = tmp_path / "moved"
    shutil.copytree(shards, moved)
    capfd.readouterr()
    assert losses_of(cli(moved, dump, 4, "--checkpoint.enable")) == {s: reference[s] for s in (3, 4)}
    assert "changed" not in capfd.readouterr().err


# -- a diverged run ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_skipping_every_step_ends_the_run_without_saving_or_exporting(shards, tmp_path, capfd):
    """lr 1e6: the first updates blow the weights up, then every step is non-finite and skipped."""
    dump = tmp_path / "out"
    code, err = run(capfd, cli(shards, dump, 30, "--checkpoint.enable", "--training.on_nonfinite", "skip",
                               "--optimizer.lr", "1e6", "--lr_scheduler.warmup_steps", "0",
                               "--training.max_consecutive_skips", "3"))
    assert code == 1
    line = one_error_line(err)
    assert "training diverged: 3 non-finite steps in a row" in line and "max_consecutive_skips" in line
    last = int(line.split("up to step ")[1].split(" ")[0])
    assert last < 30 and err.count("update skipped") == 3
    assert not (dump / "export").exists()
    saved = [s for s, _ in step_folders(dump / "checkpoint")]
    assert all(s < last for s in saved)  # nothing saved at or after the step that ended the run


@pytest.mark.slow
def test_on_nonfinite_stop_is_one_line_and_exit_1(shards, tmp_path, capfd):
    dump = tmp_path / "out"
    code, err = run(capfd, cli(shards, dump, 30, "--checkpoint.enable", "--training.on_nonfinite", "stop",
                               "--optimizer.lr", "1e6", "--lr_scheduler.warmup_steps", "0"))
    assert code == 1
    line = one_error_line(err)
    assert "training.on_nonfinite = stop" in line and "state saved in" in line
    stopped = step_folders(dump / "checkpoint")[-1][1]
    assert str(stopped) in line and (stopped / MARKER).is_file() and not (dump / "export").exists()


# -- a full disk ---------------------------------------------------------------------------------------------------

def fail_writes_of(monkeypatch, fragment: str) -> None:
    """DCP's file writes into a folder whose path contains ``fragment`` fail as on a full disk (in its threads)."""
    from torch.distributed.checkpoint import filesystem

    write_item = filesystem._write_item

    def full(*args, **kwargs):
        stream = args[1] if len(args) > 1 else None
        name = getattr(stream, "name", "")
        if fragment in str(name) or fragment in str(args):
            raise OSError(errno.ENOSPC, "No space left on device", str(name) or None)
        return write_item(*args, **kwargs)

    monkeypatch.setattr(filesystem, "_write_item", full)


@pytest.mark.parametrize("mode", ["disabled", "async"])
@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(shards, tmp_path, capfd,
                                                                                   monkeypatch, mode):
    dump = tmp_path / "out"
    fail_writes_of(monkeypatch, "step-4")
    # what a user's process does with an error that ends a thread: print its traceback (pytest would hide it)
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    code, err = run(capfd, cli(shards, dump, 6, "--checkpoint.enable", "--checkpoint.keep_latest_k", "1",
                               "--checkpoint.async_mode", mode))
    assert code == 2
    line = one_error_line(err)
    assert "step-4 failed: No space left on device" in line and "step-2 stays the newest complete checkpoint" in line
    assert len(err.strip().splitlines()) <= 3, err  # no tracebacks from DCP's threads
    assert [s for s, _ in step_folders(dump / "checkpoint")] == [2]
    assert newest_complete(dump / "checkpoint") == dump / "checkpoint" / "step-2"
    monkeypatch.undo()
    code, err = run(capfd, cli(shards, dump, 6, "--checkpoint.enable", "--checkpoint.keep_latest_k", "1"))
    assert code == 0, err[-3000:]
    assert (dump / "checkpoint" / "step-6" / MARKER).is_file()


@pytest.mark.slow
def test_a_failing_tensorboard_disk_warns_once_and_training_goes_on(shards, tmp_path, capfd, monkeypatch):
    from tensorboard.summary.writer.record_writer import RecordWriter

    write = RecordWriter.write
    calls = {"n": 0}

    def full(self, data):
        calls["n"] += 1
        if calls["n"] > 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, data)

    monkeypatch.setattr(RecordWriter, "write", full)
    dump = tmp_path / "out"
    argv = [a for a in cli(shards, dump, 4) if a != "--metrics.no_enable_tensorboard"]
    code, err = run(capfd, argv)
    assert code == 0, err[-3000:]
    assert err.count("warning: TensorBoard writing stopped") == 1 and "Traceback" not in err
    assert list((dump / "tb").glob("events.out.tfevents.*"))


# -- a forged shard header -------------------------------------------------------------------------------------------

def test_a_wrong_dtype_code_is_found_by_the_launch_pre_check(shards, tmp_path, monkeypatch, capfd):
    """int32 code over uint16 tokens, chunk_size halved so the size agrees: ids come out in the millions. The
    pre-check of run_train.sh (before torchrun starts every rank) names the shard in one line."""
    import struct

    path = shards / "train_slim_0000000001.bin"
    data = bytearray(path.read_bytes())
    data[15] = 4
    data[16:24] = struct.pack("<Q", (len(data) - 24) // 4)
    path.write_bytes(bytes(data))
    monkeypatch.setenv("DLM_TITAN_CHECK_ONLY", "1")
    code, err = run(capfd, cli(shards, tmp_path / "out", 4))
    assert code == 2
    line = one_error_line(err)
    assert path.name in line and "read as int32" in line and "header" in line


# -- further faults ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit", ["not json", "checksums not a dict", "files a list", "data a string"])
@pytest.mark.slow
def test_a_damaged_marker_is_one_line_naming_the_older_checkpoint(shards, tmp_path, capfd, edit):
    dump = tmp_path / "out"
    assert run(capfd, cli(shards, dump, 4, "--checkpoint.enable"))[0] == 0
    path = dump / "checkpoint" / "step-4" / MARKER
    marker = json.loads(path.read_text())
    if edit == "not json":
        path.write_text("{garbage")
    else:
        key, value = {"checksums not a dict": ("checksums", "abc"), "files a list": ("files", [1, 2]),
                      "data a string": ("data", "x")}[edit]
        path.write_text(json.dumps({**marker, key: value}))
    code, err = run(capfd, cli(shards, dump, 6, "--checkpoint.enable"))
    assert code == 2
    line = one_error_line(err)
    assert "step-4 is damaged: its complete.json" in line and "--checkpoint.load_step 2" in line


@pytest.mark.slow
def test_a_full_disk_outside_a_save_is_one_line(shards, tmp_path, capfd, monkeypatch):
    """The run's config.toml (written after the resume) meets a full disk: one line, exit 2, checkpoints kept."""
    import dlm_titan.train as train_module

    dump = tmp_path / "out"
    assert run(capfd, cli(shards, dump, 2, "--checkpoint.enable"))[0] == 0

    def full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", str(dump / "config.toml"))

    monkeypatch.setattr(train_module, "write_config", full)
    code, err = run(capfd, cli(shards, dump, 4, "--checkpoint.enable"))
    assert code == 2
    line = one_error_line(err)
    assert "No space left on device" in line and "config.toml" in line and "rerun" in line
    assert (dump / "checkpoint" / "step-2" / MARKER).is_file()


def test_a_checkpoint_folder_that_is_a_file_is_refused_before_training(shards, tmp_path, capfd):
    dump = tmp_path / "out"
    dump.mkdir()
    (dump / "checkpoint").write_text("x")
    capfd.readouterr()
    code = main(cli(shards, dump, 2, "--checkpoint.enable"))
    out, err = capfd.readouterr()
    assert code == 2 and "is a file" in one_error_line(err)
    assert "step: 1" not in out  # refused at start, not at the first save


@pytest.mark.slow
def test_keep_latest_k_never_deletes_the_checkpoint_just_saved(shards, tmp_path, capfd):
    """Resumed from step 2 while step 6 exists, keep_latest_k = 1: the run's own new step 4 survives its purge."""
    dump = tmp_path / "out"
    assert run(capfd, cli(shards, dump, 6, "--checkpoint.enable"))[0] == 0
    code, err = run(capfd, cli(shards, dump, 4, "--checkpoint.enable", "--checkpoint.load_step", "2",
                               "--checkpoint.keep_latest_k", "1"))
    assert code == 0, err[-3000:]
    assert (dump / "checkpoint" / "step-4" / MARKER).is_file()


def test_a_purge_cut_short_leaves_no_checkpoint_that_reads_as_complete(tmp_path, monkeypatch):
    """keep_latest_k deletes an old checkpoint marker first: a purge killed after its first deletion leaves an
    incomplete folder, skipped on resume and purged next time, not one that reads as complete with a file gone.
    (The folder listing puts the data files first and the marker last, as a filesystem's order may;
    KeyboardInterrupt stands in for the kill.)"""
    import os
    from types import SimpleNamespace

    from dlm_titan.checkpoint.manager import CheckpointManager
    from dlm_titan.checkpoint_layout import is_complete, write_marker

    folder = tmp_path / "checkpoint"
    for step in (2, 4):
        step_dir = folder / f"step-{step}"
        step_dir.mkdir(parents=True)
        for name in ("__0_0.distcp", "__0_1.distcp", ".metadata"):
            (step_dir / name).write_bytes(bytes(100))
        write_marker(step_dir, {"step": step})
    real_scandir, real_unlink = os.scandir, os.unlink

    class Listing(list):
        def __enter__(self):
            return iter(self)

        def __exit__(self, *exc):
            return False

    def marker_last(*args, **kwargs):
        with real_scandir(*args, **kwargs) as entries:
            return Listing(sorted(entries, key=lambda e: (e.name == MARKER, e.name == ".metadata")))

    deleted = []

    def killed_after_one(path, *args, **kwargs):
        if deleted:
            raise KeyboardInterrupt
        real_unlink(path, *args, **kwargs)
        deleted.append(path)

    owner = SimpleNamespace(cfg=SimpleNamespace(keep_latest_k=1), folder=folder)
    monkeypatch.setattr(os, "scandir", marker_last)
    monkeypatch.setattr(os, "unlink", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        CheckpointManager._purge(owner, folder / "step-4")
    monkeypatch.undo()
    assert len(deleted) == 1 and (folder / "step-2").is_dir()
    assert not is_complete(folder / "step-2"), f"step-2 reads as complete without {Path(deleted[0]).name}"
    assert newest_complete(folder) == folder / "step-4"
    CheckpointManager._purge(owner, folder / "step-4")
    assert [s for s, _ in step_folders(folder)] == [4] and is_complete(folder / "step-4")


@pytest.mark.slow
def test_an_async_save_failing_while_the_next_save_waits_is_reported_once(shards, tmp_path, capfd, monkeypatch):
    """The async save of step 2 fails on a full disk while the save of step 4 waits for it: one error line, not
    also a warning that the failed save "did not complete" and "stays incomplete" (its folder is removed)."""
    from torch.distributed.checkpoint import filesystem

    from dlm_titan.checkpoint.manager import CheckpointManager

    saving_step_4 = threading.Event()
    write_item, save = filesystem._write_item, CheckpointManager.save

    def full_once_step_4_saves(*args, **kwargs):
        if "step-2" in str(getattr(args[1] if len(args) > 1 else None, "name", "")) or "step-2" in str(args):
            saving_step_4.wait(120)  # still in flight when step 3 and step 4 poll it: the save of step 4 waits
            raise OSError(errno.ENOSPC, "No space left on device", "step-2")
        return write_item(*args, **kwargs)

    def save_marking_step_4(self, step: int, *args, **kwargs):
        if step == 4:
            saving_step_4.set()
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(filesystem, "_write_item", full_once_step_4_saves)
    monkeypatch.setattr(CheckpointManager, "save", save_marking_step_4)
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    dump = tmp_path / "out"
    code, err = run(capfd, cli(shards, dump, 4, "--checkpoint.enable", "--checkpoint.async_mode", "async"))
    assert code == 2
    assert "step-2 failed: No space left on device" in one_error_line(err)
    assert "did not complete" not in err and "stays incomplete" not in err, err[-3000:]
    assert step_folders(dump / "checkpoint") == []


MARKER_WRITE_FAILS_ON_RANK_0 = """
import errno, sys
import torch.distributed as dist
from dlm_titan.checkpoint import manager

def full(*args, **kwargs):
    assert dist.get_rank() == 0, "only rank 0 writes the marker"
    raise OSError(errno.ENOSPC, "No space left on device", "complete.json")

manager.write_marker = full
from dlm_titan.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.multiprocess
def test_a_marker_write_failing_on_rank_0_fails_the_save_on_every_rank(shards, tmp_path):
    """2 processes (gloo on CPU): rank 0 cannot write step-1's marker (a full disk). Every rank reports the failed
    save in one line and exits 2, rather than rank 1 counting the save complete and training on without rank 0."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dump = tmp_path / "out"
    argv = cli(shards, dump, 3, "--checkpoint.enable", "--checkpoint.interval", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, "-c", MARKER_WRITE_FAILS_ON_RANK_0, *argv], cwd=ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    results = []
    for proc in procs:
        try:
            results.append((proc.communicate(timeout=300)[1], proc.returncode))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            results.append((proc.communicate()[1] + "\n(killed after 300 s)", proc.returncode))
    for rank, (err, code) in enumerate(results):
        assert code == 2, f"rank {rank} exited {code}:\n{err[-3000:]}"
        assert "step-1 failed: No space left on device (complete.json)" in one_error_line(err)
    assert step_folders(dump / "checkpoint") == []


@pytest.mark.slow
def test_an_io_error_reading_back_the_saved_files_fails_the_save_in_one_line(shards, tmp_path, capfd, monkeypatch):
    """The checksums of step 4's files cannot be read (EIO): the save fails like any storage failure (one line,
    the folder removed, step 2 the newest complete checkpoint), and in a multi-rank run on every rank alike."""
    from dlm_titan import checksums

    crc32 = checksums.file_crc32

    def unreadable(path):
        if "step-4" in str(path):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return crc32(path)

    monkeypatch.setattr(checksums, "file_crc32", unreadable)
    dump = tmp_path / "out"
    code, err = run(capfd, cli(shards, dump, 6, "--checkpoint.enable"))
    assert code == 2
    line = one_error_line(err)
    assert "step-4 failed: Input/output error" in line and "step-2 stays the newest complete checkpoint" in line
    assert [s for s, _ in step_folders(dump / "checkpoint")] == [2]
