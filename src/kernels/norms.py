"""LayerNorm over the last dimension, optionally gated by SiLU, in Triton: the fused backend's eager LayerNorms
when the backbone's `fused_norms` is on (off by default, see the end of this docstring).

    y = (x − mean(x)) / sqrt(var(x) + eps) · weight + bias            (rows of x: every position of a map)
    y = y · silu(z)                                                    (with a gate z of x's shape)

Why: in eager mixed precision, `nn.LayerNorm` is on autocast's fp32 list, so every norm of a block reads its
bf16 input as a fp32 copy (a cast kernel), writes fp32 output, and the next linear casts that back to bf16
(another kernel); the out-norm's gate then multiplies in fp32 too. On an H100, T's 55 norms with their casts
and the gate cost ~20 ms of a 105 ms training step (torch.profiler, batch 128). These kernels read the
activations in their own dtype once, compute in fp32 and write the output in that dtype: the bytes moved per
element fall from ~20 to 4 in the forward. `torch.compile` fuses the same ops itself, so traced code keeps
`F.layer_norm` (see `layer_norm`).

Backward: one pass over rows recomputes x̂ from the saved per-row mean and 1/std, gives dx (and dz), and
accumulates the weight and bias gradients of its rows in fp32; the per-program partials are summed in a fixed
order afterwards (no atomics: the same bits on every run). Parameters stay fp32; their gradients come back in
their dtype.

`layer_norm_ref` (below) is the specification; `tests/test_norms.py` compares both directions with it.

Measured (eager T, bf16, batch 128, one H100; benchmarks/RESULTS.md): the kernels of a training step fell from
105 to 81 ms and the peak memory from 16.3 to 12.9 GB, but this Python path (autograd.Function, allocations,
Triton's launcher) costs the host more per norm than PyTorch's LayerNorm (99 against 32 µs per forward), and
eager T there is bound by the host. The host path is kept short (one allocation for the row statistics and one
for the backward's partials, the backward's grid cached per shape, no autocast region): with it eager training
rose from ~900 to ~1000 img/s on one machine (alternating processes), about level with nn.LayerNorm's (1061 vs
1089 in one run). Hence off by default: a gain where the GPU is the bottleneck (large maps, a fast host), where
memory is short, and under CUDA graphs, which take the host out of the step.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import ahead
from .ahead import cdiv, launch
from .triton_scan import _num_sms, triton_interpreted

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def layer_norm_ref(x: Tensor, weight: Tensor, bias: Tensor, eps: float, gate: Tensor | None = None) -> Tensor:
    """The definition, in x's dtype (float64 for checks): LayerNorm over the last dim, times silu(gate) if given."""
    y = F.layer_norm(x, x.shape[-1:], weight.to(x.dtype), bias.to(x.dtype), eps)
    return y if gate is None else y * F.silu(gate.to(y.dtype))


