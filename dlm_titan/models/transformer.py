"""SMDM's TransEncoder: a LLaMA encoder with bidirectional attention and an extra mask-token embedding row."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from dlm_kernels import masked_linear_cross_entropy
from dlm_kernels.add_rms_norm import add_rms_norm
from torch import nn

from dlm_titan.models.attention import Attention, rope_cache
from dlm_titan.models.flavors import ModelArgs

LossFn = Callable[..., torch.Tensor]
"""The loss a forward computes from the head: ``loss_fn(hidden [N, d], head weight [V, d], targets [N],
token_weights [N], masked_index=None)`` -> scalar, ``sum_i w_i CE(hidden_i @ weight^T, targets_i)`` (or per-row
terms, e.g. validation's). The objective decides targets and weights: masked tokens weighted 1 / (p T) for MDM,
every next token weighted 1 / T for the autoregressive baseline."""


def default_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor,
                 masked_index: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted linear cross-entropy with the implementation picked by device (fused Triton kernel on CUDA)."""
    return masked_linear_cross_entropy(hidden, weight, targets, token_weights, impl="auto", masked_index=masked_index)


def _compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype autocast gives matmuls on ``device``, or ``default`` outside autocast."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else default


class FeedForward(nn.Module):
    """SwiGLU: w_down(silu(w_gate x) * w_up x). SMDM (xformers naming) calls these w1, w2, w3."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden_dim, bias=False)
        self.w_up = nn.Linear(dim, hidden_dim, bias=False)
        self.w_down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class AddRMSNorm(nn.Module):
    """RMSNorm that first adds a pending branch output to the residual stream: ``(h, norm(h))`` with
    ``h = x + delta`` (``x`` when ``delta`` is None), in one fused op. ``norm(h)`` comes out in the autocast dtype,
    as the bf16 GEMM that reads it would cast it anyway."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rms_norm(x, delta, self.weight, self.eps, _compute_dtype(x.device, x.dtype))


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)), out = h + mlp(norm(h)).

    The block leaves its last add to the next norm: it takes the previous block's MLP output as ``delta`` (zeros
    for the first block) and returns ``(h, mlp output)``. Each residual add then happens inside the fused
    add + RMSNorm that reads the sum, instead of as a pass of its own between two compiled blocks.
    """

    def __init__(self, args: ModelArgs, attn_backend: str, causal: bool = False):
        super().__init__()
        self.attention_norm = AddRMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args.dim, args.n_heads, attn_backend, causal=causal, n_kv_heads=args.kv_heads)
        self.ffn_norm = AddRMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)

    def forward(self, x: torch.Tensor, delta: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, y = self.attention_norm(x, delta)
        h, y = self.ffn_norm(h, self.attention(y, rope))
        return h, self.feed_forward(y)


class TransEncoder(nn.Module):
    """Embedding (vocab + 1 rows) -> blocks -> RMSNorm -> untied head with vocab outputs (never the mask).

    Build it on the meta device, parallelize it, move it with ``to_empty`` and call :meth:`init_weights`.

    ``causal=True`` gives SMDM's autoregressive baseline from the same flavor: causal attention and an embedding of
    vocab_size rows (no mask token); everything else (shapes, parameter names, init) is the same.
    """

    def __init__(self, args: ModelArgs, max_seq_len: int = 2048, attn_backend: str = "math", causal: bool = False):
        super().__init__()
        self.args = args
        self.max_seq_len = max_seq_len
        self.attn_backend = attn_backend
        self.causal = causal
        self.tok_embeddings = nn.Embedding(args.vocab_size + (0 if causal else 1), args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args, attn_backend, causal) for i in range(args.n_layers)})
        self.norm = AddRMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Not persistent: recomputed by init_weights, so checkpoints hold only parameters.
        self.register_buffer("rope", rope_cache(max_seq_len, args.head_dim, args.rope_theta), persistent=False)

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [B, L, dim] of token ids [B, L] (mask id = vocab_size)."""
        h = self.tok_embeddings(tokens)
        # The first block has no add pending: a zero one, as a branch output would be (its dtype, requires_grad),
        # gives every block the same signature, so one compiled graph serves them all.
        delta = torch.zeros_like(h, dtype=_compute_dtype(h.device, h.dtype)).requires_grad_(h.requires_grad)
        for layer in self.layers.values():
            h, delta = layer(h, delta, self.rope)
        return self.norm(h, delta)[1]

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
        masked_index: torch.Tensor | None = None,
        *,
        loss_fn: LossFn = default_loss,
    ) -> torch.Tensor:
        """Logits [B, L, vocab] of ``tokens``, or, given targets and per-token loss weights, the loss that
        ``loss_fn`` computes from the final hidden states and the head weight (see :data:`LossFn`), inside
        forward, where FSDP has gathered the head. ``masked_index`` (flat indices of the non-zero weights)
        spares the loss a device-to-host sync."""
        h = self.hidden_states(tokens)
        if targets is None:
            return self.output(h)
        weight = self.output.weight
        dtype = _compute_dtype(h.device, weight.dtype)
        extra = {} if masked_index is None else {"masked_index": masked_index}
        return loss_fn(h.flatten(0, 1).to(dtype), weight.to(dtype), targets.flatten(), token_weights.flatten(), **extra)

    @torch.no_grad()
    def init_weights(self, seed: int = 3407) -> None:
        """SMDM init: every Linear and Embedding N(0, sqrt(2 / (5 d))); the attention output and the SwiGLU
        down-projection of each block N(0, 1 / (sqrt(d) * n_layer)); norms 1.

        Each parameter's values come from a generator keyed by (seed, parameter name) and are drawn at full
        size, so initial weights are identical whatever the device count and sharding (DTensor shards copy
        their slice of the full tensor).
        """
        d, n_layer = self.args.dim, self.args.n_layers
        self.rope = rope_cache(self.max_seq_len, self.args.head_dim, self.args.rope_theta, device=self.rope.device)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                _fill_full(param, lambda t: t.fill_(1.0))
                continue
            std = 1.0 / (d**0.5 * n_layer) if name.endswith(("attention.wo.weight", "w_down.weight")) else (2 / (5 * d)) ** 0.5
            gen_seed = seed * 1_000_003 + zlib.crc32(name.encode())
            _fill_full(param, lambda t, s=std, g=gen_seed: t.normal_(0.0, s, generator=_generator(t.device, g)))


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _fill_full(param: torch.Tensor, fill) -> None:
    """Fills a parameter as if unsharded: plain tensors in place, DTensors by filling the full tensor and
    copying out the local slice."""
    if not hasattr(param, "to_local"):
        fill(param.data)
        return
    from torch.distributed.tensor import distribute_tensor

    full = fill(torch.empty(param.shape, dtype=param.dtype, device=param.to_local().device))
    shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    param.to_local().copy_(shard.to_local())
