"""A TensorBoard event file written on the calling thread.

``torch.utils.tensorboard.SummaryWriter`` writes from a background thread: when the disk fills up, that thread
dies with a traceback on stderr and the next ``add_scalar`` raises in the training loop. Written here instead,
an error (ENOSPC, a vanished mount) surfaces where the metrics logger catches it, warns once and stops writing
TensorBoard, and the run goes on. The file is the same format (TFRecord-framed ``Event`` protos) that
TensorBoard, ``EventAccumulator`` and ``dlm_titan.scaling`` read.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard.summary import scalar


class EventFileWriter:
    """Scalars into ``{log_dir}/events.out.tfevents.<time>.<host>.<pid>.0`` (SummaryWriter's name), flushed at
    each :meth:`flush`. Raises OSError when the file cannot be created or written."""

    def __init__(self, log_dir: Path):
        log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.0"
        self._file = open(log_dir / name, "wb")  # noqa: SIM115 - closed by close()
        self._records = RecordWriter(self._file)
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._write(Event(wall_time=time.time(), step=step, summary=scalar(tag, value)))

    def _write(self, event: Event) -> None:
        self._records.write(event.SerializeToString())

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
