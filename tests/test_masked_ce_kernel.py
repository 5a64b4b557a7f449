"""CPU tests of the fused masked linear cross-entropy: its Triton kernels run under TRITON_INTERPRET=1
(in a process of their own, see ``interpreted.py``).

fp32 only (the interpreter is exact in fp32), tiny shapes (one program per masked row costs ~15 ms), every
result compared with a float64 loss written here from the definition.
"""

import pytest
import torch

pytest.importorskip("triton")

import dlm_kernels  # noqa: E402
from dlm_kernels import (  # noqa: E402
    fused_masked_linear_cross_entropy,
    masked_ce_triton,
    masked_linear_cross_entropy,
    masked_linear_cross_entropy_reference,
)
from dlm_kernels.masked_ce_fused import (  # noqa: E402
    masked_lce_fwd,
    scale_cast,
    scatter_rows,
)
from interpreted import replace_unless_interpreted  # noqa: E402

V = 97  # prime: no power-of-two block divides it


def _inputs(n, d, vocab, masked, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g) * scale
    weight = torch.randn(vocab, d, generator=g) / d**0.5
    targets = torch.randint(0, vocab, (n,), generator=g)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[:masked]] = True
    p = torch.rand(n, generator=g) * 0.9 + 0.05  # 1/p spans ~20x, like SMDM's t ~ U(eps, 1)
    token_weights = torch.where(mask, 1.0 / (p * n), torch.zeros(n))
    return hidden, weight, targets, token_weights


