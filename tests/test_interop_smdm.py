"""SMDM's released checkpoints (lit-gpt state dicts) in: a state dict written here from lit-gpt's key names and
fused-QKV layout (for each key/value group: its query heads, then its key head, then its value head) converts, and
dlm_titan's logits equal a float64 forward written from lit-gpt's definition; bad files are one line, exit 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from harness import user_error_line, word_level_tokenizer
from safetensors.torch import save_file

from dlm_titan.checkpoint.export import load_model
from dlm_titan.data.tokenizer import embedded_tokenizer_path
from dlm_titan.interop.smdm import litgpt_qkv_to_ours
from scripts.export_checkpoint import main as export_main

N_LAYER, N_HEAD, D, D_FF, VOCAB = 6, 4, 256, 1024, 64  # the 6M flavor's shape, a small vocabulary


def litgpt_state(seed: int = 0, vocab_rows: int = VOCAB + 1) -> dict[str, torch.Tensor]:
    """Random weights under lit-gpt's names (SMDM's TransEncoder), fp32."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {"transformer.wte.weight": w(vocab_rows, D, scale=1.0), "transformer.ln_f.weight": 1 + w(D),
             "lm_head.weight": w(VOCAB, D)}
    for i in range(N_LAYER):
        p = f"transformer.h.{i}."
        state |= {p + "norm_1.weight": 1 + w(D), p + "attn.attn.weight": w(3 * D, D), p + "attn.proj.weight": w(D, D),
                  p + "norm_2.weight": 1 + w(D), p + "mlp.swiglu.w1.weight": w(D_FF, D),
                  p + "mlp.swiglu.w2.weight": w(D_FF, D), p + "mlp.swiglu.w3.weight": w(D, D_FF)}
    return state


def qkv_rows(head: int, which: int, heads: int, groups: int, hs: int) -> slice:
    """Rows of query head ``head`` (which=0), or of its group's key (1) or value (2), in lit-gpt's fused weight."""
    q_per_kv = heads // groups
    group = head // q_per_kv
    start = group * (q_per_kv + 2) + (head % q_per_kv if which == 0 else q_per_kv + which - 1)
    return slice(start * hs, (start + 1) * hs)


