"""Model: SMDM's parameter counts, shapes, init statistics, bidirectionality, meta-device build, RoPE."""

import math

import pytest
import torch
from dlm_kernels.rope import apply_rope

from dlm_titan.config import Model
from dlm_titan.errors import UserError
from dlm_titan.models import FLAVORS, build_model, get_model_args
from dlm_titan.models.attention import rope_cache

# DESIGN.md's table: flavor -> non-embedding N (SMDM's model_para_config).
SMDM_N = {
    "6M": 6_294_784, "19M": 18_880_896, "34M": 33_563_136, "48M": 47_786_688, "66M": 65_549_440,
    "85M": 85_214_080, "75M": 75_387_520, "113M": 113_265_408, "142M": 141_581_568, "170M": 169_897_728,
    "180M": 179_856_768, "206M": 205_550_464, "231M": 231_244_160, "268M": 268_469_248, "302M": 302_027_776,
    "336M": 335_586_304, "472M": 471_906_560, "551M": 550_557_440, "571M": 571_001_728, "629M": 629_208_320,
    "666M": 666_168_448, "717M": 717_285_888, "761M": 761_335_168, "831M": 830_541_312, "944M": 943_796_736,
    "1028M": 1_027_677_952, "1233M": 1_233_213_184, "1476M": 1_476_487_168, "1678M": 1_677_826_048,
    "2121M": 2_121_393_280,
}


def cpu_model(flavor="6M", seq_len=64):
    model = build_model(Model(flavor=flavor), seq_len, torch.device("cpu"))
    model.to_empty(device="cpu")
    model.init_weights(seed=3407)
    return model


@pytest.mark.parametrize("flavor", sorted(SMDM_N))
def test_non_embedding_counts_match_smdm(flavor):
    assert flavor in FLAVORS
    model = build_model(Model(flavor=flavor), 2048, torch.device("cpu"))  # meta: no memory
    params = dict(model.named_parameters())
    counted = sum(p.numel() for n, p in params.items() if n not in ("tok_embeddings.weight", "output.weight"))
    assert counted == SMDM_N[flavor] == get_model_args(flavor).non_embedding_params()
    assert params["tok_embeddings.weight"].shape == (32001, model.args.dim)  # + mask row
    assert params["output.weight"].shape == (32000, model.args.dim)  # mask never predicted
    assert all(p.device.type == "meta" for p in params.values())


def test_alias_and_unknown_flavor():
    assert get_model_args("1B") == get_model_args("1028M")
    with pytest.raises(UserError, match="unknown model flavor '7M'"):
        get_model_args("7M")


def test_no_biases_and_untied():
    model = cpu_model()
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    assert model.output.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()


def test_init_statistics_follow_smdm():
    model = cpu_model("19M")
    d, n_layer = 384, 8
    base, out = math.sqrt(2 / (5 * d)), 1 / (math.sqrt(d) * n_layer)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.all(p == 1)
            continue
        expected = out if name.endswith(("attention.wo.weight", "w_down.weight")) else base
        assert abs(p.std().item() - expected) < 0.03 * expected, name
        assert abs(p.mean().item()) < 0.05 * expected, name


def test_init_is_deterministic_and_seeded():
    a, b = cpu_model(), cpu_model()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    c = build_model(Model(flavor="6M"), 64, torch.device("cpu"))
    c.to_empty(device="cpu")
    c.init_weights(seed=1)
    assert not torch.equal(a.output.weight, c.output.weight)


@pytest.mark.slow
def test_attention_is_bidirectional():
    model = cpu_model().eval()
    x = torch.randint(0, 32000, (1, 16))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 32000  # change only the last token
    with torch.no_grad():
        la, lb = model(x), model(y)
    assert la.shape == (1, 16, 32000)
    assert not torch.allclose(la[0, 0], lb[0, 0])  # the first position sees the last one


def test_rope_matches_complex_rotation():
    """GPT-NeoX half rotation equals multiplying (x_i, x_{i+D/2}) as a complex number by e^{i pos theta_i}."""
    seq, dim = 5, 8
    x = torch.randn(1, seq, 1, dim, dtype=torch.float64)
    rope = rope_cache(seq, dim, 10000.0).double()
    got = apply_rope(x, rope)
    half = dim // 2
    inv = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angle = torch.arange(seq, dtype=torch.float64)[:, None] * inv
    z = torch.complex(x[0, :, 0, :half], x[0, :, 0, half:]) * torch.exp(1j * angle)
    assert torch.allclose(got[0, :, 0, :half], z.real) and torch.allclose(got[0, :, 0, half:], z.imag)


def test_models_cli_prints_every_flavor(capsys):
    from dlm_titan.models.__main__ import main

    main()
    out = capsys.readouterr().out
    for flavor, n in SMDM_N.items():
        assert f"{n:,}" in out and flavor in out
