"""Samplers: invariants on a random model (no mask left, prompt kept, exactly `steps` forwards per block),
per-sample top-k, reveal probabilities, Gumbel-max temperature, CFG, batch invariance, and a tiny model trained
here on a periodic text that regenerates it and stops at its EOS."""

import io
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlm_titan.diffusion import forward_process, sample_noise
from dlm_titan.errors import UserError
from dlm_titan.models import ModelArgs, TransEncoder
from dlm_titan.sampling import SamplerConfig, generate, guided_logits, gumbel_argmax, row_generators, sample

VOCAB, MASK, EOS = 50, 50, 2
# Tiny matmuls: a second thread only adds contention on shared 2-core CI machines. Module scope: the model trained
# once for the module below trains on one thread too.
pytestmark = pytest.mark.usefixtures("one_thread")


class Counting(nn.Module):
    """Wraps a model and records the input of every forward call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return self.model(x)


def tiny_model(seed: int = 1, vocab: int = VOCAB, max_seq_len: int = 64) -> TransEncoder:
    model = TransEncoder(ModelArgs(n_layers=2, n_heads=4, dim=64, ffn_dim=256, vocab_size=vocab), max_seq_len=max_seq_len)
    model.init_weights(seed)
    return model.eval()


@pytest.fixture(scope="module")
def random_model():
    return tiny_model()


@pytest.mark.parametrize("algorithm", ["confidence", "stochastic"])
@pytest.mark.parametrize("block_length, steps", [(0, 5), (4, 3), (6, 6)])
@pytest.mark.parametrize("temperature, cfg_scale", [(0.0, 0.0), (1.0, 0.0), (0.7, 1.5)])
def test_sampler_invariants(random_model, algorithm, block_length, steps, temperature, cfg_scale):
    model = Counting(random_model)
    prompt = torch.randint(0, VOCAB, (3, 5))
    cfg = SamplerConfig(length=12, steps=steps, block_length=block_length, algorithm=algorithm,
                        temperature=temperature, cfg_scale=cfg_scale, stop_at_eos=False, seed=4)
    x = sample(model, prompt, cfg, mask_id=MASK, eos_id=EOS)
    assert x.shape == (3, 17)
    assert not (x == MASK).any()
    assert torch.equal(x[:, :5], prompt)
    blocks = 12 // (block_length or 12)
    assert len(model.inputs) == steps * blocks
    # CFG runs both passes in the one forward call: a doubled batch whose second half has the prompt masked.
    first = model.inputs[0]
    assert first.shape[0] == (6 if cfg_scale else 3)
    if cfg_scale:
        assert (first[3:, :5] == MASK).all() and torch.equal(first[3:, 5:], first[:3, 5:])
    # Every call sees the prompt unchanged; block b is untouched (all masks) before its first step.
    block = block_length or 12
    for i, inp in enumerate(model.inputs):
        assert torch.equal(inp[:3, :5], prompt)
        b = i // steps
        assert (inp[:3, 5 + (b + 1) * block :] == MASK).all()


def test_confidence_reveals_topk_per_sample():
    """Row 0 is far more confident than row 1 everywhere: SMDM's batch-wide top-k would reveal row 0 first;
    per-sample top-k reveals the scheduled count in every row at every step."""

    class Skewed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inputs = []
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            self.inputs.append(x.clone())
            logits = torch.zeros(*x.shape, VOCAB)
            logits[0, :, 7] = 20.0  # row 0: near-certain
            logits[1, :, 9] = 0.5 + torch.arange(x.shape[1]) * 1e-3  # row 1: barely above uniform, rising
            return logits

    model = Skewed()
    x = sample(model, torch.zeros(2, 3, dtype=torch.long), SamplerConfig(length=10, steps=4, stop_at_eos=False),
               mask_id=MASK)
    # the schedule for 10 tokens in 4 steps reveals 2, 3, 2, 3: 10, 8, 5, 3 masks before each step, in each row
    assert [(inp == MASK).sum(dim=1).tolist() for inp in model.inputs] == [[10, 10], [8, 8], [5, 5], [3, 3]]
    assert (x[0, 3:] == 7).all() and (x[1, 3:] == 9).all()
    # Within row 1 the most confident (rightmost) positions come first, one per step.
    model = Skewed()
    sample(model, torch.zeros(2, 3, dtype=torch.long), SamplerConfig(length=10, steps=10, stop_at_eos=False),
           mask_id=MASK)
    rows = [inp[1] for inp in model.inputs]
    revealed = [(rows[i + 1] != rows[i]).nonzero().flatten().tolist() for i in range(9)]
    assert revealed == [[p] for p in range(12, 3, -1)]


def test_stochastic_reveals_with_probability_one_minus_s_over_t():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.masked = []
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            self.masked.append((x[:, 1:] == MASK).float().mean().item())
            return torch.zeros(*x.shape, VOCAB)

    model = Flat()
    cfg = SamplerConfig(length=4000, steps=4, algorithm="stochastic", stop_at_eos=False, seed=3)
    sample(model, torch.zeros(1, 1, dtype=torch.long), cfg, mask_id=MASK)
    # times 1, 3/4, 1/2, 1/4, 0: each step keeps s/t of the masks, so the masked fraction follows t
    for seen, t in zip(model.masked, [1.0, 0.75, 0.5, 0.25], strict=True):
        assert abs(seen - t) < 4 * math.sqrt(t * (1 - t) / 4000) + 1e-9


def test_gumbel_argmax_samples_the_tempered_softmax():
    logits = torch.tensor([[[0.0, 1.0, 2.0, -1.0]]]).expand(1, 40000, 4)
    gens = row_generators([11], "cpu")
    for temperature in (1.0, 0.5):
        draws = gumbel_argmax(logits, temperature, gens)[0]
        freq = torch.bincount(draws, minlength=4).double() / draws.numel()
        expected = torch.softmax(logits[0, 0].double() / temperature, dim=-1)
        assert torch.allclose(freq, expected, atol=0.01), (temperature, freq, expected)
    assert (gumbel_argmax(logits, 0.0, gens) == 2).all()


@pytest.mark.parametrize("temperature", [1e-309, 1e-320])
def test_gumbel_argmax_at_a_tiny_temperature_is_the_argmax(temperature):
    """At a temperature near 0 the draw is the argmax. Dividing the raw logits sent every logit of one sign to the
    same +-inf, so the first of them won (here token 0 in both rows) whatever the largest logit was."""
    logits = torch.tensor([[[-2.0, -0.5, -1.0, -3.0], [0.5, 0.25, 1.0, 0.75]]])
    draws = gumbel_argmax(logits, temperature, row_generators([3], "cpu"))
    assert draws.tolist() == [[1, 2]]


def test_guided_logits_is_unsupervised_cfg(random_model):
    x = torch.randint(0, VOCAB, (2, 9))
    x[:, 6:] = MASK
    prompt_mask = torch.zeros_like(x, dtype=torch.bool)
    prompt_mask[:, :4] = True
    cond = random_model(x)
    uncond_input = x.clone()
    uncond_input[:, :4] = MASK
    uncond = random_model(uncond_input)
    expected = uncond + 2.5 * (cond - uncond)
    torch.testing.assert_close(guided_logits(random_model, x, prompt_mask, 1.5, MASK), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided_logits(random_model, x, prompt_mask, 0.0, MASK), cond)


def test_batch_of_prompts_matches_single_prompts(random_model):
    prompts = [[5, 6, 7], [8, 9], [5, 6, 7], [10, 11]]
    cfg = SamplerConfig(length=8, steps=4, block_length=4, temperature=1.0, stop_at_eos=False, seed=9)
    batched = generate(random_model, prompts, cfg, mask_id=MASK, eos_id=EOS)
    assert [len(o) for o in batched] == [8] * 4
    # prompt i draws with seed cfg.seed + i whatever else is in the batch
    for i, p in enumerate(prompts):
        alone = generate(random_model, [p], SamplerConfig(**{**cfg.__dict__, "seed": 9 + i}), mask_id=MASK, eos_id=EOS)
        assert alone[0] == batched[i]
    assert batched[0] != batched[2]  # copies of a prompt get different samples at temperature 1


def test_vocab_limit_is_respected(random_model):
    cfg = SamplerConfig(length=16, steps=4, temperature=2.0, stop_at_eos=False)
    x = sample(random_model, torch.zeros(4, 2, dtype=torch.long), cfg, mask_id=MASK, vocab_limit=10)
    assert (x[:, 2:] < 10).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"length": 10, "block_length": 4}, "multiple of block_length"),
        ({"length": 8, "steps": 9}, "exceed the block of 8 tokens"),
        ({"algorithm": "greedy"}, "unknown sampling algorithm"),
        ({"steps": 0}, "at least 1"),
    ],
)
def test_bad_sampler_options_are_user_errors(random_model, kwargs, message):
    with pytest.raises(UserError, match=message):
        sample(random_model, torch.zeros(1, 2, dtype=torch.long), SamplerConfig(**kwargs), mask_id=MASK)


# A document of 5 tokens + EOS, repeated: the stream the tiny model is trained on.
DOC = [10, 21, 13, 34, 15, EOS]
STREAM = DOC * 8


@pytest.fixture(scope="module")
def trained_model():
    """2 layers, d=64, vocab 50, trained with the MDM objective on crops of STREAM (~300 steps, a few s)."""
    torch.manual_seed(0)
    model = tiny_model(seed=0).train()
    steps, batch, seq_len = 300, 32, 24
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    gen = torch.Generator().manual_seed(0)
    stream = torch.tensor(STREAM)
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(DOC), (batch,), generator=gen).tolist()
        tokens = torch.stack([stream[s : s + seq_len] for s in starts])
        noise = sample_noise(torch.arange(batch), seq_len, seed=0, step=step)
        mb = forward_process(tokens, noise, eps=1e-3, mask_id=MASK, token_count=tokens.numel())
        ce = F.cross_entropy(model(mb.inputs).flatten(0, 1), mb.targets.flatten(), reduction="none")
        loss = (ce * mb.token_weights.flatten()).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


PROMPTS = [(0, 4), (3, 8), (5, 3), (1, 2)]  # (start in STREAM, prompt length)


@pytest.mark.parametrize("algorithm", ["confidence", "stochastic"])
@pytest.mark.parametrize("block_length, steps, temperature, cfg_scale",
                         [(0, 8, 0.0, 0.0), (8, 8, 1.0, 0.0), (4, 4, 0.0, 0.5), (0, 16, 0.0, 0.0)])
@pytest.mark.slow
def test_trained_model_regenerates_its_text(trained_model, algorithm, block_length, steps, temperature, cfg_scale):
    prompts = [STREAM[s : s + n] for s, n in PROMPTS]
    cfg = SamplerConfig(length=16, steps=steps, block_length=block_length, algorithm=algorithm,
                        temperature=temperature, cfg_scale=cfg_scale, stop_at_eos=False, seed=1)
    out = generate(trained_model, prompts, cfg, mask_id=MASK, eos_id=EOS)
    assert out == [STREAM[s + n : s + n + 16] for s, n in PROMPTS]


@pytest.mark.slow
def test_trained_model_stops_at_eos(trained_model):
    prompts = [STREAM[s : s + n] for s, n in PROMPTS]
    counted = Counting(trained_model)
    cfg = SamplerConfig(length=16, steps=4, block_length=8, stop_at_eos=True)
    out = generate(counted, prompts, cfg, mask_id=MASK, eos_id=EOS)
    x = sample(trained_model, torch.tensor([STREAM[3:11]]), cfg, mask_id=MASK, eos_id=EOS)
    expected = []
    for s, n in PROMPTS:
        rest = STREAM[s + n :]
        expected.append(rest[: rest.index(EOS)])
    assert out == expected
    # A period-6 text has an EOS in every 8-token block: the second block of each prompt group never runs.
    assert len(counted.inputs) == len(PROMPTS) * 4
    # The returned canvas holds no mask: after the first EOS it is all EOS.
    assert not (x == MASK).any() and (x[0, 8 + STREAM[11:].index(EOS) :] == EOS).all()


def test_generate_cli_prints_its_stats_line_after_the_samples_on_a_line_of_its_own(monkeypatch):
    from dlm_titan.data import load_tokenizer
    from scripts import generate as cli

    tok = load_tokenizer("")
    eos_at_end = tok.encode("a short end.", bos=False, eos=False)  # the sampler cut it before its EOS
    monkeypatch.setattr(cli, "load_for_inference", lambda *a: tiny_model(vocab=tok.vocab_size))
    monkeypatch.setattr(cli, "generate", lambda model, prompts, cfg, **kw: [eos_at_end for _ in prompts])
    both = io.StringIO()  # stdout and stderr into one stream, as on a terminal
    monkeypatch.setattr(sys, "stdout", both)
    monkeypatch.setattr(sys, "stderr", both)
    assert cli.main(["--checkpoint", "unused", "--prompt", "It was", "--length", "8", "--steps", "2"]) == 0
    text = "It was" + cli.continuation_text(tok, tok.encode("It was", bos=False, eos=False), eos_at_end)
    out = both.getvalue()
    assert out[: len(text) + 1] == text + "\n"
    assert re.fullmatch(rf"1 samples, {len(eos_at_end)} tokens in \d+\.\d\d s\n", out[len(text) + 1 :])


@pytest.mark.parametrize("extra, steps", [([], 64), (["--length", "8"], 8), (["--length", "64", "--block_length", "16"], 16),
                                          (["--length", "8", "--steps", "3"], 3)])
def test_generate_cli_default_steps_fit_the_block(monkeypatch, extra, steps):
    from dlm_titan.data import load_tokenizer
    from scripts import generate as cli

    tok = load_tokenizer("")
    seen = []
    monkeypatch.setattr(cli, "load_for_inference", lambda *a: tiny_model(vocab=tok.vocab_size, max_seq_len=256))
    monkeypatch.setattr(cli, "generate", lambda model, prompts, cfg, **kw: seen.append(cfg.steps) or [[] for _ in prompts])
    assert cli.main(["--checkpoint", "unused", "--prompt", "It was", *extra]) == 0
    assert seen == [steps]


def test_generate_cli_explicit_steps_beyond_the_block_are_refused(monkeypatch, capsys):
    from scripts import generate as cli

    monkeypatch.setattr(cli, "load_for_inference", lambda *a: tiny_model(vocab=32000))
    assert cli.main(["--checkpoint", "unused", "--prompt", "It was", "--length", "32", "--steps", "64"]) == 2
    assert "use --steps 32 or fewer" in capsys.readouterr().err
