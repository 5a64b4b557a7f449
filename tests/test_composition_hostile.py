"""Compositions of the model's and the parallel layer's settings that gave other numbers without a word (the compute
dtype under FSDP, flash-attn under training.deterministic) or failed mid-run (float8 with unaligned token counts)."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch

from dlm_titan.config import load_config
from dlm_titan.models import build_model
from dlm_titan.models.attention import Attention, rope_cache
from dlm_titan.parallelize import apply_fsdp, parallelize_model


@pytest.mark.parametrize(
    "flags,param_dtype",
    [
        (["--training.dtype", "float32"], torch.float32),
        (["--training.dtype", "float32", "--training.mixed_precision_param", "bfloat16"], torch.float32),
        (["--training.dtype", "auto"], torch.bfloat16),
        (["--training.dtype", "bfloat16"], torch.bfloat16),
        (["--training.mixed_precision_param", "float32"], torch.float32),
    ],
)
def test_fsdp_gathers_parameters_in_the_compute_dtype(monkeypatch, flags, param_dtype):
    """Under FSDP no autocast runs: the gathered parameters' dtype is the compute dtype. A float32 run gathered
    them in mixed_precision_param's default bf16, so it computed in bf16 on several GPUs and in fp32 on one (or
    under DDP). Every FSDP group (a stand-in for fully_shard records the policies) gets the same policy; gradients
    are still reduced in mixed_precision_reduce."""
    from torch.distributed import fsdp

    policies = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kwargs: policies.append(kwargs["mp_policy"]))
    cfg = load_config(["--model.flavor", "6M", *flags])
    model = build_model(cfg.model, 32, torch.device("meta"))
    apply_fsdp(model, None, cfg.training, "never", device_type="cuda")
    assert len(policies) == len(model.layers) + 3  # embedding, blocks, norm + head, root
    assert {(p.param_dtype, p.reduce_dtype) for p in policies} == {(param_dtype, torch.float32)}


def test_fsdp_on_cpu_computes_in_float32(monkeypatch):
    from torch.distributed import fsdp

    policies = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kwargs: policies.append(kwargs["mp_policy"]))
    cfg = load_config(["--model.flavor", "6M", "--training.mixed_precision_reduce", "bfloat16"])
    apply_fsdp(build_model(cfg.model, 32, torch.device("meta")), None, cfg.training, "never", device_type="cpu")
    assert {(p.param_dtype, p.reduce_dtype) for p in policies} == {(torch.float32, torch.float32)}


@pytest.mark.parametrize("deterministic", [False, True])
def test_flash_attn_backward_is_deterministic_under_training_deterministic(monkeypatch, deterministic):
    """flash-attn's backward accumulates with atomics unless called with deterministic=True: a run with
    training.deterministic and model.attn_backend = "flash_attn" was not bitwise repeatable (the other backends
    follow torch's switch). A stand-in package records the call (on CPU: the layer's GPU path, run directly)."""
    calls = []

    def flash_attn_func(q, k, v, **kwargs):
        calls.append(kwargs)
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=kwargs["causal"]).transpose(1, 2)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        attn = Attention(32, 2, backend="flash_attn", causal=True)
    finally:
        torch.use_deterministic_algorithms(before)
    attn(torch.randn(1, 4, 32), rope_cache(4, 16, 10000.0))
    assert calls == [{"causal": True, "deterministic": deterministic}]


@dataclasses.dataclass(frozen=True)
class _Float8LinearConfig:
    """torchao.float8's config, as far as the trainer reads it."""

    recipe: str = "tensorwise"
    pad_inner_dim: bool = False

    @staticmethod
    def from_recipe_name(name: str) -> _Float8LinearConfig:
        return _Float8LinearConfig(recipe=name)


@pytest.mark.parametrize(
    "flags,padded",
    [
        ([], False),  # 8 x 2048 tokens
        (["--training.local_batch_size", "3", "--training.seq_len", "1000"], True),
        (["--diffusion.ssl_ratio", "0.01"], True),  # a crop to length L gives 8 L tokens
        (["--diffusion.ssl_ratio", "0.01", "--training.local_batch_size", "16", "--training.global_batch_size",
          "256"], False),
        (["--training.objective", "ar", "--training.local_batch_size", "1", "--training.seq_len", "1000"], True),
    ],
)
def test_float8_pads_matmuls_whose_token_count_can_be_off_a_multiple_of_16(monkeypatch, flags, padded):
    """torch._scaled_mm needs each matmul's inner dimension a multiple of 16, and a float8 weight gradient's is the
    micro-batch's token count: with diffusion.ssl_ratio > 0 (SMDM's 0.01) a run failed mid-run at the first crop to
    such a length (8 x an odd length), and local_batch_size x seq_len off a multiple of 16 failed at step 1, each
    with _scaled_mm's RuntimeError traceback. torchao pads them when asked; aligned runs are not padded (the
    padding copies). A stand-in torchao records the config (no float8 GPU here)."""
    configs = []
    float8 = types.SimpleNamespace(Float8LinearConfig=_Float8LinearConfig,
                                   convert_to_float8_training=lambda model, config, module_filter_fn: configs.append(config))
    monkeypatch.setitem(sys.modules, "torchao", types.SimpleNamespace(float8=float8))
    monkeypatch.setitem(sys.modules, "torchao.float8", float8)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cfg = load_config(["--model.flavor", "6M", "--float8.enable", *flags])
    parallelize_model(build_model(cfg.model, cfg.training.seq_len, torch.device("meta")), cfg, None,
                      torch.device("cuda"))
    assert configs == [_Float8LinearConfig(recipe="tensorwise", pad_inner_dim=padded)]


_FLASH_OP_RUNS = """
import torch
from torch import nn

from dlm_titan.config import load_config
from dlm_titan.parallelize import apply_ac

runs = []


# flash-attn (>= 2.7) registers its forward under this name; a stand-in that counts its runs
@torch.library.custom_op("flash_attn::_flash_attn_forward", mutates_args=())
def flash_forward(q: torch.Tensor) -> torch.Tensor:
    runs.append(1)
    return q * 2


flash_forward.register_fake(lambda q: torch.empty_like(q))
flash_forward.register_autograd(lambda ctx, grad: grad * 2)


class Block(nn.Module):
    def forward(self, x):
        return torch.ops.flash_attn._flash_attn_forward(x).sin()


model = nn.Module()
model.layers = nn.ModuleDict({"0": Block()})
apply_ac(model, load_config(["--activation_checkpoint.mode", "selective"]).activation_checkpoint)
x = torch.randn(4, requires_grad=True)
model.layers["0"](x).sum().backward()
assert torch.allclose(x.grad, 2 * torch.cos(2 * x.detach()))
print(len(runs))
"""


def test_selective_op_ac_keeps_flash_attn_outputs():
    """Selective "op" AC keeps attention outputs; under attn_backend = "flash_attn" the attention is flash-attn's own
    torch op, which was not among those kept, so backward ran the attention forward again. The stand-in op runs
    once in forward and backward together (a separate process: the op is registered for good)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _FLASH_OP_RUNS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1"]
