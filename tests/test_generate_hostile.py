"""Hostile input to scripts.generate: prompt files, devices, options that do not apply to the checkpoint, output
that cannot be written and Ctrl-C. The model is a tiny random TransEncoder standing in for a loaded checkpoint."""

import errno
import io
import shutil
import sys

import pytest
import torch
from harness import user_error_line

from dlm_titan.data import load_tokenizer
from dlm_titan.errors import UserError
from dlm_titan.models import ModelArgs, TransEncoder
from scripts import generate as cli

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(causal: bool = False) -> TransEncoder:
    """A 1-layer model over the embedded tokenizer's vocabulary, 32 positions."""
    model = TransEncoder(ModelArgs(n_layers=1, n_heads=2, dim=16, ffn_dim=32, vocab_size=32000), max_seq_len=32,
                         causal=causal)
    model.init_weights(0)
    return model.eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, str]:
    """Export folders of a tiny MDM and a tiny AR model: {"mdm": path, "ar": path}."""
    from dlm_titan.checkpoint.export import model_config, write_export

    root = tmp_path_factory.mktemp("exports")
    for name in ("mdm", "ar"):
        model = tiny(causal=name == "ar")
        write_export(model.state_dict(), model_config(model, "tiny"), root / name, "float32", step=0)
    return {name: str(root / name) for name in ("mdm", "ar")}


@pytest.fixture
def sampled(monkeypatch) -> list[list[list[int]]]:
    """The prompt ids of every MDM sampler call of ``cli.main`` (which returns no new tokens)."""
    calls: list[list[list[int]]] = []
    monkeypatch.setattr(cli, "generate",
                        lambda model, prompts, cfg, **kw: calls.append(prompts) or [[] for _ in prompts])
    return calls


def test_prompts_file_not_utf8_is_one_line(tmp_path, capsys, sampled):
    """A Latin-1 or UTF-16 prompts file ended in a UnicodeDecodeError traceback."""
    for name, data in (("latin1.txt", "café au lait\n".encode("latin-1")), ("utf16.txt", "hi\n".encode("utf-16"))):
        (tmp_path / name).write_bytes(data)
        line = user_error_line(capsys, cli.main, ["--checkpoint", "unused", "--prompts_file", str(tmp_path / name)])
        assert line.startswith(f"error: --prompts_file {tmp_path / name} is not UTF-8 text") and "UTF-8" in line
    assert sampled == []


def test_prompts_file_byte_order_mark_is_not_part_of_the_prompt(tmp_path, exports, sampled):
    """A UTF-8 file saved with a byte-order mark (Windows editors) gave its first prompt a leading U+FEFF, which the
    tokenizer encoded as extra tokens before the text; Windows line ends are not part of the prompts either."""
    tok = load_tokenizer("")
    (tmp_path / "bom.txt").write_bytes("\ufeffAnd God said\r\nIn the beginning\r\n".encode())
    assert cli.main(["--checkpoint", exports["mdm"], "--prompts_file", str(tmp_path / "bom.txt"), "--length", "4"]) == 0
    assert sampled == [[tok.encode("And God said", bos=False, eos=False),
                        tok.encode("In the beginning", bos=False, eos=False)]]


def test_prompt_argument_that_is_not_utf8_is_one_line(capsys, exports, sampled):
    """`--prompt $'caf\\xe9'` from a Latin-1 terminal reaches Python as a lone surrogate: the tokenizer raised a
    TypeError traceback (SentencePiece and tokenizers alike)."""
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")  # what sys.argv holds for those bytes
    line = user_error_line(capsys, cli.main, ["--checkpoint", exports["mdm"], "--prompt", prompt])
    assert line.startswith("error: --prompt b'caf\\xe9' is not UTF-8 text") and "--prompts_file" in line
    assert sampled == []


