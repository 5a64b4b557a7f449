"""Checkpointing against uninterrupted runs: exact resume, crash and preemption safety, keep_latest_k, markers,
non-finite steps, export round trips, and loader resharding across world sizes (single process; the
2-process FSDP tests are in test_checkpoint_multiprocess.py).

Every run is the 6M model with a 256-token vocabulary (on random shards, so the optimizer state is 6.4M
parameters, not 22.7M) at seq_len 32, global batch 4 = 2 micro-batches of 2 (gradient accumulation 2), 2 loader
workers, 8 steps; losses are read exactly in-process (the local loss sum, which is the logged loss for one
process).
"""

import dataclasses
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import record_losses

from dlm_titan.checkpoint.export import export_model, load_model
from dlm_titan.checkpoint_layout import MARKER, step_folders
from dlm_titan.config import Data, load_config
from dlm_titan.data import build_train_loader, resolve_data_path, write_shard
from dlm_titan.train import Trainer, main

# One intra-op thread (5-20x faster steps on a shared 2-core machine). The SIGKILL child uses one too, so its
# numerics match the in-process runs bit for bit.
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
VOCAB = 256
SHARDS = Path()  # set by the module fixture below
ARGS = ["--job.config_file", "train_configs/debug.toml", "--training.steps", str(STEPS), "--training.seq_len", "32",
        "--training.global_batch_size", "4", "--training.local_batch_size", "2", "--data.num_workers", "2",
        "--metrics.log_freq", "1", "--job.no_print_config", "--metrics.no_enable_tensorboard",
        "--checkpoint.export_dtype", "float32", "--model.vocab_size", str(VOCAB)]


@pytest.fixture(scope="module", autouse=True)
def shards(tmp_path_factory):
    """Two shards of random ids below VOCAB (no tokenizer: the loader checks ids against the vocab)."""
    global SHARDS
    SHARDS = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for n in range(2):
        write_shard(SHARDS / f"train_slim_{n:010d}.bin", rng.integers(0, VOCAB, 33 * 64, dtype=np.uint16))
    return SHARDS


def cli(dump: Path, *extra: str) -> list[str]:
    return [*ARGS, "--data.path", str(SHARDS), "--job.dump_folder", str(dump), *extra]


def config(dump: Path, *extra: str):
    return load_config(cli(dump, *extra))


def train(dump: Path, *extra: str, stop_after: int | None = None, on_step=None) -> tuple[Trainer, dict[int, float]]:
    """Runs the trainer in this process; returns it and {step: exact loss}. ``stop_after`` ends the run after
    that step as if it were the last (the lr schedule still spans STEPS); ``on_step(trainer, step)`` runs
    after each step."""
    trainer = Trainer(config(dump, *extra))
    if stop_after is not None:
        trainer.steps = stop_after
    losses = record_losses(trainer, on_step)
    trainer.train()
    _stop_workers(trainer)
    return trainer, losses


def _stop_workers(trainer: Trainer) -> None:
    """Ends the loader's persistent workers now: left to pytest's final garbage collection, each one's join
    times out (5 s) instead of returning at once."""
    iterator = getattr(trainer.data_loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """Losses of the uninterrupted 8-step run, checkpointing off."""
    _, losses = train(tmp_path_factory.mktemp("reference") / "out")
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(map(torch.isfinite, torch.tensor(list(losses.values()))))
    return losses


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """4 steps (saving every 2, keeping 2), then a new process-like Trainer on the same dump folder to step 8."""
    dump = tmp_path_factory.mktemp("resumed") / "out"
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "2"]
    _, first = train(dump, *ckpt, stop_after=4)
    after_first = [s for s, _ in step_folders(dump / "checkpoint")]
    trainer, second = train(dump, *ckpt)
    return {"dump": dump, "first": first, "second": second, "after_first": after_first, "trainer": trainer}


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_losses_bit_for_bit(reference, resumed):
    assert sorted(resumed["first"]) == [1, 2, 3, 4] and sorted(resumed["second"]) == [5, 6, 7, 8]
    assert resumed["first"] == {s: reference[s] for s in range(1, 5)}
    assert resumed["second"] == {s: reference[s] for s in range(5, 9)}  # exact float equality


