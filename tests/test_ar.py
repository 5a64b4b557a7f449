"""The autoregressive baseline: causal model, next-token batch and loss, against float64 math written here."""

import math

import pytest
import torch
from dlm_kernels import masked_linear_cross_entropy

from dlm_titan.autoregressive import next_token_batch, next_token_nll, perplexity
from dlm_titan.config import Model, load_config
from dlm_titan.models import build_model
from dlm_titan.models.attention import Attention, rope_cache
from dlm_titan.models.flavors import ModelArgs
from dlm_titan.models.transformer import TransEncoder

ARGS = ModelArgs(n_layers=2, n_heads=2, dim=32, ffn_dim=64, vocab_size=61)


def tiny_model(causal=True, seq_len=16, backend="math"):
    model = TransEncoder(ARGS, max_seq_len=seq_len, attn_backend=backend, causal=causal)
    model.init_weights(seed=3407)
    return model


def _rms(x, w, eps):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


def _rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def reference_logits(params: dict, tokens: torch.Tensor, args: ModelArgs = ARGS, causal: bool = True) -> torch.Tensor:
    """The TransEncoder from its definition in float64: explicit causal mask, softmax attention, RoPE, SwiGLU."""
    p = {k: v.double() for k, v in params.items()}
    b, length = tokens.shape
    h_dim = args.head_dim
    inv = 1.0 / args.rope_theta ** (torch.arange(0, h_dim, 2, dtype=torch.float64) / h_dim)
    angle = torch.outer(torch.arange(length, dtype=torch.float64), inv).repeat(1, 2)[:, None, :]
    cos, sin = angle.cos(), angle.sin()
    allowed = torch.ones(length, length, dtype=torch.bool).tril() if causal else torch.ones(length, length, dtype=torch.bool)
    h = p["tok_embeddings.weight"][tokens]
    for i in range(args.n_layers):
        pre = f"layers.{i}."
        y = _rms(h, p[pre + "attention_norm.weight"], args.norm_eps)
        q, k, v = (y @ p[pre + "attention.wqkv.weight"].t()).view(b, length, 3, args.n_heads, h_dim).unbind(2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(h_dim)
        attn = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out = torch.einsum("bhlm,bmhd->blhd", attn, v).reshape(b, length, args.dim)
        h = h + out @ p[pre + "attention.wo.weight"].t()
        y = _rms(h, p[pre + "ffn_norm.weight"], args.norm_eps)
        gate, up = y @ p[pre + "feed_forward.w_gate.weight"].t(), y @ p[pre + "feed_forward.w_up.weight"].t()
        h = h + (torch.nn.functional.silu(gate) * up) @ p[pre + "feed_forward.w_down.weight"].t()
    return _rms(h, p["norm.weight"], args.norm_eps) @ p["output.weight"].t()


def _reference_mean_ce(params, windows):
    logits = reference_logits(params, windows[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())


def test_causal_model_has_no_mask_row_and_the_mdm_init():
    ar, mdm = tiny_model(causal=True), tiny_model(causal=False)
    assert ar.tok_embeddings.weight.shape == (ARGS.vocab_size, ARGS.dim)
    assert mdm.tok_embeddings.weight.shape == (ARGS.vocab_size + 1, ARGS.dim)
    mdm_params = dict(mdm.named_parameters())
    for name, param in ar.named_parameters():  # same names, shapes and values (the embedding's first V rows)
        assert torch.equal(param, mdm_params[name][: param.shape[0]]), name
    built = build_model(Model(flavor="6M", vocab_size=100), 32, torch.device("cpu"), causal=True)
    assert built.causal and built.tok_embeddings.weight.shape == (100, 256)
    assert all(layer.attention.causal for layer in built.layers.values())


def test_objective_config_key():
    assert load_config([]).training.objective == "mdm"
    assert load_config(["--training.objective", "ar"]).training.objective == "ar"


@pytest.mark.parametrize("causal", [True, False])
def test_logits_equal_float64_reference(causal):
    model = tiny_model(causal=causal)
    tokens = torch.randint(0, ARGS.vocab_size, (3, 16))
    expected = reference_logits(model.state_dict(), tokens, causal=causal)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).double(), expected, rtol=1e-5, atol=1e-5)
        # float64 weights: only the RoPE table (computed in float32) differs from the reference
        torch.testing.assert_close(model.double()(tokens), expected, rtol=0, atol=1e-6)


