"""The objective: float64 reference loss, noise keyed by (seed, step, global index), accumulation invariance."""

import pytest
import torch
from dlm_kernels import masked_linear_cross_entropy

from dlm_titan.config import Model
from dlm_titan.diffusion import Noise, forward_process, sample_noise, ssl_length
from dlm_titan.models import build_model
from dlm_titan.optim import lr_factor

MASK_ID = 32000


def plain_loss(h, w, y, tw):
    """The weighted CE in the inputs' own dtype (float64 here), independent of dlm_kernels."""
    sel = tw != 0
    return (torch.nn.functional.cross_entropy(h[sel] @ w.T, y[sel], reduction="none") * tw[sel]).sum()


def torch_loss(h, w, y, tw, **kw):
    return masked_linear_cross_entropy(h, w, y, tw, impl="torch", **kw)


def tiny_model(seq_len=16):
    model = build_model(Model(flavor="6M"), seq_len, torch.device("cpu"))
    model.to_empty(device="cpu")
    model.init_weights(seed=7)
    return model


def reference_loss(logits, targets, masked, p, token_count):
    """SMDM's loss in float64, written from the definition: sum_{masked} -log softmax(logits)[y] / p, / count."""
    logits = logits.double()
    total = torch.zeros((), dtype=torch.float64)
    for b in range(targets.shape[0]):
        for i in range(targets.shape[1]):
            if masked[b, i]:
                logp = logits[b, i] - torch.logsumexp(logits[b, i], dim=0)
                total += -logp[targets[b, i]] / p[b]
    return total / token_count


