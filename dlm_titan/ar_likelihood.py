"""Exact log-likelihoods of an autoregressive (``training.objective = "ar"``) model, batched over many texts.

A causal model gives log p(target | context) exactly, by one forward pass: the input is context + target without
its last token, and position ``len(context) - 1 + i`` predicts target token i. Where the masked diffusion model
needs Monte-Carlo draws for a bound (:mod:`dlm_titan.likelihood`), this is the likelihood itself.

Batching: causal attention lets no position see a later one, so sequences of different lengths share a forward,
right-padded (the padding is never read by a scored position). Texts are taken longest first, ``batch_size``
sequences per forward, and the output head runs only at the scored positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from dlm_titan.likelihood import Tokens

HEAD_ROWS = 4096
"""Scored positions per output-head call: bounds the float32 logits held at once (rows x vocabulary)."""


def _ids(tokens: Tokens | None) -> list[int]:
    if tokens is None:
        return []
    return tokens.reshape(-1).tolist() if isinstance(tokens, torch.Tensor) else [int(t) for t in tokens]


def _score_batch(model: torch.nn.Module, texts: list[tuple[list[int], list[int]]],
                 device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(log p per target token, float64; whether each is the argmax) of texts run as one right-padded forward."""
    width = max(len(c) + len(t) - 1 for c, t in texts)
    inputs = torch.zeros(len(texts), width, dtype=torch.long)
    rows, cols, targets = [], [], []
    for r, (ctx, tgt) in enumerate(texts):
        seq = ctx + tgt
        inputs[r, : len(seq) - 1] = torch.tensor(seq[:-1])
        rows += [r] * len(tgt)
        cols += range(len(ctx) - 1, len(seq) - 1)
        targets += tgt
    hidden = model.hidden_states(inputs.to(device))[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    target = torch.tensor(targets, device=device)
    logp, greedy = [], []
    for start in range(0, len(targets), HEAD_ROWS):
        logits = model.output(hidden[start : start + HEAD_ROWS]).float()
        tgt = target[start : start + HEAD_ROWS]
        logp.append(-F.cross_entropy(logits, tgt, reduction="none"))
        greedy.append(logits.argmax(dim=-1) == tgt)
    logp_all, greedy_all = torch.cat(logp).double().cpu(), torch.cat(greedy).cpu()
    sizes = [len(t) for _, t in texts]
    return list(zip(logp_all.split(sizes), greedy_all.split(sizes), strict=True))


@torch.no_grad()
def next_token_logprob_batch(
    model: torch.nn.Module,
    texts: Sequence[tuple[Tokens | None, Tokens]],
    *,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per target token log p(target_i | context, target_<i) and whether it is the model's argmax, of each
    (context, target) pair.

    Args:
        model: a causal TransEncoder (``hidden_states`` and ``output``).
        texts: (context, target) pairs; the context needs at least one token (the EOS that starts a document, or
            the token before a window), and context + target at most ``model.max_seq_len + 1`` tokens.
        batch_size: sequences per forward.
        progress: called with the number of texts finished after each forward.

    Returns:
        per text, (float64 ``[n]`` log-probabilities, bool ``[n]`` greedy flags), n = its target's length.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pairs = [(_ids(c), _ids(t)) for c, t in texts]
    for ctx, tgt in pairs:
        if not ctx or len(ctx) + len(tgt) - 1 > model.max_seq_len:
            raise ValueError(f"a text of {len(ctx)} context and {len(tgt)} target tokens: the context must be "
                             f"non-empty and the input (context + target - 1) at most {model.max_seq_len} tokens")
    device = next(model.parameters()).device
    out: list[tuple[torch.Tensor, torch.Tensor]] = [(torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool))
                                                    for _ in pairs]
    order = sorted((i for i, (_, t) in enumerate(pairs) if t), key=lambda i: -sum(map(len, pairs[i])))
    if progress is not None and len(order) < len(pairs):
        progress(len(pairs) - len(order))  # empty targets: nothing to score
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, scored in zip(chunk, _score_batch(model, [pairs[i] for i in chunk], device), strict=True):
            out[i] = scored
        if progress is not None:
            progress(len(chunk))
    return out
