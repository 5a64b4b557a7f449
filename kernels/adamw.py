"""AdamW over many tensors in one Triton launch, with the gradient-clipping scale folded in.

Math (decoupled weight decay, as ``torch.optim.AdamW``), per element, in fp32, at step ``t`` (counted from 1)::

    g  = c * grad                       c: the clip coefficient min(1, max_norm / (||grad|| + 1e-6)), or 1
    p  = p * (1 - lr * wd)
    m  = b1 * m + (1 - b1) * g
    v  = b2 * v + (1 - b2) * g^2
    p  = p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Why: ``clip_grad_norm_`` scales every gradient in place (a read and a write of all of them) before the optimizer
reads them again; reading ``c`` from device memory inside the update drops that pass without a host sync. Each
element is read once (p, grad, m, v) and written once (p, m, v): 28 bytes per parameter, the least an fp32 AdamW
step can move.

One launch covers every tensor (:class:`AdamWLaunch`): program ``i`` owns block ``i - first_block[t]`` of tensor
``t = tensor_of[i]`` and finds the tensor's four addresses in a ``[4, T]`` int64 table. Full blocks load without a
mask (16-byte vector accesses); only a tensor's last block is masked.

:func:`adamw_reference` is the PyTorch twin (CPU fallback and test reference).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .masked_ce_triton import runs_on, tl, triton

if triton is not None:

    @triton.jit
    def _base(row_ptr, t):
        """Address ``t`` of a table row as an fp32 pointer. Caching-allocator blocks are 512-byte aligned (the
        host checks 16): saying so lets the compiler use 16-byte loads and stores."""
        return tl.multiple_of(tl.load(row_ptr + t).to(tl.pointer_type(tl.float32)), 16)

    @triton.jit
    def _adamw_kernel(
        table_ptr,
        numel_ptr,
        first_block_ptr,
        tensor_of_ptr,
        scale_ptr,
        n_tensors,
        decay,
        beta1,
        beta2,
        eps,
        step_size,
        bc2_sqrt,
        HAS_SCALE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        t = tl.load(tensor_of_ptr + pid).to(tl.int64)
        n = tl.load(numel_ptr + t)
        start = (pid - tl.load(first_block_ptr + t)).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        p_ptr = _base(table_ptr, t) + offs
        g_ptr = _base(table_ptr + n_tensors, t) + offs
        m_ptr = _base(table_ptr + 2 * n_tensors, t) + offs
        v_ptr = _base(table_ptr + 3 * n_tensors, t) + offs
        mask = offs < n
        full = start + BLOCK <= n
        if full:
            g = tl.load(g_ptr)
            p = tl.load(p_ptr)
            m = tl.load(m_ptr)
            v = tl.load(v_ptr)
        else:
            g = tl.load(g_ptr, mask=mask, other=0.0)
            p = tl.load(p_ptr, mask=mask, other=0.0)
            m = tl.load(m_ptr, mask=mask, other=0.0)
            v = tl.load(v_ptr, mask=mask, other=0.0)
        if HAS_SCALE:
            g = g * tl.load(scale_ptr)
        p = p * decay
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
        if full:
            tl.store(p_ptr, p)
            tl.store(m_ptr, m)
            tl.store(v_ptr, v)
        else:
            tl.store(p_ptr, p, mask=mask)
            tl.store(m_ptr, m, mask=mask)
            tl.store(v_ptr, v, mask=mask)


def _coefficients(lr: float, weight_decay: float, beta1: float, beta2: float, step: int) -> tuple[float, float, float]:
    """(decay factor, step size, sqrt of the second bias correction) of step ``step`` (from 1)."""
    return 1.0 - lr * weight_decay, lr / (1.0 - beta1**step), math.sqrt(1.0 - beta2**step)


class BlockPlan:
    """Which tensor and block each program of the launch owns, for tensors of fixed sizes (built once).

    Args:
        numels: element count of each tensor.
        block: elements per program.
        device: where the tables live.
    """

    def __init__(self, numels: Sequence[int], block: int, device: torch.device):
        blocks = [-(-n // block) for n in numels]
        first = [0]
        for b in blocks[:-1]:
            first.append(first[-1] + b)
        self.numels = tuple(numels)
        self.block = block
        self.n_programs = sum(blocks)
        self.numel = torch.tensor(numels, dtype=torch.int64, device=device)
        self.first_block = torch.tensor(first, dtype=torch.int64, device=device)
        counts = torch.tensor(blocks, dtype=torch.int64)
        self.tensor_of = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts).to(device)


class AdamWLaunch:
    """The one Triton launch of an AdamW step over fixed parameters and moments; gradients may move between steps.

    The ``[4, T]`` address table lives on the device and is rebuilt only when a gradient's address changes (the
    caching allocator usually hands a step's gradients the same blocks as the last step's), so a step costs the
    host little more than one launch.

    Args:
        params, exp_avgs, exp_avg_sqs: contiguous fp32 tensors on one device, 16-byte aligned, shapes pairwise
            equal. They stay referenced (the table holds their addresses).
        block: elements per program.
        num_warps: warps per program.

    Raises:
        ValueError: the tensors break a condition above (callers fall back to :func:`adamw_reference`).
    """

    def __init__(self, params: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                 exp_avg_sqs: Sequence[torch.Tensor], block: int = 2048, num_warps: int = 4):
        self.tensors = [list(params), list(exp_avgs), list(exp_avg_sqs)]
        self.device = params[0].device
        for p, m, v in zip(*self.tensors):
            if not (m.shape == v.shape == p.shape):
                raise ValueError("adamw: parameter and moment shapes differ")
            _check_kernel_operand(p, self.device)
            _check_kernel_operand(m, self.device)
            _check_kernel_operand(v, self.device)
        self.plan = BlockPlan([p.numel() for p in params], block, self.device)
        self.num_warps = num_warps
        self._fixed = [[t.data_ptr() for t in row] for row in self.tensors]
        self._grad_ptrs: list[int] | None = None
        self._table: torch.Tensor | None = None

    def __call__(self, grads: Sequence[torch.Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float, step: int, grad_scale: torch.Tensor | None = None) -> None:
        """One AdamW step with these gradients (one per parameter); see :func:`adamw_reference` for the args."""
        if self.plan.n_programs == 0:
            return
        grad_ptrs = [g.data_ptr() for g in grads]
        if grad_ptrs != self._grad_ptrs:
            for g, p in zip(grads, self.tensors[0]):
                _check_kernel_operand(g, self.device)
                if g.shape != p.shape:
                    raise ValueError("adamw: gradient and parameter shapes differ")
            table = torch.tensor([self._fixed[0], grad_ptrs, self._fixed[1], self._fixed[2]], dtype=torch.int64)
            if self.device.type == "cuda":
                table = table.pin_memory().to(self.device, non_blocking=True)
            self._table, self._grad_ptrs = table, grad_ptrs
        decay, step_size, bc2_sqrt = _coefficients(lr, weight_decay, beta1, beta2, step)
        scale = grad_scale if grad_scale is not None else self._table  # never read when HAS_SCALE is False
        _adamw_kernel[(self.plan.n_programs,)](
            self._table, self.plan.numel, self.plan.first_block, self.plan.tensor_of, scale, len(grads),
            decay, beta1, beta2, eps, step_size, bc2_sqrt,
            HAS_SCALE=grad_scale is not None, BLOCK=self.plan.block, num_warps=self.num_warps,
        )


def _check_kernel_operand(t: torch.Tensor, device: torch.device) -> None:
    if t.dtype != torch.float32 or not t.is_contiguous() or t.device != device or t.data_ptr() % 16:
        raise ValueError(f"adamw: the kernel takes contiguous, 16-byte aligned fp32 tensors on one device, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")


def adamw_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: torch.Tensor | None = None,
) -> None:
    """PyTorch twin of the kernel for one quadruple (same arguments, math in the tensors' dtype)."""
    decay, step_size, bc2_sqrt = _coefficients(lr, weight_decay, beta1, beta2, step)
    g = grad * grad_scale.to(grad.dtype) if grad_scale is not None else grad
    param.mul_(decay)
    exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    param.addcdiv_(exp_avg, exp_avg_sq.sqrt().div_(bc2_sqrt).add_(eps), value=-step_size)


def adamw_runs_on(device: torch.device) -> bool:
    """Whether :func:`adamw_multi_tensor` can run on tensors of ``device``."""
    return runs_on(device)
