"""GPU tests of the fused masked linear cross-entropy at training shapes (skipped without CUDA).

bf16 inputs, N = 16384 tokens, V = 32000, about half the tokens masked with per-sequence 1/p weights; the
loss and both gradients are compared with a float64 computation written here in closed form.
"""

import pytest
import torch
from dlm_kernels import masked_ce_fused, masked_linear_cross_entropy, resolve_impl
from dlm_kernels.masked_ce_fused import fused_masked_linear_cross_entropy

pytestmark = pytest.mark.gpu

N, V, SEQ = 16384, 32000, 2048


def _inputs(n, d, vocab, dtype, seed, logit_std=2.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, d, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(vocab, d, device="cuda", generator=g) * (logit_std / d**0.5)).to(dtype)
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    # SMDM-like masking: one ratio p per sequence (mean 0.5), weights 1 / (p * global token count).
    p = (torch.rand(max(1, n // SEQ), device="cuda", generator=g) * 0.5 + 0.25).repeat_interleave(SEQ)[:n]
    p = torch.cat([p, p.new_full((n - p.numel(),), 0.5)])
    mask = torch.rand(n, device="cuda", generator=g) < p
    token_weights = torch.where(mask, 1.0 / (p * n), torch.zeros_like(p))
    return hidden, weight, targets, token_weights


def _float64_reference(hidden, weight, targets, token_weights):
    """Loss, dH and dW in float64, in closed form over the masked rows: G = w (softmax - onehot)."""
    idx = torch.nonzero(token_weights).squeeze(1)
    h = hidden.double()[idx]
    w64 = weight.double()
    z = h @ w64.t()
    lse = torch.logsumexp(z, dim=1)
    wt = token_weights.double()[idx]
    loss = (wt * (lse - z.gather(1, targets[idx, None]).squeeze(1))).sum()
    grad = torch.exp(z - lse[:, None])
    grad[torch.arange(idx.numel(), device="cuda"), targets[idx]] -= 1.0
    grad *= wt[:, None]
    dh = torch.zeros_like(hidden, dtype=torch.float64)
    dh[idx] = grad @ w64
    return loss, dh, grad.t() @ h


def _fused(hidden, weight, targets, token_weights, upstream=1.0, **kw):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = fused_masked_linear_cross_entropy(h, w, targets, token_weights, **kw)
    (loss * upstream).backward()
    return loss.detach(), h.grad, w.grad


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("d", [768, 2048])
def test_bf16_training_shape_matches_float64(d):
    inputs = _inputs(N, d, V, torch.bfloat16, seed=d)
    loss, dh, dw = _fused(*inputs)
    ref_loss, ref_dh, ref_dw = _float64_reference(*inputs)
    errs = (abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()), _rel(dh, ref_dh), _rel(dw, ref_dw))
    print(
        f"d={d} masked={int((inputs[3] != 0).sum())} rel err loss {errs[0]:.2e} dH {errs[1]:.2e} dW {errs[2]:.2e}"
        f" (fp32-C addmm: {masked_ce_fused._FP32_C_ADDMM})"
    )
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
    assert errs[0] <= 1e-3 and errs[1] <= 1e-2 and errs[2] <= 1e-2
    assert torch.count_nonzero(dh[inputs[3] == 0]) == 0
    again = _fused(*inputs)
    assert all(torch.equal(a, b) for a, b in zip((loss, dh, dw), again, strict=True)), "not deterministic"


def test_fp32_many_chunks_and_upstream_grad_match_float64():
    inputs = _inputs(3000, 256, V, torch.float32, seed=1)
    # ~1500 masked rows in chunks of <= 500
    loss, dh, dw = _fused(*inputs, upstream=0.25, chunk_bytes=500 * V * 4)
    ref_loss, ref_dh, ref_dw = _float64_reference(*inputs)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert _rel(dh, 0.25 * ref_dh) <= 1e-5 and _rel(dw, 0.25 * ref_dw) <= 1e-5


def test_nothing_masked_gives_zero_loss_and_grads():
    hidden, weight, targets, _ = _inputs(4096, 256, V, torch.bfloat16, seed=2)
    loss, dh, dw = _fused(hidden, weight, targets, torch.zeros(4096, device="cuda"))
    assert loss.item() == 0.0
    assert torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0


def test_auto_is_fused_on_cuda_and_matches_reference_path():
    assert resolve_impl("auto", torch.device("cuda")) == "fused"
    hidden, weight, targets, token_weights = _inputs(2048, 128, 5003, torch.float32, seed=3)
    fused = masked_linear_cross_entropy(hidden, weight, targets, token_weights, impl="auto")
    ref = masked_linear_cross_entropy(hidden, weight, targets, token_weights, impl="torch")
    assert abs(fused.item() - ref.item()) <= 1e-5 * abs(ref.item())


def test_inductor_fullgraph_matches_eager():
    hidden, weight, targets, token_weights = _inputs(1024, 64, 1000, torch.float32, seed=4)

    def step(h, w):
        return masked_linear_cross_entropy(torch.tanh(h), w, targets, token_weights, impl="fused") * 3.0

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*results, strict=True):
        assert _rel(a, b) <= 1e-5
