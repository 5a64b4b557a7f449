"""Checkpoints: one entry point for the trainer, :class:`CheckpointManager` (manager.py: DCP save and resume of
the whole training state, async saves, crash safety), what a checkpoint holds (state.py), the on-disk layout and
completion markers (layout.py), async staging (staging.py), and model weights in and out of training
(export.py: safetensors export, ``load_model`` for inference)."""

from dlm_titan.checkpoint.manager import CheckpointManager

__all__ = ["CheckpointManager"]
