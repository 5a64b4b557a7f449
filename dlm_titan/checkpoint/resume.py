"""The load side of checkpoints: a resume of the whole training state, or model weights only.

A resume takes the newest complete ``step-N`` (or ``checkpoint.load_step``) and refuses, with one line and exit 2,
what it cannot continue: another model or objective, other training shards (unless
``checkpoint.accept_data_change``), files whose CRC-32 differs from the marker's, weights holding NaN or inf.
``checkpoint.initial_load_path`` loads model weights only: a DCP checkpoint (resharded), an export, or the
formats of :mod:`dlm_titan.interop`. The checkpoint manager (manager.py) decides which and delegates here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from dlm_titan.checkpoint.export import is_export_folder, read_model_weights
from dlm_titan.checkpoint.state import (
    BLOB_KEYS,
    TRAIN_STATE,
    first_nonfinite,
    from_json_tensor,
    load_optimizer,
    tensor_state,
)
from dlm_titan.checkpoint_layout import (
    damaged,
    find_checkpoint,
    is_complete,
    is_dcp_folder,
    newest_complete,
    print_warning,
    read_dcp_metadata,
    read_marker,
    single_process_dcp,
    step_folders,
    verify_checksums,
)
from dlm_titan.data.identity import describe_change
from dlm_titan.errors import UserError
from dlm_titan.interop.formats import interop_kind
from dlm_titan.interop.mask_row import match_objective

_SHAPE_KEYS = ("n_layers", "n_heads", "dim", "ffn_dim", "vocab_size")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job and the gloo groups of a load's collectives.

    Attributes:
        distributed: more than one process.
        rank, world_size: this process's rank and the number of processes.
        dcp_group: the group of DCP's own collectives (the manager's save group).
        agree_group: the main thread's group, for the agreements on verification results.
    """

    distributed: bool
    rank: int
    world_size: int
    dcp_group: dist.ProcessGroup | None
    agree_group: dist.ProcessGroup | None


def resume_folder(folder: Path, load_step: int, warn: bool) -> Path | None:
    """The checkpoint a resume loads: ``step-{load_step}`` when ``load_step`` >= 0 (UserError when there is no
    such folder; :func:`read_marker` refuses it later when incomplete or damaged), else the newest complete one
    (None: a fresh start)."""
    if load_step >= 0:
        path = folder / f"step-{load_step}"
        if not path.is_dir():
            have = [s for s, p in step_folders(folder) if is_complete(p)]
            raise UserError(f"checkpoint.load_step = {load_step}: no {path}; complete checkpoints: {have or 'none'}")
        return path
    return newest_complete(folder, warn=warn)


def _model_fields(c: dict[str, Any]) -> dict[str, Any]:
    """What of a recorded model config must match for its weights to be this model's: the tensor shapes and the
    constants that are no tensor (RoPE base, RMSNorm epsilon). Markers written before grouped-query attention have
    no n_kv_heads (one key/value head per query head); missing constants are the defaults models are built with."""
    return {**{k: c.get(k) for k in _SHAPE_KEYS}, "n_kv_heads": c.get("n_kv_heads") or c.get("n_heads"),
            "rope_theta": float(c.get("rope_theta", 10000.0)), "norm_eps": float(c.get("norm_eps", 1e-5))}


RESUME_FIX = ("resume with the model that saved it (its model.flavor and model.vocab_size, or the "
              "checkpoint.initial_load_path that shaped it) or use another dump_folder")
INITIAL_FIX = ("set model.flavor and model.vocab_size to that model's, or pass a checkpoint.initial_load_path "
               "that holds this run's model")


def check_model(this: dict[str, Any], saved: dict[str, Any], where: Path, fix: str = RESUME_FIX) -> None:
    """Refuses a checkpoint whose model config ``saved`` differs from this run's ``this`` in a shape or a constant:
    one line naming each differing field with both values, then ``fix``."""
    if not saved:
        return
    ours, theirs = _model_fields(this), _model_fields(saved)
    differ = [k for k in ours if theirs[k] != ours[k]]
    if differ:
        raise UserError(f"{where} holds a {saved.get('flavor') or 'custom-shape'} model with "
                        f"{', '.join(f'{k} = {theirs[k]}' for k in differ)} but this run builds a "
                        f"{this.get('flavor') or 'custom-shape'} model with "
                        f"{', '.join(f'{k} = {ours[k]}' for k in differ)}; {fix}")


def other_objective(this: dict[str, Any], saved: dict[str, Any]) -> bool:
    """Whether a checkpoint's model config records the other objective (causal or not) than this run's."""
    return bool(saved) and bool(saved.get("causal")) != bool(this.get("causal"))


