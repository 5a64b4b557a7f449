"""Training length from a FLOPs budget (SMDM's rule) and model FLOPs utilisation (torchtitan's formula)."""

from __future__ import annotations

# Dense bf16 peak (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name(), most specific first.
_PEAK_BF16_TFLOPS = (
    ("H200 NVL", 835.0),  # the PCIe card: lower clocks and power than the SXM H200 ("H200" below)
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
)


def mean_seq_len(seq_len: int, ssl_ratio: float) -> float:
    """Mean tokens per sequence under stochastic sequence length: seq_len (1 - r) + r (1 + seq_len) / 2."""
    return seq_len * (1.0 - ssl_ratio) + ssl_ratio * (1 + seq_len) / 2


def steps_from_budget(flops: float, non_embedding_params: int, global_batch_size: int, seq_len: int, ssl_ratio: float = 0.0) -> int:
    """SMDM: steps = floor(C / (6 N B L)), N the non-embedding parameters, L the mean sequence length.

    Computed in float64 (under SSL the mean length is fractional). The divisor 6 N B L is exact while it stays
    below 2^53 and float ``//`` floors the true quotient, so whole-token lengths give the integer result: e.g. 170M
    at 1e19 with 256 x 2048 gives exactly 18,710.
    """
    return int(flops // step_flops(non_embedding_params, global_batch_size, seq_len, ssl_ratio))


def step_flops(non_embedding_params: int, global_batch_size: int, seq_len: int, ssl_ratio: float = 0.0) -> float:
    """SMDM's compute of one step, 6 N B L (L the mean sequence length): the least budget that trains a step."""
    return 6 * non_embedding_params * global_batch_size * mean_seq_len(seq_len, ssl_ratio)


def smdm_warmup_steps(steps: int) -> int:
    """SMDM's warmup rule: max(1% of the steps, 100)."""
    return max(steps // 100, 100)


def flops_per_token(params_without_embedding: int, n_layers: int, dim: int, seq_len: int) -> float:
    """Training FLOPs per token (torchtitan, bidirectional attention): 6 * (params - input embedding) +
    12 * n_layer * d * seq_len. The head counts as a matmul; the attention term is full (not halved)
    because every token attends to every other.

    The autoregressive baseline (``training.objective = "ar"``) keeps this formula, attention counted as full:
    torchtitan counts it so for its causal Llama, so the two MFUs compare, although a causal kernel skips about
    half of that attention work (its MFU is then an overstatement by up to 12 n_layer d L / 2 per token)."""
    return 6.0 * params_without_embedding + 12.0 * n_layers * dim * seq_len


def peak_flops(device_name: str) -> float | None:
    """bf16 dense peak FLOP/s of a GPU by name, or None when unknown (then no MFU is reported)."""
    for key, tflops in _PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None
