"""CPU tests of the RoPE backward Triton kernel under TRITON_INTERPRET=1 (in a process of their own, see
``interpreted.py``): fp32, tiny grids, against float64 math written here."""

import pytest
import torch

pytest.importorskip("triton")

from dlm_kernels import rope_triton as K  # noqa: E402
from interpreted import replace_unless_interpreted  # noqa: E402


def _expected(dq, dk, dv, rope):
    L, half = dq.shape[1], dq.shape[-1] // 2
    cos, sin = (r[:L, None, :].double() for r in rope)

    def back(dy):
        dy = dy.double()
        return torch.cat([dy[..., :half] * cos[..., :half] + dy[..., half:] * sin[..., half:],
                          dy[..., half:] * cos[..., half:] - dy[..., :half] * sin[..., :half]], dim=-1)

    return torch.stack([back(dq), back(dk), dv.double()], dim=2)


# 24: half of 12 in a 16-wide tile, the last 4 columns masked; a bf16 table under fp32 gradients (the kernel rounds
# the table to the gradients' dtype, here a widening)
@pytest.mark.parametrize("D,table_dtype", [(16, torch.float32), (24, torch.float32), (16, torch.bfloat16)])
def test_kernel_matches_float64_with_strided_gradients(D, table_dtype):
    """B=2, H=2, L=10 in 4-position tiles (the last tile partly past the end); dq in cuDNN's [B, H, L, D] layout,
    dk a slice of a wider buffer, dv contiguous; tables longer than L with arbitrary (non-cos/sin) values, each row
    repeating its first half as the kernel expects."""
    B, L, H = 2, 10, 2
    g = torch.Generator().manual_seed(D)
    dq = torch.randn(B, H, L, D, generator=g).transpose(1, 2)
    dk = torch.randn(B, L, H + 1, D, generator=g)[:, :, 1:]
    dv = torch.randn(B, L, H, D, generator=g)
    first = torch.randn(2, L + 3, D // 2, generator=g)
    rope = torch.cat([first, first], dim=-1).to(table_dtype)
    got = K.rope_qkv_backward(dq, dk, dv, rope, block_t=4, num_warps=1)
    assert got.shape == (B, L, 3, H, D) and got.is_contiguous()
    torch.testing.assert_close(got.double(), _expected(dq, dk, dv, rope), rtol=1e-6, atol=1e-6)
    assert torch.equal(got[:, :, 2], dv)


replace_unless_interpreted(globals(), __file__)