def check_objective(this: dict[str, Any], saved: dict[str, Any], where: Path) -> None:
    """A checkpoint of this trainer records whether its model is causal (training.objective = "ar")."""
    saved_objective, objective = ("ar" if saved.get("causal") else "mdm"), ("ar" if this.get("causal") else "mdm")
    if saved and saved_objective != objective:
        raise UserError(f"{where} holds a model trained with training.objective = {saved_objective!r} but this run "
                        f"trains {objective!r}; use the same objective or another dump_folder")


def check_data(marker: dict[str, Any], identity: dict[str, Any], step_dir: Path, accept_change: bool) -> None:
    """A resume continues the saved sample stream only over the same shards (markers without "data": none);
    ``accept_change`` (checkpoint.accept_data_change) turns the refusal into a warning."""
    change = describe_change(marker["data"], identity) if "data" in marker else None
    if change is None:
        return
    if not accept_change:
        raise UserError(f"the training data changed since {step_dir} was saved: {change}; restore the saved "
                        "shards, or resume on the new ones with --checkpoint.accept_data_change")
    print_warning(f"the training data changed since {step_dir} was saved ({change}); continuing from the saved "
                  "sample position over the new shards with their epoch order recomputed "
                  "(checkpoint.accept_data_change): the sample stream differs from the saved run's")


