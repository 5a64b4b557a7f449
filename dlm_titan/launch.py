"""``python -m dlm_titan.launch <torchrun arguments>``: torchrun, ending as the trainers end (run_train.sh uses it).

torchrun reports any trainer that exits non-zero with its ``ChildFailedError`` traceback and exit 1, and Ctrl-C
with its ``SignalException`` traceback and exit 1. For bad input found by the trainers once started (a shard whose
ids do not fit, a validation set read by rank 0 only) and for Ctrl-C, every trainer concerned has already printed
its one ``error:`` line: the launcher then exits 2 (bad input) or 130 (interrupted) as a single process does,
without the traceback that buries that line. Anything else (a bug, a killed rank, SIGTERM) ends as torchrun's own.
"""

from __future__ import annotations

import signal
import sys

from dlm_titan.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR

# The trainers' own one-line endings (dlm_titan.train.main): bad input and Ctrl-C.
_TRAINER_CODES = (EXIT_USER_ERROR, EXIT_INTERRUPTED)


def main(argv: list[str] | None = None) -> int:
    """Runs torchrun with ``argv``; returns 0, 2 or 130, or raises torchrun's own error."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(sys.argv[1:] if argv is None else argv)
    except ChildFailedError as e:
        # A trainer that said why it stopped decides (bad input first); the other ranks' failures follow from it
        # (stopped by the agent, or failing in a collective with the rank that left) and their code says nothing.
        codes = {failure.exitcode for failure in e.failures.values()}
        own = next((code for code in _TRAINER_CODES if code in codes), None)
        if own is None:
            raise
        return own
    except SignalException as e:
        if e.sigval != signal.SIGINT:  # SIGTERM/SIGUSR1 saved and stopped: torchrun's ending, as documented
            raise
        return EXIT_INTERRUPTED  # the trainers printed Ctrl-C's line
    return 0


if __name__ == "__main__":
    sys.exit(main())
