"""Multi-head (or grouped-query) self-attention with rotary embeddings (bidirectional, or causal for the AR
baseline), and the choice of attention kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dlm_kernels.rope import apply_rope, rope_qkv
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dlm_titan.errors import UserError

_SDPA = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


# SDPA backends with a CPU kernel; cuDNN, memory-efficient attention and the flash-attn package need CUDA.
_CPU_BACKENDS = ("math", "flash")


def resolve_attn_backend(name: str, device: torch.device) -> str:
    """Maps "auto" to a concrete backend: cuDNN on Hopper (1.5-1.9x the flash backend for bidirectional
    attention there), flash elsewhere on CUDA, math on CPU. Other names pass through after a check.

    Raises:
        UserError: a backend that has no kernel on a CPU device (else the first forward fails with SDPA's
            "No viable backend" traceback), or "flash_attn" without the flash-attn package.
    """
    if device.type == "cpu" and name not in (*_CPU_BACKENDS, "auto"):
        raise UserError(f"model.attn_backend = {name!r} has no CPU kernel; on a CPU use auto, math or flash")
    if name == "flash_attn":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise UserError('model.attn_backend = "flash_attn" needs the flash-attn package: pip install ".[flash]"') from None
        return name
    if name != "auto":
        return name
    if device.type != "cuda":
        return "math"
    major, _ = torch.cuda.get_device_capability(device)
    return "cudnn" if major == 9 else "flash"


def rope_cache(seq_len: int, head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """cos and sin of GPT-NeoX rotary embeddings over the full head dim, stacked: [2, seq_len, head_dim]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return torch.stack([angles.cos(), angles.sin()])


class Attention(nn.Module):
    """Multi-head attention. Without a causal mask (the default, SMDM's MDM) every token sees the whole (packed)
    sequence; with ``causal=True`` (the autoregressive baseline) token i sees tokens 0..i, on every backend.

    ``wqkv`` stacks the q rows (``n_heads * head_dim``), then k, then v (``n_kv_heads * head_dim`` each). With
    ``n_kv_heads < n_heads`` (grouped-query attention, as Llama-family checkpoints) query head h reads key/value
    head ``h // (n_heads // n_kv_heads)``.
    """

    def __init__(self, dim: int, n_heads: int, backend: str = "math", causal: bool = False, n_kv_heads: int = 0):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = dim // n_heads
        self.backend = backend
        self.causal = causal
        # flash-attn's backward accumulates with atomics unless asked for its deterministic kernel: taken from
        # torch's switch (training.deterministic sets it before the model is built), read once here, not per call.
        self.deterministic = torch.are_deterministic_algorithms_enabled()
        self.wqkv = nn.Linear(dim, (n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def _rotated_qkv(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, L, H, D], rotated k and v [B, L, KV, D] of x [B, L, dim]."""
        batch, seq_len, _ = x.shape
        qkv = self.wqkv(x)
        if self.n_kv_heads == self.n_heads:
            # q and k rotated by position; the op's backward writes the projection's gradient in one pass.
            return rope_qkv(qkv.view(batch, seq_len, 3, self.n_heads, self.head_dim), rope)
        q, k, v = qkv.view(batch, seq_len, -1, self.head_dim).split([self.n_heads, self.n_kv_heads, self.n_kv_heads], 2)
        return apply_rope(q, rope), apply_rope(k, rope), v

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        batch, seq_len, dim = x.shape
        q, k, v = self._rotated_qkv(x, rope)
        # flash-attn (as SDPA's flash and cuDNN kernels on CUDA) takes bf16/fp16 only: fp32 (training.dtype
        # float32, or evaluation without autocast) goes to SDPA's memory-efficient kernel. CPU flash takes fp32.
        fp32_on_cuda = q.dtype == torch.float32 and q.device.type == "cuda"
        if self.backend == "flash_attn" and not fp32_on_cuda:
            from flash_attn import flash_attn_func

            # takes fewer key/value heads as they are
            out = flash_attn_func(q, k, v, causal=self.causal, deterministic=self.deterministic)
        else:
            if self.n_kv_heads != self.n_heads:  # each key/value head serves its group of query heads
                k, v = (t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=2) for t in (k, v))
            backend = "efficient" if self.backend in ("cudnn", "flash", "flash_attn") and fp32_on_cuda else self.backend
            # The context sits inside forward so that it also reaches the graph of a compiled block.
            with sdpa_kernel(_SDPA[backend]):
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=self.causal
                ).transpose(1, 2)
        return self.wo(out.reshape(batch, seq_len, dim))
