"""GPU tests of RoPE's Triton backward at training shapes (skipped without CUDA): bf16 through cuDNN attention's
gradient layouts, against float64 math."""

import pytest
import torch
import torch.nn.functional as F
from dlm_kernels.rope import rope_qkv

from dlm_titan.models.attention import rope_cache

pytestmark = pytest.mark.gpu


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("heads,head_dim", [(12, 64), (14, 128)])  # 170M, 1028M
def test_qkv_gradient_through_attention_matches_float64(heads, head_dim):
    g = torch.Generator(device="cuda").manual_seed(head_dim)
    B, L = 2, 2048
    qkv = torch.randn(B, L, 3, heads, head_dim, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    rope = rope_cache(L, head_dim, 10000.0, device=torch.device("cuda"))
    grad_out = torch.randn(B, L, heads, head_dim, device="cuda", generator=g).to(torch.bfloat16)

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    attention(*rope_qkv(qkv, rope)).backward(grad_out)
    x = qkv.detach().double().requires_grad_()
    cos, sin = (r[:, None, :].to(torch.bfloat16).double() for r in rope)

    def rot(t):
        t1, t2 = t.chunk(2, dim=-1)
        return t * cos + torch.cat([-t2, t1], dim=-1) * sin

    attention(rot(x[:, :, 0]), rot(x[:, :, 1]), x[:, :, 2]).backward(grad_out.double())
    assert qkv.grad.dtype == torch.bfloat16 and _rel(qkv.grad, x.grad) < 2e-2  # bf16 attention and roundings
    for slot in range(3):
        assert _rel(qkv.grad[:, :, slot], x.grad[:, :, slot]) < 2e-2


def test_kernel_rounds_like_its_twin():
    """The kernel against its PyTorch twin in bf16 (cuDNN's transposed gradient layout for dq): the same tables
    rounded to bf16 and one rounding per output, so nearly every element is bitwise equal (fused multiply-adds
    can move a near-tie by one bf16 step); against unrounded tables about a quarter of them differ."""
    from dlm_kernels.rope import rope_qkv_backward_reference, rope_qkv_bwd

    g = torch.Generator(device="cuda").manual_seed(0)
    B, L, H, D = 2, 2048, 12, 64
    dq = torch.randn(B, H, L, D, device="cuda", generator=g).to(torch.bfloat16).transpose(1, 2)
    dk, dv = (torch.randn(B, L, H, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
    rope = rope_cache(L, D, 10000.0, device=torch.device("cuda"))
    got = rope_qkv_bwd(dq, dk, dv, rope)
    assert got.shape == (B, L, 3, H, D) and torch.equal(got[:, :, 2], dv)
    rounded = rope_qkv_backward_reference(dq, dk, dv, rope)
    unrounded = rope_qkv_backward_reference(dq.float(), dk.float(), dv.float(), rope).to(torch.bfloat16)
    for slot in range(2):
        assert (got[:, :, slot] == rounded[:, :, slot]).float().mean() > 0.99
        assert (got[:, :, slot] == unrounded[:, :, slot]).float().mean() < 0.95
