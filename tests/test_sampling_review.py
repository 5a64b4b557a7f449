"""Review tests of the samplers and the MDM paths of scripts.generate / scripts.eval_elbo: reveal counts per
forward against a hand-computed schedule, non-finite sampler options, and bad seeds as one-line errors."""

import math

import pytest
import torch
from torch import nn

from dlm_titan.errors import UserError
from dlm_titan.sampling import SamplerConfig, generate, sample

V, MASK = 8, 8
pytestmark = pytest.mark.usefixtures("one_thread")


class Recording(nn.Module):
    """Logits from a fixed random table per (position, token); records every input canvas."""

    def __init__(self, vocab: int = V, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(64, vocab, generator=g) * 3, requires_grad=False)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return self.table[: x.shape[1]][None].expand(x.shape[0], -1, -1)


def test_confidence_reveals_the_hand_computed_schedule_per_block_and_prompt_length():
    """length 10 in 2 blocks of 5, 3 steps: reveals per step 1, 2, 2 (floor(5*1/3)=1, floor(10/3)=3, 5);
    so the masks seen by the 6 forwards are 10, 9, 7, 5, 4, 2, for every prompt whatever its length."""
    model = Recording()
    cfg = SamplerConfig(length=10, steps=3, block_length=5, algorithm="confidence", temperature=1.0,
                        stop_at_eos=False, seed=3)
    out = generate(model, [[1], [2, 3, 4], [5]], cfg, mask_id=MASK)
    assert [len(o) for o in out] == [10, 10, 10] and all(MASK not in o for o in out)
    by_length: dict[int, list[list[int]]] = {}  # prompt length -> masks per row, per forward
    for x in model.inputs:
        plen = x.shape[1] - 10
        by_length.setdefault(plen, []).append((x[:, plen:] == MASK).sum(1).tolist())
    assert sorted(by_length) == [1, 3]
    for plen, masks in by_length.items():
        rows = 2 if plen == 1 else 1
        assert masks == [[m] * rows for m in (10, 9, 7, 5, 4, 2)]


def test_stochastic_with_more_steps_than_tokens_reveals_everything():
    cfg = SamplerConfig(length=3, steps=7, algorithm="stochastic", temperature=1.0, stop_at_eos=False)
    x = sample(Recording(), torch.zeros(4, 2, dtype=torch.long), cfg, mask_id=MASK)
    assert not (x == MASK).any()


@pytest.mark.parametrize("option", ["temperature", "cfg_scale"])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_non_finite_temperature_or_cfg_is_a_user_error(option, value):
    """temperature = inf made every -inf (vocab-limited) logit NaN, and argmax picks NaN: tokens >= vocab_limit
    came out; NaN gave arbitrary tokens. Both are refused."""
    cfg = SamplerConfig(length=4, steps=2, stop_at_eos=False, **{option: value})
    with pytest.raises(UserError, match="finite"):
        sample(Recording(), torch.zeros(2, 1, dtype=torch.long), cfg, mask_id=MASK, vocab_limit=5)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_generate_cli_negative_seed_is_one_line_and_exit_2(monkeypatch, capsys):
    from dlm_titan.data import load_tokenizer
    from scripts import generate as cli

    vocab = load_tokenizer("").vocab_size
    monkeypatch.setattr(cli, "load_for_inference", lambda *a: _tiny_transencoder(vocab))
    assert cli.main(["--checkpoint", "unused", "--prompt", "It was", "--length", "2", "--steps", "1",
                     "--seed", "-1"]) == 2
    assert "--seed" in _one_line_error(capsys)


def test_eval_elbo_cli_negative_seed_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    from dlm_titan.data import load_tokenizer
    from scripts import eval_elbo as cli

    vocab = load_tokenizer("").vocab_size
    monkeypatch.setattr(cli, "load_for_inference", lambda *a: _tiny_transencoder(vocab))
    text = tmp_path / "t.txt"
    text.write_text("a short text")
    assert cli.main(["--checkpoint", "unused", "--text_file", str(text), "--seq_len", "8", "--mc_samples", "2",
                     "--seed", "-3"]) == 2
    assert "--seed" in _one_line_error(capsys)


def _tiny_transencoder(vocab: int) -> nn.Module:
    from dlm_titan.models import ModelArgs, TransEncoder

    model = TransEncoder(ModelArgs(n_layers=1, n_heads=2, dim=16, ffn_dim=32, vocab_size=vocab), max_seq_len=32)
    model.init_weights(0)
    return model.eval()


def test_eval_elbo_negative_max_windows_is_one_line_and_exit_2(tmp_path, capsys):
    """--max_windows 0 means all windows; a negative count is refused before anything loads, not read as 'all'."""
    from scripts.eval_elbo import main

    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert main(["--checkpoint", str(tmp_path / "none"), "--text_file", str(text), "--max_windows", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "--max_windows must be >= 0" in err, err
