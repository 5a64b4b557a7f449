"""The autoregressive objective (``training.objective = "ar"``) used the wrong way round, as a user would: its
Hugging Face export loaded with the masked-LM class, its runs plotted and logged with diffusion-only views, and
isoFLOP comparisons collected before both objectives finished, its config given diffusion options that draw noise
it never draws."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dlm_titan.interop.hf_export import write_hf_folder
from dlm_titan.models import ModelArgs, build_transencoder, model_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 256  # no tokenizer needed


def tiny(causal: bool) -> torch.nn.Module:
    model = build_transencoder(ModelArgs(2, 4, 64, 96, vocab_size=VOCAB), 32, "math", "cpu", causal=causal)
    model.to_empty(device="cpu")
    model.init_weights(4)
    return model.eval()


def test_ar_export_is_refused_as_a_masked_lm(tmp_path):
    """An AR folder loaded with AutoModelForMaskedLM gave a causal model under a masked-LM head whose labels are not
    shifted (a meaningless loss), without a word; it now says to use AutoModelForCausalLM, as the causal class
    says the reverse for a diffusion folder."""
    transformers = pytest.importorskip("transformers")
    model = tiny(causal=True)
    write_hf_folder(model.state_dict(), model_config(model, "tiny"), tmp_path, "float32", {})
    with pytest.raises(ValueError, match="AutoModelForCausalLM"):
        transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)).__name__ == (
        "DlmTitanForCausalLM")


def plotted_titles(monkeypatch, run, argv: list[str]) -> list[str]:
    """The panel titles ``scripts.plot_run`` draws for ``run`` (the figure caught as it is closed)."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from scripts import plot_run

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    assert plot_run.main([str(run), *argv]) == 0
    return [ax.get_title() for ax in figures[0].axes if ax.get_title()]


@pytest.mark.parametrize("how", ["config", "validation tag"])
def test_plot_of_an_ar_run_does_not_call_its_loss_an_elbo(tmp_path, monkeypatch, how):
    """scripts.plot_run titled an AR run's next-token NLL "MDM loss (ELBO bound)" and drew an empty, unexplained
    loss-by-t panel. The objective comes from the dump folder's config.toml, else from the AR validation tag."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    for step in (1, 2):
        writer.add_scalar("loss/train", 10.0 - step, step)
        if how == "validation tag":
            writer.add_scalar("validation/loss", 9.5, step)
            writer.add_scalar("validation/ppl", 13359.7, step)
    writer.close()
    if how == "config":
        (tmp_path / "config.toml").write_text('[training]\nobjective = "ar"\n')
    titles = plotted_titles(monkeypatch, tmp_path, ["--out", str(tmp_path / "c.png")])
    assert titles[0] == "AR loss (next-token NLL, nats/token)"
    assert "autoregressive run" in titles[1]
    assert not any("ELBO" in t for t in titles)
    if how == "config":  # a diffusion run's plot is unchanged
        (tmp_path / "config.toml").write_text('[training]\nobjective = "mdm"\n')
        assert plotted_titles(monkeypatch, tmp_path, [])[0] == "MDM loss (ELBO bound, nats/token)"


def test_plot_reads_the_objective_of_the_run_it_plots(tmp_path, monkeypatch):
    """An AR run whose events sit in its own dump folder (metrics.save_tb_folder = ".") inside another run's dump
    folder (./outputs, the default) took the outer run's objective from the outer config.toml."""
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "ar"
    writer = SummaryWriter(log_dir=str(run))
    writer.add_scalar("loss/train", 9.0, 1)
    writer.close()
    (tmp_path / "config.toml").write_text('[training]\nobjective = "mdm"\n')
    (run / "config.toml").write_text('[training]\nobjective = "ar"\n')
    assert plotted_titles(monkeypatch, run, [])[0] == "AR loss (next-token NLL, nats/token)"


