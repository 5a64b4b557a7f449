"""lm-eval end to end through ``python -m dlm_titan.lm_eval`` (lm-eval's own CLI, model ``dlm_titan``) on three
local tasks defined with ``--include_path`` (multiple choice -> loglikelihood, loglikelihood_rolling,
generate_until), offline, on a tiny random export: the logged answers equal the likelihood functions called one
request at a time in this process, lm-eval's flags reach the model (--limit, --gen_kwargs, --output_path,
--log_samples), and a 2-process torchrun (gloo) run with another batch size gives the 1-process answers.

The subprocesses run from tmp_path (a user's working folder: dlm_titan is installed, so it imports from anywhere).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlm_titan.likelihood import elbo
from dlm_titan.lm_eval.scorer import Scorer, ScorerConfig, encode_pair, rolling_windows
from dlm_titan.models import ModelArgs, TransEncoder

MC_SAMPLES, SEED = 8, 77
MC_DOCS = [("The sky is", ["blue", "green", "loud"], 0), ("In the beginning God created the", ["heaven", "cat"], 0),
           ("One plus one is", ["two", "seven", "ten"], 1), ("Water is", ["wet", "dry"], 0)]
TEXTS = ["In the beginning God created the heaven and the earth.",
         "And the earth was without form, and void; and darkness was upon the face of the deep. And the Spirit of "
         "God moved upon the face of the waters. And God said, Let there be light: and there was light."]
GEN_DOCS = [("Q: What is the color of the sky?\nA:", "blue"), ("Q: Who made the heaven?\nA:", "God"),
            ("Q: Who made the earth?\nA:", "God")]


def write_tasks(folder: Path) -> Path:
    """Three task YAMLs over local JSON-lines files (the packaged ``json`` builder: no download)."""
    folder.mkdir()
    rows = {"mc": [{"question": q, "choices": c, "answer": a} for q, c, a in MC_DOCS],
            "text": [{"text": t} for t in TEXTS], "gen": [{"question": q, "answer": a} for q, a in GEN_DOCS]}
    for name, items in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))

    def head(task: str, data: str) -> str:
        return (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / data}\n"
                "test_split: test\n")

    (folder / "tiny_mc.yaml").write_text(head("tiny_mc", "mc.jsonl") + 'output_type: multiple_choice\n'
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n")
    (folder / "tiny_ppl.yaml").write_text(head("tiny_ppl", "text.jsonl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
        "  - metric: bits_per_byte\n")
    (folder / "tiny_gen.yaml").write_text(head("tiny_gen", "gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n'
        "  max_gen_toks: 6\nmetric_list:\n  - metric: exact_match\n")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, TransEncoder]:
    """(work folder, export folder, the model): a tiny random model (vocab 32000: the embedded tokenizer's,
    max_seq_len 24 so the longer text spans two rolling windows) exported and reloaded."""
    from dlm_titan.checkpoint.export import load_model, model_config, write_export

    root = tmp_path_factory.mktemp("lm_eval")
    model = TransEncoder(ModelArgs(n_layers=2, n_heads=2, dim=32, ffn_dim=64, vocab_size=32000), max_seq_len=24)
    model.init_weights(5)
    write_export(model.state_dict(), model_config(model, "tiny"), root / "export", "float32", step=0)
    write_tasks(root / "tasks")
    return root, root / "export", load_model(root / "export")


def lm_eval_command(root: Path, export: Path, batch_size: int, out: str) -> list[str]:
    """All three tasks, the first 3 documents of each (--limit), generation cut to 4 tokens (--gen_kwargs)."""
    return ["-m", "dlm_titan.lm_eval", "--model", "dlm_titan",
            "--model_args", f"pretrained={export},mc_samples={MC_SAMPLES},seed={SEED}",
            "--tasks", "tiny_mc,tiny_ppl,tiny_gen", "--include_path", str(root / "tasks"), "--limit", "3",
            "--gen_kwargs", "max_gen_toks=4", "--batch_size", str(batch_size), "--device", "cpu",
            "--output_path", str(root / out), "--log_samples"]


def run(root: Path, args: list[str], nproc: int = 1) -> str:
    """Runs a command line from ``root``, offline (no hub access, a fresh datasets cache)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(root / "hf_cache")}
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0"]
    result = subprocess.run([*launcher, *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def read_samples(folder: Path) -> dict[str, list[dict]]:
    """Per task, lm-eval's logged samples sorted by document."""
    out = {}
    for path in folder.rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        out[task] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
    return out


def arguments(sample: dict) -> list[list]:
    """The request arguments of a logged sample, in request order."""
    calls = sample["arguments"]
    return [[calls[f"gen_args_{i}"][f"arg_{j}"] for j in range(len(calls[f"gen_args_{i}"]))] for i in range(len(calls))]


def answers(sample: dict) -> list:
    """The model's answer to each request of a logged sample (lm-eval logs them as strings)."""
    return [json.loads(r[0].lower()) if isinstance(r[0], str) else [json.loads(x.lower()) for x in r[0]]
            for r in sample["resps"]]


def read_results(folder: Path) -> dict:
    [path] = folder.rglob("results_*.json")
    return json.loads(path.read_text())["results"]


@pytest.fixture(scope="module")
def one_process(setup) -> tuple[str, dict, dict]:
    root, export, _ = setup
    stdout = run(root, lm_eval_command(root, export, 16, "one"))
    return stdout, read_samples(root / "one"), read_results(root / "one")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_lm_eval_cli_answers_equal_the_likelihood_functions(setup, one_process):
    root, _, model = setup
    stdout, samples, results = one_process
    assert "tiny_mc" in stdout and "bits_per_byte" in stdout  # lm-eval's results table
    from dlm_titan.data import load_tokenizer

    tok = load_tokenizer("")
    assert [s["doc_id"] for s in samples["tiny_mc"]] == [0, 1, 2]  # --limit 3
    for sample, (question, choices, _) in zip(samples["tiny_mc"], MC_DOCS[:3], strict=True):
        assert arguments(sample) == [[question, f" {c}"] for c in choices]
        for (logp, greedy), choice in zip(answers(sample), choices, strict=True):
            ctx, cont = encode_pair(tok, question, f" {choice}")
            ref = -elbo(model, cont, mask_id=32000, context=ctx, mc_samples=MC_SAMPLES, seed=SEED).nll
            assert logp == pytest.approx(ref, rel=1e-5) and greedy is False
    for sample, text in zip(samples["tiny_ppl"], TEXTS, strict=True):
        windows = rolling_windows(tok.encode(text, eos=False), 24, 1, tok.eos_id)
        ref = -sum(elbo(model, t, mask_id=32000, context=c, mc_samples=MC_SAMPLES, seed=SEED).nll for c, t in windows)
        assert answers(sample) == [pytest.approx(ref, rel=1e-5)]
    assert len(rolling_windows(tok.encode(TEXTS[1], eos=False), 24, 1, tok.eos_id)) >= 2
    # generate_until: the task's stop string and the command line's max_gen_toks reach the sampler
    assert [arguments(s)[0][0] for s in samples["tiny_gen"]] == [q for q, _ in GEN_DOCS]
    assert all("'max_gen_toks': 4" in str(arguments(s)[0][1]) for s in samples["tiny_gen"])
    scorer = Scorer(model, tok, ScorerConfig(seed=SEED))
    want = scorer.generate_until([(q, {"until": ["\n"], "max_gen_toks": 4}) for q, _ in GEN_DOCS])
    assert [s["resps"][0][0] for s in samples["tiny_gen"]] == want
    assert set(results) == {"tiny_mc", "tiny_ppl", "tiny_gen"}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_give_the_one_process_answers(setup, one_process):
    """torchrun, 2 ranks on gloo, batch size 3: lm-eval splits the documents over the ranks and gathers them."""
    root, export, _ = setup
    _, one, one_results = one_process
    run(root, lm_eval_command(root, export, 3, "two"), nproc=2)
    two, two_results = read_samples(root / "two"), read_results(root / "two")
    for task in ("tiny_mc", "tiny_ppl"):
        a, b = ([a for s in run[task] for a in answers(s)] for run in (one, two))
        flat = lambda xs: torch.tensor([x[0] if isinstance(x, list) else x for x in xs], dtype=torch.float64)  # noqa: E731
        torch.testing.assert_close(flat(b), flat(a), rtol=1e-5, atol=1e-6)
        assert [s["doc_id"] for s in two[task]] == [s["doc_id"] for s in one[task]]
    # a rank with fewer documents repeats its last request (lm-eval's padding): compare first answers
    assert [s["resps"][0][0] for s in two["tiny_gen"]] == [s["resps"][0][0] for s in one["tiny_gen"]]
    assert two_results["tiny_mc"]["acc,none"] == one_results["tiny_mc"]["acc,none"]
    ppl = "word_perplexity,none"
    assert two_results["tiny_ppl"][ppl] == pytest.approx(one_results["tiny_ppl"][ppl], rel=1e-5)


@pytest.mark.parametrize("model_args, message", [
    ("mc_sample=3", "unknown dlm_titan model_args mc_sample; known: pretrained, "),
    ("nll_type=exact", "nll_type 'exact' is not one of mc, left_to_right, chain_rule"),
    ("mc_samples=many", "model_args mc_samples='many' must be an integer"),
    ("greedy=maybe", "model_args greedy='maybe' must be true or false"),
    ("compile=sometimes", "model_args compile='sometimes' must be auto, true or false"),
    ("cfg_scale=inf", "model_args cfg_scale=inf must be a finite number >= 0 (0 = off)"),
    ("cfg_scale=nan", "model_args cfg_scale=nan must be a finite number >= 0 (0 = off)"),
    ("seed=-1", "model_args seed=-1 must be >= 0"),
    # each bad value is named alone (the line named mc_samples, batch_size and rolling_context for any of them)
    ("mc_samples=0", "model_args mc_samples=0 must be at least 1"),
    ("gen_steps=-1", "model_args gen_steps=-1 must be >= 0 (0 = one step per generated token)"),
])
def test_bad_model_args_are_user_errors(setup, model_args, message):
    """Checked before the model loads (so the path need not exist); lm-eval parses model_args as this string is
    parsed here."""
    from dlm_titan.errors import UserError
    from dlm_titan.lm_eval.model import DLMTitanLM

    _, export, _ = setup
    with pytest.raises(UserError) as err:
        DLMTitanLM.create_from_arg_string(f"pretrained=/nonexistent,{model_args}", {"batch_size": 4, "device": "cpu"})
    assert str(err.value).startswith(message)
    with pytest.raises(UserError, match="no such checkpoint or export: /nonexistent"):
        DLMTitanLM.create_from_arg_string("pretrained=/nonexistent", {"device": "cpu"})


def test_litgpt_weights_file_needs_its_tokenizer(tmp_path):
    """An SMDM/lit-gpt state dict (SMDM's released models: Llama-2's 32,000 ids) carries and records no tokenizer:
    pretrained= such a file was scored with the embedded default (32,000 other pieces) without a word. Refused
    before the model loads; the tokenizer named is the one used."""
    from harness import train_tiny_sentencepiece
    from test_interop_smdm import released_vocabulary_file

    from dlm_titan.errors import UserError
    from dlm_titan.lm_eval.model import DLMTitanLM

    weights = released_vocabulary_file(tmp_path)
    with pytest.raises(UserError) as err:
        DLMTitanLM.create_from_arg_string(f"pretrained={weights}", {"device": "cpu"})
    assert str(err.value).startswith(f"{weights} is an SMDM/lit-gpt state dict, which carries no tokenizer")
    assert "tokenizer_path=PATH in --model_args" in str(err.value)
    tokenizer = train_tiny_sentencepiece(tmp_path)
    lm = DLMTitanLM.create_from_arg_string(f"pretrained={weights},tokenizer_path={tokenizer}", {"device": "cpu"})
    assert lm.scorer.tok.path == tokenizer


def test_user_errors_inside_lm_eval_are_one_line_and_exit_2(monkeypatch, capsys):
    import lm_eval.__main__

    from dlm_titan.errors import UserError
    from dlm_titan.lm_eval.__main__ import main

    def fail() -> None:
        raise UserError("model_args mc_samples=0: must be at least 1")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", fail)
    assert main() == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: model_args mc_samples=0: must be at least 1"]


def test_top_k_on_a_diffusion_checkpoint_is_named_as_unused(setup, capsys):
    """A task's (or --gen_kwargs') top_k changed nothing on a masked diffusion checkpoint, without a word
    (scripts.generate refuses --top_k there); lm-eval's generation now warns once per call that it is unused."""
    from types import SimpleNamespace

    from dlm_titan.lm_eval.model import DLMTitanLM

    _, export, _ = setup
    lm = DLMTitanLM.create_from_arg_obj({"pretrained": str(export)}, {"device": "cpu", "batch_size": 2})

    def generate(**kwargs) -> str:
        request = SimpleNamespace(args=(GEN_DOCS[0][0], {"until": ["\n"], "max_gen_toks": 2, **kwargs}), doc_id=0)
        capsys.readouterr()
        lm.generate_until([request, request], disable_tqdm=True)
        return capsys.readouterr().err

    err = generate(top_k=50)
    assert err.count("warning: top_k=50 in the generation kwargs does not apply to a masked diffusion model") == 1
    assert "top_k" not in generate()
