"""The on-disk layout of checkpoints, at its import path in the checkpoint package: the code is in
:mod:`dlm_titan.checkpoint_layout`, below both this package and dlm_titan.interop (which reads markers too and
which this package imports), so that the two packages import one way."""

from dlm_titan.checkpoint_layout import (
    MARKER,
    checkpoint_folder_of,
    damaged,
    find_checkpoint,
    is_complete,
    is_dcp_folder,
    newest_complete,
    print_warning,
    read_dcp_metadata,
    read_marker,
    remove_checkpoint,
    single_process_dcp,
    step_folders,
    verify_checksums,
    write_marker,
)

__all__ = ["MARKER", "checkpoint_folder_of", "damaged", "find_checkpoint", "is_complete", "is_dcp_folder",
           "newest_complete", "print_warning", "read_dcp_metadata", "read_marker", "remove_checkpoint",
           "single_process_dcp", "step_folders", "verify_checksums", "write_marker"]
