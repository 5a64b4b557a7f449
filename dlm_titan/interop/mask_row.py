"""The mask token's embedding row when weights cross objectives.

A masked diffusion model's embedding has ``vocab_size + 1`` rows (the last one the mask token); the autoregressive
baseline's (``training.objective = "ar"``) and a Llama's have ``vocab_size``. Weights of one kind initialise a
model of the other (``checkpoint.initial_load_path``) with that row added or dropped; everything else maps one to
one. The added row is the mean of the token embeddings: an input of the embedding's own scale that favours no
token (the head never predicts it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

EMBEDDING = "tok_embeddings.weight"


def with_mask_row(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the mean of the token embeddings appended to the embedding as the mask token's row."""
    emb = state[EMBEDDING]
    row = emb.float().mean(dim=0, keepdim=True).to(emb.dtype)
    return {**state, EMBEDDING: torch.cat([emb, row])}


def match_objective(cfg: dict[str, Any], state: dict[str, torch.Tensor], causal: bool,
                    log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state) of weights ``cfg`` / ``state`` made to fit a model that is ``causal`` or not: the mask row
    added (causal weights into a diffusion model) or dropped (the reverse), said through ``log``; unchanged when
    the kinds agree."""
    source = bool(cfg.get("causal", False))
    if source == causal:
        return cfg, state
    if causal:
        state = {**state, EMBEDDING: state[EMBEDDING][: int(cfg["vocab_size"])]}
        note = "a masked diffusion model's weights: its mask-token embedding row dropped"
    else:
        state = with_mask_row(state)
        note = "an autoregressive model's weights: a mask-token embedding row added (the mean of the token embeddings)"
    log(f"initialized from {note}")
    return {**cfg, "causal": causal}, state
