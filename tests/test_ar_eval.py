"""Evaluation and sampling of an autoregressive (``training.objective = "ar"``) checkpoint: eval_elbo, generate and
lm-eval (through ``python -m dlm_titan.lm_eval`` on local tasks) branch on the checkpoint's causal flag and give the
exact log-likelihood, against the float64 causal model of test_ar (sum of log-softmax of its logits)."""

import json

import numpy as np
import pytest
import torch
from test_ar import reference_logits
from test_lm_eval import GEN_DOCS, MC_DOCS, TEXTS, answers, arguments, read_samples, run, write_tasks

from dlm_titan.data import load_tokenizer
from dlm_titan.models import ModelArgs, TransEncoder

ARGS = ModelArgs(n_layers=2, n_heads=2, dim=32, ffn_dim=64, vocab_size=32000)  # the embedded tokenizer's vocabulary
MAX_LEN = 24


@pytest.fixture(scope="module")
def ar_export(tmp_path_factory):
    """(export folder, float64 parameters) of a tiny random causal model."""
    from dlm_titan.checkpoint.export import model_config, write_export

    model = TransEncoder(ARGS, max_seq_len=MAX_LEN, causal=True)
    model.init_weights(11)
    out = tmp_path_factory.mktemp("ar") / "export"
    write_export(model.state_dict(), model_config(model, "tiny"), out, "float32", step=0)
    return out, {k: v.double() for k, v in model.state_dict().items()}


def ref_logprob(params: dict, context: list[int], target: list[int]) -> tuple[float, bool]:
    """(log p(target | context), every target token the argmax) by the float64 model on context + target[:-1]."""
    seq = torch.tensor([context + target])
    logp = reference_logits(params, seq[:, :-1], ARGS).log_softmax(-1)[0, len(context) - 1 :]
    tgt = torch.tensor(target)
    return logp.gather(-1, tgt[:, None]).sum().item(), bool((logp.argmax(-1) == tgt).all())


def ref_greedy(params: dict, prompt: list[int], n: int, eos: int) -> list[int]:
    """Greedy decoding by the float64 model, whole prefix each step, stopped before EOS."""
    seq = list(prompt)
    for _ in range(n):
        nxt = int(reference_logits(params, torch.tensor([seq]), ARGS)[0, -1].argmax())
        if nxt == eos:
            break
        seq.append(nxt)
    return seq[len(prompt) :]


