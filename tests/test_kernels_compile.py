"""Every Triton kernel compiled ahead of time for Hopper (sm_90) by Triton's own compiler, no GPU needed: the
interpreter tests run the kernels' Python without that compiler, which rejects code the interpreter accepts (a
rounding mode on a widening cast was one). Signatures are the dtypes the kernels' launchers pass."""

import pytest

triton = pytest.importorskip("triton")

from dlm_kernels import adamw, add_rms_norm_triton, masked_ce_triton, rope_triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROPE_STRIDES = ["sq_b", "sq_t", "sq_h", "sk_b", "sk_t", "sk_h", "sv_b", "sv_t", "sv_h", "rope_table", "rope_t"]


def _rope(grad: str, table: str) -> tuple:
    signature = {"dq_ptr": f"*{grad}", "dk_ptr": f"*{grad}", "dv_ptr": f"*{grad}", "rope_ptr": f"*{table}",
                 "out_ptr": f"*{grad}", "L": "i32", "H": "i32", "half": "i32", **{name: "i64" for name in ROPE_STRIDES}}
    return rope_triton._rope_qkv_bwd_kernel, signature, {"BLOCK_T": 32, "BLOCK_HALF": 32}


def _norm_fwd(stream: str, has_delta: bool) -> tuple:
    signature = {"x_ptr": f"*{stream}", "delta_ptr": "*bf16", "w_ptr": f"*{stream}", "h_ptr": f"*{stream}",
                 "y_ptr": "*bf16", "rstd_ptr": "*fp32", "n_rows": "i32", "D": "i32", "eps": "fp32"}
    return (add_rms_norm_triton._add_rms_norm_fwd_kernel, signature,
            {"HAS_DELTA": has_delta, "BLOCK_M": 4, "BLOCK_D": 1024})


def _norm_bwd(stream: str, flags: bool) -> tuple:
    signature = {"dy_ptr": "*bf16", "dh_in_ptr": f"*{stream}", "h_ptr": f"*{stream}", "rstd_ptr": "*fp32",
                 "w_ptr": f"*{stream}", "dx_ptr": f"*{stream}", "ddelta_ptr": "*bf16", "dw_part_ptr": "*fp32",
                 "n_rows": "i32", "D": "i32", "rows_per_program": "i32"}
    return (add_rms_norm_triton._add_rms_norm_bwd_kernel, signature,
            {"HAS_DH_IN": flags, "WRITE_DDELTA": flags, "BLOCK_M": 1, "BLOCK_D": 1024})


def _ce_rows(logits: str, single_tile: bool) -> tuple:
    signature = {"z_ptr": f"*{logits}", "stride_z": "i32", "y_ptr": "*i64", "w_ptr": "*fp32", "loss_ptr": "*fp32",
                 "V": "i32"}
    return (masked_ce_triton._ce_rows_kernel, signature,
            {"BLOCK_V": 32768 if single_tile else 4096, "SINGLE_TILE": single_tile, "WRITE_GRAD": True})


def _adamw(has_scale: bool) -> tuple:
    signature = {"table_ptr": "*i64", "coef_ptr": "*fp32", "numel_ptr": "*i64", "first_block_ptr": "*i64",
                 "tensor_of_ptr": "*i32", "scale_ptr": "*fp32", "n_tensors": "i32", "decay": "fp32", "beta1": "fp32",
                 "beta2": "fp32", "eps": "fp32"}
    return adamw._adamw_kernel, signature, {"HAS_SCALE": has_scale, "BLOCK": 1024}


CASES = {
    "rope bf16 grads, fp32 table": _rope("bf16", "fp32"),
    "rope fp32 grads, fp32 table": _rope("fp32", "fp32"),
    "rope fp32 grads, bf16 table": _rope("fp32", "bf16"),
    "rope fp16 grads, bf16 table": _rope("fp16", "bf16"),
    "norm fwd fp32 stream": _norm_fwd("fp32", True),
    "norm fwd bf16 stream, no delta": _norm_fwd("bf16", False),
    "norm bwd fp32 stream": _norm_bwd("fp32", True),
    "norm bwd bf16 stream": _norm_bwd("bf16", False),
    "ce rows bf16, tiled": _ce_rows("bf16", False),
    "ce rows fp32, one tile": _ce_rows("fp32", True),
    "scatter rows": (masked_ce_triton._scatter_rows_kernel,
                     {"src_ptr": "*bf16", "row_of_ptr": "*i64", "dst_ptr": "*bf16", "scale_ptr": "*fp32", "d": "i32"},
                     {"BLOCK_D": 1024}),
    "scale cast": (masked_ce_triton._scale_cast_kernel,
                   {"src_ptr": "*fp32", "dst_ptr": "*bf16", "scale_ptr": "*fp32", "n": "i32"}, {"BLOCK": 1024}),
    "adamw": _adamw(False),
    "adamw with grad scale": _adamw(True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_compiles_for_hopper(case):
    kernel, signature, constexprs = CASES[case]
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    assert list(signature) == kernel.arg_names  # the signature names every argument, in order
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert len(compiled.asm["cubin"]) > 0