class CheckpointLoader:
    """Loads checkpoints into the training objects (collective: every rank calls the same methods).

    Args:
        cfg: the ``checkpoint`` section of the JobConfig (uses accept_data_change).
        model, optimizer, lr_scheduler, data_loader: the training objects (model possibly FSDP2-sharded).
        model_config: this run's model description (``models.model_config``), compared with the marker's.
        data_identity: this run's training shards' identity (``CheckpointManager.data_identity``).
        ranks: this process's rank and the groups of the collectives.
        log: prints one line on rank 0.
    """

    def __init__(self, cfg, model: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler, data_loader,
                 model_config: dict[str, Any], data_identity: Callable[[], dict[str, Any]], ranks: Ranks,
                 log: Callable[[str], None]):
        self.cfg = cfg
        self.model, self.optimizer, self.lr_scheduler, self.data_loader = model, optimizer, lr_scheduler, data_loader
        self.model_config = model_config
        self.data_identity = data_identity
        self.ranks = ranks
        self.log = log
        self.saved_layout: dict[str, Any] | None = None
        """The resumed checkpoint's loader layout (batch sizes, ranks), once load_full has read it."""

    def load_full(self, step_dir: Path) -> tuple[int, int, float | None]:
        """Restores model, optimizer, lr scheduler and data loader from ``step_dir`` after checking that it is
        this run's model, objective and data and that its files are intact; returns (step, tokens_seen,
        last_loss), the last the latest logged training loss (None in checkpoints that predate it)."""
        start = time.perf_counter()
        marker = read_marker(step_dir)
        self._check_marker_model(marker.get("model", {}), step_dir)
        check_data(marker, self.data_identity(), step_dir, self.cfg.accept_data_change)
        self._verify(step_dir, marker)
        metadata = read_dcp_metadata(step_dir)
        sizes = {k: v.size for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}
        state = tensor_state(self.model, self.optimizer)
        optim_extras = state.pop("_optim_extras")
        for key in BLOB_KEYS:
            state[key] = torch.empty(sizes[key], dtype=torch.uint8)
        self._dcp_load(state, step_dir)
        train_state = from_json_tensor(state[TRAIN_STATE])
        self._check_finite(state["model"], step_dir)
        set_model_state_dict(self.model, state["model"])
        load_optimizer(self.model, self.optimizer, state["optimizer"], optim_extras,
                       from_json_tensor(state["optimizer_groups"]))
        self.lr_scheduler.load_state_dict(from_json_tensor(state["lr_scheduler"]))
        self._load_data_loader(step_dir, train_state, sizes)
        step, tokens = int(train_state["step"]), int(train_state["tokens_seen"])
        self.log(f"resumed from {step_dir} (step {step}, {tokens:,} tokens, saved by {train_state['world_size']} "
                 f"ranks) in {time.perf_counter() - start:.2f} s")
        last_loss = train_state.get("last_loss")
        return step, tokens, None if last_loss is None else float(last_loss)

    def load_weights(self, path: Path) -> None:
        """Model weights only (``initial_load_path``): DCP checkpoints load resharded, exports as full tensors."""
        if not path.exists():
            raise UserError(f"checkpoint.initial_load_path {path} does not exist")
        step_dir = None
        if not is_export_folder(path) and interop_kind(path) is None:
            step_dir = path if is_dcp_folder(path) else find_checkpoint(path, warn=self.ranks.rank == 0)
        marker = read_marker(step_dir) if step_dir is not None else {}
        if step_dir is not None and other_objective(self.model_config, marker.get("model", {})):
            path, step_dir = step_dir, None  # read whole below, the mask-token row added or dropped
        if step_dir is not None:
            self._load_dcp_weights(step_dir, marker)
        else:
            cfg, full = read_model_weights(path)
            check_model(self.model_config, cfg, path, INITIAL_FIX)
            cfg, full = match_objective(cfg, full, bool(self.model_config.get("causal")), self.log)
            set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True))
        self.log(f"initialized model weights from {step_dir or path} (optimizer, schedule and data start fresh)")

    def _load_dcp_weights(self, step_dir: Path, marker: dict[str, Any]) -> None:
        """The model weights of a DCP checkpoint of this run's objective (``marker``: its read marker), resharded
        to this run's layout."""
        self._check_marker_model(marker.get("model", {}), step_dir, INITIAL_FIX)
        self._verify(step_dir, marker)
        read_dcp_metadata(step_dir)  # UserError when damaged
        state = {"model": get_model_state_dict(self.model)}
        self._dcp_load(state, step_dir)
        self._check_finite(state["model"], step_dir)
        set_model_state_dict(self.model, state["model"])

    def _check_marker_model(self, saved: dict[str, Any], step_dir: Path, fix: str = RESUME_FIX) -> None:
        check_model(self.model_config, saved, step_dir, fix)
        check_objective(self.model_config, saved, step_dir)

    def _dcp_load(self, state: dict[str, Any], step_dir: Path) -> None:
        """Loads ``state``'s keys from a checkpoint in place (DCP reshards DTensors to this run's layout)."""
        with single_process_dcp():
            dcp.load(state, checkpoint_id=str(step_dir), process_group=self.ranks.dcp_group,
                     no_dist=not self.ranks.distributed)

    def _agree(self, error: str | None) -> None:
        """Raises UserError with the first rank's ``error`` on every rank (collective), so all ranks exit 2."""
        if self.ranks.distributed:
            errors: list[str | None] = [None] * self.ranks.world_size
            dist.all_gather_object(errors, error, group=self.ranks.agree_group)
            error = next((e for e in errors if e), None)
        if error:
            raise UserError(error)

    def _verify(self, step_dir: Path, marker: dict[str, Any]) -> None:
        """Checks the files' CRC-32s against the marker's, each rank a share of the files (collective)."""
        names = sorted(marker.get("checksums") or {})[self.ranks.rank::self.ranks.world_size]
        try:
            verify_checksums(step_dir, marker, names)
            error = None
        except UserError as e:
            error = str(e)
        self._agree(error)

    def _check_finite(self, model_state: dict[str, Any], step_dir: Path) -> None:
        """Refuses loaded weights that hold NaN or inf (collective: each rank checks its shards)."""
        bad = first_nonfinite(model_state)
        self._agree(None if bad is None else damaged(step_dir, f"its weights hold non-finite values (first: {bad})"))

    def _load_data_loader(self, step_dir: Path, train_state: dict[str, Any], sizes: dict[str, Any]) -> None:
        """The rank's own saved loader state when the layout is unchanged. Under another world size (or worker
        count or micro-batch size) the loader is repositioned at the start of the next step instead: its
        position is global (see :meth:`dlm_titan.data.loader.TrainLoader.reposition`)."""
        rank, world_size = self.ranks.rank, self.ranks.world_size
        own = f"dataloader.rank_{rank}"
        same_world = int(train_state["world_size"]) == world_size
        key = own if same_world and own in sizes else "dataloader.rank_0"
        blob = {"dataloader": {key.split(".", 1)[1]: torch.empty(sizes[key], dtype=torch.uint8)}}
        self._dcp_load(blob, step_dir)
        saved = from_json_tensor(next(iter(blob["dataloader"].values())))
        self.saved_layout = saved.get("layout")
        layout = getattr(self.data_loader, "layout", None)
        if same_world and (layout is None or json.loads(json.dumps(layout)) == saved.get("layout")):
            self.data_loader.load_state_dict(saved)
            return
        if not hasattr(self.data_loader, "reposition"):
            raise UserError("this data loader cannot resume under another world size; resume with the saved one")
        self.data_loader.load_state_dict(self.data_loader.reposition(saved, int(train_state["step"])))
        self.log(f"data loader repositioned at step {train_state['step']} (saved by {train_state['world_size']} "
                 f"ranks, {saved['layout'].get('num_workers')} workers; now {world_size} ranks)")
