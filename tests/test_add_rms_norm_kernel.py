"""CPU tests of the fused residual add + RMSNorm Triton kernels under TRITON_INTERPRET=1 (in a process of their
own, see ``interpreted.py``): fp32, tiny shapes, every result against float64 math written here."""

import pytest
import torch

pytest.importorskip("triton")

from dlm_kernels import add_rms_norm_triton as K  # noqa: E402
from interpreted import replace_unless_interpreted  # noqa: E402

EPS = 1e-5
D = 48  # not a power of two: the tile masks its last 16 columns


def _float64(x, delta, weight, dy, dh_in):
    h = x.double() if delta is None else x.double() + delta.double()
    rstd = torch.rsqrt(h.pow(2).mean(-1) + EPS)
    xh = h * rstd[:, None]
    y = xh * weight.double()
    g = dy.double() * weight.double()
    dh = rstd[:, None] * (g - xh * (g * xh).mean(-1, keepdim=True))
    if dh_in is not None:
        dh = dh + dh_in.double()
    return h, y, rstd, dh, (dy.double() * xh).sum(0)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _tensors(rows, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, D, generator=g) * 2
    return x, torch.randn(rows, D, generator=g), 1 + 0.5 * torch.randn(D, generator=g), torch.randn(rows, D, generator=g), torch.randn(rows, D, generator=g)


@pytest.mark.parametrize("with_delta", [True, False])
def test_forward(with_delta):
    x, delta, w, _, _ = _tensors(11, 0)
    delta = delta if with_delta else None
    h, y, rstd = K.add_rms_norm_forward(x, delta, w, EPS, torch.float32, block_m=4)
    h64, y64, r64, _, _ = _float64(x, delta, w, x, None)
    assert h.numel() == (11 * D if with_delta else 0)
    if with_delta:
        assert _rel(h, h64) < 1e-7
    assert _rel(rstd, r64) < 1e-6 and _rel(y, y64) < 1e-6


@pytest.mark.parametrize("with_dh_in,second_copy", [(True, True), (False, False)])
def test_backward_walks_several_tiles_per_program(with_dh_in, second_copy):
    """11 rows, 4-row tiles, 2 programs: each walks two tiles, the last one partly past the end."""
    x, _, w, dy, dh_in = _tensors(11, 1)
    dh_in = dh_in if with_dh_in else None
    _, _, rstd = K.add_rms_norm_forward(x, None, w, EPS, torch.float32, block_m=4)
    dx, ddelta, dw = K.add_rms_norm_backward(
        dy, dh_in, x, rstd, w, torch.float32, torch.float32 if second_copy else None, block_m=4, programs_per_sm=1
    )
    _, _, _, dh64, dw64 = _float64(x, None, w, dy, dh_in)
    assert _rel(dx, dh64) < 1e-6 and _rel(dw, dw64) < 1e-6
    if second_copy:
        assert torch.equal(ddelta, dx)
    else:
        assert ddelta.numel() == 0


def test_default_tiles_cover_every_row():
    """The default configs at D=48: forward 16-row tiles, the last partly past the end; backward one row per
    tile, 14 programs of 5 rows each."""
    x, delta, w, dy, dh_in = _tensors(70, 2)
    h, y, rstd = K.add_rms_norm_forward(x, delta, w, EPS, torch.float32)
    dx, _, dw = K.add_rms_norm_backward(dy, dh_in, h, rstd, w, torch.float32, None)
    h64, y64, _, dh64, dw64 = _float64(x, delta, w, dy, dh_in)
    assert _rel(y, y64) < 1e-6 and _rel(dx, dh64) < 1e-6 and _rel(dw, dw64) < 1e-6


def test_no_rows_gives_empty_outputs_and_a_zero_weight_gradient():
    x = torch.empty(0, D)
    w = torch.ones(D)
    h, y, rstd = K.add_rms_norm_forward(x, x, w, EPS, torch.float32)
    dx, _, dw = K.add_rms_norm_backward(x, x, x, rstd, w, torch.float32, None)
    assert h.shape == y.shape == dx.shape == (0, D) and rstd.shape == (0,)
    assert torch.equal(dw, torch.zeros(D))


def test_autograd_op_runs_the_kernels_on_model_shaped_tensors():
    """The public op on [batch, seq, D] tensors (the interpreter makes the CPU a kernel device): h, y and the
    gradients of x, delta (the same tensor as x's: equal dtypes) and the weight."""
    from dlm_kernels.add_rms_norm import add_rms_norm

    x, delta, w, dy, dh_in = (t.reshape(2, 5, D) if t.dim() == 2 else t for t in _tensors(10, 3))
    leaves = [t.clone().requires_grad_() for t in (x, delta, w)]
    h, y = add_rms_norm(*leaves, EPS)
    ((h * dh_in).sum() + (y * dy).sum()).backward()
    h64, y64, _, dh64, dw64 = _float64(x.reshape(10, D), delta.reshape(10, D), w, dy.reshape(10, D), dh_in.reshape(10, D))
    assert _rel(h.reshape(10, D), h64) < 1e-7 and _rel(y.reshape(10, D), y64) < 1e-6
    assert _rel(leaves[0].grad.reshape(10, D), dh64) < 1e-6 and torch.equal(leaves[1].grad, leaves[0].grad)
    assert _rel(leaves[2].grad, dw64) < 1e-6


replace_unless_interpreted(globals(), __file__)
