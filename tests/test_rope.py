"""RoPE of a fused QKV projection (``dlm_kernels.rope``): values and gradients against float64 complex-rotation
math written here, the op's schema and fake implementation, and its checks. CPU: the PyTorch twin runs (the
Triton kernel has its own interpreted tests in ``test_rope_kernel.py`` and GPU tests in ``test_rope_gpu.py``)."""

import pytest
import torch
from dlm_kernels.rope import rope_qkv, rope_qkv_backward_reference, rope_qkv_bwd

from dlm_titan.models.attention import rope_cache

B, L, H, D = 2, 7, 3, 8


def _angles(seq: int, dim: int) -> torch.Tensor:
    """pos * theta_i, theta_i = 10000^(-2i/dim), float64 [seq, dim/2]."""
    return torch.arange(seq, dtype=torch.float64)[:, None] / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def _rotate64(x: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """(x_i, x_{i+D/2}) as a complex number times e^{i sign pos theta_i}, float64."""
    half = x.shape[-1] // 2
    angle = _angles(x.shape[1], x.shape[-1])[:, None, :]
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.exp(1j * sign * angle)
    return torch.cat([z.real, z.imag], dim=-1)


def _qkv(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, 3, H, D, generator=g).to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_and_gradients_match_complex_rotation(dtype):
    """Forward: q, k rotated by +angle, v untouched (a view of qkv). Backward: a rotation is orthogonal, so the
    gradient of q, k is the upstream gradient rotated by -angle; v's passes through."""
    qkv = _qkv(dtype)
    # float64 tables written here (rope_cache computes in fp32; test_model checks it), longer than the sequence
    angle = torch.cat([_angles(L + 5, D)] * 2, dim=-1)
    rope = torch.stack([angle.cos(), angle.sin()]).to(dtype)
    q, k, v = rope_qkv(qkv, rope)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(q.double(), _rotate64(qkv[:, :, 0].detach()), **tol)
    torch.testing.assert_close(k.double(), _rotate64(qkv[:, :, 1].detach()), **tol)
    assert v.data_ptr() == qkv[:, :, 2].data_ptr() and torch.equal(v, qkv[:, :, 2])
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(B, L, H, D, generator=g).to(dtype) for _ in range(3)]
    torch.autograd.backward([q, k, v], grads)
    expected = torch.stack([_rotate64(grads[0], -1.0), _rotate64(grads[1], -1.0), grads[2].double()], dim=2)
    torch.testing.assert_close(qkv.grad.double(), expected, **tol)


def _back_bf16(dy: torch.Tensor, rope: torch.Tensor, round_tables: bool) -> torch.Tensor:
    """float64 math of the backward of q or k, over tables rounded to bf16 (as the forward uses them) or not,
    rounded once to bf16."""
    half = dy.shape[-1] // 2
    cos, sin = (r[: dy.shape[1], None, :half] for r in rope)
    if round_tables:
        cos, sin = cos.to(torch.bfloat16), sin.to(torch.bfloat16)
    cos, sin, dy = cos.double(), sin.double(), dy.double()
    dx = torch.cat([dy[..., :half] * cos + dy[..., half:] * sin, dy[..., half:] * cos - dy[..., :half] * sin], dim=-1)
    return dx.to(torch.bfloat16)


def test_bf16_backward_rounds_the_tables_like_the_forward():
    """In bf16 the forward multiplies by cos and sin rounded to bf16, so the backward must use the same rounded
    tables: each output then equals float64 math over the rounded tables, rounded once to bf16 (all elements at
    L=512, D=64); over unrounded tables a quarter of them would differ, which the second check confirms."""
    g = torch.Generator().manual_seed(2)
    dq, dk, dv = (torch.randn(2, 512, 2, 64, generator=g).to(torch.bfloat16) for _ in range(3))
    rope = rope_cache(512, 64, 10000.0)
    got = rope_qkv_backward_reference(dq, dk, dv, rope)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 512, 3, 2, 64)
    assert torch.equal(got[:, :, 2], dv)
    for slot, dy in enumerate((dq, dk)):
        assert (got[:, :, slot] == _back_bf16(dy, rope, round_tables=True)).float().mean() > 0.999
        assert (got[:, :, slot] == _back_bf16(dy, rope, round_tables=False)).float().mean() < 0.9


def test_op_passes_opcheck():
    """Schema and fake (meta) implementation of the backward op, with cuDNN-like transposed gradient layouts."""
    dq = torch.randn(B, H, L, D).transpose(1, 2)
    dk, dv = torch.randn(B, L, H, D), torch.randn(B, L, H, D)
    torch.library.opcheck(rope_qkv_bwd, (dq, dk, dv, rope_cache(L, D, 10000.0)),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_shapes_are_refused():
    rope = rope_cache(L, D, 10000.0)
    with pytest.raises(ValueError, match=r"qkv must be \[B, L, 3, H, D\]"):
        rope_qkv(torch.randn(B, L, 2, H, D), rope)
    with pytest.raises(ValueError, match="rope must be"):
        rope_qkv(torch.randn(B, L + 1, 3, H, D), rope)

