"""FLOPs budget -> steps (SMDM) and MFU inputs."""

from dlm_titan.flops import flops_per_token, mean_seq_len, peak_flops, smdm_warmup_steps, steps_from_budget
from dlm_titan.models import get_model_args


def test_smdm_step_counts():
    n170 = get_model_args("170M").non_embedding_params()
    assert steps_from_budget(1e19, n170, 256, 2048) == 18_710
    assert steps_from_budget(6e19, n170, 256, 2048, ssl_ratio=0.01) == 112_828
    n1b = get_model_args("1028M").non_embedding_params()
    assert steps_from_budget(1.6e21, n1b, 256, 2048) == 494_927
    assert steps_from_budget(3.3e21, n1b, 1024, 2048, ssl_ratio=0.01) == 256_478


def test_mean_length_and_warmup():
    assert mean_seq_len(2048, 0.0) == 2048
    assert mean_seq_len(2048, 1.0) == 1024.5
    assert smdm_warmup_steps(18_710) == 187 and smdm_warmup_steps(500) == 100


def test_flops_per_token_170m_by_hand():
    a = get_model_args("170M")
    params_wo_embedding = a.non_embedding_params() + 32000 * 768  # blocks + norms + output head
    assert flops_per_token(params_wo_embedding, 18, 768, 2048) == 6 * (169_897_728 + 24_576_000) + 12 * 18 * 768 * 2048


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Some Future GPU") is None