@pytest.mark.slow
def test_async_save_resumes_exactly(reference, tmp_path):
    """async_mode = async (async_with_pinned_mem falls back to it without CUDA): training continues while a
    thread writes; the checkpoints are complete and resume exactly."""
    dump = tmp_path / "out"
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.async_mode", "async"]
    first, _ = train(dump, *ckpt, stop_after=4)
    assert [s["step"] for s in first.checkpointer.save_stats] == [2, 4]
    assert all((p / MARKER).is_file() for _, p in step_folders(dump / "checkpoint"))
    _, rest = train(dump, *ckpt, "--checkpoint.async_mode", "async_with_pinned_mem")
    assert rest == {s: reference[s] for s in range(5, 9)}


@pytest.fixture
def graphs_claimed(monkeypatch):
    """The trainer's parallel plan claims CUDA graphs: the CPU has none, but the trainer then keeps zeroed
    gradient buffers allocated from the start, as it does for them."""
    import dlm_titan.train as train_module

    parallelize = train_module.parallelize_model
    monkeypatch.setattr(train_module, "parallelize_model",
                        lambda *a, **k: dataclasses.replace(parallelize(*a, **k), cudagraphs=True))


@pytest.mark.slow
def test_resume_exact_with_gradients_kept_allocated(reference, tmp_path, graphs_claimed):
    """Under CUDA graphs the trainer keeps gradient buffers allocated and zeroes them in place; that must not stop
    the checkpoint load from restoring Adam's moments."""
    dump = tmp_path / "out"
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "2"]
    _, first = train(dump, *ckpt, stop_after=4)
    trainer, rest = train(dump, *ckpt)
    assert all(p.grad is not None for p in trainer.model.parameters())  # the kept buffers, zeroed in place
    assert first == {s: reference[s] for s in range(1, 5)}
    assert rest == {s: reference[s] for s in range(5, 9)}


def test_graphed_single_micro_batch_hands_gradients_over(tmp_path, graphs_claimed):
    """Under CUDA graphs with one micro-batch a step (no DDP) nothing holds gradients between steps: each step's
    reach the optimizer and are dropped after it (two micro-batches keep zeroed buffers: the test above)."""
    dropped = []
    trainer, losses = train(tmp_path / "out", "--training.global_batch_size", "2", stop_after=2,
                            on_step=lambda tr, step: dropped.append(all(p.grad is None for p in tr.model.parameters())))
    assert trainer.micro_batches == 1 and not trainer.keep_grads
    assert dropped == [True, True] and len(losses) == 2


def test_save_before_any_update_with_kept_gradients_loads(tmp_path, graphs_claimed):
    """A checkpoint written before the first optimizer update while gradient buffers are kept allocated (CUDA
    graphs, DDP) holds Adam's (zero) state, so a new process loads it; the kept buffers survive the save."""
    dump = tmp_path / "out"
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "2"]
    first = Trainer(config(dump, *ckpt))
    grads = [p.grad for p in first.model.parameters()]
    first.checkpointer.save(1, 0, blocking=True)
    assert all(p.grad is g for p, g in zip(first.model.parameters(), grads))
    _stop_workers(first)
    second = Trainer(config(dump, *ckpt))
    assert second.step == 1 and second.optimizer.state
    _stop_workers(second)


