"""The fused residual add + RMSNorm op on the CPU (its PyTorch path) against float64 math written here, and the
model's deferred residual adds against a block written the textbook way."""

import pytest
import torch
import torch.nn.functional as F
from dlm_kernels.add_rms_norm import add_rms_norm

EPS = 1e-5


def _float64_reference(x, delta, weight, grad_h, grad_y):
    """h = x + delta, y = h / rms(h) * w in float64, and the gradients of <grad_h, h> + <grad_y, y>."""
    leaves = [t.detach().double().requires_grad_() for t in (x, delta, weight)]
    xd, dd, wd = leaves
    h = xd + dd
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * wd
    ((h * grad_h.double()).sum() + (y * grad_y.double()).sum()).backward()
    return h.detach(), y.detach(), [t.grad for t in leaves]


def _inputs(shape, delta_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).requires_grad_()
    delta = torch.randn(shape, generator=g).to(delta_dtype).requires_grad_()
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=g)).requires_grad_()
    return x, delta, weight, torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("delta_dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_values_and_gradients_match_float64(delta_dtype, out_dtype):
    """fp32 residual stream with an fp32 or bf16 branch (as under autocast): h, y and all three gradients."""
    x, delta, weight, grad_h, grad_y = _inputs((3, 5, 40), delta_dtype)
    h, y = add_rms_norm(x, delta, weight, EPS, out_dtype)
    assert h.dtype == torch.float32 and y.dtype == out_dtype
    (h * grad_h).sum().add((y.float() * grad_y).sum()).backward()
    # y's gradient reaches the op in y's dtype (as the bf16 GEMM's dX does in training).
    h64, y64, (gx, gd, gw) = _float64_reference(x, delta, weight, grad_h, grad_y.to(out_dtype))
    assert _rel(h, h64) < 1e-7
    assert _rel(y, y64) < (1e-6 if out_dtype == torch.float32 else 4e-3)
    assert delta.grad.dtype == delta_dtype and weight.grad.dtype == torch.float32
    assert _rel(x.grad, gx) < 1e-6
    assert _rel(delta.grad, gd) < (1e-6 if delta_dtype == torch.float32 else 4e-3)
    assert _rel(weight.grad, gw) < 1e-6


def test_without_delta_is_rms_norm_and_returns_x():
    x, _, weight, _, grad_y = _inputs((4, 24), torch.float32, seed=1)
    h, y = add_rms_norm(x, None, weight, EPS)
    assert h is x
    expected = F.rms_norm(x.detach().double(), (24,), weight.detach().double(), EPS)
    assert _rel(y, expected) < 1e-6
    (y * grad_y).sum().backward()
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    (F.rms_norm(x64, (24,), w64, EPS) * grad_y.double()).sum().backward()
    assert _rel(x.grad, x64.grad) < 1e-6 and _rel(weight.grad, w64.grad) < 1e-6


def test_float64_inputs_are_exact():
    x, delta, weight, grad_h, grad_y = (t.detach().double() for t in _inputs((6, 16), torch.float32, seed=2))
    for t in (x, delta, weight):
        t.requires_grad_()
    h, y = add_rms_norm(x, delta, weight, EPS)
    (h * grad_h).sum().add((y * grad_y).sum()).backward()
    h64, y64, grads = _float64_reference(x, delta, weight, grad_h, grad_y)
    assert _rel(y, y64) < 1e-14
    for got, want in zip((x.grad, delta.grad, weight.grad), grads):
        assert _rel(got, want) < 1e-13


@pytest.mark.slow
def test_model_defers_residual_adds_without_changing_the_function():
    """hidden_states of the model (each block's last add left to the next norm) equals the blocks written as
    x + attn(norm(x)), then + mlp(norm(x)), in float64, and so do the gradients."""
    from dlm_titan.models import ModelArgs, TransEncoder

    args = ModelArgs(n_layers=3, n_heads=2, dim=16, ffn_dim=32, vocab_size=50)
    model = TransEncoder(args, max_seq_len=8, attn_backend="math")
    model.init_weights(seed=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn(p.shape))  # not all ones, so a misplaced weight shows
    model.double()
    tokens = torch.randint(0, 51, (2, 8), generator=torch.Generator().manual_seed(0))

    def textbook(tokens):
        m = model
        x = m.tok_embeddings(tokens)
        for block in m.layers.values():
            n1, n2 = block.attention_norm, block.ffn_norm
            x = x + block.attention(F.rms_norm(x, (16,), n1.weight, n1.eps), m.rope)
            x = x + block.feed_forward(F.rms_norm(x, (16,), n2.weight, n2.eps))
        return F.rms_norm(x, (16,), m.norm.weight, m.norm.eps)

    probe = torch.randn(2, 8, 16, dtype=torch.float64)
    outputs, grads = [], []
    for fn in (model.hidden_states, textbook):
        model.zero_grad()
        out = fn(tokens)
        (out * probe).sum().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if n != "output.weight"})
    assert _rel(outputs[0], outputs[1]) < 1e-13
    for name, g in grads[1].items():
        assert _rel(grads[0][name], g) < 1e-12, name


def test_shape_mismatches_are_refused():
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="delta has shape"):
        add_rms_norm(x, torch.randn(1, 4, 8), torch.ones(8), EPS)
    with pytest.raises(ValueError, match="weight has shape"):
        add_rms_norm(x, None, torch.ones(7), EPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_pass_opcheck(dtype):
    """Schema, fake (meta) implementation and no aliasing between outputs and inputs, for both ops."""
    from dlm_kernels.add_rms_norm import add_rms_norm_bwd, add_rms_norm_fwd

    x, delta, weight = torch.randn(3, 16), torch.randn(3, 16).to(dtype), torch.rand(16) + 0.5
    for args in ((x, delta, weight, EPS, dtype), (x, None, weight, EPS, torch.float32)):
        torch.library.opcheck(add_rms_norm_fwd, args, test_utils=("test_schema", "test_faketensor"))
    h, _, rstd = add_rms_norm_fwd(x, delta, weight, EPS, dtype)
    dy = torch.randn(3, 16).to(dtype)
    for args in ((dy, torch.randn(3, 16), h, rstd, weight, None), (dy, None, h, rstd, weight, torch.float32),
                 (dy, None, h, rstd, weight, torch.bfloat16)):
        torch.library.opcheck(add_rms_norm_bwd, args, test_utils=("test_schema", "test_faketensor"))