@pytest.mark.parametrize("device", ["foo", "meta", "cuda:x", "CPU"])
def test_device_that_is_not_one_is_one_line(capsys, exports, sampled, device):
    """--device foo was torch's RuntimeError traceback listing twenty device types; --device meta loaded the model
    and failed in a traceback at the first noise generator."""
    argv = ["--checkpoint", exports["mdm"], "--prompt", "a", "--length", "4", "--device", device]
    line = user_error_line(capsys, cli.main, argv)
    assert line.startswith(f"error: --device {device} is not a device") and '"cuda:N"' in line


def test_cuda_index_beyond_the_machine_is_one_line(monkeypatch):
    """--device cuda:3 on a machine with 2 GPUs: torch's 'invalid device ordinal' at the first tensor moved."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match=r"has 2 CUDA device\(s\); use --device cuda:0 \.\. cuda:1"):
        cli.resolve_device("cuda:3")
    assert cli.resolve_device("cuda:1") == torch.device("cuda:1")
    assert cli.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("kind, extra, named", [
    ("ar", ["--steps", "4"], "--steps"),
    ("ar", ["--block_length", "2", "--algorithm", "confidence"], "--block_length and --algorithm"),
    ("ar", ["--cfg_scale", "-1"], "--cfg_scale"),
    ("mdm", ["--no_kv_cache"], "--no_kv_cache"),
    ("mdm", ["--top_k", "5", "--temperature", "1"], "--top_k"),
])
def test_options_of_the_other_kind_of_checkpoint_are_refused(capsys, exports, kind, extra, named):
    """--steps, --block_length and --algorithm on an AR checkpoint, and --no_kv_cache on an MDM one, were ignored
    without a word (the AR sampler reads none of them: --steps 8 did not make it faster); a negative --cfg_scale
    slipped past the AR check for > 0."""
    argv = ["--checkpoint", exports[kind], "--device", "cpu", "--prompt", "a", "--length", "4"]
    line = user_error_line(capsys, cli.main, [*argv, *extra])
    assert line.startswith(f"error: {named} appl") and f"{exports[kind]} is" in line and "drop" in line
    if kind == "mdm":  # the sampler options of the checkpoint's own kind are accepted
        assert cli.main([*argv, "--steps", "2", "--block_length", "2", "--algorithm", "stochastic"]) == 0
    else:
        assert cli.main([*argv, "--temperature", "1", "--top_k", "5", "--no_kv_cache"]) == 0


class FailingStdout(io.StringIO):
    """A stdout whose writes fail with ``error`` once ``limit`` characters are written."""

    def __init__(self, error: OSError, limit: int = 0):
        super().__init__()
        self.error, self.limit = error, limit

    def write(self, text: str) -> int:
        if self.tell() + len(text) > self.limit:
            raise self.error
        return super().write(text)


@pytest.mark.parametrize("error, code, line", [
    (OSError(errno.ENOSPC, "No space left on device"), 2,
     "error: cannot write the samples to stdout (No space left on device); free space or redirect the output "
     "elsewhere\n"),
    (BrokenPipeError(errno.EPIPE, "Broken pipe"), 141, ""),  # `generate ... | head`: the reader has what it wanted
])
def test_stdout_that_cannot_be_written(monkeypatch, capsys, exports, error, code, line):
    """`generate ... > /dev/full` and `generate ... | head -c 10` ended in an OSError / BrokenPipeError traceback
    from print."""
    argv = ["--checkpoint", exports["mdm"], "--device", "cpu", "--prompt", "a", "--prompt", "b", "--length", "4"]
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", FailingStdout(error, limit=5))
    assert cli.main(argv) == code
    assert capsys.readouterr().err == line


def test_closed_stdout_is_refused_before_sampling(monkeypatch, capsys, exports, sampled):
    """`generate ... >&-`: Python starts with sys.stdout None; the samples were drawn, print dropped them without a
    word, and the flush after them ended in an AttributeError traceback."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", None)
    assert cli.main(["--checkpoint", exports["mdm"], "--device", "cpu", "--prompt", "a", "--length", "4"]) == 2
    assert capsys.readouterr().err.startswith("error: stdout is closed, so no sample could be printed")
    assert sampled == []


