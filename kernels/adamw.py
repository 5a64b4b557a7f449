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
``t = tensor_of[i]``, finds the tensor's four addresses in a ``[4, T]`` int64 table and its step size
``lr / (1 - b1^t)`` and ``sqrt(1 - b2^t)`` in a ``[2, T]`` table (computed in float64 on the host, so tensors may
be at different step counts). Full blocks load without a mask (16-byte vector accesses); only a tensor's last
block is masked.

:func:`adamw_reference` is the PyTorch twin (CPU fallback and test reference).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from .triton_utils import runs_on, tl, triton

if triton is not None:

    @triton.jit
    def _base(row_ptr, t):
        """Address ``t`` of a table row as an fp32 pointer. Caching-allocator blocks are 512-byte aligned (the
        host checks 16): saying so lets the compiler use 16-byte loads and stores."""
        return tl.multiple_of(tl.load(row_ptr + t).to(tl.pointer_type(tl.float32)), 16)

    @triton.jit
    def _adamw_kernel(
        table_ptr,
        coef_ptr,
        numel_ptr,
        first_block_ptr,
        tensor_of_ptr,
        scale_ptr,
        n_tensors,
        decay,
        beta1,
        beta2,
        eps,
        HAS_SCALE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        t = tl.load(tensor_of_ptr + pid).to(tl.int64)
        n = tl.load(numel_ptr + t)
        step_size = tl.load(coef_ptr + t)  # lr / (1 - b1^t) and sqrt(1 - b2^t) of this tensor's step count
        bc2_sqrt = tl.load(coef_ptr + n_tensors + t)
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
    """Which tensor and block each program of the launch owns, for tensors of given sizes.

    Args:
        numels: element count of each tensor.
        block: elements per program.
        device: where the tables live.
    """

    def __init__(self, numels: Sequence[int], block: int, device: torch.device):
        blocks = [-(-n // block) for n in numels]
        self.sizes = list(numels)  # on the host, to compare with; ``numel`` is the device copy the kernel reads
        self.block = block
        self.device = device
        self.n_programs = sum(blocks)
        self.numel = _to_device(torch.tensor(numels, dtype=torch.int64), device)
        self.first_block = _to_device(torch.tensor([0, *itertools.accumulate(blocks)][:-1], dtype=torch.int64), device)
        counts = torch.tensor(blocks, dtype=torch.int64)
        self.tensor_of = _to_device(torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts), device)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without blocking the host: a copy from pageable memory would wait for the
    GPU's queue to drain (and leave the GPU idle while the host goes on)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


class AdamWLaunch:
    """One Triton launch per AdamW step over many tensors; its device tables follow the tensors' addresses.

    The ``[4, T]`` address table is rebuilt when some tensor's address changes (gradients set to None between
    steps come back at new addresses in most steps); the block plan (a program-to-tensor map of ~1M entries for
    1B parameters) only when the tensors the kernel takes or their sizes change. A step costs the host a pass
    over the addresses, at most two small copies (addresses, per-tensor coefficients) and one launch. It holds
    no parameter or state tensors.

    Args:
        block: elements per program.
        num_warps: warps per program.
    """

    def __init__(self, block: int, num_warps: int):
        self.block, self.num_warps = block, num_warps
        self._addresses: list[int] | None = None
        self._device: torch.device | None = None
        self._suits: list[bool] = []  # per tensor, in the order of the addresses: whether it suits the kernel
        self._ready: list[int] = []  # parameters the kernel updates
        self._left: list[int] = []  # and those it leaves to the caller
        self._plan: BlockPlan | None = None
        self._table: torch.Tensor | None = None

    def __call__(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        exp_avgs: Sequence[torch.Tensor],
        exp_avg_sqs: Sequence[torch.Tensor],
        steps: Sequence[torch.Tensor],
        *,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        grad_scale: torch.Tensor | None = None,
    ) -> list[int]:
        """One AdamW step (see the module docstring) of every tensor the kernel can take, in place.

        Args:
            params, grads, exp_avgs, exp_avg_sqs: one entry per parameter.
            steps: each parameter's step count after this update (CPU scalars, as ``torch.optim.AdamW`` keeps).
            lr, beta1, beta2, eps, weight_decay: AdamW hyperparameters.
            grad_scale: one-element fp32 tensor ``c`` multiplying every gradient, or None for 1.

        Returns:
            The indices of the parameters left alone: not contiguous 16-byte aligned fp32 on the device of the
            first parameter, for the caller to update with :func:`adamw_reference`.
        """
        rows = (params, grads, exp_avgs, exp_avg_sqs)
        addresses = [t.data_ptr() for row in rows for t in row]
        if addresses != self._addresses:
            self._rebuild(rows, addresses)
        if self._plan is None:
            return self._left
        device = self._table.device
        counts = torch.stack([steps[i] for i in self._ready]).double()
        coef = _to_device(torch.stack([lr / (1.0 - beta1**counts), (1.0 - beta2**counts).sqrt()]).float(), device)
        scale = grad_scale if grad_scale is not None else coef  # never read when HAS_SCALE is False
        plan = self._plan
        _adamw_kernel[(plan.n_programs,)](
            self._table, coef, plan.numel, plan.first_block, plan.tensor_of, scale, len(self._ready),
            1.0 - lr * weight_decay, beta1, beta2, eps,
            HAS_SCALE=grad_scale is not None, BLOCK=plan.block, num_warps=self.num_warps,
        )
        return self._left

    def _rebuild(self, rows: tuple[Sequence[torch.Tensor], ...], addresses: list[int]) -> None:
        """Follows new addresses: which tensors the kernel takes (rechecked only for tensors that moved: alignment
        may have changed), their address table, and the block plan if those tensors' sizes differ from the plan's."""
        n, device = len(rows[0]), rows[0][0].device
        if self._addresses is None or len(self._addresses) != len(addresses) or device != self._device:
            moved = range(len(addresses))
            self._suits = [False] * len(addresses)
        else:
            moved = [k for k, (new, old) in enumerate(zip(addresses, self._addresses)) if new != old]
        for k in moved:
            self._suits[k] = _kernel_takes(rows[k // n][k % n], rows[0][k % n], device)
        per_row = (self._suits[r * n:(r + 1) * n] for r in range(len(rows)))
        ready = [i for i, column in enumerate(zip(*per_row)) if all(column)] if runs_on(device) else []
        numels = [rows[0][i].numel() for i in ready]
        if not sum(numels):  # nothing for the kernel: all to the caller
            ready, numels = [], []
        self._ready, self._table = ready, None
        if not ready:
            self._plan = None
        elif self._plan is None or self._plan.sizes != numels or self._plan.device != device:
            self._plan = BlockPlan(numels, self.block, device)
        if ready:
            table = torch.tensor(addresses, dtype=torch.int64).view(len(rows), n)[:, ready]
            self._table = _to_device(table.contiguous(), device)
        taken = set(ready)
        self._left = [i for i in range(n) if i not in taken]
        self._addresses, self._device = addresses, device


def _kernel_takes(t: torch.Tensor, param: torch.Tensor, device: torch.device) -> bool:
    """Contiguous, 16-byte aligned fp32 of the parameter's shape on ``device``."""
    return (t.dtype == torch.float32 and t.is_contiguous() and t.device == device and t.data_ptr() % 16 == 0
            and t.shape == param.shape)


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
    """Whether :class:`AdamWLaunch` can run on tensors of ``device``."""
    return runs_on(device)
