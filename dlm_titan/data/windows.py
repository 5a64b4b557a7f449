"""Fixed-length token windows addressed by index over the shards of one prefix.

Window ``i`` of a shard is tokens ``[i * w, (i + 1) * w)`` with ``w = seq_len + 1``; a shard of ``c`` tokens
holds ``c // w`` windows and windows never cross shard boundaries (TinyLlama's blocks do the same). The tail of
each shard (< w tokens, 0 for the default 2049*1024 chunk at seq_len 2048) is not used. The windows of a prefix
are numbered shard after shard in sorted file-name order.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from dlm_titan.errors import UserError

from .shards import ShardInfo, list_shards, open_shard, read_header

_MAX_OPEN = 256  # memory maps kept open per process (each holds a file descriptor)


class WindowSet:
    """The ``seq_len + 1`` windows of every shard matching ``prefix`` in ``folder``.

    Headers and sizes of all shards are validated here; each shard's token ids are checked against
    ``vocab_size`` the first time a process maps it (one fast ``max`` per shard).
    """

    def __init__(self, folder: str, prefix: str, window: int, vocab_size: int | None):
        self.prefix = prefix
        self.window = window
        self.vocab_size = vocab_size
        self.infos: list[ShardInfo] = [read_header(p) for p in list_shards(folder, prefix)]
        per_file = np.array([info.chunk_size // window for info in self.infos], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(per_file)])
        self.num_windows = int(self.starts[-1])
        if self.num_windows == 0:
            longest = max(info.chunk_size for info in self.infos)
            raise UserError(f"shards {prefix}*.bin in {folder} hold no window of seq_len + 1 = {window} tokens "
                            f"(longest shard: {longest} tokens); lower training.seq_len or prepare with a larger "
                            "--chunk_size")
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        self._checked: set[int] = set()

    def __getstate__(self) -> dict:
        # memory maps are per process: workers re-open what they need
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def _tokens(self, f: int) -> np.ndarray:
        mm = self._open.get(f)
        if mm is None:
            check = None if f in self._checked else self.vocab_size
            mm = open_shard(self.infos[f], check)
            self._checked.add(f)
            if len(self._open) >= _MAX_OPEN:
                self._open.popitem(last=False)
            self._open[f] = mm
        else:
            self._open.move_to_end(f)
        return mm

    def check_all_ids(self) -> None:
        """Checks every shard's token ids now rather than at its first read (for small sets: a validation set's
        bad id would otherwise surface at the first validation, possibly hours into a run)."""
        for f in range(len(self.infos)):
            self._tokens(f)

    def read(self, ids: np.ndarray, out: np.ndarray) -> None:
        """Copy windows ``ids`` (global window indices) into the rows of ``out`` (shape ``[len(ids), window]``)."""
        files = np.searchsorted(self.starts, ids, side="right") - 1
        offsets = (ids - self.starts[files]) * self.window
        w = self.window
        for row, (f, off) in enumerate(zip(files.tolist(), offsets.tolist(), strict=True)):
            out[row] = self._tokens(f)[off : off + w]
