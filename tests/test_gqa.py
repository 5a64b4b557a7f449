"""Grouped-query attention (n_kv_heads < n_heads, as Llama-family checkpoints) against a float64 reference written
from the definition: query head h attends with key/value head h // (n_heads / n_kv_heads), q and k rotated by
GPT-NeoX RoPE, softmax(q k^T / sqrt(D)) v, bidirectional or causal."""

from __future__ import annotations

import math

import pytest
import torch

from dlm_titan.errors import UserError
from dlm_titan.models import ModelArgs, build_transencoder
from dlm_titan.models.attention import Attention, rope_cache


def reference_attention(x: torch.Tensor, wqkv: torch.Tensor, wo: torch.Tensor, heads: int, kv_heads: int,
                        theta: float, causal: bool) -> torch.Tensor:
    """float64, one head at a time, positions and frequencies computed here (not dlm_titan's tables)."""
    x, wqkv, wo = x.double(), wqkv.double(), wo.double()
    batch, length, dim = x.shape
    d = dim // heads
    q_all, k_all, v_all = (x @ wqkv.T).split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.tensor([theta ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    angle = pos * freq  # [L, D/2]

    def rotate(t: torch.Tensor) -> torch.Tensor:  # pairs (i, i + D/2) rotated by angle i
        a, b = t[..., : d // 2], t[..., d // 2:]
        return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], dim=-1)

    outs = []
    for h in range(heads):
        g = h // (heads // kv_heads)
        q = rotate(q_all[..., h * d:(h + 1) * d])
        k = rotate(k_all[..., g * d:(g + 1) * d])
        v = v_all[..., g * d:(g + 1) * d]
        scores = q @ k.transpose(1, 2) / math.sqrt(d)
        if causal:
            scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(scores.softmax(-1) @ v)
    return torch.cat(outs, dim=-1) @ wo.T


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (6, 3), (4, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_attention_matches_float64_reference(heads, kv_heads, causal):
    dim, length, theta = 48, 11, 500000.0
    attn = Attention(dim, heads, "math", causal=causal, n_kv_heads=kv_heads)
    assert attn.wqkv.weight.shape == ((heads + 2 * kv_heads) * dim // heads, dim)
    x = torch.randn(2, length, dim)
    out = attn(x, rope_cache(16, dim // heads, theta))
    ref = reference_attention(x, attn.wqkv.weight, attn.wo.weight, heads, kv_heads, theta, causal)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-6


def test_gqa_model_trains_and_counts_parameters():
    """A GQA TransEncoder: gradients reach every parameter, and non_embedding_params counts what it holds."""
    args = ModelArgs(2, 4, 32, 64, vocab_size=50, n_kv_heads=2)
    model = build_transencoder(args, 16, "math", "cpu")
    model.to_empty(device="cpu")
    model.init_weights(0)
    tokens = torch.randint(0, 51, (2, 16))
    loss = model(tokens, torch.randint(0, 50, (2, 16)), torch.full((2, 16), 1 / 32))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    held = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("tok_embeddings", "output")))
    assert held == args.non_embedding_params()


def test_bad_gqa_shape_is_a_user_error():
    with pytest.raises(UserError, match="n_kv_heads"):
        ModelArgs(2, 4, 32, 64, n_kv_heads=3)


def test_checkpoint_of_other_key_value_heads_is_refused():
    """A checkpoint whose model differs only in n_kv_heads is one UserError (not a shape error mid-load); markers
    written before n_kv_heads existed read as one key/value head per query head."""
    from pathlib import Path

    from dlm_titan.checkpoint.resume import check_model

    shape = {"flavor": "6M", "n_layers": 6, "n_heads": 4, "dim": 256, "ffn_dim": 1024, "vocab_size": 32000}
    this = {**shape, "n_kv_heads": 4}
    check_model(this, dict(shape), Path("old"))  # no n_kv_heads recorded: multi-head
    check_model(this, {**shape, "n_kv_heads": 4}, Path("same"))
    with pytest.raises(UserError, match="holds"):
        check_model(this, {**shape, "n_kv_heads": 2}, Path("gqa"))
