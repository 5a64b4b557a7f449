"""CPU tests of the Triton AdamW (kernels/adamw.py, dlm_titan.optim.TritonAdamW) under TRITON_INTERPRET=1 (in a
process of their own, see ``interpreted.py``): the kernel against float64 AdamW written here from its definition,
the optimizer against ``torch.optim.AdamW`` with ``clip_grad_norm_``, checkpoints across implementations, and
the trainer."""

import copy
import math

import pytest
import torch

pytest.importorskip("triton")

from dlm_kernels.adamw import AdamWLaunch, adamw_reference  # noqa: E402
from harness import run_trainer, tiny_run_args, write_random_shards  # noqa: E402
from interpreted import replace_unless_interpreted  # noqa: E402

from dlm_titan.optim import TritonAdamW, clip_grad_norm  # noqa: E402

HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _adamw_float64(p, g, m, v, step, scale):
    """One AdamW step in float64, from the definition (decoupled decay, bias-corrected moments)."""
    lr, (b1, b2), eps, wd = HYPER["lr"], HYPER["betas"], HYPER["eps"], HYPER["weight_decay"]
    g = g * scale
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**step), v / (1 - b2**step)
    return p - lr * m_hat / (v_hat.sqrt() + eps), m, v


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("scaled", [False, True])
def test_kernel_matches_float64(scaled):
    # Sizes: below one block, one block exactly, a ragged tail over several blocks, a 2-D tensor, one element;
    # each tensor at its own step count (as after steps some parameters had no gradient).
    g = torch.Generator().manual_seed(1)
    shapes = [(7,), (32,), (77,), (5, 13), (1,)]
    params = [torch.randn(s, generator=g) for s in shapes]
    moments = [torch.randn(s, generator=g) * 0.1 for s in shapes]
    squares = [torch.rand(s, generator=g) * 0.01 for s in shapes]
    steps = [torch.tensor(float(k)) for k in (1, 5, 2, 40, 3)]
    ref = [(p.double(), m.double(), v.double()) for p, m, v in zip(params, moments, squares)]
    launch = AdamWLaunch(block=32, num_warps=1)
    scale = torch.tensor([0.37]) if scaled else None
    plans, tables = [], []
    for step in range(3):
        # New gradient tensors each step (the address table is rebuilt), then the same ones again (reused).
        grads = [torch.randn(s, generator=g) for s in shapes]
        for _ in range(2 if step == 2 else 1):
            torch._foreach_add_(steps, 1.0)
            left = launch(params, grads, moments, squares, steps, lr=HYPER["lr"], beta1=0.9, beta2=0.95, eps=1e-8,
                          weight_decay=0.1, grad_scale=scale)
            assert left == []
            plans.append(launch._plan)
            tables.append(launch._table)
            ref = [_adamw_float64(p, gr.double(), m, v, int(t), 0.37 if scaled else 1.0)
                   for (p, m, v), gr, t in zip(ref, grads, steps)]
    for got, want in zip(zip(params, moments, squares), ref):
        for a, b in zip(got, want):
            assert _rel(a, b) <= 1e-6
    # New gradients only move the address table; the block plan (same sizes) is built once.
    assert all(plan is plans[0] for plan in plans)
    assert [t is u for t, u in zip(tables, tables[1:])] == [False, False, True]


