"""Defects found by a new user's review of the autoregressive baseline, end to end: AR sampling at a tiny
temperature, lm-eval's rolling windows with a longer rolling context, and generate_until with ``do_sample``
but no temperature."""

from __future__ import annotations

import pytest
import torch

from dlm_titan.ar_sampling import next_token_probs, sample_next
from dlm_titan.lm_eval.ar_scorer import ar_rolling_windows
from dlm_titan.lm_eval.scorer import gen_options
from dlm_titan.sampling import row_generators


class CharTokenizer:
    """One id per character (ids 3..), EOS 2: enough for gen_options."""

    eos_id = 2

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [3 + ord(c) % 97 for c in text]


@pytest.mark.parametrize("temperature", [1e-320, 1e-308, 1e-200])
def test_a_tiny_temperature_samples_the_argmax(temperature):
    """logits / temperature overflowed to inf for a tiny temperature and the softmax gave NaN, so
    torch.multinomial raised a traceback; the limit of softmax(logits / T) as T -> 0 is the argmax."""
    logits = torch.tensor([[1.0, 3.0, -2.0, 2.5], [0.5, -1.0, 4.0, 3.9]])
    probs = next_token_probs(logits, temperature)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs, torch.nn.functional.one_hot(logits.argmax(-1), 4).double())
    drawn = sample_next(logits, temperature, 0, row_generators([0, 1], torch.device("cpu")))
    assert drawn.tolist() == [1, 2]


def test_a_moderate_temperature_gives_the_same_distribution():
    """Shifting by the row maximum leaves softmax(logits / T) as it was."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for temperature, top_k in [(0.7, 0), (1.3, 5)]:
        scaled = logits.double() / temperature
        if top_k:
            scaled = scaled.masked_fill(scaled < scaled.topk(top_k, dim=-1).values[:, -1:], float("-inf"))
        torch.testing.assert_close(next_token_probs(logits, temperature, top_k), scaled.softmax(-1),
                                   rtol=1e-12, atol=1e-15)


def _lm_eval_windows(tokens: list[int], max_length: int, context: int, prefix: int) -> list[tuple[list, list]]:
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    return [tuple(map(list, make_disjoint_window(w)))
            for w in get_rolling_token_windows(token_list=tokens, prefix_token=prefix, max_seq_len=max_length,
                                               context_len=context)]


@pytest.mark.parametrize("max_length", [1, 2, 5, 8])
def test_ar_rolling_windows_are_lm_evals_for_every_rolling_context(max_length):
    """With rolling_context > 1 the first window predicted only max_length + 1 - rolling_context tokens, where
    lm-eval's causal windows (which the docstring and docs claim) predict max_length there."""
    pytest.importorskip("lm_eval")
    for n in range(0, 3 * max_length + 3):
        tokens = list(range(100, 100 + n))
        for context in range(1, max_length + 1):
            assert ar_rolling_windows(tokens, max_length, context, 2) == _lm_eval_windows(tokens, max_length, context, 2)


def test_ar_rolling_windows_score_every_token_once_within_max_length():
    tokens = list(range(100, 117))
    windows = ar_rolling_windows(tokens, 6, 3, 2)
    assert windows[0] == ([2], tokens[:6])
    assert [t for _, target in windows for t in target] == tokens
    assert all(len(ctx) + len(target) - 1 <= 6 for ctx, target in windows)


@pytest.mark.parametrize(("kwargs", "temperature"), [
    ({"do_sample": True}, 1.0),                        # was 0: a task asking to sample decoded greedily
    ({"do_sample": True, "temperature": 0.6}, 0.6),
    ({"do_sample": False, "temperature": 0.6}, 0.0),
    ({"temperature": 0.8}, 0.8),
    ({}, 0.0),
    ({"do_sample": None, "temperature": None}, 0.0),
])
def test_gen_options_sample_at_1_when_a_task_asks_to_sample_without_a_temperature(kwargs, temperature):
    """lm-eval's Hugging Face and vLLM models sample at temperature 1 for ``do_sample: true`` alone."""
    _, _, opts = gen_options(CharTokenizer(), "the cat", {"until": [], "max_gen_toks": 4, **kwargs}, max_length=64)
    assert opts.temperature == temperature