@pytest.mark.slow
def test_ar_run_logs_no_diffusion_tags(tmp_path):
    """An AR run wrote diffusion/masked_fraction = 1.0 at every logged step, a diffusion metric that means nothing
    for next-token prediction; it logs neither that nor loss_by_t now (an MDM run still logs both)."""
    from harness import run_trainer, tiny_run_args, write_random_shards
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tmp_path / "shards").mkdir()
    data = write_random_shards(tmp_path / "shards", 512)
    tags = {}
    for objective in ("ar", "mdm"):
        dump = tmp_path / objective
        run_trainer(tiny_run_args(data, dump, 512, 2, 4, 4, 0, "--metrics.enable_tensorboard",
                                  "--training.objective", objective))
        events = EventAccumulator(str(dump / "tb"))
        events.Reload()
        tags[objective] = set(events.Tags()["scalars"])
    assert "loss/train" in tags["ar"] and not any(t.startswith(("diffusion/", "loss_by_t/")) for t in tags["ar"])
    assert "diffusion/masked_fraction" in tags["mdm"]


def test_collecting_a_comparison_before_the_ar_runs_finish_says_so(tmp_path, capsys):
    """A --objective mdm,ar sweep collected while only its MDM runs had finished ended in 'run the sweep with
    --objective mdm,ar', which it had been. The line now says that no AR run has finished and how to go on."""
    from harness import user_error_line
    from test_scaling import write_events

    from dlm_titan.scaling import TRAIN_LOSS_TAG, VALIDATION_LOSS_TAG
    from scripts import isoflop_sweep

    out = tmp_path / "sweep"
    plan = ["--objective", "mdm,ar", "--budgets", "1e17,3e17", "--flavors", "6M,19M,34M", "--launcher", "run_train",
            "--output_dir", str(out), "--no_plot"]
    assert isoflop_sweep.main(plan) == 0
    for row in json.loads((out / "plan.json").read_text())["runs"]:
        if row["objective"] == "mdm":
            loss = 5.0 + (row["non_embedding_params"] / 19e6 - 1) ** 2
            write_events(out / row["run_dir"] / "tb", {TRAIN_LOSS_TAG: [(row["steps"], loss)],
                                                       VALIDATION_LOSS_TAG: [(row["steps"], loss)]})
    line = user_error_line(capsys, isoflop_sweep.main, ["--output_dir", str(out), "--collect_only", "--no_plot"])
    assert "no ar run" in line and "--collect_only" in line and "run the sweep with --objective" not in line


def test_collect_only_refuses_an_objective_the_plan_lacks(tmp_path, capsys):
    """--collect_only fits the runs of plan.json; an --objective beside it was ignored without a word, so asking an
    MDM-only sweep for the MDM-vs-AR comparison printed MDM's fits and no comparison (exit 0). The plan's own
    objectives, or none given, still collect."""
    from harness import user_error_line

    from scripts import isoflop_sweep

    out = tmp_path / "sweep"
    assert isoflop_sweep.main(["--budgets", "1e17", "--flavors", "6M,19M", "--launcher", "run_train",
                               "--output_dir", str(out)]) == 0
    collect = ["--output_dir", str(out), "--collect_only", "--no_plot"]
    for objective in ("mdm,ar", "ar"):
        line = user_error_line(capsys, isoflop_sweep.main, [*collect, "--objective", objective])
        assert f"--objective {objective} but the plan" in line and "mdm only" in line
    for given in ([], ["--objective", "mdm"]):
        assert isoflop_sweep.main([*collect, *given]) == 0
        assert (out / "isoflop_fits.json").is_file()


