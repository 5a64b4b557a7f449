"""Checkpoints: DCP save and resume of the whole training state (manager.py), the on-disk layout and completion
markers (layout.py), async staging (staging.py) and model weights in and out of training (export.py)."""

from dlm_titan.checkpoint.manager import CheckpointManager, reposition

__all__ = ["CheckpointManager", "reposition"]