def test_ctrl_c_while_sampling_is_one_line(monkeypatch, capsys, exports):
    """Ctrl-C during sampling printed a KeyboardInterrupt traceback."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "generate", interrupted)
    capsys.readouterr()
    assert cli.main(["--checkpoint", exports["mdm"], "--device", "cpu", "--prompt", "a", "--length", "4"]) == 130
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "error: interrupted; no sample printed (the samples print once all are generated)\n"


@pytest.mark.parametrize("kind, how", [("mdm", "the confidence sampler at temperature 0"), ("ar", "greedy decoding")])
def test_num_samples_without_noise_is_refused(capsys, exports, kind, how):
    """--num_samples 3 at temperature 0 (the default) printed three identical copies of each sample: greedy
    decoding and the confidence sampler at argmax draw no noise, so the seed + i of each copy changed nothing."""
    argv = ["--checkpoint", exports[kind], "--device", "cpu", "--prompt", "a", "--length", "4", "--num_samples", "3"]
    line = user_error_line(capsys, cli.main, argv)
    assert line.startswith(f"error: --num_samples 3 would print 3 identical copies: {how} draws no noise")
    assert "--temperature" in line
    noisy = [["--temperature", "1"]] + ([["--algorithm", "stochastic"]] if kind == "mdm" else [])
    for options in noisy:  # with noise the copies differ
        assert cli.main([*argv, *options]) == 0
        samples = capsys.readouterr().out.split("--- sample ")[1:]
        assert len(samples) == 3 and len({s.split("\n", 1)[1] for s in samples}) > 1


@pytest.mark.parametrize("kind", ["mdm", "ar"])
def test_batch_size_bounds_each_forward_and_changes_no_sample(monkeypatch, capsys, exports, kind):
    """Every copy of every prompt of one length ran as one batch: --num_samples 300 of a 2048-token model asked
    for 300 x 2048 x 32000 float32 logits in one forward (an out-of-memory traceback on an 80 GB GPU).
    --batch_size (default 16) bounds the rows of a forward; prompt i still samples with seed + i."""
    rows: list[int] = []
    forward = TransEncoder.forward
    monkeypatch.setattr(TransEncoder, "forward",
                        lambda self, x, *a, **k: rows.append(x.shape[0]) or forward(self, x, *a, **k))
    argv = ["--checkpoint", exports[kind], "--device", "cpu", "--prompt", "a", "--prompt", "bb cc", "--num_samples",
            "3", "--temperature", "1", "--length", "4"]
    if kind == "ar":  # the KV cache runs the layers, not forward: count the rows of the uncached path
        argv.append("--no_kv_cache")
    outputs = {}
    for batch_size in ("2", "16"):
        rows.clear()
        assert cli.main([*argv, "--batch_size", batch_size]) == 0
        outputs[batch_size] = capsys.readouterr().out
        assert max(rows) == min(int(batch_size), 3)  # 3 copies of a prompt: its one length group
    assert outputs["2"] == outputs["16"]
    assert len(set(outputs["2"].split("--- sample ")[1:])) == 6


@pytest.mark.parametrize("kind", ["mdm", "ar"])
def test_runs_of_different_seeds_share_no_sample(capsys, exports, kind):
    """Sample i drew with seed + i: --seed 1 --num_samples 3 printed --seed 0's samples 2 and 3 again as its 1 and
    2, so runs of consecutive seeds (one per job) were nearly all duplicates. The same seed still repeats its text."""
    def samples(seed: str) -> list[str]:
        assert cli.main(["--checkpoint", exports[kind], "--device", "cpu", "--prompt", "a", "--num_samples", "3",
                         "--temperature", "1", "--length", "6", "--seed", seed]) == 0
        return capsys.readouterr().out.split("--- sample ")[1:]

    def texts(seed: str) -> set[str]:
        return {s.split("\n", 1)[1] for s in samples(seed)}

    capsys.readouterr()
    first = samples("0")
    assert samples("0") == first and len(texts("0")) == 3
    assert not texts("0") & texts("1")


def test_litgpt_weights_file_needs_its_tokenizer(monkeypatch, capsys, tmp_path, exports, sampled):
    """An SMDM/lit-gpt state dict (SMDM's released mdm-170M-1e19.safetensors: Llama-2's 32,000 ids) carries no
    tokenizer and records none, so the embedded default (32,000 other pieces) encoded the prompts without a word
    and the text came out as garbage. The load is stood in for: any weights file is such a state dict here."""
    from scripts import eval_elbo

    weights = str(tmp_path / "mdm-170M-1e19.safetensors")
    shutil.copy(f"{exports['mdm']}/model.safetensors", weights)  # a weights file of its own, as SMDM's
    monkeypatch.setattr(cli, "load_for_inference", lambda *a: tiny())
    monkeypatch.setattr(eval_elbo, "load_for_inference", lambda *a: tiny())
    line = user_error_line(capsys, cli.main, ["--checkpoint", weights, "--prompt", "a", "--length", "4"])
    assert line.startswith(f"error: {weights} is an SMDM/lit-gpt state dict, which carries no tokenizer")
    assert "--tokenizer_path" in line
    assert sampled == []
    text = tmp_path / "text.txt"
    text.write_text("In the beginning")
    line = user_error_line(capsys, eval_elbo.main, ["--checkpoint", weights, "--text_file", str(text), "--seq_len", "8"])
    assert "SMDM/lit-gpt state dict" in line
    tokenizer = str(load_tokenizer("").path)  # its own tokenizer, named: accepted
    assert cli.main(["--checkpoint", weights, "--tokenizer_path", tokenizer, "--prompt", "a", "--length", "4"]) == 0


def test_weights_file_of_a_model_folder_names_the_folder(capsys, tmp_path, exports, sampled):
    """An export's model.safetensors passed as --checkpoint was read as an SMDM/lit-gpt state dict and refused as
    "not an SMDM/lit-gpt checkpoint: key 'transformer.wte.weight' is missing", which names no fix; it is a weights
    file of a model folder, and the folder loads. Exports of both kinds (Hugging Face, older "format": "dlm_titan") and
    a shard of a sharded one."""
    from dlm_titan.checkpoint.export import model_config
    from dlm_titan.interop.hf_export import write_hf_folder
    from scripts import eval_elbo

    model = tiny()
    for name, shard_bytes in (("hf", 1 << 30), ("sharded", 1 << 20)):
        write_hf_folder(model.state_dict(), model_config(model, "tiny"), tmp_path / name, "float32", {}, None,
                        max_shard_bytes=shard_bytes)
    text = tmp_path / "text.txt"
    text.write_text("In the beginning")
    for folder, file in ((exports["mdm"], "model.safetensors"), (str(tmp_path / "hf"), "model.safetensors"),
                         (str(tmp_path / "sharded"), "model-00001-of-00004.safetensors")):
        weights = f"{folder}/{file}"
        for main, argv in ((cli.main, ["--prompt", "a", "--length", "4"]),
                           (eval_elbo.main, ["--text_file", str(text), "--seq_len", "8"])):
            line = user_error_line(capsys, main, ["--checkpoint", weights, "--device", "cpu", *argv])
            assert line == (f"error: {weights} is a weights file of the model folder {folder} (config.json beside "
                            "it), not an SMDM/lit-gpt state dict; pass the folder instead"), line
    assert sampled == []
    assert cli.main(["--checkpoint", exports["mdm"], "--device", "cpu", "--prompt", "a", "--length", "4"]) == 0