def _float64_loss_and_grads(hidden, weight, targets, token_weights):
    """Loss over all rows in float64 (unmasked rows carry weight 0), and its autograd gradients."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logits = h @ w.t()
    nll = torch.logsumexp(logits, dim=1) - logits.gather(1, targets[:, None]).squeeze(1)
    loss = (token_weights.double() * nll).sum()
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _run(fn, hidden, weight, targets, token_weights, upstream=1.0):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = fn(h, w, targets, token_weights)
    (loss * upstream).backward()
    return loss.detach(), h.grad, w.grad


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _assert_close64(got, ref, upstream=1.0):
    loss, dh, dw = got
    rloss, rdh, rdw = ref
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - rloss.item()) <= 1e-5 * abs(rloss.item())
    assert _rel(dh, upstream * rdh) <= 1e-5
    assert _rel(dw, upstream * rdw) <= 1e-5


@pytest.mark.parametrize(
    "n,d,masked,chunk_rows,block_v,quantum",
    [
        (64, 32, 32, 0, 0, 1),  # one chunk, the whole row in one tile (BLOCK_V = 128 > V)
        (48, 24, 48, 16, 32, 1),  # all rows masked, 3 chunks (fp32 dW accumulation), tiled rows with a V tail
        (40, 20, 1, 0, 64, 1),  # a single masked row, two tiles
        (33, 16, 17, 5, 0, 1),  # chunks of 5 rows: ragged last chunk
        (33, 16, 17, 0, 0, 8),  # one chunk of 24 rows: 7 rows of padding
        (40, 16, 21, 9, 0, 4),  # chunks of 8 rows: the last padded with 3 rows
        (30, 16, 29, 12, 0, 8),  # chunks of 8: padding to 32 rows would pass the 30 of dX, so the last stays short
    ],
)
def test_fused_matches_float64(n, d, masked, chunk_rows, block_v, quantum):
    inputs = _inputs(n, d, V, masked, seed=n + d)
    chunk_bytes = chunk_rows * V * 4 if chunk_rows else 1 << 30

    def fused(h, w, y, tw):
        return fused_masked_linear_cross_entropy(h, w, y, tw, chunk_bytes=chunk_bytes, block_v=block_v,
                                                 row_quantum=quantum)

    got = _run(fused, *inputs)
    _assert_close64(got, _float64_loss_and_grads(*inputs))
    unmasked = inputs[3] == 0
    assert torch.all(got[1][unmasked] == 0)


def test_public_api_fused_and_torch_match_float64_with_upstream_grad():
    inputs = _inputs(50, 32, V, 26, seed=7, scale=3.0)
    ref = _float64_loss_and_grads(*inputs)
    for impl in ("fused", "torch"):
        got = _run(
            lambda h, w, y, tw, impl=impl: masked_linear_cross_entropy(h, w, y, tw, impl=impl), *inputs, 2.5
        )
        _assert_close64(got, ref, upstream=2.5)


def test_reference_chunks_match_float64():
    inputs = _inputs(45, 16, V, 30, seed=3)
    got = _run(lambda *a: masked_linear_cross_entropy_reference(*a, chunk_rows=7), *inputs)
    _assert_close64(got, _float64_loss_and_grads(*inputs))


@pytest.mark.parametrize("impl", ["fused", "torch"])
def test_nothing_masked_gives_exact_zero(impl):
    hidden, weight, targets, _ = _inputs(24, 16, V, 0, seed=1)
    got = _run(
        lambda h, w, y, tw: masked_linear_cross_entropy(h, w, y, tw, impl=impl),
        hidden,
        weight,
        targets,
        torch.zeros(24),
    )
    loss, dh, dw = got
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert dh is not None and dw is not None
    assert torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0


def test_leading_dims_and_frozen_weight():
    hidden, weight, targets, token_weights = _inputs(32, 16, V, 12, seed=5)
    ref_loss, ref_dh, _ = _float64_loss_and_grads(hidden, weight, targets, token_weights)
    h = hidden.reshape(4, 8, 16).clone().requires_grad_()
    loss = masked_linear_cross_entropy(
        h, weight, targets.reshape(4, 8), token_weights.reshape(4, 8), impl="fused"
    )
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert _rel(h.grad.reshape(32, 16), ref_dh) <= 1e-5
    with torch.no_grad():
        assert abs(
            masked_linear_cross_entropy(hidden, weight, targets, token_weights, impl="fused").item()
            - ref_loss.item()
        ) <= 1e-5 * abs(ref_loss.item())


def test_deterministic_and_permutation_invariant():
    hidden, weight, targets, token_weights = _inputs(40, 16, V, 20, seed=11)
    a = _run(lambda *x: masked_linear_cross_entropy(*x, impl="fused"), hidden, weight, targets, token_weights)
    b = _run(lambda *x: masked_linear_cross_entropy(*x, impl="fused"), hidden, weight, targets, token_weights)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    c = _run(
        lambda *x: masked_linear_cross_entropy(*x, impl="fused"),
        hidden[perm],
        weight,
        targets[perm],
        token_weights[perm],
    )
    assert abs(c[0].item() - a[0].item()) <= 1e-6 * abs(a[0].item())
    assert _rel(c[1], a[1][perm]) <= 1e-6 and _rel(c[2], a[2]) <= 1e-6


@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("with_grad", [True, False])
def test_per_token_terms_match_float64(impl, with_grad):
    """``per_token=True`` also gives each row's ``w_i CE_i`` (0 at unmasked rows, no gradient) without changing
    the loss or its gradients; several padded chunks (rows 128-aligned in 5-row chunks, quantum 2 on fused)."""
    hidden, weight, targets, token_weights = _inputs(24, 16, V, 11, seed=6)
    logits = hidden.double() @ weight.double().t()
    want = (torch.logsumexp(logits, 1) - logits.gather(1, targets[:, None]).squeeze(1)) * token_weights.double()
    h = hidden.clone().requires_grad_(with_grad)
    w = weight.clone().requires_grad_(with_grad)
    index = torch.nonzero(token_weights).squeeze(1)
    if impl == "fused":
        loss, terms = fused_masked_linear_cross_entropy(h, w, targets, token_weights, index, chunk_bytes=5 * V * 4,
                                                        row_quantum=2, per_token=True)
    else:
        loss, terms = masked_linear_cross_entropy(h, w, targets, token_weights, impl="torch", per_token=True)
    assert terms.shape == (24,) and terms.dtype == torch.float32 and not terms.requires_grad
    torch.testing.assert_close(terms.double(), want, rtol=1e-6, atol=1e-9)
    assert (terms[token_weights == 0] == 0).all()
    torch.testing.assert_close(loss.double(), want.sum(), rtol=1e-6, atol=0)
    if with_grad:
        loss.backward()
        _, gh, gw = _float64_loss_and_grads(hidden, weight, targets, token_weights)
        assert _rel(h.grad, gh) <= 1e-6 and _rel(w.grad, gw) <= 1e-6


def test_compiles_fullgraph_without_graph_break():
    inputs = _inputs(16, 16, V, 9, seed=2)

    def step(h, w, y, tw):
        return masked_linear_cross_entropy(h * 1.0, w, y, tw, impl="fused")

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    _assert_close64(_run(compiled, *inputs), _float64_loss_and_grads(*inputs))


def test_custom_ops_pass_opcheck():
    hidden, weight, targets, token_weights = _inputs(12, 16, V, 6, seed=4)
    args = (hidden, weight, targets, token_weights, None, True, True, 1 << 20, 0, 4, False)
    torch.library.opcheck(masked_lce_fwd, args, test_utils=("test_schema", "test_faketensor"))
    index = torch.nonzero(token_weights).squeeze(1)
    torch.library.opcheck(masked_lce_fwd, (*args[:4], index, *args[5:-1], True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(scale_cast, (weight, torch.tensor([2.0]), torch.float32))
    row_of = torch.tensor([2, -1, 0, -1, 1])
    torch.library.opcheck(scatter_rows, (hidden[:3], row_of, torch.tensor([2.0]), torch.float32))


@pytest.mark.parametrize("d", [40, 2100])  # one column tile; two (the tile is at most 2048 wide) with a ragged end
def test_scatter_rows_kernel_matches_float64(d):
    """Backward's dH pass: scaled source rows where a row has one, exact zeros elsewhere; d not a power of 2."""
    g = torch.Generator().manual_seed(9)
    src = torch.randn(5, d, generator=g)
    row_of = torch.tensor([3, -1, 0, -1, -1, 4, 1])
    scale = torch.tensor([0.75])
    want = torch.zeros(7, d, dtype=torch.float64)
    for r, j in enumerate(row_of.tolist()):
        if j >= 0:
            want[r] = src[j].double() * 0.75
    for fn in (masked_ce_triton.scatter_rows, masked_ce_triton.scatter_rows_reference):
        got = fn(src, row_of, scale, torch.float32)
        assert got.dtype == torch.float32 and got.shape == (7, d)
        torch.testing.assert_close(got.double(), want, rtol=1e-7, atol=0)
        assert torch.all(got[row_of < 0] == 0)


