"""Causal attention on every GPU backend (skipped without CUDA): bf16 outputs against float64 softmax with an
explicit causal mask."""

import math

import pytest
import torch

from dlm_titan.models.attention import Attention, rope_cache

pytestmark = pytest.mark.gpu


def _backends():
    names = ["cudnn", "flash", "efficient", "math"]
    try:
        import flash_attn  # noqa: F401

        names.append("flash_attn")
    except ImportError:
        pass
    return names


@pytest.mark.parametrize("backend", _backends())
def test_causal_attention_matches_float64(backend):
    if backend == "cudnn" and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("cuDNN attention needs sm80+")
    dim, heads, length = 768, 12, 256  # 170M's heads
    g = torch.Generator(device="cuda").manual_seed(0)
    attn = Attention(dim, heads, backend=backend, causal=True).cuda().to(torch.bfloat16)
    with torch.no_grad():
        attn.wqkv.weight.normal_(0, 0.05, generator=g)
        attn.wo.weight.normal_(0, 0.05, generator=g)
    x = torch.randn(2, length, dim, device="cuda", generator=g).to(torch.bfloat16)
    rope = rope_cache(length, dim // heads, 10000.0, device=torch.device("cuda"))
    with torch.no_grad():
        out = attn(x, rope).double()
    hd = dim // heads
    q, k, v = (x.double() @ attn.wqkv.weight.double().t()).view(2, length, 3, heads, hd).unbind(2)
    cos, sin = (r[:, None, :].double() for r in rope)

    def rotate(t):
        t1, t2 = t.chunk(2, dim=-1)
        return t * cos + torch.cat([-t2, t1], dim=-1) * sin

    scores = torch.einsum("blhd,bmhd->bhlm", rotate(q), rotate(k)) / math.sqrt(hd)
    allowed = torch.ones(length, length, dtype=torch.bool, device="cuda").tril()
    ref = torch.einsum("bhlm,bmhd->blhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)
    ref = ref.reshape(2, length, dim) @ attn.wo.weight.double().t()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, f"{backend}: relative error {rel:.3g}"