def test_generate_refuses_top_k_with_greedy_decoding(tmp_path, capsys):
    """`scripts.generate --top_k 50` on an AR checkpoint without --temperature decoded greedily (temperature 0, the
    default), top-k ignored without a word; it is now one line naming both options. With a temperature it samples."""
    from harness import user_error_line

    from dlm_titan.checkpoint.export import model_config, write_export
    from dlm_titan.models import TransEncoder
    from scripts import generate

    model = TransEncoder(ModelArgs(n_layers=1, n_heads=2, dim=32, ffn_dim=64, vocab_size=32000), max_seq_len=16,
                         causal=True)
    model.init_weights(3)
    write_export(model.state_dict(), model_config(model, "tiny"), tmp_path / "export", "float32", step=0)
    argv = ["--checkpoint", str(tmp_path / "export"), "--device", "cpu", "--prompt", "And God said", "--length", "4"]
    line = user_error_line(capsys, generate.main, [*argv, "--top_k", "50"])
    assert "--top_k 50" in line and "--temperature" in line
    assert generate.main([*argv, "--top_k", "50", "--temperature", "1.0"]) == 0
    assert generate.main(argv) == 0  # greedy without --top_k


@pytest.mark.parametrize("causal", [True, False])
def test_lm_eval_max_length_1_is_refused_up_front(causal):
    """model_args max_length=1 left generate_until no room for a prompt: on an AR checkpoint the error blamed
    'prompt (0) + max_new_tokens (1)' and the model's max_seq_len, on a diffusion one it was a RuntimeError
    traceback (an empty prompt tensor). It is refused as the scorer is built, naming max_length. So is a
    rolling_context that leaves a rolling window nothing to score (it was refused at the first perplexity request,
    as 'rolling context N must be in 1..M', naming no option)."""
    from dlm_titan.data import load_tokenizer
    from dlm_titan.errors import UserError
    from dlm_titan.lm_eval.ar_scorer import make_scorer
    from dlm_titan.lm_eval.scorer import ScorerConfig

    model = build_transencoder(ModelArgs(1, 2, 32, 64, vocab_size=32000), 16, "math", "cpu", causal=causal)
    model.to_empty(device="cpu")
    model.init_weights(2)
    with pytest.raises(UserError, match="max_length=1 leaves no room.*max_length=2 or more"):
        make_scorer(model.eval(), load_tokenizer(""), ScorerConfig(max_length=1, mc_samples=2))
    scorer = make_scorer(model.eval(), load_tokenizer(""), ScorerConfig(max_length=2, mc_samples=2))
    assert len(scorer.generate_until([("The sky", {"max_gen_toks": 3})])) == 1
    # a rolling context that fills the window: refused as the scorer is built, not at the first perplexity request
    most = 16 if causal else 15
    with pytest.raises(UserError, match=f"rolling_context={most + 1} leaves no token.*rolling_context={most} or less"):
        make_scorer(model.eval(), load_tokenizer(""), ScorerConfig(rolling_context=most + 1, mc_samples=2))
    scorer = make_scorer(model.eval(), load_tokenizer(""), ScorerConfig(rolling_context=most, mc_samples=2))
    assert len(scorer.loglikelihood_rolling(["In the beginning God created the heaven and the earth."])) == 1


def test_lm_eval_model_args_repeating_its_flags_are_one_line():
    """``--model_args pretrained=P,device=cpu`` (as Hugging Face users write it) met lm-eval's own --device, which
    it always passes: a TypeError traceback ('got multiple values for keyword argument'). One line now, before the
    model loads."""
    pytest.importorskip("lm_eval")
    from dlm_titan.errors import UserError
    from dlm_titan.lm_eval.model import DLMTitanLM

    with pytest.raises(UserError, match="model_args device repeats lm-eval's own --device: pass it as"):
        DLMTitanLM.create_from_arg_obj({"pretrained": "nowhere", "device": "cpu"}, {"device": "cuda", "batch_size": 1})
    with pytest.raises(UserError, match="batch_size, device repeat lm-eval's own --batch_size, --device"):
        DLMTitanLM.create_from_arg_obj({"pretrained": "nowhere", "device": "cpu", "batch_size": 4},
                                       {"device": "cuda", "batch_size": 1, "max_batch_size": None})
    with pytest.raises(UserError, match="nowhere"):  # no repeat: the model's own checks run
        DLMTitanLM.create_from_arg_obj({"pretrained": "nowhere"}, {"device": "cpu", "max_batch_size": None})
    # model_args as a string (lm-eval's Python API) took lm-eval's other path: the TypeError traceback
    with pytest.raises(UserError, match="model_args device repeats lm-eval's own --device"):
        DLMTitanLM.create_from_arg_string("pretrained=nowhere,device=cpu", {"device": "cuda", "batch_size": 1})
    with pytest.raises(UserError, match="nowhere"):
        DLMTitanLM.create_from_arg_string("pretrained=nowhere", {"device": "cpu", "batch_size": None})