def test_int32_targets_still_work():
    """row_of is int64 whatever the targets' dtype (it once took theirs and broke index_copy_)."""
    hidden, weight, targets, token_weights = _inputs(20, 16, V, 9, seed=11)
    ref = _float64_loss_and_grads(hidden, weight, targets, token_weights)
    got = _run(fused_masked_linear_cross_entropy, hidden, weight, targets.int(), token_weights)
    _assert_close64(got, ref)


def test_masked_index_gives_the_same_loss_and_grads():
    """Passing the masked rows' indices (no device sync) changes nothing in the result."""
    inputs = _inputs(24, 16, V, 10, seed=6)
    index = torch.nonzero(inputs[3]).squeeze(1)
    for impl in ("fused", "torch"):
        plain = _run(lambda *a, i=impl: masked_linear_cross_entropy(*a, impl=i), *inputs)
        indexed = _run(lambda *a, i=impl: masked_linear_cross_entropy(*a, impl=i, masked_index=index), *inputs)
        for a, b in zip(plain, indexed):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("frozen", ["hidden", "weight"])
def test_padded_chunks_with_index_and_one_gradient(frozen):
    """Chunks padded to a quantum, the masked rows given, gradients for only one input: as float64. An unmasked
    row 0 holding inf must not reach the result (padding copies a masked row, never row 0)."""
    hidden, weight, targets, token_weights = _inputs(40, 16, V, 21, seed=9)
    token_weights[0] = 0.0
    ref = _float64_loss_and_grads(hidden, weight, targets, token_weights)
    hidden[0] = float("inf")
    index = torch.nonzero(token_weights).squeeze(1)
    h = hidden.clone().requires_grad_(frozen != "hidden")
    w = weight.clone().requires_grad_(frozen != "weight")
    loss = fused_masked_linear_cross_entropy(h, w, targets, token_weights, index, chunk_bytes=9 * V * 4, row_quantum=4)
    loss.backward()
    assert abs(loss.item() - ref[0].item()) <= 1e-5 * abs(ref[0].item())
    grad, want = (w.grad, ref[2]) if frozen == "hidden" else (h.grad, ref[1])
    assert torch.isfinite(grad).all() and _rel(grad, want) <= 1e-5
    assert (h.grad if frozen == "hidden" else w.grad) is None
    with pytest.raises(ValueError, match="row_quantum"):
        fused_masked_linear_cross_entropy(h, w, targets, token_weights, row_quantum=0)


def test_bad_inputs_raise_clear_errors():
    hidden, weight, targets, token_weights = _inputs(8, 16, V, 4, seed=0)
    with pytest.raises(ValueError, match="one of auto, fused, torch"):
        masked_linear_cross_entropy(hidden, weight, targets, token_weights, impl="cuda")
    with pytest.raises(ValueError, match="cast them"):
        masked_linear_cross_entropy(hidden, weight.double(), targets, token_weights)
    with pytest.raises(ValueError, match="leading shape"):
        masked_linear_cross_entropy(hidden, weight, targets[:4], token_weights)
    assert dlm_kernels.resolve_impl("auto", torch.device("cpu")) == "torch"


replace_unless_interpreted(globals(), __file__)