def test_plan_follows_the_tensors_the_kernel_takes():
    """A gradient that turns misaligned leaves the kernel (a plan without it; the caller updates it) and comes back
    (a plan with it again); steps in between reuse the plan. Every step matches float64 AdamW."""
    g = torch.Generator().manual_seed(3)
    shapes = [(40,), (9, 5), (70,)]
    params = [torch.randn(s, generator=g) for s in shapes]
    moments, squares = [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes]
    ref = [(p.double(), m.double(), v.double()) for p, m, v in zip(params, moments, squares)]
    steps = [torch.tensor(0.0) for _ in shapes]
    hyper = dict(lr=HYPER["lr"], beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    launch, plans = AdamWLaunch(block=32, num_warps=1), []
    for misaligned in (None, 1, 1, None, None):  # which gradient is a view 4 bytes into its buffer
        grads = [torch.randn(s, generator=g) for s in shapes]
        if misaligned is not None:
            buffer = torch.empty(grads[misaligned].numel() + 1)
            buffer[1:].copy_(grads[misaligned].flatten())
            grads[misaligned] = buffer[1:].view(shapes[misaligned])
        torch._foreach_add_(steps, 1.0)
        left = launch(params, grads, moments, squares, steps, **hyper)
        assert left == ([] if misaligned is None else [misaligned])
        for i in left:
            adamw_reference(params[i], grads[i], moments[i], squares[i], step=int(steps[i]), **hyper)
        plans.append(launch._plan)
        ref = [_adamw_float64(p, gr.double(), m, v, int(t), 1.0) for (p, m, v), gr, t in zip(ref, grads, steps)]
    assert [a is b for a, b in zip(plans, plans[1:])] == [False, True, False, True]
    for got, want in zip(zip(params, moments, squares), ref):
        for a, b in zip(got, want):
            assert _rel(a, b) <= 1e-6


def test_kernel_leaves_out_what_it_cannot_take():
    """A float64 parameter and a misaligned view are returned for PyTorch math; the others are still updated."""
    base = torch.zeros(33)
    params = [torch.ones(8), torch.ones(8, dtype=torch.float64), base[1:9].fill_(1.0)]  # 4-byte offset: misaligned
    grads = [torch.full_like(p, 0.5) for p in params]
    moments, squares = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    left = AdamWLaunch(block=8, num_warps=1)(params, grads, moments, squares, [torch.tensor(1.0)] * 3, lr=0.1,
                                             beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0)
    assert left == [1, 2]
    assert torch.all(params[0] < 1) and torch.all(params[1] == 1) and torch.all(params[2] == 1)


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(9, 40), torch.nn.LayerNorm(40), torch.nn.Linear(40, 3))


def _train(model, optimizer, steps, max_norm, triton_clip, seed=7):
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    norms = []
    for _ in range(steps):
        x = torch.randn(16, 9, generator=g).to(dtype)
        optimizer.zero_grad()
        (model(x) ** 2).sum().backward()
        params = list(model.parameters())
        if triton_clip:
            norm, scale = clip_grad_norm(params, max_norm, optimizer)
            optimizer.step(**({} if scale is None else {"grad_scale": scale}))
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            optimizer.step()
        norms.append(norm.item())
    return norms


@pytest.mark.parametrize("max_norm", [0.5, 0.0])
def test_triton_adamw_matches_torch_adamw_with_clipping(max_norm):
    ours, theirs = _model(0), _model(0)
    opt_ours = TritonAdamW(ours.parameters(), block=64, **HYPER)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), foreach=False, **HYPER)
    norms = _train(ours, opt_ours, 4, max_norm, triton_clip=True)
    ref_norms = _train(theirs, opt_theirs, 4, max_norm if max_norm > 0 else math.inf, triton_clip=False)
    assert opt_ours.tensors_by_pytorch == 0 and opt_ours.tensors_by_kernel == 4 * 6  # 6 tensors, 4 steps: all by the kernel
    if max_norm > 0:
        assert min(norms) > max_norm  # every step clipped, so the folded scale mattered
    assert norms == pytest.approx(ref_norms, rel=1e-6)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert _rel(a, b.double()) <= 1e-6
    state, ref_state = opt_ours.state_dict(), opt_theirs.state_dict()
    assert state["state"].keys() == ref_state["state"].keys()
    for key, s in state["state"].items():
        assert s.keys() == ref_state["state"][key].keys()
        assert s["step"].device.type == "cpu" and s["step"].item() == ref_state["state"][key]["step"].item() == 4


