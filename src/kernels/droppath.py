"""A residual branch added with stochastic depth in one Triton kernel each way: the fused backend's eager residual
adds of the SSM and MLP branches when the backbone's `fused_drop_path` is on.

    out = x + branch·keep / keep_prob        keep ~ Bernoulli(keep_prob), one draw per sample (in training)

Why: in eager mode `x + drop_path(branch)` is three full-size kernels forward (the mask multiply, the division,
the add) and two backward (the division's and the multiply's), with three autograd nodes; for Spatial-Mamba-T's 36
residual branches that is 180 kernels a step over its largest activations. Here it is one kernel forward and one
backward (x's gradient is dy itself), one autograd node.

The mask is drawn by `src.kernels.drop_path_mask`, as the plain `drop_path` draws it, so the random stream is the
same either way. The arithmetic is that of the plain expression, step by step, in the
activations' dtype: keep_prob rounded to it (as PyTorch's division reads a 0-d fp32 tensor against a 16-bit one),
branch·keep / keep_prob rounded once (an IEEE division in fp32), then the sum rounded once; the backward gives
(dy / keep_prob rounded)·keep. On a GPU the outputs and gradients are those of the plain ops bit for bit
(`tests/test_droppath.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import ahead, drop_path_mask
from .ahead import cdiv, launch
from .triton_scan import triton_interpreted

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK = 2048


@triton.jit
def _elements(keep_ptr, kp_ptr, n, per_sample, dtype, BLOCK: tl.constexpr):
    """This program's flat offsets and their mask, keep_prob as the activations' dtype reads it (fp32), and each
    element's sample mask (fp32)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    kp = tl.load(kp_ptr).to(dtype).to(tl.float32)
    return offs, m, kp, tl.load(keep_ptr + offs // per_sample, mask=m, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["n", "per_sample"])
def _drop_path_fwd_kernel(x_ptr, br_ptr, keep_ptr, kp_ptr, out_ptr, n, per_sample, BLOCK: tl.constexpr):
    dtype = out_ptr.dtype.element_ty
    offs, m, kp, k = _elements(keep_ptr, kp_ptr, n, per_sample, dtype, BLOCK)
    br = tl.load(br_ptr + offs, mask=m, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    t = tl.math.div_rn((br * k).to(dtype).to(tl.float32), kp).to(dtype).to(tl.float32)  # (branch·keep) / keep_prob
    tl.store(out_ptr + offs, (x + t).to(dtype), mask=m)


@triton.jit(do_not_specialize=["n", "per_sample"])
def _drop_path_bwd_kernel(dy_ptr, keep_ptr, kp_ptr, dbr_ptr, n, per_sample, BLOCK: tl.constexpr):
    dtype = dbr_ptr.dtype.element_ty
    offs, m, kp, k = _elements(keep_ptr, kp_ptr, n, per_sample, dtype, BLOCK)
    dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.math.div_rn(dy, kp).to(dtype).to(tl.float32)  # the division's backward, then the mask's
    tl.store(dbr_ptr + offs, (g * k).to(dtype), mask=m)


def _forward(x: Tensor, branch: Tensor, keep: Tensor, keep_prob: Tensor) -> Tensor:
    ahead.plan(("drop_path", x.dtype, keep_prob.dtype, x.device), x.device,
               lambda: _plan(x, branch, keep, keep_prob))
    out = torch.empty_like(x)
    n = x.numel()
    launch(_drop_path_fwd_kernel, (cdiv(n, BLOCK),), x, branch, keep, keep_prob, out, n, n // x.shape[0],
           BLOCK=BLOCK, num_warps=4)
    return out


def _backward(dy: Tensor, keep: Tensor, keep_prob: Tensor) -> Tensor:
    dbranch = torch.empty_like(dy)
    n = dy.numel()
    launch(_drop_path_bwd_kernel, (cdiv(n, BLOCK),), dy, keep, keep_prob, dbranch, n, n // dy.shape[0],
           BLOCK=BLOCK, num_warps=4)
    return dbranch


def _plan(x: Tensor, branch: Tensor, keep: Tensor, keep_prob: Tensor) -> None:
    """A plan's dry run (`ahead.plan`): forward and backward on meta tensors of the inputs' shapes and dtypes."""
    x, branch, keep, keep_prob = (ahead.meta_like(t) for t in (x, branch, keep, keep_prob))
    _backward(_forward(x, branch, keep, keep_prob), keep, keep_prob)


class _ResidualDropPath(torch.autograd.Function):
    """x, branch contiguous of one shape and dtype; keep (B, 1, …) in that dtype; keep_prob a 0-d tensor."""

    @staticmethod
    def forward(ctx, x, branch, keep, keep_prob):
        ctx.save_for_backward(keep, keep_prob)
        return _forward(x, branch, keep, keep_prob)

    @staticmethod
    def backward(ctx, dy):
        keep, keep_prob = ctx.saved_tensors
        dy = dy.contiguous()
        return dy, _backward(dy, keep, keep_prob), None, None


def residual_drop_path(x: Tensor, branch: Tensor, keep_prob: Tensor, training: bool, kernel: bool = True) -> Tensor:
    """x + drop_path(branch): in training each sample's branch is kept with probability keep_prob (a 0-d tensor)
    and scaled by 1 / keep_prob, else dropped; in eval it is x + branch. With `kernel`, in training, on CUDA (or
    the Triton interpreter), eager and not under a dispatch mode, with x and branch contiguous of one shape and
    kernel dtype and keep_prob a float tensor of their device, the kernels compute it; otherwise the plain ops."""
    if not training:
        return x + branch
    keep = drop_path_mask(branch, keep_prob)
    usable = (kernel and (x.is_cuda or triton_interpreted()) and x.shape == branch.shape and x.dtype == branch.dtype
              and x.dtype in KERNEL_DTYPES and x.numel() > 0 and x.is_contiguous() and branch.is_contiguous()
              and x.device == branch.device == keep_prob.device and keep_prob.dtype.is_floating_point
              and keep_prob.ndim == 0 and not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None)
    if not usable:
        return x + branch * keep / keep_prob
    return _ResidualDropPath.apply(x, branch, keep, keep_prob)


__all__ = ["KERNEL_DTYPES", "residual_drop_path"]