@pytest.mark.slow
def test_resume_keeps_this_runs_optimizer_implementation(tmp_path):
    """The kernel choice does not come back from the checkpoint: a checkpoint of a run whose AdamW had foreach off
    (the Triton AdamW's groups say so too) resumes with the foreach kernel asked for. Neither do hyper-parameters
    (tests/test_lr_resume.py): the lr follows this run's config."""
    dump = tmp_path / "out"
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "2"]
    first = Trainer(config(dump, *ckpt, "--optimizer.implementation", "for-loop", "--optimizer.lr", "1e-3"))
    first.checkpointer.save(1, 0, blocking=True)
    _stop_workers(first)
    second = Trainer(config(dump, *ckpt, "--optimizer.implementation", "foreach", "--optimizer.lr", "5e-4"))
    group = second.optimizer.param_groups[0]
    assert second.step == 1 and group["foreach"] is True and group["fused"] is False
    assert second.lr_scheduler.peak_lr == 5e-4 and group["lr"] == second.lr_scheduler.lr_at(1)  # saved before a step
    _stop_workers(second)


@pytest.mark.slow
def test_keep_latest_k_holds_and_markers_are_written(resumed):
    assert resumed["after_first"] == [2, 4]
    folders = step_folders(resumed["dump"] / "checkpoint")
    assert [s for s, _ in folders] == [6, 8]
    for step, path in folders:
        marker = json.loads((path / MARKER).read_text())
        assert marker["step"] == step and marker["model"]["flavor"] == "6M" and (path / ".metadata").is_file()


@pytest.mark.slow
def test_export_and_checkpoint_reload_give_identical_logits(resumed, tmp_path):
    # Exports load on the CPU: the reference is a CPU model holding the trained weights (its RoPE table and
    # attention backend are the CPU's), so the logits can be bitwise equal also where training ran on a GPU.
    trained = load_model(resumed["dump"] / "export").eval()
    trained.load_state_dict({k: v.cpu() for k, v in resumed["trainer"].model.state_dict().items()})
    tokens = torch.randint(0, VOCAB + 1, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = trained(tokens)
        for path in (resumed["dump"] / "export", resumed["dump"] / "checkpoint" / "step-8", resumed["dump"]):
            model = load_model(path)
            assert model.config["step"] == 8 and next(model.parameters()).dtype == torch.float32
            assert torch.equal(model(tokens), want), path
        # bf16 export: the reloaded model equals the trained one cast to bf16
        export_model(trained, {"flavor": "6M"}, tmp_path / "bf16", "bfloat16", step=8)
        model = load_model(tmp_path / "bf16")
        assert next(model.parameters()).dtype == torch.bfloat16
        cast = load_model(resumed["dump"] / "export", dtype="bfloat16")
        assert torch.equal(model(tokens), cast(tokens))


@pytest.mark.slow
def test_export_cli_writes_a_loadable_export(resumed, tmp_path):
    from scripts.export_checkpoint import main as export_main

    step6 = resumed["dump"] / "checkpoint" / "step-6"
    assert export_main([str(step6), "--out", str(tmp_path / "e6"), "--dtype", "float32"]) == 0
    tokens = torch.randint(0, VOCAB + 1, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "e6")(tokens), load_model(step6)(tokens))
    assert json.loads((tmp_path / "e6" / "config.json").read_text())["step"] == 6
    assert export_main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exported_files_get_the_mode_of_any_new_file(tmp_path, umask):
    """safetensors writes its file as a private temporary (0600); the export gives every file the mode a new file
    gets under the umask (0644 under the usual 022), so other users can read a shared export."""
    from dlm_titan.checkpoint.export import write_export
    from dlm_titan.interop.safetensors_io import write_weights

    (tmp_path / "hf").mkdir()
    old = os.umask(umask)
    try:
        write_export({"w": torch.ones(2, 3)}, {"flavor": "tiny"}, tmp_path / "e", "float32", step=1)
        # the training export's (Hugging Face folder) weights, one file and shards with their index
        write_weights({"a": torch.ones(64), "b": torch.ones(64)}, tmp_path / "hf", max_bytes=300)
    finally:
        os.umask(old)
    files = [tmp_path / "e" / "model.safetensors", tmp_path / "e" / "config.json", *(tmp_path / "hf").iterdir()]
    assert len(files) == 5  # two shards and their index, no .tmp left anywhere
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.slow
def test_incomplete_checkpoint_is_skipped_and_explicit_load_of_it_exits_2(resumed, tmp_path, capfd):
    dump = tmp_path / "out"
    # hard links: a cheap copy of the dump folder; saves never write into existing files
    shutil.copytree(resumed["dump"], dump, copy_function=os.link)
    shutil.copytree(dump / "checkpoint" / "step-8", dump / "checkpoint" / "step-10", copy_function=os.link)
    (dump / "checkpoint" / "step-10" / MARKER).unlink()
    trainer = Trainer(config(dump, "--checkpoint.enable"))
    assert trainer.step == 8
    assert "skipping incomplete checkpoint" in capfd.readouterr().err
    code = main(cli(dump, "--checkpoint.enable", "--checkpoint.load_step", "10"))
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: checkpoint ") and "step-10 is incomplete" in err[0]
    assert main(cli(dump, "--checkpoint.enable", "--checkpoint.load_step", "3")) == 2
    assert "complete checkpoints: [6, 8]" in capfd.readouterr().err


