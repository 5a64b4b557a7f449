"""Likelihoods: the MC ELBO is the training loss estimator (same noise) and converges to the exact bound;
the left-to-right order's likelihood equals a product computed by hand from the model's logits; batching many
texts gives each text's own value; the lm-eval scorer (without lm_eval); the generate / eval_elbo command lines
on a tiny exported model."""

import math
import sys
from functools import partial

import numpy as np
import pytest
import torch
from dlm_kernels import masked_linear_cross_entropy
from harness import user_error_line

from dlm_titan.diffusion import Noise, forward_process, sample_noise
from dlm_titan.likelihood import (
    EVAL_STREAM,
    chain_rule_logprob,
    elbo,
    elbo_batch,
    left_to_right_logprob,
    left_to_right_logprob_batch,
    text_key,
)
from dlm_titan.lm_eval.scorer import (
    Scorer,
    ScorerConfig,
    encode_pair,
    rolling_windows,
    split_context,
    truncate_pair,
)
from dlm_titan.models import ModelArgs, TransEncoder

VOCAB, MASK, EOS = 50, 50, 2
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: a second thread only adds contention


def tiny_model(seed: int = 1, vocab: int = VOCAB, dim: int = 64) -> TransEncoder:
    model = TransEncoder(ModelArgs(n_layers=2, n_heads=4, dim=dim, ffn_dim=4 * dim, vocab_size=vocab), max_seq_len=64)
    model.init_weights(seed)
    return model.eval()


TORCH_LOSS = partial(masked_linear_cross_entropy, impl="torch")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("t_sampling", ["stratified", "uniform"])
def test_elbo_equals_mean_training_loss_estimator(model, t_sampling):
    text = torch.randint(0, VOCAB, (12,))
    k, eps = 16, 1e-3
    est = elbo(model, text, mask_id=MASK, mc_samples=k, batch_size=5, eps=eps, seed=7, step=3, t_sampling=t_sampling)
    # The trainer's estimator on the same noise: sequence j of a step of k copies of the text.
    noise = sample_noise(torch.arange(k), 12, seed=7, step=3, stream=EVAL_STREAM, t_sampling=t_sampling,
                         num_positions=k)
    with torch.no_grad():
        per_copy = []
        for j in range(k):
            mb = forward_process(text[None], Noise(noise.t[j : j + 1], noise.uniforms[j : j + 1]), eps=eps,
                                 mask_id=MASK, token_count=12)
            per_copy.append(model(mb.inputs, mb.targets, mb.token_weights, loss_fn=TORCH_LOSS).item())
        batch = forward_process(text.expand(k, 12), noise, eps=eps, mask_id=MASK, token_count=k * 12)
        step_loss = model(batch.inputs, batch.targets, batch.token_weights, loss_fn=TORCH_LOSS).item()
    torch.testing.assert_close(est.samples, torch.tensor(per_copy, dtype=torch.float64) * 12, rtol=1e-5, atol=1e-5)
    assert est.nll == pytest.approx(np.mean(per_copy) * 12, rel=1e-5)
    assert est.nll == pytest.approx(step_loss * 12, rel=1e-5)  # the training loss of that step, x tokens
    assert est.num_tokens == 12 and est.std_err == pytest.approx(np.std(per_copy, ddof=1) * 12 / math.sqrt(k), rel=1e-4)


def exact_elbo(model, text: list[int], eps: float) -> float:
    """E over t ~ U(0,1) of the estimator with p = (1-eps) t + eps, by enumerating mask sets (float64).

    f(p) = sum over non-empty masked sets S of p^(|S|-1) (1-p)^(L-|S|) * sum_{i in S} CE_i(x | S masked);
    the expectation is the integral of f over p in [eps, 1] divided by 1 - eps (Gauss-Legendre, exact here).
    """
    n = len(text)
    terms = []
    for bits in range(1, 2**n):
        masked = [i for i in range(n) if bits >> i & 1]
        x = torch.tensor([[MASK if i in masked else tok for i, tok in enumerate(text)]])
        with torch.no_grad():
            logp = torch.log_softmax(model(x)[0].double(), dim=-1)
        terms.append((len(masked), -sum(logp[i, text[i]].item() for i in masked)))
    nodes, weights = np.polynomial.legendre.leggauss(16)
    p = (1 - eps) / 2 * nodes + (1 + eps) / 2
    f = sum(p ** (size - 1) * (1 - p) ** (n - size) * ce for size, ce in terms)
    return float((weights * f).sum() * (1 - eps) / 2 / (1 - eps))


