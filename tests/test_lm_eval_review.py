"""Review of the lm-eval integration and the corpus preparation at their edges: long contexts keep every context
token that fits (against the untruncated reference), a max_length beyond the model is one line, lm-eval's aliases of
max_gen_toks (its own ``normalize_gen_kwargs`` is the reference), and a preparation manifest that is valid JSON but
no manifest, or whose stream numbers a new input file would take over, is refused."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from harness import word_level_tokenizer
from test_ar import reference_logits
from test_likelihood import EOS, MASK, CharTokenizer, tiny_model

from dlm_titan.errors import UserError
from dlm_titan.likelihood import left_to_right_logprob
from dlm_titan.lm_eval.ar_scorer import ARScorer
from dlm_titan.lm_eval.scorer import Scorer, ScorerConfig, encode_pair, gen_options, truncate_pair
from dlm_titan.models import ModelArgs, TransEncoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("ctx_len, cont_len, max_length", [(3, 1, 5), (4, 1, 5), (6, 1, 5), (1500, 10, 2048),
                                                           (2, 7, 5), (0, 3, 5)])
def test_truncate_pair_keeps_the_last_tokens_that_fit(ctx_len, cont_len, max_length):
    """The kept pair is the last ``max_length`` tokens of context + continuation (lm-eval's
    ``(context_enc + continuation_enc)[-max_length:]``), split where the continuation starts."""
    ctx, cont = list(range(ctx_len)), list(range(10_000, 10_000 + cont_len))
    kept = (ctx + cont)[-max_length:]
    n_cont = min(cont_len, max_length)
    assert truncate_pair(ctx, cont, max_length) == (kept[: len(kept) - n_cont], kept[len(kept) - n_cont :])


def test_truncate_pair_random_lengths():
    rng = random.Random(0)
    for _ in range(500):
        ctx, cont = list(range(rng.randint(0, 40))), list(range(100, 100 + rng.randint(1, 40)))
        max_length = rng.randint(1, 60)
        kept = (ctx + cont)[-max_length:]
        n_cont = min(len(cont), max_length)
        assert truncate_pair(ctx, cont, max_length) == (kept[: len(kept) - n_cont], kept[len(kept) - n_cont :])


def test_mdm_loglikelihood_of_a_long_context_sees_all_of_it():
    """A context of more than half of max_length (but fitting) is scored whole: the left-to-right log-likelihood
    equals the one computed on the untruncated pair."""
    model, tok = tiny_model(), CharTokenizer()
    context, continuation = "in the beginning god created the heaven", " and"  # 39 + 4 tokens <= 64
    ctx, cont = encode_pair(tok, context, continuation)
    assert len(ctx) + len(cont) <= model.max_seq_len and 2 * len(ctx) > model.max_seq_len - len(cont)
    scorer = Scorer(model, tok, ScorerConfig(nll_type="left_to_right", batch_size=4))
    [(logp, _)] = scorer.loglikelihood([(context, continuation)])
    ref = left_to_right_logprob(model, cont, mask_id=MASK, context=ctx).sum().item()
    assert logp == pytest.approx(ref, rel=1e-6, abs=1e-6)


AR_ARGS = ModelArgs(n_layers=2, n_heads=2, dim=32, ffn_dim=64, vocab_size=50)


def test_ar_loglikelihood_of_a_long_context_sees_all_of_it():
    """The causal model's exact log p(continuation | whole context), against the float64 model, for contexts
    that fill 60-100% of the input."""
    model = TransEncoder(AR_ARGS, max_seq_len=24, causal=True)
    model.init_weights(3)
    params = {k: v.double() for k, v in model.state_dict().items()}
    scorer = ARScorer(model.eval(), CharTokenizer(), ScorerConfig(batch_size=2))
    requests = [("the cat sat on the m", "at"), ("a big red dog ran far", " aw")]  # 20 + 2 and 21 + 3 tokens
    got = scorer.loglikelihood(requests)
    for (context, continuation), (logp, _) in zip(requests, got, strict=True):
        ctx, cont = encode_pair(CharTokenizer(), context, continuation)
        seq = torch.tensor([ctx + cont])
        ref = reference_logits(params, seq[:, :-1], AR_ARGS).log_softmax(-1)[0, len(ctx) - 1 :]
        assert logp == pytest.approx(ref.gather(-1, torch.tensor(cont)[:, None]).sum().item(), rel=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_max_length_beyond_the_model_is_a_user_error(causal):
    model = TransEncoder(AR_ARGS, max_seq_len=16, causal=causal)
    model.init_weights(1)
    scorer_cls = ARScorer if causal else Scorer
    with pytest.raises(UserError, match=r"max_length=64 .*max_seq_len 16"):
        scorer_cls(model, CharTokenizer(), ScorerConfig(max_length=64))


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": 5}, {"max_tokens": 7}, {"max_completion_tokens": 3},
                                    {"max_gen_toks": 4, "max_new_tokens": 9}, {"until": "\n"}])
def test_gen_options_follow_lm_evals_max_token_aliases(kwargs):
    from lm_eval.models.utils import normalize_gen_kwargs

    ref = normalize_gen_kwargs(dict(kwargs), default_max_gen_toks=256)
    _, until, opts = gen_options(CharTokenizer(), "the cat", dict(kwargs), max_length=1000)
    assert opts.length == ref["max_gen_toks"] and until == ref["until"]


def test_empty_context_is_the_eos_that_starts_a_document():
    assert encode_pair(CharTokenizer(), "", "ab")[0] == [EOS]


# --- corpus preparation -------------------------------------------------------------------------------------------


def _write(src: Path, name: str, docs: list[str]) -> None:
    (src / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


@pytest.mark.parametrize("content", ["[1, 2]", '"manifest"', "{}"])
def test_manifest_that_is_no_manifest_is_a_user_error(tmp_path: Path, content: str):
    from dlm_titan.data import general_corpus, prepare_split

    tok = word_level_tokenizer(tmp_path)
    (tmp_path / "src").mkdir()
    _write(tmp_path / "src", "a.jsonl", ["a b c"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "p_manifest.json").write_text(content)
    with pytest.raises(UserError, match="p_manifest.json"):
        prepare_split(str(tmp_path / "src"), tok, str(tmp_path / "out"), "train", corpus=general_corpus(), prefix="p",
                      show_progress=False)


def test_new_input_taking_a_removed_inputs_stream_is_refused(tmp_path: Path):
    """a.jsonl and b.jsonl prepared (streams 0, 1); b removed and c added: c would be stream 1 and overwrite b's
    shards while the manifest still records b with them (totals counting both)."""
    from dlm_titan.data import general_corpus, prepare_split

    tok = word_level_tokenizer(tmp_path)
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    _write(src, "a.jsonl", ["a b c"])
    _write(src, "b.jsonl", ["b b"])
    run = lambda: prepare_split(str(src), tok, str(out), "train", corpus=general_corpus(), prefix="p",  # noqa: E731
                                show_progress=False)
    assert run()["totals"]["tokens"] == 4 + 3
    (src / "b.jsonl").unlink()
    _write(src, "c.jsonl", ["c c c c"])
    with pytest.raises(UserError, match="b.jsonl"):
        run()


@pytest.mark.parametrize("causal", [False, True])
def test_sampled_generation_does_not_depend_on_how_documents_are_spread(causal):
    """Two documents with the same prompt, sampled at temperature 1: one process scores both, two ranks one each
    (lm-eval gives each rank whole documents, with their global doc ids). Each document's text must be the same
    either way, and the two documents' samples differ (their noise is keyed by the document, not the rank)."""
    torch.manual_seed(0)
    if causal:
        model = TransEncoder(AR_ARGS, max_seq_len=24, causal=True)
        model.init_weights(3)
        scorer = ARScorer(model.eval(), CharTokenizer(), ScorerConfig(batch_size=4))
    else:
        scorer = Scorer(tiny_model(), CharTokenizer(), ScorerConfig(batch_size=4))
    request = ("the cat", {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0})
    together = scorer.generate_until([request, request], doc_ids=[3, 7])
    apart = scorer.generate_until([request], doc_ids=[3]) + scorer.generate_until([request], doc_ids=[7])
    assert together == apart
    assert together[0] != together[1]


def test_progress_with_greedy_reaches_the_end_only_when_decoding_is_done():
    """With greedy=true a loglikelihood call scores, then decodes: the progress reports add up to the number of
    requests only at the end, and at most half of it before the decoding pass starts."""
    model, tok = tiny_model(), CharTokenizer()
    scorer = Scorer(model, tok, ScorerConfig(mc_samples=4, batch_size=8, greedy=True))
    reports: list[float] = []
    decode = scorer.is_greedy
    seen_at_decode: list[float] = []

    def is_greedy(pairs, progress=None):
        seen_at_decode.append(sum(reports))
        return decode(pairs, progress)

    scorer.is_greedy = is_greedy
    requests = [("the cat", " sat"), ("a dog", " ran far"), ("", " x")]
    scorer.loglikelihood(requests, progress=reports.append)
    assert seen_at_decode == [pytest.approx(len(requests) / 2)]
    assert sum(reports) == pytest.approx(len(requests))