def test_sweep_of_ar_alone_refuses_ssl_ratio(capsys):
    """AR runs never use --ssl_ratio; a sweep of AR alone with it planned and trained without a word of the option
    doing nothing. With MDM in the sweep it applies to the MDM runs, as documented."""
    from harness import user_error_line

    from scripts import isoflop_sweep

    plan = ["--budgets", "1e18", "--flavors", "19M", "--ssl_ratio", "0.01", "--dry_run"]
    line = user_error_line(capsys, isoflop_sweep.main, [*plan, "--objective", "ar"])
    assert "--ssl_ratio 0.01 applies to MDM runs only" in line and "--objective ar" in line
    assert isoflop_sweep.main([*plan, "--objective", "mdm,ar"]) == 0


@pytest.mark.parametrize("flags", [["--diffusion.eps", "0.01"], ["--diffusion.t_sampling", "stratified"]])
def test_ar_run_refuses_noise_options(flags):
    """An AR run draws no masking noise: diffusion.eps or t_sampling off their defaults were ignored without a word.
    ssl_ratio (crops AR batches) and loss_impl (the kernel) apply and stay accepted; MDM takes all four."""
    from dlm_titan.config import load_config
    from dlm_titan.errors import UserError

    with pytest.raises(UserError) as refused:  # at load, before any folder is made (the trainer prints it, exit 2)
        load_config(["--training.objective", "ar", *flags])
    assert str(refused.value) == (f"--training.objective ar draws no masking noise, so {' '.join(flags)} would do "
                                  "nothing; remove it, or train --training.objective mdm")
    applies = ["--diffusion.ssl_ratio", "0.01", "--diffusion.loss_impl", "torch"]
    assert load_config(["--training.objective", "ar", *applies]).diffusion.ssl_ratio == 0.01
    assert load_config(["--training.objective", "mdm", *flags, *applies]).training.objective == "mdm"


def test_sweep_gives_noise_options_to_its_mdm_runs_only(tmp_path, capsys):
    """A sweep of both objectives with --diffusion.eps after -- writes it into the MDM runs' configs and the
    default into the AR runs' (which would refuse it); a sweep of AR alone refuses it in one line."""
    from harness import user_error_line

    from dlm_titan.config import load_config
    from scripts import isoflop_sweep

    plan = ["--budgets", "1e18", "--flavors", "19M", "--launcher", "run_train", "--output_dir", str(tmp_path)]
    assert isoflop_sweep.main([*plan, "--objective", "mdm,ar", "--", "--diffusion.eps", "0.01"]) == 0
    configs = tmp_path / "configs"
    assert load_config(["--job.config_file", str(configs / "1e18-19M.toml")]).diffusion.eps == 0.01
    assert load_config(["--job.config_file", str(configs / "ar-1e18-19M.toml")]).diffusion.eps == 1e-3
    line = user_error_line(capsys, isoflop_sweep.main, [*plan, "--objective", "ar", "--dry_run", "--",
                                                        "--diffusion.t_sampling", "stratified"])
    assert "--training.objective ar draws no masking noise" in line, line