@pytest.mark.parametrize("first", ["torch", "triton"])
def test_checkpoint_state_loads_across_implementations(first):
    """Two steps with one implementation, its state loaded into the other, two more steps: equal to four steps
    of torch's AdamW. The receiving optimizer first steps with lr 0 and zero gradients, as DCP does to create
    state before loading into it, so the Triton launch it caches must follow the loaded (new) tensors."""
    build = {"torch": lambda m: torch.optim.AdamW(m.parameters(), foreach=True, **HYPER),
             "triton": lambda m: TritonAdamW(m.parameters(), block=64, **HYPER)}
    second = "triton" if first == "torch" else "torch"
    model, straight = _model(0), _model(0)
    opt = build[first](model)
    _train(model, opt, 2, 0.5, triton_clip=first == "triton")
    moved = build[second](model)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    moved.param_groups[0]["lr"] = 0.0
    moved.step()
    moved.load_state_dict(copy.deepcopy(opt.state_dict()))
    if second == "triton":  # its kernel flags stay its own (torch's load_state_dict takes the saved ones)
        assert moved.param_groups[0]["foreach"] is False
    _train(model, moved, 2, 0.5, triton_clip=second == "triton", seed=8)
    ref_opt = build["torch"](straight)
    _train(straight, ref_opt, 2, 0.5, triton_clip=False)
    _train(straight, ref_opt, 2, 0.5, triton_clip=False, seed=8)
    for a, b in zip(model.parameters(), straight.parameters()):
        assert _rel(a, b.double()) <= 1e-6


def test_steps_loaded_in_place_at_different_counts():
    """DCP primes the optimizer with a zero-lr step, then loads the checkpoint's tensors in place: per-parameter
    step counts that differ (parameters without gradients in some steps) must each get their own bias correction."""
    ours, theirs = _model(0), _model(0)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), foreach=False, **HYPER)
    _train(theirs, opt_theirs, 2, 0.5, triton_clip=False)
    theirs[0].weight.grad = None  # two more steps without the first weight: its count stays at 2
    for _ in range(2):
        for p in list(theirs.parameters())[1:]:
            p.grad = torch.ones_like(p) * 0.01
        opt_theirs.step()
    ours.load_state_dict(theirs.state_dict())
    opt_ours = TritonAdamW(ours.parameters(), block=64, **HYPER)
    for p in ours.parameters():
        p.grad = torch.zeros_like(p)
    lr = opt_ours.param_groups[0]["lr"]
    opt_ours.param_groups[0]["lr"] = 0.0
    opt_ours.step()
    opt_ours.param_groups[0]["lr"] = lr
    for p, q in zip(ours.parameters(), theirs.parameters()):  # in place, as DCP loads
        for key in ("step", "exp_avg", "exp_avg_sq"):
            opt_ours.state[p][key].copy_(opt_theirs.state[q][key])
    assert sorted({int(s["step"]) for s in opt_ours.state.values()}) == [2, 4]
    _train(ours, opt_ours, 1, 0.5, triton_clip=True, seed=9)
    _train(theirs, opt_theirs, 1, 0.5, triton_clip=False, seed=9)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert _rel(a, b.double()) <= 1e-6


def test_tensors_the_kernel_cannot_take_get_the_same_math():
    ours, theirs = _model(0).double(), _model(0).double()
    opt = TritonAdamW(ours.parameters(), **HYPER)
    _train(ours, opt, 3, 0.5, triton_clip=True)
    assert opt.tensors_by_kernel == 0 and opt.tensors_by_pytorch == 3 * 6
    _train(theirs, torch.optim.AdamW(theirs.parameters(), foreach=False, **HYPER), 3, 0.5, triton_clip=False)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert _rel(a, b) <= 1e-12


def test_trainer_with_triton_adamw_equals_foreach_and_resumes(tmp_path):
    (tmp_path / "shards").mkdir()
    data = write_random_shards(tmp_path / "shards", 256)
    args = lambda name, *extra: tiny_run_args(data, tmp_path / name, 256, 4, 4, 2, 0, *extra)  # noqa: E731
    foreach = run_trainer(args("foreach", "--optimizer.implementation", "foreach"))
    triton = run_trainer(args("triton", "--optimizer.implementation", "triton"))
    assert len({round(v, 4) for v in foreach.values()}) == 4  # the steps differ: equality means something
    assert triton == pytest.approx(foreach, rel=1e-6)
    ckpt = ("--optimizer.implementation", "triton", "--checkpoint.enable", "--checkpoint.interval", "2")
    run_trainer(args("resumed", *ckpt), stop_after=2)
    resumed = run_trainer(args("resumed", *ckpt))
    assert sorted(resumed) == [3, 4]
    assert all(resumed[s] == triton[s] for s in (3, 4))  # bit for bit: the moments came back exactly


replace_unless_interpreted(globals(), __file__)