def reference_logits(state: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """float64 forward of lit-gpt's TransEncoder: pre-norm blocks, bidirectional attention, GPT-NeoX RoPE."""
    s = {k: v.double() for k, v in state.items()}
    hs, length = D // N_HEAD, tokens.shape[1]

    def rmsnorm(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    angle = torch.arange(length, dtype=torch.float64)[:, None] * torch.tensor(
        [10000.0 ** (-2 * i / hs) for i in range(hs // 2)], dtype=torch.float64)

    def rope(t):
        a, b = t[..., : hs // 2], t[..., hs // 2:]
        return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], -1)

    x = s["transformer.wte.weight"][tokens]
    for i in range(N_LAYER):
        p = f"transformer.h.{i}."
        h = rmsnorm(x, s[p + "norm_1.weight"])
        qkv = s[p + "attn.attn.weight"]
        heads = []
        for head in range(N_HEAD):
            q, k, v = (h @ qkv[qkv_rows(head, j, N_HEAD, N_HEAD, hs)].T for j in range(3))
            heads.append(torch.softmax(rope(q) @ rope(k).transpose(1, 2) / math.sqrt(hs), -1) @ v)
        x = x + torch.cat(heads, -1) @ s[p + "attn.proj.weight"].T
        h = rmsnorm(x, s[p + "norm_2.weight"])
        gate, up = h @ s[p + "mlp.swiglu.w1.weight"].T, h @ s[p + "mlp.swiglu.w2.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ s[p + "mlp.swiglu.w3.weight"].T
    return rmsnorm(x, s["transformer.ln_f.weight"]) @ s["lm_head.weight"].T


@pytest.fixture(scope="module")
def litgpt():
    """(state dict, tokens, float64 reference logits)."""
    state = litgpt_state()
    tokens = torch.randint(0, VOCAB + 1, (2, 12), generator=torch.Generator().manual_seed(1))
    return state, tokens, reference_logits(state, tokens)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt"])
@pytest.mark.slow
def test_litgpt_state_dict_converts_to_reference_logits(tmp_path, litgpt, suffix):
    state, tokens, reference = litgpt
    path = tmp_path / f"mdm-6M{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state} if suffix == ".pth" else state, path)  # lit-gpt's {"model": ...} wrapper too
    model = load_model(path, attn_backend="math")
    assert model.config["flavor"] == "6M" and not model.causal
    with torch.no_grad():
        assert ((model(tokens).double() - reference).norm() / reference.norm()).item() < 1e-5
    if suffix != ".safetensors":
        return
    # scripts.export_checkpoint turns it into a Hugging Face folder with the same logits
    tokenizer = word_level_tokenizer(tmp_path)
    assert export_main([str(path), "--out", str(tmp_path / "hf"), "--dtype", "float32",
                        "--tokenizer_path", tokenizer]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["flavor"] == "6M"
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "hf", attn_backend="math")(tokens), model(tokens))


@pytest.mark.parametrize("heads,groups", [(8, 2), (6, 3), (4, 1), (4, 4)])
def test_grouped_fused_qkv_reorders_per_group(heads, groups):
    """lit-gpt's per-group layout -> dlm_titan's [all q, all k, all v], checked row block by row block."""
    hs, dim = 4, 8
    w = torch.randn((heads + 2 * groups) * hs, dim)
    ours = litgpt_qkv_to_ours(w, heads, groups)
    q_per_kv = heads // groups
    for h in range(heads):
        assert torch.equal(ours[h * hs:(h + 1) * hs], w[qkv_rows(h, 0, heads, groups, hs)])
    for g in range(groups):
        k_at, v_at = (heads + g) * hs, (heads + groups + g) * hs
        assert torch.equal(ours[k_at:k_at + hs], w[qkv_rows(g * q_per_kv, 1, heads, groups, hs)])
        assert torch.equal(ours[v_at:v_at + hs], w[qkv_rows(g * q_per_kv, 2, heads, groups, hs)])


def released_vocabulary_file(folder: Path) -> Path:
    """A lit-gpt file of the 6M flavor at the vocabulary of SMDM's released models (Llama-2's 32,000 ids and the
    mask row), bfloat16 with zero embeddings to stay small: ``folder/mdm-6M.safetensors``."""
    state = {k: v.bfloat16() for k, v in litgpt_state().items()}
    state |= {"transformer.wte.weight": torch.zeros(32001, D, dtype=torch.bfloat16),
              "lm_head.weight": torch.zeros(32000, D, dtype=torch.bfloat16)}
    save_file(state, str(folder / "mdm-6M.safetensors"))
    return folder / "mdm-6M.safetensors"


def one_error_line(capsys, argv: list[str]) -> str:
    code = export_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.slow
def test_bad_litgpt_files_are_one_line_exit_2(tmp_path, capsys):
    out = ["--out", str(tmp_path / "out"), "--tokenizer_path", word_level_tokenizer(tmp_path)]
    missing = litgpt_state()
    del missing["transformer.h.3.mlp.swiglu.w2.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    assert "transformer.h.3.mlp.swiglu.w2.weight" in one_error_line(capsys, [str(tmp_path / "missing.safetensors"), *out])
    wrong = litgpt_state()
    wrong["transformer.h.2.attn.proj.weight"] = torch.zeros(D, D + 1)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    assert "layers.2.attention.wo.weight" in one_error_line(capsys, [str(tmp_path / "wrong.safetensors"), *out])
    odd = {k: v for k, v in litgpt_state().items() if not k.startswith("transformer.h.5.")}  # 5 layers: no flavor
    save_file(odd, str(tmp_path / "odd.safetensors"))
    assert "--flavor" in one_error_line(capsys, [str(tmp_path / "odd.safetensors"), *out])
    save_file(litgpt_state(), str(tmp_path / "good.safetensors"))
    assert "does not fit" in one_error_line(capsys, [str(tmp_path / "good.safetensors"), "--flavor", "19M", *out])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "cannot read" in one_error_line(capsys, [str(tmp_path / "junk.pt"), *out])
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_export_of_a_litgpt_file_needs_its_tokenizer(tmp_path, capsys):
    """SMDM's released weights (Llama-2's 32,000 ids) carry no tokenizer: their export shipped the embedded one (also
    32,000 pieces, other ids) without a word, and every tool then sampled and scored with it. Refused before the
    weights are read, nothing written; the tokenizer named is shipped."""
    path, out = released_vocabulary_file(tmp_path), tmp_path / "out"
    line = user_error_line(capsys, export_main, [str(path), "--out", str(out)])
    assert line.startswith(f"error: {path} is an SMDM/lit-gpt state dict, which carries no tokenizer"), line
    assert "--tokenizer_path" in line and "Llama-2's tokenizer.model" in line
    empty = user_error_line(capsys, export_main, [str(path), "--out", str(out), "--tokenizer_path", ""])
    assert empty.startswith(f"error: {path} is an SMDM/lit-gpt state dict")  # "" is the embedded default again
    assert not out.exists()
    tokenizer = str(embedded_tokenizer_path())  # named: shipped, whatever it is
    assert export_main([str(path), "--out", str(out), "--tokenizer_path", tokenizer]) == 0
    assert (out / "tokenizer.json").is_file()


def test_continued_pretraining_starts_from_the_litgpt_weights(tmp_path, litgpt):
    """checkpoint.initial_load_path takes an SMDM/lit-gpt file: the run's model starts from its weights and trains."""
    from harness import run_trainer, tiny_run_args, write_random_shards

    from dlm_titan import distributed as dist_utils
    from dlm_titan.config import load_config
    from dlm_titan.interop.smdm import read_litgpt
    from dlm_titan.train import Trainer

    state, _, _ = litgpt
    save_file(state, str(tmp_path / "mdm-6M.safetensors"))
    (tmp_path / "data").mkdir()
    data = write_random_shards(tmp_path / "data", VOCAB)
    argv = tiny_run_args(data, tmp_path / "dump", VOCAB, 2, 2, 1, 0, "--checkpoint.initial_load_path",
                         str(tmp_path / "mdm-6M.safetensors"))
    try:
        trainer = Trainer(load_config(argv))
        want = read_litgpt(tmp_path / "mdm-6M.safetensors")[1]
        assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in want.items())
    finally:
        dist_utils.shutdown()
    losses = run_trainer(argv)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