@pytest.mark.parametrize("t_sampling", ["stratified", "uniform"])
def test_elbo_converges_to_the_exact_bound(model, t_sampling):
    text = [7, 31, 12]
    exact = exact_elbo(model, text, eps=1e-3)
    est = elbo(model, text, mask_id=MASK, mc_samples=4096, batch_size=4096, eps=1e-3, seed=1, t_sampling=t_sampling)
    assert abs(est.nll - exact) < 4 * est.std_err, (est.nll, exact, est.std_err)
    assert est.std_err < 0.05 * exact
    # eps -> 0 gives the textbook bound sum_k E_k / k (E_k: mean CE sum over masked sets of size k).
    assert exact_elbo(model, text, eps=0.0) < exact


def test_elbo_masks_only_the_target_and_keys_noise_by_text(model):
    class Recording(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.inputs = inner, []

        def forward(self, x):
            self.inputs.append(x.clone())
            return self.inner(x)

    rec = Recording(model)
    ctx, tgt = [3, 4, 5], [9, 10, 11, 12]
    a = elbo(rec, tgt, mask_id=MASK, context=ctx, mc_samples=8, batch_size=3)
    x = torch.cat(rec.inputs)
    assert x.shape == (8, 7) and len(rec.inputs) == 3
    assert (x[:, :3] == torch.tensor(ctx)).all()
    assert ((x[:, 3:] == torch.tensor(tgt)) | (x[:, 3:] == MASK)).all() and (x[:, 3:] == MASK).any()
    b = elbo(model, tgt, mask_id=MASK, context=ctx, mc_samples=8, step=text_key(ctx + tgt))
    assert a.nll == b.nll  # default noise key = the tokens, so request order in a run does not matter


@pytest.mark.parametrize("context, cfg_scale", [([], 0.0), ([5, 6], 0.0), ([5, 6], 1.0)])
def test_left_to_right_of_three_tokens_equals_hand_product(model, context, cfg_scale):
    a, b, c = 17, 4, 29

    def prob(seq, pos, tok):
        with torch.no_grad():
            logits = model(torch.tensor([context + seq]))[0, len(context) + pos].double()
            if cfg_scale:
                uncond = model(torch.tensor([[MASK] * len(context) + seq]))[0, len(context) + pos].double()
                logits = uncond + (cfg_scale + 1) * (logits - uncond)
        return torch.softmax(logits, dim=-1)[tok].item()

    by_hand = prob([MASK, MASK, MASK], 0, a) * prob([a, MASK, MASK], 1, b) * prob([a, b, MASK], 2, c)
    per_token = left_to_right_logprob(model, [a, b, c], mask_id=MASK, context=context, batch_size=2,
                                      cfg_scale=cfg_scale)
    assert per_token.shape == (3,) and per_token.dtype == torch.float64
    assert math.exp(per_token.sum().item()) == pytest.approx(by_hand, rel=1e-4)
    assert chain_rule_logprob is left_to_right_logprob  # SMDM's name stays as an alias


def reference_elbo_samples(model, ctx: list[int], tgt: list[int], key: int, k: int, cfg_scale: float) -> torch.Tensor:
    """Per-sample sum over masked target tokens of CE / p, from whole-sequence logits (the sampler's CFG)."""
    from dlm_titan.sampling import guided_logits

    noise = sample_noise(torch.arange(k), len(tgt), seed=0, step=key, stream=EVAL_STREAM, t_sampling="stratified",
                         num_positions=k)
    mb = forward_process(torch.tensor(tgt).expand(k, -1), noise, eps=1e-3, mask_id=MASK, token_count=1)
    x = torch.cat([torch.tensor(ctx, dtype=torch.long).expand(k, -1), mb.inputs], 1)
    prompt = torch.zeros_like(x, dtype=torch.bool)
    prompt[:, : len(ctx)] = True
    with torch.no_grad():
        logp = torch.log_softmax(guided_logits(model, x, prompt, cfg_scale, MASK)[:, len(ctx):].double(), -1)
    ce = -logp.gather(-1, mb.targets[..., None]).squeeze(-1)
    return (ce * mb.token_weights.double()).sum(1)


@pytest.mark.parametrize("cfg_scale", [0.0, 0.5])
def test_batched_texts_get_their_own_values(model, cfg_scale):
    """Texts of mixed lengths packed into forwards of 1, 5 or all rows give each text's value alone, which equals
    an independent computation from whole-sequence logits; left-to-right copies likewise."""
    texts = [([3, 4], [9, 10, 11]), ([], [7, 8, 9, 10, 11]), ([5], [6, 7, 8, 9]), ([1, 2, 3], [4, 5]),
             ([8, 8], [8])]
    runs = [elbo_batch(model, texts, mask_id=MASK, mc_samples=6, batch_size=b, cfg_scale=cfg_scale)
            for b in (1, 5, 1000)]
    for i, (ctx, tgt) in enumerate(texts):
        ref = reference_elbo_samples(model, ctx, tgt, text_key(ctx + tgt), 6, cfg_scale)
        for run in runs:
            torch.testing.assert_close(run[i].samples, ref, rtol=1e-5, atol=1e-5)
        assert runs[0][i].num_tokens == len(tgt)
    singles = [left_to_right_logprob(model, t, mask_id=MASK, context=c, batch_size=1, cfg_scale=cfg_scale)
               for c, t in texts]
    for b in (2, 7, 1000):
        done = []
        packed = left_to_right_logprob_batch(model, texts, mask_id=MASK, batch_size=b, cfg_scale=cfg_scale,
                                             progress=done.append)
        assert sum(done) == len(texts)
        for got, want in zip(packed, singles, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---- lm-eval scoring (no lm_eval needed) ----


class CharTokenizer:
    """Lowercase letters and space as ids 3..29; EOS 2."""

    vocab_size, eos_id = VOCAB, EOS
    chars = " abcdefghijklmnopqrstuvwxyz"

    def encode(self, text, bos=False, eos=True):
        return [3 + self.chars.index(ch) for ch in text] + ([EOS] if eos else [])

    def decode(self, ids):
        return "".join(self.chars[i - 3] for i in ids if 3 <= i < 3 + len(self.chars))


@pytest.mark.parametrize("max_length, context_length", [(8, 3), (8, 1), (5, 4)])
def test_rolling_windows_score_every_token_once_after_its_context(max_length, context_length):
    tokens = list(range(100, 123))
    windows = rolling_windows(tokens, max_length, context_length, prefix_token=EOS)
    assert [t for _, tgt in windows for t in tgt] == tokens
    stream = [EOS] + tokens
    for ctx, tgt in windows:
        start = stream.index(tgt[0])
        assert ctx == stream[max(0, start - context_length) : start] and len(ctx) >= 1
        assert len(ctx) + len(tgt) <= max_length


def test_context_split_and_truncation():
    assert split_context("The cat ", "sat") == ("The cat", " sat")
    tok = CharTokenizer()
    assert encode_pair(tok, "ab ", "cd") == ([4, 5], [3, 6, 7])
    assert encode_pair(tok, "", "cd") == ([EOS], [6, 7])
    assert truncate_pair([1, 2, 3, 4], [5, 6], 4) == ([3, 4], [5, 6])
    assert truncate_pair([1, 2], [5, 6, 7, 8, 9], 4) == ([], [6, 7, 8, 9])


def test_encode_pair_with_the_embedded_tokenizer():
    from dlm_titan.data import load_tokenizer

    tok = load_tokenizer("")
    ctx, cont = encode_pair(tok, "In the beginning God ", "created the heaven")
    assert ctx == tok.encode("In the beginning God", eos=False)
    assert tok.decode(ctx + cont) == "In the beginning God created the heaven"


def test_scorer_matches_the_likelihood_functions(model):
    tok = CharTokenizer()
    ctx, cont = encode_pair(tok, "the cat", " sat")
    chain = Scorer(model, tok, ScorerConfig(nll_type="chain_rule", batch_size=3))
    assert chain.cfg.nll_type == "left_to_right"  # SMDM's name, accepted as an alias
    mc = Scorer(model, tok, ScorerConfig(nll_type="mc", mc_samples=32, seed=5))
    [(ll_chain, greedy)], [(ll_mc, _)] = chain.loglikelihood([("the cat", " sat")]), mc.loglikelihood([("the cat", " sat")])
    assert ll_chain == pytest.approx(left_to_right_logprob(model, cont, mask_id=MASK, context=ctx).sum().item(), rel=1e-6)
    assert ll_mc == pytest.approx(-elbo(model, cont, mask_id=MASK, context=ctx, mc_samples=32, seed=5).nll, rel=1e-6)
    assert greedy is False  # not computed unless asked
    # Rolling: a text within one window is minus its ELBO after the document-start EOS.
    text = "in the beginning"
    [rolled] = mc.loglikelihood_rolling([text])
    ids = tok.encode(text, eos=False)
    assert rolled == pytest.approx(-elbo(model, ids, mask_id=MASK, context=[EOS], mc_samples=32, seed=5).nll, rel=1e-6)
    # Several windows: the sum over windows, each conditioned on the token before it.
    small = Scorer(model, tok, ScorerConfig(mc_samples=8, max_length=6, rolling_context=2))
    [rolled] = small.loglikelihood_rolling([text])
    expected = -sum(elbo(model, t, mask_id=MASK, context=c, mc_samples=8, seed=1234).nll
                    for c, t in rolling_windows(ids, 6, 2, EOS))
    assert rolled == pytest.approx(expected, rel=1e-6) and len(rolling_windows(ids, 6, 2, EOS)) == 4


def test_is_greedy_by_one_token_per_step_confidence_decoding():
    class Fixed(torch.nn.Module):
        """Predicts token 3 + (position mod 4) with certainty."""

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))
            self.args, self.max_seq_len = ModelArgs(1, 1, 4, 4, vocab_size=VOCAB), 64

        def forward(self, x):
            logits = torch.zeros(*x.shape, VOCAB)
            logits[:, torch.arange(x.shape[1]), 3 + torch.arange(x.shape[1]) % 4] = 30.0
            return logits

    scorer = Scorer(Fixed(), CharTokenizer(), ScorerConfig(nll_type="left_to_right", greedy=True))
    # context "ab" = 2 tokens, so the continuation starts at position 2: greedy tokens 5, 6, 3, 4 = "bc a"
    [(ll, yes), (_, no)] = scorer.loglikelihood([("ab", "bc a"), ("ab", "bca")])
    assert yes is True and no is False and ll == pytest.approx(0.0, abs=1e-6)


