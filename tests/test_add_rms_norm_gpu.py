"""GPU tests of the fused residual add + RMSNorm kernels at training shapes (skipped without CUDA): both
residual-stream dtypes (fp32 under autocast, bf16 under FSDP's mixed precision) against float64 math."""

import pytest
import torch
from dlm_kernels.add_rms_norm import add_rms_norm

pytestmark = pytest.mark.gpu

EPS = 1e-5


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dim", [768, 1792])
@pytest.mark.parametrize("stream_dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_at_training_shapes(dim, stream_dtype):
    g = torch.Generator(device="cuda").manual_seed(dim)
    shape = (4, 2048, dim)
    x = (torch.randn(shape, device="cuda", generator=g) * 4).to(stream_dtype).requires_grad_()
    delta = torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    weight = (1 + 0.2 * torch.randn(dim, device="cuda", generator=g)).to(stream_dtype).requires_grad_()
    grad_h = torch.randn(shape, device="cuda", generator=g).to(stream_dtype)
    grad_y = torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16)
    h, y = add_rms_norm(x, delta, weight, EPS, torch.bfloat16)
    torch.autograd.backward([h, y], [grad_h, grad_y])

    leaves = [t.detach().double().requires_grad_() for t in (x, delta, weight)]
    h64 = (leaves[0] + leaves[1]).to(stream_dtype).double()  # the stream stores h in its dtype
    y64 = h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + EPS) * leaves[2]
    torch.autograd.backward([h64, y64], [grad_h.double(), grad_y.double()])
    bf16 = 8e-3  # a few bf16 roundings
    tight = 1e-6 if stream_dtype == torch.float32 else bf16
    assert _rel(h, h64) < tight and _rel(y, y64) < bf16
    assert _rel(x.grad, leaves[0].grad) < tight
    assert delta.grad.dtype == torch.bfloat16 and _rel(delta.grad, leaves[1].grad) < bf16
    assert _rel(weight.grad, leaves[2].grad) < (1e-5 if stream_dtype == torch.float32 else bf16)
