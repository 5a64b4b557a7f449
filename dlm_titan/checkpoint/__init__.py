"""Checkpoints: one entry point for the trainer, :class:`CheckpointManager` (manager.py: DCP save of the whole
training state, async saves, crash safety; it delegates loading to resume.py: resume, its checks, and
``initial_load_path`` weights), what a checkpoint holds (state.py), the on-disk layout and completion markers
(:mod:`dlm_titan.checkpoint_layout`, outside this package: dlm_titan.interop reads markers too), async staging (staging.py), and model weights in and out of training (export.py: safetensors export,
``load_model`` for inference)."""

from dlm_titan.checkpoint.manager import CheckpointManager

__all__ = ["CheckpointManager"]