def test_generate_until_cuts_at_stop_strings():
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))
            self.args, self.max_seq_len = ModelArgs(1, 1, 4, 4, vocab_size=VOCAB), 64

        def forward(self, x):
            logits = torch.zeros(*x.shape, VOCAB)
            logits[..., 3 + CharTokenizer.chars.index("x")] = 5.0
            logits[:, 6, 3] = 9.0  # a space at position 6
            return logits

    out = Scorer(Fixed(), CharTokenizer(), ScorerConfig()).generate_until(
        [("ab", {"until": [" "], "max_gen_toks": 8}), ("ab", {"until": ["q"], "max_gen_toks": 8})])
    assert out == ["xxxx", "xxxx xxx"]


def test_scorer_answers_do_not_depend_on_batch_size_or_order(model):
    tok = CharTokenizer()
    requests = [("the cat", " sat"), ("a", " dog ran"), ("the cow", " sat"), ("", "in the"), ("ab", " cd ef")]
    texts = ["in the beginning was", "and the earth", "x"]
    gens = [("the", {"until": ["q"], "max_gen_toks": 5, "temperature": 1.0}), ("abc", {"max_gen_toks": 3}),
            ("the", {"until": ["q"], "max_gen_toks": 5, "temperature": 1.0}), ("abd", {"max_gen_toks": 3})]

    def answers(batch_size: int, order: list[int]) -> tuple:
        mc = Scorer(model, tok, ScorerConfig(mc_samples=6, batch_size=batch_size, greedy=True, max_length=8))
        ltr = Scorer(model, tok, ScorerConfig(nll_type="left_to_right", batch_size=batch_size))
        reqs = [requests[i] for i in order]
        back = sorted(range(len(order)), key=order.__getitem__)
        pick = lambda xs: [xs[i] for i in back]  # noqa: E731
        return (pick(mc.loglikelihood(reqs)), pick(ltr.loglikelihood(reqs)), mc.loglikelihood_rolling(texts),
                mc.generate_until(gens))

    one = answers(1, [0, 1, 2, 3, 4])
    many = answers(64, [4, 2, 0, 3, 1])
    for a, b in zip(one[:2], many[:2], strict=True):
        assert [g for _, g in a] == [g for _, g in b]
        assert [v for v, _ in a] == pytest.approx([v for v, _ in b], rel=1e-5)
    assert one[2] == pytest.approx(many[2], rel=1e-5)
    assert one[3] == many[3] and one[3][0] != one[3][2]  # copies of a request sample differently at temperature 1