@pytest.mark.slow
def test_loss_equals_float64_reference_on_hand_made_inputs():
    model = tiny_model()
    tokens = torch.tensor([[5, 17, 2, 99, 31999, 0, 8, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
    # Fixed t and uniforms chosen by hand: row 0 has p = 0.5005, row 1 p = 0.9001; masked where u < p.
    t = torch.tensor([0.5, 0.9])
    uniforms = torch.tensor([[0.1, 0.9, 0.4, 0.6, 0.2, 0.99, 0.0, 0.7], [0.95, 0.1, 0.2, 0.3, 0.91, 0.5, 0.6, 0.7]])
    noise = Noise(t=t, uniforms=uniforms)
    batch = forward_process(tokens, noise, eps=1e-3, mask_id=MASK_ID, token_count=16)
    masked = torch.tensor([[1, 0, 1, 0, 1, 0, 1, 0], [0, 1, 1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(batch.inputs == MASK_ID, masked)
    assert torch.equal(batch.inputs[~masked], tokens[~masked])
    assert batch.num_masked == 10
    p = torch.tensor([0.5 * 0.999 + 1e-3, 0.9 * 0.999 + 1e-3], dtype=torch.float64)
    with torch.no_grad():
        loss = model(batch.inputs, batch.targets, batch.token_weights, loss_fn=torch_loss)
        logits = model(batch.inputs)
    expected = reference_loss(logits, tokens, masked, p, token_count=16)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_noise_keyed_by_seed_step_and_global_index():
    pos = torch.arange(6)
    a = sample_noise(pos, 32, seed=1, step=3)
    again = sample_noise(pos, 32, seed=1, step=3)
    assert torch.equal(a.t, again.t) and torch.equal(a.uniforms, again.uniforms)
    # the same global index gives the same noise whatever batch it sits in (layout invariance)
    part = sample_noise(torch.tensor([4, 5]), 32, seed=1, step=3)
    assert torch.equal(part.t, a.t[4:]) and torch.equal(part.uniforms, a.uniforms[4:])
    # differs across sequences, steps and seeds
    assert len(set(a.t.tolist())) == 6
    assert not torch.equal(sample_noise(pos, 32, seed=1, step=4).t, a.t)
    assert not torch.equal(sample_noise(pos, 32, seed=2, step=3).t, a.t)
    assert ((a.t >= 0) & (a.t < 1)).all()


def test_stratified_t_covers_the_batch():
    n = 64
    noise = sample_noise(torch.arange(n), 8, seed=0, step=1, t_sampling="stratified", num_positions=n)
    bins = torch.floor(noise.t * n).long()
    assert sorted(bins.tolist()) == list(range(n))  # exactly one t per 1/n interval


def test_mask_rate_follows_p():
    noise = sample_noise(torch.arange(256), 512, seed=0, step=1)
    batch = forward_process(torch.zeros(256, 512, dtype=torch.long), noise, eps=1e-3, mask_id=MASK_ID, token_count=1)
    rate = (batch.inputs == MASK_ID).float().mean(dim=1)
    assert torch.allclose(rate, noise.mask_prob(1e-3), atol=0.08)
    assert abs(rate.mean().item() - 0.5) < 0.05


def accumulation_gap(dtype):
    """Loss and gradients of one batch of 4 vs 4 accumulated micro-batches of 1; returns both."""
    seq_len, n = 16, 4
    tokens = torch.randint(0, 32000, (n, seq_len))
    noise = sample_noise(torch.arange(n), seq_len, seed=3, step=1)
    whole = forward_process(tokens, noise, eps=1e-3, mask_id=MASK_ID, token_count=n * seq_len)
    loss_fn = plain_loss if dtype == torch.float64 else torch_loss
    model = tiny_model(seq_len).to(dtype)
    loss_full = model(whole.inputs, whole.targets, whole.token_weights.to(dtype), loss_fn=loss_fn)
    loss_full.backward()
    grads_full = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    loss_acc = 0.0
    for j in range(n):
        part = sample_noise(torch.tensor([j]), seq_len, seed=3, step=1)
        mb = forward_process(tokens[j : j + 1], part, eps=1e-3, mask_id=MASK_ID, token_count=n * seq_len)
        loss = model(mb.inputs, mb.targets, mb.token_weights.to(dtype), loss_fn=loss_fn)
        loss.backward()
        loss_acc += loss.item()
    grads_acc = {k: p.grad for k, p in model.named_parameters()}
    return loss_full.item(), loss_acc, grads_full, grads_acc


@pytest.mark.slow
def test_accumulation_equals_one_batch_fp32():
    """1 process x 4 micro-batches of 1 == one batch of 4 (fp32), loss and gradients.

    Gradients agree to 1e-5 of each tensor's largest entry: batched and single-sequence GEMMs round differently,
    and an embedding row sums many positions' terms (1.3e-6 next to entries up to 0.75 on a 2-core CPU), while a
    wrong normalisation would be off by a factor."""
    loss_full, loss_acc, grads_full, grads_acc = accumulation_gap(torch.float32)
    assert loss_acc == pytest.approx(loss_full, rel=1e-6)
    for k, g in grads_full.items():
        torch.testing.assert_close(grads_acc[k], g, rtol=1e-6, atol=1e-5 * g.abs().max().item())


@pytest.mark.slow
def test_accumulation_equals_one_batch_float64_exactly():
    """In float64 the two agree to rounding: the normalisation itself is exact."""
    loss_full, loss_acc, grads_full, grads_acc = accumulation_gap(torch.float64)
    assert loss_acc == pytest.approx(loss_full, rel=1e-12)
    diff = torch.cat([(grads_acc[k] - g).flatten() for k, g in grads_full.items()])
    assert (diff.norm() / torch.cat([g.flatten() for g in grads_full.values()]).norm()).item() < 1e-12


def test_ssl_length_rate_and_range():
    lengths = [ssl_length(0, s, 0, 100, 0.25) for s in range(2000)]
    cropped = [x for x in lengths if x != 100]
    assert 0.2 < len(cropped) / 2000 < 0.3
    assert min(lengths) >= 1 and max(lengths) <= 100
    assert ssl_length(0, 5, 0, 100, 0.0) == 100
    assert lengths == [ssl_length(0, s, 0, 100, 0.25) for s in range(2000)]


def test_lr_schedule_warmup_cosine_floor():
    warm, total, ratio = 10, 110, 0.1
    assert lr_factor(1, warm, total, ratio, "cosine") == pytest.approx(0.1)
    assert lr_factor(10, warm, total, ratio, "cosine") == pytest.approx(1.0)
    assert lr_factor(60, warm, total, ratio, "cosine") == pytest.approx(0.55)  # halfway down the cosine
    assert lr_factor(110, warm, total, ratio, "cosine") == pytest.approx(0.1)
    assert lr_factor(500, warm, total, ratio, "cosine") == pytest.approx(0.1)


@pytest.mark.slow
def test_masked_index_matches_the_weights():
    """The trainer passes the masked rows' flat indices so the loss needs no device sync; same loss either way."""
    model = tiny_model()
    tokens = torch.randint(0, 32000, (3, 16))
    batch = forward_process(tokens, sample_noise(torch.arange(3), 16, seed=0, step=1), eps=1e-3, mask_id=MASK_ID,
                            token_count=48)
    assert torch.equal(batch.masked_index, torch.nonzero(batch.token_weights.flatten()).squeeze(1))
    with torch.no_grad():
        with_index = model(batch.inputs, batch.targets, batch.token_weights, batch.masked_index, loss_fn=torch_loss)
        without = model(batch.inputs, batch.targets, batch.token_weights, loss_fn=torch_loss)
    assert with_index.item() == without.item()
