"""AR sampling: the KV cache changes nothing, and a step's draw follows the float64 distribution written here."""

import dataclasses

import pytest
import torch
from test_ar import ARGS, tiny_model

from dlm_titan.ar_sampling import (
    ARSamplerConfig,
    KVCache,
    cached_last_logits,
    generate,
    next_token_probs,
    sample_next,
)
from dlm_titan.errors import UserError
from dlm_titan.models.transformer import TransEncoder
from dlm_titan.sampling import row_generators


@pytest.mark.parametrize("kv_heads", [0, 1], ids=["mha", "gqa"])
@pytest.mark.slow
def test_cached_logits_equal_full_forward_and_greedy_outputs_are_identical(kv_heads):
    model = TransEncoder(dataclasses.replace(ARGS, n_kv_heads=kv_heads), max_seq_len=32, causal=True)
    model.init_weights(seed=3407)
    model.eval()
    prompt = torch.randint(0, ARGS.vocab_size, (2, 5))
    cfg = ARSamplerConfig(max_new_tokens=20, temperature=0, kv_cache=True)
    cached = generate(model, prompt, cfg)
    uncached = generate(model, prompt, ARSamplerConfig(max_new_tokens=20, temperature=0, kv_cache=False))
    assert cached.shape == (2, 25) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, uncached)
    # every step's logits, prompt first then one token at a time, against the whole-prefix forward
    cache = KVCache(model, 2, 25, torch.float32, torch.device("cpu"))
    assert cache.keys[0].shape[2] == (kv_heads or ARGS.n_heads)
    with torch.no_grad():
        steps = [cached_last_logits(model, cached[:, :5], cache)]
        steps += [cached_last_logits(model, cached[:, i : i + 1], cache) for i in range(5, 24)]
        full = model(cached[:, :24])
    for i, logits in enumerate(steps):
        torch.testing.assert_close(logits, full[:, 4 + i], rtol=1e-5, atol=1e-5)


def _reference_probs(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """Softmax over the top_k logits by sorting, in float64."""
    x = logits.double() / temperature
    order = x.argsort(dim=-1, descending=True)
    keep = torch.zeros_like(x, dtype=torch.bool).scatter(-1, order[:, :top_k], True)
    e = torch.where(keep, torch.exp(x - x.max(-1, keepdim=True).values), torch.zeros_like(x))
    return e / e.sum(-1, keepdim=True)


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5)])
def test_one_step_follows_the_float64_distribution(temperature, top_k):
    logits = torch.randn(1, ARGS.vocab_size) * 2
    expected = _reference_probs(logits, temperature, top_k or ARGS.vocab_size)[0]
    torch.testing.assert_close(next_token_probs(logits, temperature, top_k)[0], expected, rtol=1e-12, atol=1e-15)
    n = 4000
    draws = sample_next(logits.expand(n, -1), temperature, top_k, row_generators(list(range(n)), "cpu"))
    freq = torch.bincount(draws, minlength=ARGS.vocab_size).double() / n
    assert torch.all(freq[expected == 0] == 0)  # nothing outside the top k
    sigma = (expected * (1 - expected) / n).sqrt()
    assert torch.all((freq - expected).abs() <= 5 * sigma + 1e-12)


@pytest.mark.slow
def test_greedy_is_argmax_and_samples_do_not_depend_on_their_batch():
    logits = torch.randn(3, ARGS.vocab_size)
    assert torch.equal(sample_next(logits, 0.0, 0, []), logits.argmax(-1))
    model = tiny_model(seq_len=32).eval()
    prompt = torch.randint(0, ARGS.vocab_size, (2, 4))
    cfg = ARSamplerConfig(max_new_tokens=8, temperature=1.0, top_k=10, seed=5)
    both = generate(model, prompt, cfg)
    assert torch.equal(generate(model, prompt[:1], cfg), both[:1])
    assert torch.equal(generate(model, prompt, cfg), both)


def test_stop_at_eos_pads_with_eos():
    model = tiny_model(seq_len=32).eval()
    prompt = torch.randint(0, ARGS.vocab_size, (1, 4))
    free = generate(model, prompt, ARSamplerConfig(max_new_tokens=10, temperature=0, stop_at_eos=False))
    eos = int(free[0, 6])  # the third generated token, taken as EOS
    out = generate(model, prompt, ARSamplerConfig(max_new_tokens=10, temperature=0), eos_id=eos)
    first = int((free[0, 4:] == eos).nonzero()[0]) + 4
    assert torch.equal(out[0, : first + 1], free[0, : first + 1])
    assert torch.all(out[0, first:] == eos) and out.shape == free.shape


def test_bad_options_are_user_errors():
    model = tiny_model(seq_len=16).eval()
    prompt = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(UserError, match="max_seq_len"):
        generate(model, prompt, ARSamplerConfig(max_new_tokens=13))
    with pytest.raises(UserError, match="top_k"):
        generate(model, prompt, ARSamplerConfig(top_k=ARGS.vocab_size + 1, max_new_tokens=2))
    with pytest.raises(UserError, match="temperature"):
        generate(model, prompt, ARSamplerConfig(temperature=-1, max_new_tokens=2))
    with pytest.raises(UserError, match="causal"):
        generate(tiny_model(causal=False), prompt, ARSamplerConfig(max_new_tokens=2))


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), -0.5])
def test_temperature_must_be_finite_and_not_negative(temperature):
    """An infinite temperature turns the masked-out logits (ids past the vocabulary limit) into NaN, which argmax
    would pick; NaN likewise: both are one-line user errors, as a negative one is."""
    with pytest.raises(UserError, match="temperature must be finite and >= 0"):
        ARSamplerConfig(max_new_tokens=4, temperature=temperature).check(50)