def test_lm_eval_main_without_lm_eval_is_a_user_error(monkeypatch, capsys):
    from dlm_titan.lm_eval.__main__ import main

    for name in ("lm_eval", "lm_eval.__main__"):  # as if not installed (even when another test imported it)
        monkeypatch.setitem(sys.modules, name, None)
    code = main()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: lm-eval is not installed")


# ---- command lines on a tiny exported model (real tokenizer: vocab 32000) ----


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from dlm_titan.checkpoint.export import model_config, write_export

    m = tiny_model(seed=3, vocab=32000, dim=32)
    out = tmp_path_factory.mktemp("export")
    write_export(m.state_dict(), model_config(m, "tiny"), out, "float32", step=0)
    return out


def test_generate_cli_keeps_prompts_verbatim(export_dir, capsys):
    from scripts import generate

    prompts = ["In the  beginning", "def main(", ""]
    argv = ["--checkpoint", str(export_dir), "--device", "cpu", "--length", "8", "--steps", "4", "--temperature", "1", "--seed", "3"]
    for p in prompts:
        argv += ["--prompt", p]
    assert generate.main(argv) == 0
    lines = capsys.readouterr().out.split("--- sample ")[1:]
    assert len(lines) == 3
    for i, (p, chunk) in enumerate(zip(prompts, lines, strict=True)):
        header, text = chunk.split("\n", 1)
        assert header == f"{i + 1}/3 ---" and text.startswith(p)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--checkpoint", "/nonexistent", "--prompt", "a"], "no such checkpoint or export"),
        (["--prompt", "a", "--length", "10", "--block_length", "3"], "multiple of block_length"),
        (["--prompt", "a", "--length", "64"], "exceeds the model's 64"),
    ],
)
def test_generate_cli_bad_input(export_dir, capsys, argv, message):
    from scripts import generate

    if "--checkpoint" not in argv:
        argv = ["--checkpoint", str(export_dir), *argv]
    assert generate.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_eval_elbo_cli_text_and_shards(export_dir, tmp_path, capsys):
    import json

    from dlm_titan.checkpoint.export import load_model
    from dlm_titan.data import load_tokenizer, write_shard
    from scripts import eval_elbo

    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth.")
    base = ["--checkpoint", str(export_dir), "--device", "cpu", "--mc_samples", "8", "--seq_len", "8", "--json"]
    assert eval_elbo.parse_args([*base, "--text_file", "t", "--chain_rule"]).left_to_right  # SMDM's name
    assert eval_elbo.main([*base, "--text_file", str(text), "--left_to_right"]) == 0
    r = json.loads(capsys.readouterr().out)
    ids = load_tokenizer("").encode(text.read_text(), eos=True)
    assert r["tokens"] == len(ids) and r["windows"] == math.ceil(len(ids) / 8)
    # window i of the text is scored with noise step i
    model = load_model(export_dir)
    expected = sum(elbo(model, ids[i : i + 8], mask_id=32000, mc_samples=8, step=i // 8).nll
                   for i in range(0, len(ids), 8))
    assert r["elbo_nll"] == pytest.approx(expected, rel=1e-5)
    ltr = -sum(left_to_right_logprob(model, ids[i : i + 8], mask_id=32000).sum().item() for i in range(0, len(ids), 8))
    assert r["left_to_right_nll"] == pytest.approx(ltr, rel=1e-5)

    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "val_0000000000.bin", np.arange(100, 140, dtype=np.uint16))
    assert eval_elbo.main([*base, "--shards", str(shards), "--prefix", "val", "--max_windows", "3"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["windows"] == 3 and r["tokens"] == 24
    assert eval_elbo.main([*base[:-1], "--shards", str(shards), "--prefix", "val"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("windows: 5, tokens: 40") and lines[1].startswith("ELBO NLL/token: ")
    assert lines[2].startswith("perplexity bound: ")
    assert eval_elbo.main([*base, "--text_file", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read --text_file" in capsys.readouterr().err
    for shards_arg, prefix in ((str(tmp_path / "missing"), "val"), (str(shards), "test")):
        assert eval_elbo.main([*base, "--shards", shards_arg, "--prefix", prefix]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: no shard {prefix}*.bin in --shards {shards_arg}: pass the folder of prepared .bin " \
                      "shards and --prefix the start of their names (e.g. val)"
    assert eval_elbo.main([*base, "--text_file", str(text), "--mc_samples", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --mc_samples must be at least 2 (for a standard error), got 1"


@pytest.mark.parametrize("content", ["", " \n\t\n"])
def test_eval_elbo_of_a_file_without_text_is_one_line(export_dir, tmp_path, capsys, content):
    """An empty (or whitespace-only) --text_file is refused: it scored the lone EOS appended to the document and
    printed that as the file's NLL."""
    from scripts import eval_elbo

    text = tmp_path / "empty.txt"
    text.write_text(content)
    line = user_error_line(capsys, eval_elbo.main, ["--checkpoint", str(export_dir), "--device", "cpu",
                                                    "--text_file", str(text)])
    why = "only whitespace" if content else "it is empty"
    assert line == f"error: --text_file {text} holds no text ({why}); give a file with the text to score"


@pytest.mark.parametrize("given", [["--max_windows", "3"], ["--prefix", "val"], ["--prefix", "val", "--max_windows", "0"]])
def test_eval_elbo_text_file_refuses_shard_options(export_dir, tmp_path, capsys, given):
    """--prefix / --max_windows beside --text_file are one line: the whole file was scored and they were ignored
    without a word (--max_windows 3 read as "the first 3 windows of my file")."""
    from scripts import eval_elbo

    text = tmp_path / "t.txt"
    text.write_text("some words to score")
    line = user_error_line(capsys, eval_elbo.main, ["--checkpoint", str(export_dir), "--device", "cpu",
                                                    "--text_file", str(text), *given])
    names = " and ".join(a for a in given if a.startswith("--"))
    assert line == (f"error: {names} select windows of --shards, but --text_file {text} is scored whole: drop "
                    f"{names}, or score shards with --shards")


def test_eval_elbo_of_shards_shorter_than_a_window_names_its_seq_len(export_dir, tmp_path, capsys):
    """Shards shorter than one window: the line names eval_elbo's --seq_len and the largest that fits; it was the
    training loader's 'seq_len + 1 = 8 tokens ... lower training.seq_len', wrong on both counts here."""
    from dlm_titan.data import write_shard
    from scripts import eval_elbo

    write_shard(tmp_path / "val_0000000000.bin", np.arange(100, 105, dtype=np.uint16))
    line = user_error_line(capsys, eval_elbo.main, ["--checkpoint", str(export_dir), "--device", "cpu", "--seq_len",
                                                    "8", "--shards", str(tmp_path), "--prefix", "val"])
    assert line == (f"error: no shard val*.bin in --shards {tmp_path} holds a window of --seq_len 8 (longest shard: "
                    "5 tokens); pass --seq_len 5 or less")
    assert eval_elbo.main(["--checkpoint", str(export_dir), "--device", "cpu", "--seq_len", "5", "--shards",
                           str(tmp_path), "--prefix", "val", "--mc_samples", "2", "--json"]) == 0
