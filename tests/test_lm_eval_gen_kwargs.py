"""generate_until decodes a task's generation kwargs as lm-eval's Hugging Face model (``--model hf``) does.

Since lm-eval 0.4.10 that model normalises the kwargs with ``lm_eval.models.utils.normalize_gen_kwargs``
before calling transformers' ``generate``: a ``temperature`` above 0 without ``do_sample`` samples,
``do_sample: false`` is greedy whatever the temperature. Older lm-eval left ``do_sample`` unset there and
transformers decoded greedily; the project requires lm-eval >= 0.4.13, so the newer rule is the one to match.
"""

from __future__ import annotations

import pytest

from dlm_titan.lm_eval.scorer import gen_options


class CharTokenizer:
    """One id per character (ids 3..), EOS 2: enough for gen_options."""

    eos_id = 2

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [3 + ord(c) % 97 for c in text]


# Every combination for which --model hf decodes; do_sample: true with a temperature of 0 (given or
# defaulted) stops there with transformers' "temperature has to be a strictly positive float".
HF_DECODABLE = [
    {},
    {"temperature": 0.0},
    {"temperature": 0},
    {"temperature": 0.7},
    {"temperature": 1},
    {"do_sample": False},
    {"do_sample": False, "temperature": 0.0},
    {"do_sample": False, "temperature": 0.7},
    {"do_sample": True, "temperature": 0.7},
    {"do_sample": True, "temperature": 2.0},
]


def _hf_temperature(kwargs: dict) -> float:
    """The temperature --model hf samples at, 0 for greedy, by lm-eval's own normalisation."""
    from lm_eval.models.utils import normalize_gen_kwargs

    normalized = normalize_gen_kwargs(dict(kwargs, until=[]))
    return float(normalized.get("temperature", 0.0)) if normalized["do_sample"] else 0.0


@pytest.mark.parametrize("kwargs", HF_DECODABLE, ids=str)
def test_generate_until_samples_exactly_when_lm_evals_hf_model_does(kwargs):
    pytest.importorskip("lm_eval")
    _, _, opts = gen_options(CharTokenizer(), "the cat", {"until": [], "max_gen_toks": 4, **kwargs}, max_length=64)
    assert opts.temperature == _hf_temperature(kwargs)


def test_a_temperature_without_do_sample_samples():
    """The case where vLLM's and the old Hugging Face reading differed: it samples, as --model hf now does."""
    _, _, opts = gen_options(CharTokenizer(), "the cat", {"until": [], "temperature": 0.7}, max_length=64)
    assert opts.temperature == 0.7