def test_causal_model_ignores_the_future():
    model = tiny_model().eval()
    x = torch.randint(0, ARGS.vocab_size, (2, 16))
    y = x.clone()
    y[:, 9:] = (x[:, 9:] + 1) % ARGS.vocab_size
    with torch.no_grad():
        lx, ly = model(x), model(y)
    assert torch.equal(lx[:, :9], ly[:, :9])
    assert not torch.allclose(lx[:, 9:], ly[:, 9:])


@pytest.mark.parametrize("backend,dtype,tol", [("flash", torch.bfloat16, 3e-2), ("math", torch.float32, 1e-5)])
def test_causal_sdpa_backends_equal_explicit_mask(backend, dtype, tol):
    """On the CPU, SDPA runs the flash backend (here in bf16) and the math backend; both must equal softmax with
    an explicit causal mask in float64 (GPU backends: test_ar_gpu)."""
    attn = Attention(32, 2, backend=backend, causal=True)
    torch.nn.init.normal_(attn.wqkv.weight, std=0.3)
    attn.to(dtype)
    x = torch.randn(2, 12, 32).to(dtype)
    rope = rope_cache(12, 16, 10000.0)
    with torch.no_grad():
        out = attn(x, rope).double()
        math_attn = Attention(32, 2, backend="math", causal=False).to(dtype)
        math_attn.load_state_dict(attn.state_dict())
        full = math_attn(x, rope).double()
    # explicit reference through the float64 model math: one layer of q, k, v
    q, k, v = (x.double() @ attn.wqkv.weight.double().t()).view(2, 12, 3, 2, 16).unbind(2)
    angle = rope.double()
    q, k = (_rotate(t, angle[0][:, None], angle[1][:, None]) for t in (q, k))
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / 4.0
    scores = scores.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v).reshape(2, 12, 32) @ attn.wo.weight.double().t()
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    assert not torch.allclose(full, ref, atol=1e-3)  # the flag is what makes it causal


def test_next_token_batch_shifts_and_weights_every_row():
    windows = torch.arange(2 * 9).view(2, 9)
    mb = next_token_batch(windows, token_count=40)
    assert torch.equal(mb.inputs, windows[:, :8]) and torch.equal(mb.targets, windows[:, 1:])
    assert torch.equal(mb.token_weights, torch.full((2, 8), 1 / 40))
    assert torch.equal(mb.masked_index, torch.arange(16)) and mb.num_masked == 16
    cropped = next_token_batch(windows, token_count=8, length=4)  # an SSL-cropped micro-batch
    assert torch.equal(cropped.inputs, windows[:, :4]) and torch.equal(cropped.targets, windows[:, 1:5])
    with pytest.raises(ValueError):
        next_token_batch(windows, token_count=8, length=9)


def ar_loss(model, mb, impl="torch"):
    """The AR batch through the loss kernel (``impl``; "torch" = its PyTorch reference), from the model's final
    hidden states and head, as the model's forward calls it."""
    hidden = model.hidden_states(mb.inputs).flatten(0, 1)
    return masked_linear_cross_entropy(hidden, model.output.weight, mb.targets.flatten(), mb.token_weights.flatten(),
                                       impl=impl, masked_index=mb.masked_index)


def _ar_step_loss_and_grads(model, windows, micro_batches):
    """The trainer's arithmetic: each micro-batch backpropagates its weighted sum with the step's token count."""
    model.zero_grad()
    token_count = windows.shape[0] * (windows.shape[1] - 1)
    total = 0.0
    for part in windows.chunk(micro_batches):
        loss = ar_loss(model, next_token_batch(part, token_count=token_count))
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_ar_loss_and_gradients_equal_float64_reference():
    model = tiny_model()
    windows = torch.randint(0, ARGS.vocab_size, (4, 13))
    loss, grads = _ar_step_loss_and_grads(model, windows, micro_batches=1)
    params = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters()}
    expected = _reference_mean_ce(params, windows)
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-6)
    for name, param in params.items():
        torch.testing.assert_close(grads[name].double(), param.grad, rtol=1e-4, atol=1e-6, msg=name)
    # layout: 4 micro-batches of one sequence give the same step (the global token count divides each)
    loss4, grads4 = _ar_step_loss_and_grads(model, windows, micro_batches=4)
    assert loss4 == pytest.approx(loss, rel=1e-6)
    for name in grads:
        torch.testing.assert_close(grads4[name], grads[name], rtol=1e-5, atol=1e-7)


