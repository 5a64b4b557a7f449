"""The checkpoint manager: DCP save of the whole training state, async saves, crash safety; resume delegated.

A save of step N writes ``{dump_folder}/{checkpoint.folder}/step-N`` and marks it complete last (dlm_titan.checkpoint_layout);
what it holds is described in state.py; async saves stage the state in CPU buffers (staging.py) and write them
from a background thread. A resume takes the newest complete checkpoint (resume.py). The final weights are
exported (export.py) when a run completes.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from dlm_titan.checkpoint.eval_tokenizer import export_tokenizer
from dlm_titan.checkpoint.export import EXPORT_FOLDER, export_model
from dlm_titan.checkpoint.resume import CheckpointLoader, Ranks, resume_folder
from dlm_titan.checkpoint.staging import StateStager, current_cuda_device, use_device
from dlm_titan.checkpoint.state import state_to_save, tensor_state
from dlm_titan.checkpoint.write_errors import save_failure, writer_thread_errors
from dlm_titan.checkpoint_layout import (
    is_complete,
    print_warning,
    remove_checkpoint,
    single_process_dcp,
    step_folders,
    write_marker,
)
from dlm_titan.checksums import checksum_files
from dlm_titan.data.identity import dataset_identity
from dlm_titan.errors import UserError


@dataclass
class _Pending:
    """An async save in flight: its step, folder and the future of its background write."""

    step: int
    path: Path
    upload: Future
    started: float
    blocking_s: float


class CheckpointManager:
    """The trainer's one entry point to checkpoints: saves and restores model, optimizer, lr scheduler, data
    loader (per rank) and train state with DCP, and exports the final weights.

    The trainer calls :meth:`load` before iterating the loader, :meth:`step_end` after every step (saves on
    interval, at the last step and, blocking, when the loop stops early), :meth:`finish_in_flight` when the run
    fails, and :meth:`close` at the end (waits for saves, exports).

    Args:
        cfg: the whole JobConfig (uses checkpoint, training.seed, job.dump_folder).
        model, optimizer, lr_scheduler: the training objects (model possibly FSDP2-sharded).
        data_loader: the training loader (a TrainLoader; any Stateful loader works for same-layout resumes).
        model_config: JSON description of the model (``models.model_config``), kept in markers and exports.
        barrier_group: a gloo group for the main thread's barriers (e.g. the training loop's own), or None to
            make one. Never the group of DCP's collectives (see below).
    """

    def __init__(self, cfg, model: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler, data_loader,
                 model_config: dict[str, Any], barrier_group: dist.ProcessGroup | None = None):
        self.cfg = cfg.checkpoint
        self.seed = cfg.training.seed
        self.folder = Path(cfg.job.dump_folder) / self.cfg.folder
        self.export_folder = Path(cfg.job.dump_folder) / EXPORT_FOLDER
        self.model, self.optimizer, self.lr_scheduler, self.data_loader = model, optimizer, lr_scheduler, data_loader
        self.model_config = model_config
        self.tokenizer_path = cfg.data.tokenizer_path  # converted into the final export's tokenizer files
        self.data_cfg = cfg.data  # its shards' identity goes into every marker and is compared on resume
        self._data_identity: dict[str, Any] | None = None
        self.tokens_seen: int | None = None
        # The latest logged training loss, for the final export. Kept in every checkpoint's train state (like
        # tokens_seen) rather than read back from an earlier export: a rerun of a finished run resumes at its last
        # step and logs nothing, yet its export must record the loss of the run that trained, even when that
        # run's own export never completed (config.json is written last) or the export folder was removed.
        self.last_loss: float | None = None
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        # Two gloo groups: DCP's planning collectives (in a background thread while an async save runs) and
        # the main thread's barriers must not interleave on one group, and neither may touch the NCCL stream
        # or sync the GPU.
        self._save_group = dist.new_group(backend="gloo") if self.distributed else None
        self._barrier_group = barrier_group
        if self.distributed and barrier_group is None:
            self._barrier_group = dist.new_group(backend="gloo")
        self._pending: _Pending | None = None
        self._stager: StateStager | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._reserved = False
        self._last_saved = -1
        self.resumed_layout: dict[str, Any] | None = None
        """The data-loader layout the resumed checkpoint was saved with (None: no resume)."""
        self.record_checksums = True
        """CRC-32 of every file in the marker (scripts.bench_checkpoint --checksum turns it off to time its cost)."""
        self.save_stats: list[dict[str, float]] = []
        """One entry per completed save: step, blocking_s (training stall), total_s (until complete)."""
        if self.cfg.enable:
            self._check_config()
            if self.folder.exists() and not self.folder.is_dir():  # found now, not at the first save
                raise UserError(f"checkpoint folder {self.folder} is a file; remove it or set another "
                                "--checkpoint.folder")
            self.data_identity()  # the shards as the loader opened them, whatever changes during the run
            if self.cfg.async_mode != "disabled":
                self._start_async_writer()

    def _start_async_writer(self) -> None:
        # one stager and writer thread for the whole run: the stager's CPU buffers are reused by every save
        self._stager = StateStager(pin_memory=self.cfg.async_mode == "async_with_pinned_mem")
        # The writer thread waits on CUDA events and DCP touches streams there: on this rank's GPU, not on GPU 0,
        # where a new thread starts (and would create a context).
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer",
                                          initializer=use_device, initargs=(current_cuda_device(),))
        self.optimizer.register_step_pre_hook(lambda *_: self._wait_for_staging())

    def _check_config(self) -> None:
        # write_threads and keep_latest_k are range-checked when the config loads (dlm_titan.config).
        if self.cfg.async_mode == "async_with_pinned_mem" and not torch.cuda.is_available():
            self._log('async_mode = "async_with_pinned_mem" needs CUDA; saving like "async" instead')

    def _log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"checkpoint: {msg}", flush=True)

    def step_folder(self, step: int) -> Path:
        """Where the checkpoint of ``step`` is (or would be) saved."""
        return self.folder / f"step-{step}"

    # -- loading (resume.py) --------------------------------------------------------------------------------

    def load(self) -> tuple[int, int]:
        """Restores the newest complete checkpoint (or ``load_step``), else ``initial_load_path`` weights.

        Returns:
            (step, tokens_seen) to continue from; (0, 0) for a fresh start.
        """
        ranks = Ranks(self.distributed, self.rank, self.world_size, self._save_group, self._barrier_group)
        loader = CheckpointLoader(self.cfg, self.model, self.optimizer, self.lr_scheduler, self.data_loader,
                                  self.model_config, self.data_identity, ranks, self._log)
        if self.cfg.enable:
            step_dir = resume_folder(self.folder, self.cfg.load_step, warn=self.rank == 0)
            if step_dir is not None:
                if self.cfg.initial_load_path:  # it seeds fresh runs only; say so rather than drop it silently
                    self._log(f"resuming from {step_dir}: checkpoint.initial_load_path ({self.cfg.initial_load_path}) "
                              "applies only to a run without checkpoints and is not loaded")
                step, tokens, self.last_loss = loader.load_full(step_dir)
                self.resumed_layout = loader.saved_layout
                self._last_saved = step
                self.tokens_seen = tokens  # what a rerun that trains no step exports
                return step, tokens
        elif self.cfg.load_step >= 0:
            raise UserError(f"checkpoint.load_step = {self.cfg.load_step} needs --checkpoint.enable")
        if self.cfg.initial_load_path:
            loader.load_weights(Path(self.cfg.initial_load_path))
        return 0, 0

    def data_identity(self) -> dict[str, Any]:
        """The training shards' identity (names, sizes, manifests), taken once: the loader opened them at start."""
        if self._data_identity is None:
            from dlm_titan.data import resolve_data_path, used_sources

            used = [prefix for prefix, _ in used_sources(self.data_cfg)]
            self._data_identity = dataset_identity(resolve_data_path(self.data_cfg), used)
        return self._data_identity

    # -- saving -------------------------------------------------------------------------------------------------

    def _state_to_save(self, step: int, tokens_seen: int) -> dict[str, Any]:
        train_state = {"step": step, "tokens_seen": tokens_seen, "world_size": self.world_size, "seed": self.seed,
                       "last_loss": self.last_loss}
        return state_to_save(self.model, self.optimizer, self.lr_scheduler, self.data_loader, train_state, self.rank)

    def save(self, step: int, tokens_seen: int, blocking: bool = False) -> None:
        """Saves ``step-{step}``; async modes return once the state is staged unless ``blocking``."""
        self.wait()  # one save in flight at a time
        start = time.perf_counter()
        path = self.step_folder(step)
        if self.rank == 0:
            if path.exists():  # a stale folder from a crashed save (or a rerun): never mix its files in
                remove_checkpoint(path)
            path.mkdir(parents=True)
        self._barrier()
        state = self._state_to_save(step, tokens_seen)
        mode = self.cfg.async_mode
        if mode == "disabled" or blocking:
            self._write(state, path, step)
            self._finish(step, path, start, time.perf_counter() - start)
            return
        upload = self._async_save(state, path, step)
        self._pending = _Pending(step, path, upload, start, time.perf_counter() - start)

    def _async_save(self, state: dict[str, Any], path: Path, step: int) -> Future:
        """Stages ``state`` into CPU buffers (pinned in "async_with_pinned_mem" on CUDA, where the copy overlaps the
        next forward and backward) and writes the copy from a background thread; returns the write's future."""
        staged = self._stager.stage(state)
        return self._writer.submit(self._write_staged, staged, path, step)

    def _write_staged(self, staged: dict[str, Any], path: Path, step: int) -> None:
        self._stager.synchronize()
        # Marked here, not by the main thread: a written checkpoint is complete even if training has failed or
        # hangs meanwhile (e.g. rank 0 blocked in a collective after another rank died).
        self._write(staged, path, step)

    def _write(self, state: dict[str, Any], path: Path, step: int) -> None:
        """Writes the checkpoint and marks it complete. A failure of the storage (full disk, quota, read-only
        filesystem) on any rank is one UserError on every rank; the folder is removed (it never got a marker), so
        the previous checkpoint stays the newest complete one. Other failures (bugs) raise as they are."""
        try:
            with writer_thread_errors() as lost:
                self._dcp_save(state, path)
            if lost:  # a helper thread's error: DCP's save "succeeded" without that thread's files
                raise lost[0]
            failure = None
        except (Exception, dcp.api.CheckpointException) as e:
            failure = save_failure(e, path, self.folder)
            if failure is None:
                raise
        self._mark_complete(step, path, None if failure is None else str(failure))

    def _storage_failed(self, path: Path, error: str) -> UserError:
        if self.rank == 0:
            remove_checkpoint(path, ignore_errors=True)
        return UserError(error)

    def _dcp_save(self, state: dict[str, Any], path: Path) -> None:
        writer = dcp.FileSystemWriter(str(path), thread_count=self.cfg.write_threads)
        with single_process_dcp():
            dcp.save(state, storage_writer=writer, process_group=self._save_group, no_dist=not self.distributed)

    def _wait_for_staging(self) -> None:
        """Before each optimizer step: the step may not change tensors still being copied. The wait is queued on
        the GPU stream (pinned copies), so the host goes on."""
        if self._pending is not None and self._stager is not None and self._stager.pin_memory:
            self._stager.guard_current_stream()

    def _poll(self) -> None:
        p = self._pending
        if p is not None and p.upload.done():
            self._pending = None
            p.upload.result()  # re-raises a failed save
            self._finish(p.step, p.path, p.started, p.blocking_s)

    def wait(self) -> None:
        """Waits for the save in flight, if any, and completes it (raises its failure, which is then reported: a
        failed save is no longer in flight, and :meth:`finish_in_flight` says nothing more about it)."""
        p = self._pending
        if p is not None:
            start = time.perf_counter()
            wait_for([p.upload])  # interrupted (Ctrl-C), the save stays in flight for finish_in_flight
            p.blocking_s += time.perf_counter() - start
            self._poll()

    def finish_in_flight(self) -> None:
        """On the way out of a failed run (an error, Ctrl-C): waits for the save in flight, which its writer thread
        marks complete by itself, and reports (rather than raises) its failure, so that the run's own error stays
        the one shown; its folder then stays incomplete and is skipped on resume. A second Ctrl-C interrupts it."""
        p = self._pending
        if p is None:
            return
        self._pending = None
        self._log(f"finishing the save of step {p.step} before stopping")
        try:
            p.upload.result()
        except Exception as e:  # noqa: BLE001 - see the docstring
            print_warning(f"rank {self.rank}: the save of step {p.step} did not complete ({type(e).__name__}: {e}); "
                          f"{p.path} stays incomplete and is skipped on resume")
            return
        self._finish(p.step, p.path, p.started, p.blocking_s)

    def _mark_complete(self, step: int, path: Path, error: str | None = None) -> None:
        """Rank 0 writes the marker once DCP's save has returned on every rank without ``error``, i.e. every
        rank's files and .metadata are written. Each rank checksums the files it wrote; all ranks gather the
        checksums and errors, then learn whether rank 0's marker write succeeded (collectives on the save group:
        in the writer thread for async saves), so a save that failed anywhere fails everywhere, unmarked."""
        checksums: dict[str, str] = {}
        if error is None:
            checksums, error = self._own_checksums(path)
        parts = [(error, checksums)]
        if self.distributed:
            parts = [None] * self.world_size
            dist.all_gather_object(parts, (error, checksums), group=self._save_group)
        errors = [e for e, _ in parts if e]
        if errors:
            raise self._storage_failed(path, errors[0])
        bug = None
        if self.rank == 0:
            try:
                self._write_marker(step, path, {k: v for _, part in parts for k, v in part.items()})
            except Exception as e:  # noqa: BLE001 - told to every rank below, then raised
                failure = save_failure(e, path, self.folder)
                if failure is None:  # a bug: its traceback on rank 0, one line on the others
                    bug, error = e, f"rank 0 failed to mark {path} complete ({type(e).__name__}: {e})"
                else:
                    error = str(failure)
        if self.distributed:  # the other ranks must not count a save complete whose marker rank 0 failed to write
            shared = [error]
            dist.broadcast_object_list(shared, src=0, group=self._save_group)
            error = shared[0]
        if bug is not None:
            raise bug
        if error is not None:
            raise self._storage_failed(path, error)

    def _own_checksums(self, path: Path) -> tuple[dict[str, str], str | None]:
        """The CRC-32s of the files this rank wrote (``__{rank}_*.distcp``; rank 0 also .metadata), or the error
        line of a storage failure reading them back (an I/O error), which fails the save on every rank."""
        if not self.record_checksums:
            return {}, None
        own = sorted(path.glob(f"__{self.rank}_*.distcp")) + ([path / ".metadata"] if self.rank == 0 else [])
        try:
            return checksum_files(own), None
        except OSError as e:
            failure = save_failure(e, path, self.folder)
            if failure is None:
                raise
            return {}, str(failure)

    def _write_marker(self, step: int, path: Path, checksums: dict[str, str]) -> None:
        marker = {"step": step, "world_size": self.world_size, "model": self.model_config,
                  "async_mode": self.cfg.async_mode, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "data": self.data_identity()}
        write_marker(path, marker, checksums if self.record_checksums else None)

    def _finish(self, step: int, path: Path, started: float, blocking_s: float) -> None:
        """Bookkeeping of a completed save (main thread): purge, stats, log."""
        if self.rank == 0:
            self._purge(path)
        self._last_saved = step
        total = time.perf_counter() - started
        self.save_stats.append({"step": step, "blocking_s": blocking_s, "total_s": total})
        self._log(f"saved {path} in {total:.2f} s (training blocked {blocking_s:.2f} s)")

    def _purge(self, saved: Path) -> None:
        """keep_latest_k: deletes all but the newest k complete checkpoints, and incomplete folders older than
        the newest complete one (leftovers of crashed saves). Never the one just ``saved``: a run resumed from an
        older step (checkpoint.load_step) has newer checkpoints of its abandoned past, which must not push out
        its own."""
        k = self.cfg.keep_latest_k
        if k <= 0:
            return
        folders = step_folders(self.folder)
        complete = [p for _, p in folders if is_complete(p)]
        newest = max((s for s, p in folders if is_complete(p)), default=-1)
        doomed = [p for p in complete[:-k] if p != saved] + [p for s, p in folders if s < newest and not is_complete(p)]
        for path in doomed:
            remove_checkpoint(path, ignore_errors=True)

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self._barrier_group)

    # -- the training loop's calls ------------------------------------------------------------------------------

    def save_due(self, step: int, last: bool) -> bool:
        """Whether :meth:`step_end` saves ``step`` (on interval or at the last step) unless the loop stops."""
        return self.cfg.enable and (last or (self.cfg.interval > 0 and step % self.cfg.interval == 0))

    def step_end(self, step: int, tokens_seen: int, last: bool, stop: bool = False,
                 last_loss: float | None = None) -> None:
        """After each step: finishes a completed async save, and saves on interval, at the last step, or when the
        loop stops early (``stop``: SIGTERM/SIGUSR1, a non-finite step under on_nonfinite = "stop"), then
        blocking, so the state is on disk before the process ends. Call it once the step's update is known to
        be finite: no checkpoint may hold a non-finite one. ``last_loss``: the latest logged training loss, None
        while this process has logged none (the resumed checkpoint's is kept then)."""
        self._poll()
        self.tokens_seen = tokens_seen
        if last_loss is not None:
            self.last_loss = last_loss
        if self._stager is not None and self._stager.pin_memory and not self._reserved and self.optimizer.state:
            # Once Adam's state exists (after the first applied update: asking for the state dict of an optimizer
            # without state would make torch take a zero step): pin the staging buffers in the background now
            # rather than inside the first save, where it would stall training for seconds.
            state = tensor_state(self.model, self.optimizer)
            state.pop("_optim_extras")
            self._stager.reserve(state)
            self._reserved = True
        if stop or self.save_due(step, last):
            if step != self._last_saved:
                self.save(step, tokens_seen, blocking=stop)
            elif stop:
                self.wait()

    def close(self, step: int, export: bool) -> None:
        """End of training: waits for saves in flight, exports the final weights (``export``: the run completed
        with every update finite) when checkpointing is on, with the tokens seen and the latest logged loss that
        :meth:`step_end` or the resumed checkpoint gave, and stops the writer thread. Collective."""
        try:
            self.wait()
            if export and self.cfg.enable:
                start = time.perf_counter()
                tokenizer = export_tokenizer(self.tokenizer_path, self.data_identity()) if self.rank == 0 else ""
                export_model(self.model, self.model_config, self.export_folder, self.cfg.export_dtype, step,
                             tokenizer, self.tokens_seen, self.last_loss)
                self._log(f"exported step {step} ({self.cfg.export_dtype}) to {self.export_folder} in "
                          f"{time.perf_counter() - start:.2f} s")
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
            self._stager = None