def _damage(path: Path, keep_bytes: int | None) -> None:
    """Truncates (or, with None, deletes) a file of a hard-linked copy without touching the original."""
    data = path.read_bytes()
    path.unlink()
    if keep_bytes is not None:
        path.write_bytes(data[:keep_bytes])


@pytest.mark.parametrize("damage", ["truncated", "missing", "garbage_metadata"])
@pytest.mark.slow
def test_damaged_checkpoint_exits_2_naming_the_file(resumed, tmp_path, capfd, damage):
    """A checkpoint whose files no longer match what its save wrote (sizes recorded in the marker) is refused
    with one line naming the file, by the trainer and by the model loader; the checkpoint is left as it is."""
    dump = tmp_path / "out"
    shutil.copytree(resumed["dump"], dump, copy_function=os.link)
    saved = (dump / "config.toml").read_text()
    (dump / "config.toml").unlink()  # a private copy: the last run below writes it
    (dump / "config.toml").write_text(saved)
    step8 = dump / "checkpoint" / "step-8"
    shard = sorted(step8.glob("*.distcp"))[0]
    if damage == "truncated":
        _damage(shard, shard.stat().st_size // 2)
        named = f"{shard.name} has {shard.stat().st_size:,} bytes, but its save wrote"
    elif damage == "missing":
        _damage(shard, None)
        named = f"{shard.name} is missing"
    else:  # same size, unreadable content
        size = (step8 / ".metadata").stat().st_size
        _damage(step8 / ".metadata", 0)
        (step8 / ".metadata").write_bytes(b"\x8f" * size)
        named = ".metadata does not match the checksum its save recorded"  # caught before DCP parses it
    before = sorted((p.name, p.stat().st_size) for p in step8.iterdir())
    code = main(cli(dump, "--checkpoint.enable"))
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: checkpoint {step8} is damaged: ") and named in err[0], err[0]
    assert "checkpoint.load_step" in err[0]
    from dlm_titan.errors import UserError

    with pytest.raises(UserError, match="is damaged"):
        load_model(step8)
    assert sorted((p.name, p.stat().st_size) for p in step8.iterdir()) == before
    # an older step still loads (and its run saves step 8 anew in place of the damaged one)
    assert main(cli(dump, "--checkpoint.enable", "--checkpoint.load_step", "6")) == 0


@pytest.mark.slow
def test_a_refused_resume_keeps_the_saved_config(resumed, tmp_path):
    """Resuming with another model is refused before anything is written: the dump folder's config.toml (which
    tools read for checkpoint.folder) still describes the run that saved."""
    from dlm_titan.errors import UserError

    dump = tmp_path / "out"
    shutil.copytree(resumed["dump"], dump, copy_function=os.link)
    saved = (dump / "config.toml").read_text()
    (dump / "config.toml").unlink()  # a private copy: the write below must not reach the fixture's file
    (dump / "config.toml").write_text(saved)
    with pytest.raises(UserError, match="holds a 6M model"):
        Trainer(config(dump, "--checkpoint.enable", "--model.vocab_size", str(VOCAB + 64)))
    assert (dump / "config.toml").read_text() == saved


@pytest.mark.slow
def test_the_async_writer_marks_its_checkpoint_complete_itself(tmp_path, monkeypatch):
    """The background writer writes the marker as soon as DCP's save returns, so a written checkpoint is complete
    even if the main thread never gets to its bookkeeping (a failure, a hang in a collective)."""
    from dlm_titan.checkpoint import CheckpointManager

    monkeypatch.setattr(CheckpointManager, "_finish", lambda self, step, path, started, blocking_s: None)
    dump = tmp_path / "out"
    train(dump, "--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.async_mode", "async", stop_after=2)
    marker = json.loads((dump / "checkpoint" / "step-2" / MARKER).read_text())
    assert marker["step"] == 2 and ".metadata" in marker["files"] and MARKER not in marker["files"]


@pytest.mark.slow
def test_a_failing_run_completes_the_save_in_flight(reference, tmp_path):
    """An error mid-run (here a bad shard met at step 3) while an async save of step 2 is being written: the
    save is still completed, so the rerun resumes from it and continues exactly."""
    from dlm_titan.errors import UserError

    dump = tmp_path / "out"
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.async_mode", "async"]
    trainer = Trainer(config(dump, *ckpt))
    step_fn = trainer.train_step

    def failing(step: int):
        if step == 3:
            raise UserError("shard x holds token id 65535, outside the model vocabulary")
        return step_fn(step)

    trainer.train_step = failing
    with pytest.raises(UserError):
        trainer.train()
    _stop_workers(trainer)
    assert (dump / "checkpoint" / "step-2" / MARKER).is_file()
    _, rest = train(dump, *ckpt)
    assert rest == {s: reference[s] for s in range(3, STEPS + 1)}


@pytest.mark.slow
def test_sigterm_saves_at_step_boundary_and_rerun_reproduces(reference, tmp_path):
    dump = tmp_path / "out"

    def preempt(trainer, step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal; the handler only records it

    previous = signal.getsignal(signal.SIGTERM)
    first, losses = train(dump, "--checkpoint.enable", "--checkpoint.interval", "100", on_step=preempt)
    assert signal.getsignal(signal.SIGTERM) is previous  # restored at close
    assert first.step == 5 and sorted(losses) == [1, 2, 3, 4, 5]
    assert [s for s, _ in step_folders(dump / "checkpoint")] == [5] and not (dump / "export").exists()
    # the rerun also changes the worker count (2 -> 0): the loader is repositioned, same samples
    _, rest = train(dump, "--checkpoint.enable", "--checkpoint.interval", "100", "--data.num_workers", "0")
    assert rest == {s: reference[s] for s in range(6, 9)}


@pytest.mark.multiprocess
def test_sigterm_to_the_whole_process_group_exits_0_with_a_checkpoint(tmp_path):
    """The CLI in its own session; SIGTERM goes to every process of the group, loader workers included (as
    Slurm signals a job step). The trainer saves at the next step boundary and exits 0."""
    dump = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dlm_titan.train", *cli(dump, "--checkpoint.enable")], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step: 2 "):
            os.killpg(proc.pid, signal.SIGTERM)
            break
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    stopped = [s for s, _ in step_folders(dump / "checkpoint")]
    assert len(stopped) == 1 and 2 <= stopped[0] < STEPS, out[-3000:]
    assert f"stopping at step {stopped[0]} on signal SIGTERM" in out
    assert (dump / "checkpoint" / f"step-{stopped[0]}" / MARKER).is_file() and not (dump / "export").exists()


@pytest.mark.multiprocess
def test_sigkill_during_save_leaves_previous_checkpoint_for_resume(reference, tmp_path):
    """A child process is SIGKILLed while DCP writes step-4 (data written, metadata and marker not yet)."""
    dump = tmp_path / "out"
    child = f"""
import os, signal, sys
import torch
torch.set_num_threads(1)
from torch.distributed.checkpoint import FileSystemWriter
from dlm_titan.train import main
finish = FileSystemWriter.finish
def killed(self, *a, **k):
    if str(self.path).endswith("step-4"):
        os.kill(os.getpid(), signal.SIGKILL)
    return finish(self, *a, **k)
FileSystemWriter.finish = killed
sys.exit(main({cli(dump, "--checkpoint.enable", "--checkpoint.interval", "2")!r}))
"""
    result = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    step4 = dump / "checkpoint" / "step-4"
    assert list(step4.glob("*.distcp")) and not (step4 / MARKER).exists()
    assert (dump / "checkpoint" / "step-2" / MARKER).is_file()
    _, rest = train(dump, "--checkpoint.enable", "--checkpoint.interval", "2", stop_after=4)
    assert rest == {s: reference[s] for s in (3, 4)}  # resumed from step 2, exactly
    assert (step4 / MARKER).is_file()  # the rerun saved step 4 again, completely


def _nan_at(step_to_poison: int, micro_batch: int = 0):
    """on_step-free injection: wraps the model's loss so one micro-batch of one step returns NaN."""
    calls = {"n": 0}

    def install(trainer):
        inner = trainer.loss_fn
        per_step = trainer.micro_batches

        def poisoned(*args, **kwargs):
            loss = inner(*args, **kwargs)
            k = calls["n"]
            calls["n"] += 1
            return loss * float("nan") if k == (step_to_poison - 1) * per_step + micro_batch else loss

        trainer.loss_fn = poisoned

    return install


def _train_with(dump: Path, install, *extra: str, steps: int = 4):
    trainer = Trainer(config(dump, *extra, "--training.steps", str(steps), "--data.num_workers", "0"))
    install(trainer)
    snapshots: dict[int, torch.Tensor] = {}

    def snapshot(tr: Trainer, step: int) -> None:
        snapshots[step] = torch.cat([p.detach().flatten().cpu() for p in tr.model.parameters()])

    return trainer, record_losses(trainer, snapshot), snapshots


@pytest.mark.slow
def test_nonfinite_loss_skip_drops_the_update_and_continues(tmp_path, capfd):
    trainer, losses, params = _train_with(tmp_path / "out", _nan_at(3, micro_batch=1), "--training.on_nonfinite", "skip")
    adam_steps = []
    trainer.optimizer.register_step_post_hook(lambda *_: adam_steps.append(trainer.step))
    trainer.train()
    assert sorted(losses) == [1, 2, 3, 4] and losses[3] != losses[3]  # NaN at step 3 only
    assert all(losses[s] == losses[s] for s in (1, 2, 4))
    assert torch.equal(params[3], params[2]) and not torch.equal(params[4], params[3])
    assert adam_steps == [1, 2, 4]
    assert trainer.lr_scheduler.last_epoch == 4  # the schedule moves on with the step count
    err = capfd.readouterr().err
    assert "non-finite loss at step 3, rank 0, micro-batch 1" in err and "update skipped" in err


def test_nonfinite_loss_stop_saves_then_raises(tmp_path):
    dump = tmp_path / "out"
    trainer, losses, params = _train_with(dump, _nan_at(2), "--training.on_nonfinite", "stop", "--checkpoint.enable")
    with pytest.raises(FloatingPointError, match="stopped at step 2"):
        trainer.train()
    assert gc.isenabled()  # the trainer finished its loop normally before the error
    assert sorted(losses) == [1, 2] and [s for s, _ in step_folders(dump / "checkpoint")] == [2]
    assert not (dump / "export").exists()
    saved = load_model(dump / "checkpoint" / "step-2")  # the weights of step 1: step 2's update was dropped
    assert torch.equal(torch.cat([p.flatten() for p in saved.parameters()]), params[1])


@pytest.mark.parametrize("deferred", [False, True])
def test_nonfinite_loss_raise(tmp_path, deferred):
    """The immediate verdict (CPU) raises inside the bad step; the deferred one (the GPU path, no host sync)
    raises in the next step's check, before that step's update. Both name the bad step."""
    if torch.cuda.is_available() and not deferred:
        pytest.skip("on CUDA the verdict is always deferred (no host sync)")
    trainer, losses, _ = _train_with(tmp_path / "out", _nan_at(1), "--training.on_nonfinite", "raise")
    trainer.nonfinite.defer_raise = deferred
    with pytest.raises(FloatingPointError, match="non-finite loss at step 1"):
        trainer.train()
    assert sorted(losses) == ([1] if deferred else [])


@pytest.mark.parametrize("deferred", [False, True])
def test_nonfinite_verdict_precedes_the_save(tmp_path, deferred):
    """A save due at the bad step (interval 2, NaN at step 2) never happens, deferred verdict or not."""
    if torch.cuda.is_available() and not deferred:
        pytest.skip("on CUDA the verdict is always deferred (no host sync)")
    trainer, losses, _ = _train_with(tmp_path / "out", _nan_at(2), "--training.on_nonfinite", "raise",
                                     "--checkpoint.enable", "--checkpoint.interval", "2")
    trainer.nonfinite.defer_raise = deferred
    with pytest.raises(FloatingPointError, match="non-finite loss at step 2"):
        trainer.train()
    assert sorted(losses) == ([1, 2] if deferred else [1])
    assert not step_folders(tmp_path / "out" / "checkpoint")


@pytest.mark.slow
def test_initial_load_path_loads_weights_only(resumed, tmp_path, capsys):
    initial = str(resumed["dump"] / "checkpoint" / "step-6")
    trainer = Trainer(config(tmp_path / "out", "--checkpoint.enable", "--checkpoint.initial_load_path", initial))
    assert trainer.step == 0 and trainer.tokens_seen == 0 and not trainer.optimizer.state
    assert trainer.lr_scheduler.last_epoch == 0
    reference = load_model(initial)
    for (name, p), q in zip(trainer.model.named_parameters(), reference.parameters()):
        assert torch.equal(p.detach().cpu(), q), name
    assert "initial_load_path" not in capsys.readouterr().out
    # A folder with checkpoints resumes from its newest one and says that initial_load_path is not used.
    resuming = Trainer(config(resumed["dump"], "--checkpoint.enable", "--checkpoint.initial_load_path", initial))
    assert resuming.step == STEPS
    assert f"checkpoint.initial_load_path ({initial}) applies only to a run without checkpoints" in capsys.readouterr().out


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_loader_reposition_continues_the_global_stream(workers):
    """Loader states saved by 2 ranks x 4 micro-batches after 3 steps, repositioned for other layouts: step 4's samples are
    those of an uninterrupted 1-rank loader (independent reference: the loader's position map)."""
    data = Data(num_workers=workers)
    path = resolve_data_path(data)

    def loader(rank, world, b):
        return build_train_loader(data, data_path=path, seq_len=16, local_batch_size=b, global_batch_size=8,
                                  dp_rank=rank, dp_world_size=world, seed=5, vocab_size=32000)

    saved = []
    for rank in range(2):
        old = loader(rank, 2, 1)
        it = iter(old)
        for _ in range(3 * 4):  # 3 steps x 4 micro-batches per rank
            next(it)
        saved.append(old.state_dict())
        del it
    straight = iter(loader(0, 1, 4))
    for _ in range(3 * 2):
        next(straight)
    want = torch.cat([next(straight)["input"] for _ in range(2)])  # step 4: 8 sequences
    for world, b in ((1, 4), (4, 1), (1, 2)):  # 2, 2 and 4 micro-batches per rank per step
        got = []
        for rank in range(world):
            new = loader(rank, world, b)
            new.load_state_dict(new.reposition(saved[rank % 2], step=3))
            it = iter(new)
            got += [next(it)["input"] for _ in range(8 // (b * world))]
        assert torch.equal(torch.cat(got), want), (world, b)