def test_eval_elbo_scores_an_ar_checkpoint_exactly(ar_export, tmp_path, capsys):
    from dlm_titan.data import write_shard
    from scripts import eval_elbo

    export, params = ar_export
    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth.")
    base = ["--checkpoint", str(export), "--device", "cpu", "--seq_len", "8", "--batch_size", "2", "--json"]
    assert eval_elbo.main([*base, "--text_file", str(text)]) == 0
    r = json.loads(capsys.readouterr().out)
    tok = load_tokenizer("")
    ids = tok.encode(text.read_text(), eos=True)
    stream = [tok.eos_id, *ids]  # each window after the token before it; the document after an EOS
    expected = -sum(ref_logprob(params, stream[i : i + 1], ids[i : i + 8])[0] for i in range(0, len(ids), 8))
    assert (r["objective"], r["tokens"], r["windows"]) == ("ar", len(ids), -(-len(ids) // 8))
    assert r["nll"] == pytest.approx(expected, rel=1e-5)

    shards = tmp_path / "shards"
    shards.mkdir()
    tokens = np.arange(100, 140, dtype=np.uint16)
    write_shard(shards / "val_0000000000.bin", tokens)
    assert eval_elbo.main([*base[:-1], "--shards", str(shards), "--prefix", "val", "--max_windows", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    w = tokens.astype(int).tolist()  # windows of seq_len + 1 tokens: the first is the context
    expected = -sum(ref_logprob(params, w[i : i + 1], w[i + 1 : i + 9])[0] for i in (0, 9, 18)) / 24
    assert lines[0].startswith("windows: 3, tokens: 24; autoregressive model: exact likelihood")
    assert float(lines[1].split(": ")[1]) == pytest.approx(expected, abs=1e-4)
    assert eval_elbo.main([*base, "--text_file", str(text), "--left_to_right"]) == 2
    assert "drop --left_to_right" in capsys.readouterr().err
    # --mc_samples does not apply to an exact likelihood: any value gives the same result
    assert eval_elbo.main([*base, "--text_file", str(text), "--mc_samples", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["nll"] == pytest.approx(r["nll"], rel=1e-12)
    text.write_text("\n \n")  # no text: the exact likelihood of the lone EOS was printed as the file's
    assert eval_elbo.main([*base, "--text_file", str(text)]) == 2
    assert capsys.readouterr().err.strip().endswith("holds no text (only whitespace); give a file with the text to score")
    # a window needs seq_len + 1 tokens (its context first): an 8-token shard holds none of --seq_len 8
    write_shard(shards / "short_0000000000.bin", tokens[:8])
    assert eval_elbo.main([*base, "--shards", str(shards), "--prefix", "short"]) == 2
    assert capsys.readouterr().err.strip().endswith("holds a window of --seq_len 8 + 1 context token (longest shard: "
                                                    "8 tokens); pass --seq_len 7 or less")


def test_generate_samples_an_ar_checkpoint(ar_export, capsys):
    from scripts import generate

    export, params = ar_export
    tok = load_tokenizer("")
    prompts = ["In the beginning", "And God said"]  # two lengths: two batches
    argv = ["--checkpoint", str(export), "--device", "cpu", "--length", "6", "--prompt", prompts[0], "--prompt",
            prompts[1]]
    assert generate.main(argv) == 0  # temperature 0: greedy
    samples = [s.split("\n", 1)[1].rstrip("\n") for s in capsys.readouterr().out.split("--- sample ")[1:]]
    for prompt, sample in zip(prompts, samples, strict=True):
        ids = tok.encode(prompt, eos=False)
        assert sample == tok.decode(ids + ref_greedy(params, ids, 6, tok.eos_id))
    assert generate.main([*argv, "--temperature", "0.8", "--top_k", "5", "--seed", "4", "--no_kv_cache"]) == 0
    uncached = capsys.readouterr().out
    assert generate.main([*argv, "--temperature", "0.8", "--top_k", "5", "--seed", "4"]) == 0
    assert capsys.readouterr().out == uncached  # the KV cache changes nothing
    assert generate.main([*argv, "--cfg_scale", "1"]) == 2
    assert "autoregressive" in capsys.readouterr().err
    assert generate.main([*argv, "--length", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --length must be at least 1, got 0"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_lm_eval_cli_scores_an_ar_checkpoint_exactly(ar_export, tmp_path):
    """loglikelihood, loglikelihood_rolling (lm-eval's own rolling windows) and greedy generate_until."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    export, params = ar_export
    write_tasks(tmp_path / "tasks")
    run(tmp_path, ["-m", "dlm_titan.lm_eval", "--model", "dlm_titan", "--model_args", f"pretrained={export}",
                   "--tasks", "tiny_mc,tiny_ppl,tiny_gen", "--include_path", str(tmp_path / "tasks"),
                   "--gen_kwargs", "max_gen_toks=4", "--batch_size", "3", "--device", "cpu",
                   "--output_path", str(tmp_path / "out"), "--log_samples"])
    samples = read_samples(tmp_path / "out")
    tok = load_tokenizer("")
    for sample, (question, choices, _) in zip(samples["tiny_mc"], MC_DOCS, strict=True):
        for (logp, greedy), choice in zip(answers(sample), choices, strict=True):
            whole = tok.encode(question + " " + choice, eos=False)
            ctx = tok.encode(question, eos=False)
            ref, ref_greedy_flag = ref_logprob(params, ctx, whole[len(ctx) :])
            assert logp == pytest.approx(ref, rel=1e-5) and greedy == ref_greedy_flag
    for sample, text in zip(samples["tiny_ppl"], TEXTS, strict=True):
        windows = map(make_disjoint_window, get_rolling_token_windows(
            token_list=tok.encode(text, eos=False), prefix_token=tok.eos_id, max_seq_len=MAX_LEN, context_len=1))
        ref = sum(ref_logprob(params, list(c), list(t))[0] for c, t in windows)
        assert answers(sample) == [pytest.approx(ref, rel=1e-5)]
    assert len(tok.encode(TEXTS[1], eos=False)) > MAX_LEN  # two windows at least
    for sample, (question, _) in zip(samples["tiny_gen"], GEN_DOCS, strict=True):
        assert "'max_gen_toks': 4" in str(arguments(sample)[0][1])
        ids = tok.encode(question, eos=False)
        want = tok.decode(ids + ref_greedy(params, ids, 4, tok.eos_id))[len(tok.decode(ids)) :].split("\n")[0]
        assert sample["resps"][0][0] == want
