"""GPU test of the Triton AdamW (skipped without CUDA): compiled kernel, vectorized full blocks and masked tails,
against PyTorch's fused AdamW after clip_grad_norm_, on parameters shaped like a small model's."""

import copy

import pytest
import torch

from dlm_titan.optim import TritonAdamW, clip_grad_norm

pytestmark = pytest.mark.gpu

HYPER = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
# Embedding-like, square, SwiGLU-like and norm weights; with 1024-element blocks the embedding, the norm and the
# last two leave ragged (masked) last blocks.
SHAPES = [(32001, 256), (256, 256), (1000, 256), (256,), (4097,), (3,)]


@pytest.mark.parametrize("max_norm", [1.0, 0.0])
def test_triton_adamw_matches_torch_fused_on_gpu(max_norm):
    g = torch.Generator(device="cuda").manual_seed(0)
    init = [torch.randn(s, device="cuda", generator=g) * 0.02 for s in SHAPES]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt_ours = TritonAdamW(ours, **HYPER)
    opt_theirs = torch.optim.AdamW(theirs, fused=True, **HYPER)
    for step in range(5):
        for a, b in zip(ours, theirs):
            grad = torch.randn(a.shape, device="cuda", generator=g) * 0.01 * (step + 1)
            a.grad, b.grad = grad.clone(), grad.clone()
        norm, scale = clip_grad_norm(ours, max_norm, opt_ours)
        opt_ours.step(**({} if scale is None else {"grad_scale": scale}))
        ref_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm if max_norm > 0 else float("inf"))
        opt_theirs.step()
        assert abs(norm.item() - ref_norm.item()) <= 1e-5 * ref_norm.item()
    assert opt_ours.tensors_by_kernel == 5 * len(SHAPES) and opt_ours.tensors_by_pytorch == 0
    for a, b in zip(ours, theirs):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5


def test_state_of_pytorch_fused_adamw_loads_with_steps_on_the_cpu():
    """PyTorch's fused AdamW keeps step counts on the GPU; loaded here they move to the CPU and training goes on
    as with the fused optimizer."""
    g = torch.Generator(device="cuda").manual_seed(1)
    init = [torch.randn(s, device="cuda", generator=g) * 0.02 for s in SHAPES]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt_theirs = torch.optim.AdamW(theirs, fused=True, **HYPER)
    grads = [[torch.randn(s, device="cuda", generator=g) * 0.01 for s in SHAPES] for _ in range(3)]
    for step_grads in grads[:2]:
        for p, grad in zip(theirs, step_grads):
            p.grad = grad.clone()
        opt_theirs.step()
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    opt_ours = TritonAdamW(ours, **HYPER)
    # A copy: load_state_dict keeps tensors already on the right device and dtype, so without it both optimizers
    # would update the same moment tensors.
    opt_ours.load_state_dict(copy.deepcopy(opt_theirs.state_dict()))
    assert all(s["step"].device.type == "cpu" and s["step"].item() == 2 for s in opt_ours.state.values())
    assert opt_ours.param_groups[0]["fused"] is False
    for a, b, grad in zip(ours, theirs, grads[2]):
        a.grad, b.grad = grad.clone(), grad.clone()
    opt_ours.step()
    opt_theirs.step()
    assert opt_ours.tensors_by_kernel == len(SHAPES) and opt_ours.tensors_by_pytorch == 0
    for a, b in zip(ours, theirs):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5