@triton.jit(do_not_specialize=["M"])
def _ln_fwd_kernel(x_ptr, z_ptr, w_ptr, b_ptr, y_ptr, stats_ptr, M, N, z_row_stride, eps,
                   HAS_GATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask_m = rows < M
    mask_n = cols < N
    mask = mask_m[:, None] & mask_n[None, :]
    offs = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    if HAS_GATE:
        z = tl.load(z_ptr + rows[:, None] * z_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(stats_ptr + rows, mean, mask=mask_m)  # stats (2, M): means, then 1/std
    tl.store(stats_ptr + M + rows, rstd, mask=mask_m)


@triton.jit(do_not_specialize=["M", "blocks_per_program"])
def _ln_bwd_kernel(dy_ptr, x_ptr, z_ptr, w_ptr, b_ptr, stats_ptr, dx_ptr, dz_ptr, part_ptr,
                   M, N, z_row_stride, blocks_per_program,
                   HAS_GATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask_n = cols < N
    w = tl.load(w_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_GATE:
        b = tl.load(b_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in tl.range(0, blocks_per_program, num_stages=STAGES):
        rows = (pid.to(tl.int64) * blocks_per_program + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = rows < M
        mask = mask_m[:, None] & mask_n[None, :]
        offs = rows[:, None] * N + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(stats_ptr + rows, mask=mask_m, other=0.0)
        rstd = tl.load(stats_ptr + M + rows, mask=mask_m, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_GATE:
            z = tl.load(z_ptr + rows[:, None] * z_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            y = xhat * w[None, :] + b[None, :]
            tl.store(dz_ptr + offs, (dy * y * sig * (1.0 + z * (1.0 - sig))).to(dz_ptr.dtype.element_ty), mask=mask)
            dy = dy * z * sig
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(part_ptr + pid * N + cols, dw, mask=mask_n)  # parts (2, programs, N): weight, then bias partials
    tl.store(part_ptr + (tl.num_programs(0) + pid) * N + cols, db, mask=mask_n)


# The backward's loop over its row blocks, software-pipelined (the next blocks' loads issued while one is
# reduced). Measured on an H100 at T's widths (bf16, B = 128; alternating rounds): 3 stages against none took
# the gated backward 22-28 % faster (0.303 -> 0.217 ms at 56² × 128 channels), the plain one 2 % slower to
# 15 % faster, all sixteen shapes 1.52 -> 1.25 ms. ptxas then reports no spills at any of T's widths (the
# gated 16 × 128 tile spilled 52 bytes unpipelined), at 17-26 KB of shared memory a program.
BWD_STAGES = 3


@functools.lru_cache(maxsize=None)
def _tile(N: int) -> tuple[int, int, int]:
    """The forward's (BLOCK_M rows, BLOCK_N ≥ N columns, warps): about 4096 elements per program, whole rows."""
    block_n = triton.next_power_of_2(N)
    block_m = max(1, min(64, 4096 // block_n))
    return block_m, block_n, 4 if block_n * block_m <= 4096 else 8


@functools.lru_cache(maxsize=None)
def _bwd_tile(N: int) -> tuple[int, int, int]:
    """The backward's tile: about 2048 elements per step of a program, 2 warps (whole rows; wider rows get a
    warp per 1024 columns). At T's eight norm shapes on an H200 (bf16) this took the backward kernels from 0.80
    to 0.61 ms (sum of one call each) against the forward's 4096 elements and 4 warps; 8 warps were slower
    still (1.2 ms)."""
    block_n = triton.next_power_of_2(N)
    block_m = max(1, min(64, 2048 // block_n))
    return block_m, block_n, max(2, min(16, block_n // 1024))


def _rows(t: Tensor, N: int) -> Tensor | None:
    """(..., N) -> (M, N), a view with unit column stride (a gate that is one half of a chunked projection
    qualifies: its rows sit at a fixed stride), or None where no such view exists."""
    try:
        t2 = t.view(-1, N)
    except RuntimeError:
        return None
    return t2 if t2.stride(1) == 1 else None


def _forward(x: Tensor, z: Tensor | None, weight: Tensor, bias: Tensor, eps: float):
    """x (M, N) contiguous, z None or (M, N) with unit column stride -> y (M, N), stats (2, M): per-row means
    and 1/std (one tensor: fewer allocations and views, host time)."""
    M, N = x.shape
    ahead.plan(("layer_norm", N, x.dtype, None if z is None else z.stride(0), x.device), x.device,
               lambda: _plan(x, z, weight, bias, eps))
    y = torch.empty_like(x)
    stats = torch.empty(2, M, device=x.device, dtype=torch.float32)
    block_m, block_n, warps = _tile(N)
    launch(_ln_fwd_kernel, (cdiv(M, block_m),),
        x, x if z is None else z, weight, bias, y, stats, M, N, N if z is None else z.stride(0), eps,
        HAS_GATE=z is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return y, stats


def _plan(x: Tensor, z: Tensor | None, weight: Tensor, bias: Tensor, eps: float) -> None:
    """A plan's dry run (`ahead.plan`): forward and backward on meta tensors of the inputs' shapes and strides."""
    x, z, weight, bias = (ahead.meta_like(t) for t in (x, z, weight, bias))
    y, stats = _forward(x, z, weight, bias, eps)
    _backward(torch.empty_like(y), x, z, weight, bias, stats)


def _backward(dy: Tensor, x: Tensor, z: Tensor | None, weight: Tensor, bias: Tensor, stats: Tensor):
    """Shapes as `_forward`'s; dz comes back contiguous even for a strided gate; the parameters' gradients in
    fp32, their dtype (`layer_norm` runs the kernels for fp32 parameters only)."""
    M, N = x.shape
    dy = dy.contiguous()
    dx = torch.empty_like(x)
    dz = None if z is None else torch.empty_like(x)
    block_m, block_n, warps, programs, per_program = _bwd_grid(M, N, x.device)
    parts = torch.empty(2, programs, N, device=x.device, dtype=torch.float32)  # weight and bias partials
    launch(_ln_bwd_kernel, (programs,),
        dy, x, x if z is None else z, weight, bias, stats, dx, dx if dz is None else dz,
        parts, M, N, N if z is None else z.stride(0), per_program,
        HAS_GATE=z is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, STAGES=BWD_STAGES)
    dw, db = parts.sum(1)  # a fixed-order reduction over the programs' partials
    return dx, dz, dw, db


@functools.lru_cache(maxsize=256)
def _bwd_grid(M: int, N: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """The backward's tile, its program count (at most 4 per SM, each over whole row blocks) and row blocks
    per program, cached per shape: the arithmetic is a measurable share of the host's time per norm."""
    block_m, block_n, warps = _bwd_tile(N)
    blocks = cdiv(M, block_m)
    programs = min(blocks, 4 * _num_sms(device))
    per_program = cdiv(blocks, programs)
    return block_m, block_n, warps, cdiv(blocks, per_program), per_program


class _LayerNorm(torch.autograd.Function):
    """Over the last dim of x (..., N) contiguous; z None or of x's shape. The rows' views are taken here, out of
    autograd's sight: as ops of their own each would be one more op and autograd node a call (host time)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, z):
        N = x.shape[-1]
        x2 = x.view(-1, N)
        z2 = None if z is None else _rows(z, N)
        if z is not None and z2 is None:
            z2 = z.contiguous().view(-1, N)
        y, stats = _forward(x2, z2, weight, bias, eps)
        ctx.save_for_backward(x2, z2, weight, bias, stats)
        ctx.shapes = x.shape, None if z is None else z.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, z2, weight, bias, stats = ctx.saved_tensors
        x_shape, z_shape = ctx.shapes
        dx, dz, dw, db = _backward(dy.reshape(x2.shape), x2, z2, weight, bias, stats)
        return dx.view(x_shape), dw, db, None, None if dz is None else dz.view(z_shape)


def layer_norm(x: Tensor, norm: torch.nn.LayerNorm, gate: Tensor | None = None, kernel: bool = True) -> Tensor:
    """`norm(x)` (times silu(gate) if given) for channels-last activations (..., C).

    With `kernel` the Triton kernels run where they can: on CUDA (or the Triton interpreter), x of a kernel
    dtype (copied if not contiguous; a gate of its shape and dtype is read in place if its rows have unit
    column stride, as a half of a chunked projection does, else copied too), fp32 parameters, not traced
    (torch.compile fuses the plain ops itself) and not under a dispatch mode (fake tensors, FlopCounterMode).
    Under autocast the input and gate are cast to autocast's dtype, and so is the output — autocast's own
    LayerNorm would return fp32, which the next linear casts back. Anywhere else (or with `kernel=False`) this
    is `norm(x)` and, with a gate, `· F.silu(gate)`: the reference behaviour."""
    weight, bias = norm.weight, norm.bias
    usable = (kernel and (x.is_cuda or triton_interpreted()) and weight is not None and bias is not None
              and weight.dtype == torch.float32 and bias.dtype == torch.float32
              and tuple(norm.normalized_shape) == (x.shape[-1],)
              and not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None)
    if usable and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x = x if x.dtype == dtype else x.to(dtype)  # (a no-op `to` still costs a dispatch: host time)
        gate = gate if gate is None or gate.dtype == dtype else gate.to(dtype)
    usable = (usable and x.dtype in KERNEL_DTYPES and x.numel() > 0
              and (gate is None or (gate.shape == x.shape and gate.dtype == x.dtype and gate.device == x.device)))
    if not usable:
        y = norm(x)
        return y if gate is None else y * F.silu(gate)
    # no autocast region needed: the Function's forward and backward run Triton kernels and fp32 reductions only
    return _LayerNorm.apply(x.contiguous(), weight, bias, norm.eps, gate)


__all__ = ["KERNEL_DTYPES", "layer_norm", "layer_norm_ref"]