def test_exact_nll_and_perplexity():
    model = tiny_model()
    windows = torch.randint(0, ARGS.vocab_size, (2, 11))
    with torch.no_grad():
        nll = next_token_nll(model(windows[:, :-1]), windows[:, 1:])
    logp = reference_logits(model.state_dict(), windows[:, :-1]).log_softmax(-1)
    expected = -logp.gather(-1, windows[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(nll.double(), expected, rtol=1e-5, atol=1e-5)
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)


def test_validation_is_the_exact_nll_per_token():
    from dlm_titan.ar_validation import NextTokenValidator

    model = tiny_model()
    batches = [{"input": torch.randint(0, ARGS.vocab_size, (2, 17)), "position": torch.arange(2) + 2 * i}
               for i in range(3)]
    result = NextTokenValidator(model, batches, steps=-1, seq_len=16, device=torch.device("cpu")).run()
    windows = torch.cat([b["input"] for b in batches])
    logp = reference_logits(model.state_dict(), windows[:, :-1]).log_softmax(-1)
    nll = -logp.gather(-1, windows[:, 1:, None]).squeeze(-1)
    assert result.loss == pytest.approx(nll.mean().item(), rel=1e-6)
    assert result.ppl == pytest.approx(math.exp(nll.mean().item()), rel=1e-6)
    assert result.stderr == pytest.approx(nll.mean(1).std().item() / math.sqrt(6), rel=1e-5)
    assert (result.sequences, result.tokens) == (6, 96) and model.training
    assert result.scalars()["validation/loss"] == result.loss and "exact NLL" in result.summary()
    two = NextTokenValidator(model, batches, steps=2, seq_len=16, device=torch.device("cpu")).run()
    assert two.sequences == 4 and two.loss == pytest.approx(nll[:4].mean().item(), rel=1e-6)


def test_trainer_micro_batch_uses_seq_len_and_the_ssl_crop():
    from dlm_titan.autoregressive import next_token_micro_batch
    from dlm_titan.diffusion import ssl_length

    windows = torch.randint(0, ARGS.vocab_size, (2, 33))
    batch = {"input": windows, "position": torch.tensor([4, 5])}
    cfg = load_config(["--training.seq_len", "32", "--training.objective", "ar"])
    mb, t, length = next_token_micro_batch(cfg, batch, step=3, token_count=128)
    assert t is None and length == 32 and torch.equal(mb.targets, windows[:, 1:])
    assert torch.equal(mb.token_weights, torch.full((2, 32), 1 / 128))
    cfg = load_config(["--training.seq_len", "32", "--diffusion.ssl_ratio", "1.0"])
    mb, _, length = next_token_micro_batch(cfg, batch, step=3, token_count=128)
    assert length == ssl_length(cfg.training.seed, 3, 4, 32, 1.0) == mb.inputs.shape[1]
    assert torch.equal(mb.targets, windows[:, 1 : length + 1])


def test_plan_line_counts_the_parameters_the_model_has():
    """An AR model has no mask-token row: the plan line's total is its real parameter count (an MDM's has d more)."""
    from pathlib import Path

    from dlm_titan.train import plan_summary

    for objective, causal in (("ar", True), ("mdm", False)):
        cfg = load_config(["--training.objective", objective, "--model.vocab_size", "100"])
        model = build_model(cfg.model, 32, torch.device("cpu"), causal=causal)
        line = plan_summary(cfg, model, 10, 1, 1, torch.device("cpu"), Path("data"))[0]
        total = sum(p.numel() for p in model.parameters())
        assert f" {total:,} total;" in line, line
    assert model.args.total_params() - model.args.total_params(mask_row=False) == model.args.dim
