"""Depthwise k×k convolution (stride 1, zero padding k//2, bias) on channels-last maps in Triton, with the block's
residual or the SSM's SiLU fused in: the fused backend's eager convolutions when the backbone's `fused_convs` is on.

    y = x + dwconv(x) + bias                  (a block's conditional positional encodings, `residual`)
    y = silu(dwconv(x) + bias)                (the SSM's convolution after the input projection, `silu`)

Why: in eager mode every one of a block's three depthwise convolutions is a permute, autocast's casts of its
weight and bias, cuDNN's NHWC depthwise kernel and a separate residual add or SiLU; its backward is cuDNN's
data-gradient and weight-gradient kernels, the bias gradient as a PyTorch reduction over every position (a slow
kernel on channels-last maps), the SiLU's or the add's backward, the casts' backward and the gradient
accumulation of the residual — about a dozen kernels and autograd nodes per convolution, for 54 convolutions
per step of Spatial-Mamba-T. Here the forward is one kernel and the backward three.

Tiles: a program owns (a band of rows) × (BLOCK_W columns) × (BLOCK_C channels) of one image and walks its rows
with a rolling window: the k source rows r − P … r + P (P = k // 2), each as k column-shifted tiles (contiguous
channel vectors, zero outside the map), held in registers. At the next row the oldest source row is dropped and
one new one loaded, so each output row costs k tile loads instead of k² (the loads and their index arithmetic,
not the bytes, bounded the first per-tap version). The input may be a strided channels-last view with unit
channel stride (one half of a chunked projection is read in place).

Backward, given dy:
  `_dwconv_bwd_param_kernel`: the gradient at the convolution's output gp = dy, or dy·silu'(pre) with the
       pre-activation the forward saved (then written, in the activations' dtype, as autograd's SiLU backward
       would); per-program fp32 partials of the weight gradient Σ_p gp[p]·x[p + tap] and of the bias gradient
       Σ_p gp[p].
  `_dwconv_bwd_input_kernel`: dx[q] = Σ_taps w[tap]·gp[q − tap] (+ dy[q] with the residual): the transposed
       convolution as a gather, zero outside the map. (One kernel doing both read gp at 18 shifted positions
       per element, twice that with the SiLU, and ran ~4× the forward's time on an H100.)
  `_dwconv_param_kernel`: the partials summed in fp64 in a fixed order, written as the weight's (C, 1, k, k)
       and the bias's (C,) gradients in the parameters' dtype.
No atomics: the same bits on every run. `dwconv_ref` (below) is the specification; `tests/test_dwconv.py`
compares both directions with it.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import ahead, plain_depthwise_conv
from .ahead import cdiv, launch
from .fused import _candidates, _grid, _program_tile
from .triton_scan import triton_interpreted
from .tuning import pick_config, tune_for_trace

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_IMAGE_EXTENT = 2**31 - 1  # offsets within one image are 32-bit in the kernels (the image's own is 64-bit)
_SHAPE_ARGS = ["H", "W", "n_ctiles", "rows"]
# candidate tiles (BLOCK_W columns, BLOCK_C channels, warps), timed once per shape (`tuning.pick_config`) except
# where a measured pick applies (Hopper, 16-bit inputs: `tuning.MEASURED_PICKS`); the parameter kernel holds
# k·k + 1 accumulator tiles. Two-warp tiles won the parameter kernel at all eight of T's convolution shapes on an
# H200 (by 3–50 %: 4 × 64 or 8 × 32) and on an H100, and most of the others; 32 × 32 never won
FWD_CONFIGS = ((16, 64, 4), (8, 128, 4), (16, 64, 2), (8, 128, 2))  # the forward and the input gradient
BWD_CONFIGS = ((8, 32, 2), (4, 64, 2), (16, 32, 4), (8, 64, 4))


def dwconv_ref(x: Tensor, weight: Tensor, bias: Tensor | None, residual: bool = False, silu: bool = False) -> Tensor:
    """The definition, in x's dtype (float64 for checks): x (B, H, W, C), weight (C, 1, k, k), bias (C,) or None."""
    k = weight.shape[-1]
    y = F.conv2d(x.permute(0, 3, 1, 2), weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                 padding=k // 2, groups=x.shape[-1]).permute(0, 2, 3, 1)
    if silu:
        y = F.silu(y)
    return x + y if residual else y


@triton.jit
def _row_taps(base, sr, s_h, s_w, cols, mask_c, H, W, KS: tl.constexpr):
    """The KS tiles of source row sr at columns cols − P … cols + P (P = KS // 2), fp32, zero outside the map:
    one row of a program's rolling window."""
    P: tl.constexpr = KS // 2
    row_ok = (sr >= 0) & (sr < H)
    taps = ()
    for c in tl.static_range(KS):
        sc = cols + (c - P)
        ok = (sc >= 0) & (sc < W) & row_ok
        taps = taps + (tl.load(base + sr * s_h + sc[:, None] * s_w, mask=ok[:, None] & mask_c[None, :],
                               other=0.0).to(tl.float32),)
    return taps


@triton.jit
def _window_start(base, r0, s_h, s_w, cols, mask_c, H, W, KS: tl.constexpr):
    """A rolling window before its first row r0: source rows r0 − P … r0 + P − 1, KS tiles each (row-major)."""
    P: tl.constexpr = KS // 2
    win = ()
    for a in tl.static_range(KS - 1):
        win = win + _row_taps(base, r0 - P + a, s_h, s_w, cols, mask_c, H, W, KS)
    return win


@triton.jit
def _window_drop_row(win, KS: tl.constexpr):
    """The window without its oldest row (its first KS tiles)."""
    rest = ()
    for t in tl.static_range(KS, KS * KS):
        rest = rest + (win[t],)
    return rest


@triton.jit
def _tap_weights(w_ptr, ch, mask_c, KS: tl.constexpr, FLIP: tl.constexpr):
    """The KS·KS weight vectors of the channels (fp32), in tap order, or in reversed order (FLIP: the transposed
    convolution's)."""
    wts = ()
    for t in tl.static_range(KS * KS):
        src = KS * KS - 1 - t if FLIP else t
        wts = wts + (tl.load(w_ptr + ch * (KS * KS) + src, mask=mask_c, other=0.0).to(tl.float32),)
    return wts


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _dwconv_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, pre_ptr, sx_b, sx_h, sx_w, C, H, W, n_ctiles, rows,
                       KS: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr,
                       BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """y (and with SILU the pre-activation) for `rows` rows × BLOCK_W columns × BLOCK_C channels of image b."""
    pid, _, band, _, b, cols, mask_w, ch, mask_c, m = _program_tile(n_ctiles, W, C, BLOCK_W, BLOCK_C)
    P: tl.constexpr = KS // 2
    x_base = x_ptr + b * sx_b + ch[None, :]
    out_base = b * H * W * C + ch[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + ch, mask=mask_c, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    wts = _tap_weights(w_ptr, ch, mask_c, KS, False)
    r0 = band * rows
    win = _window_start(x_base, r0, sx_h, sx_w, cols, mask_c, H, W, KS)
    for r in range(r0, tl.minimum(r0 + rows, H)):
        full = win + _row_taps(x_base, r + P, sx_h, sx_w, cols, mask_c, H, W, KS)  # rows r − P … r + P
        acc = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32) + bias[None, :]
        for t in tl.static_range(KS * KS):
            acc += wts[t][None, :] * full[t]
        offs = out_base + (r * W + cols)[:, None] * C
        out = acc
        if SILU:
            tl.store(pre_ptr + offs, acc.to(pre_ptr.dtype.element_ty), mask=m)
            out = acc * tl.sigmoid(acc)
        if RESIDUAL:
            out += full[P * KS + P]  # the centre tap: x itself
        tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=m)
        win = _window_drop_row(full, KS)


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _dwconv_bwd_param_kernel(dy_ptr, x_ptr, pre_ptr, gp_ptr, part_ptr, sx_b, sx_h, sx_w, C, H, W, n_ctiles, rows,
                             KS: tl.constexpr, SILU: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """For `rows` rows × BLOCK_W columns × BLOCK_C channels of image b: the gradient at the convolution's output
    gp = dy (or dy·silu'(pre), then written to gp for the input kernel) and this program's partials of the
    weight gradient Σ_p gp[p]·x[p + tap] and of the bias gradient Σ_p gp[p] (part: (B, programs over
    positions, k·k + 1, C), the bias last)."""
    pid, _, band, _, b, cols, mask_w, ch, mask_c, m = _program_tile(n_ctiles, W, C, BLOCK_W, BLOCK_C)
    P: tl.constexpr = KS // 2
    NTAP: tl.constexpr = KS * KS
    x_base = x_ptr + b * sx_b + ch[None, :]
    base = b * H * W * C + ch[None, :]  # dy, pre and gp: contiguous (B, H, W, C)
    acc = (tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32),) * (NTAP + 1)
    r0 = band * rows
    win = _window_start(x_base, r0, sx_h, sx_w, cols, mask_c, H, W, KS)
    for r in range(r0, tl.minimum(r0 + rows, H)):
        full = win + _row_taps(x_base, r + P, sx_h, sx_w, cols, mask_c, H, W, KS)  # x at rows r − P … r + P
        offs = base + (r * W + cols)[:, None] * C
        gp = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if SILU:
            p = tl.load(pre_ptr + offs, mask=m, other=0.0).to(tl.float32)
            s = tl.sigmoid(p)
            gp = gp * s * (1.0 + p * (1.0 - s))
            tl.store(gp_ptr + offs, gp.to(gp_ptr.dtype.element_ty), mask=m)
        new = ()
        for t in tl.static_range(NTAP):
            new = new + (acc[t] + gp * full[t],)
        acc = new + (acc[NTAP] + gp,)
        win = _window_drop_row(full, KS)
    part = ((b * tl.num_programs(0) + pid) * (NTAP + 1)) * C + ch
    for tap in tl.static_range(NTAP + 1):
        tl.store(part_ptr + part + tap * C, tl.sum(acc[tap], axis=0), mask=mask_c)


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _dwconv_bwd_input_kernel(gp_ptr, dy_ptr, w_ptr, dx_ptr, C, H, W, n_ctiles, rows,
                             KS: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx[q] = Σ_taps w[tap]·gp[q − tap] (+ dy[q] with the residual), the transposed convolution as a gather (zero
    outside the map), for `rows` rows × BLOCK_W columns × BLOCK_C channels of image b; all contiguous. The
    window holds gp at rows q − P … q + P, columns q − P … q + P: window tile (i, j) meets weight tap
    (KS − 1 − i, KS − 1 − j), the flipped kernel."""
    pid, _, band, _, b, cols, mask_w, ch, mask_c, m = _program_tile(n_ctiles, W, C, BLOCK_W, BLOCK_C)
    P: tl.constexpr = KS // 2
    base = b * H * W * C + ch[None, :]
    wts = _tap_weights(w_ptr, ch, mask_c, KS, True)
    r0 = band * rows
    win = _window_start(gp_ptr + base, r0, W * C, C, cols, mask_c, H, W, KS)
    for r in range(r0, tl.minimum(r0 + rows, H)):
        full = win + _row_taps(gp_ptr + base, r + P, W * C, C, cols, mask_c, H, W, KS)
        offs = base + (r * W + cols)[:, None] * C
        if RESIDUAL:
            dx = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        else:
            dx = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
        for t in tl.static_range(KS * KS):
            dx += wts[t][None, :] * full[t]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
        win = _window_drop_row(full, KS)


@triton.jit(do_not_specialize=["R"])
def _dwconv_param_kernel(part_ptr, dw_ptr, db_ptr, R, C, NTAP: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    """For one tap (the bias at tap == NTAP) and block of channels: the R rows of partials summed in fp64, in a
    fixed order, written as dweight[c, 0, a, b] (tap = a·k + b) or dbias[c]."""
    tap = tl.program_id(1)
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = ch < C
    rows = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)
    for r0 in range(0, R, BLOCK_R):
        rr = (r0 + rows).to(tl.int64)
        acc += tl.load(part_ptr + (rr[:, None] * (NTAP + 1) + tap) * C + ch[None, :],
                       mask=(rr < R)[:, None] & mask_c[None, :], other=0.0).to(tl.float64)
    s = tl.sum(acc, axis=0)
    if tap < NTAP:
        tl.store(dw_ptr + ch * NTAP + tap, s.to(dw_ptr.dtype.element_ty), mask=mask_c)
    else:
        tl.store(db_ptr + ch, s.to(db_ptr.dtype.element_ty), mask=mask_c)


# ----------------------------------------------------------------------------------------------------
# launchers (shapes, dtypes and strides are checked by `depthwise_conv`)


def _forward(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool, residual: bool):
    """x (B, H, W, C) with unit channel stride -> (y, pre-activation or None), both contiguous (B, H, W, C)."""
    Bsz, H, W, C = x.shape
    ks = weight.shape[-1]
    ahead.plan(("dwconv", x.shape, x.stride(), x.dtype, weight.dtype, ks, bias is not None, silu, residual, x.device),
               x.device, lambda: _plan(x, weight, bias, silu, residual))
    y = torch.empty(Bsz, H, W, C, device=x.device, dtype=x.dtype)
    pre = torch.empty_like(y) if silu else None

    def run(cfg):
        grid, n_ctiles, rows = _grid(Bsz, C, H, W, cfg, x.device)
        launch(_dwconv_fwd_kernel, grid,
            x, weight, weight if bias is None else bias, y, y if pre is None else pre,
            x.stride(0), x.stride(1), x.stride(2), C, H, W, n_ctiles, rows,
            KS=ks, HAS_BIAS=bias is not None, SILU=silu, RESIDUAL=residual, BLOCK_W=cfg[0], BLOCK_C=cfg[1],
            num_warps=cfg[2])

    key = (Bsz, C, H, W, ks, silu, residual, str(x.dtype))
    run(pick_config("dwconv_fwd", key, _candidates(FWD_CONFIGS, C, W), run, H * W, x.element_size() == 2, x.device))
    return y, pre


def _backward(dy: Tensor, x: Tensor, pre: Tensor | None, weight: Tensor, bias: Tensor | None, residual: bool):
    """(dx contiguous (B, H, W, C) in x's dtype, dweight, dbias or None in the parameters' dtypes)."""
    Bsz, H, W, C = x.shape
    ks = weight.shape[-1]
    ntap = ks * ks
    dy = dy.contiguous()
    gp = dy if pre is None else torch.empty_like(pre)  # the gradient before the SiLU, in the activations' dtype
    out = {}

    def run_param(cfg):
        grid, n_ctiles, rows = _grid(Bsz, C, H, W, cfg, x.device)
        out["part"] = torch.empty(Bsz * grid[0], ntap + 1, C, device=x.device, dtype=torch.float32)
        launch(_dwconv_bwd_param_kernel, grid,
            dy, x, dy if pre is None else pre, gp, out["part"],
            x.stride(0), x.stride(1), x.stride(2), C, H, W, n_ctiles, rows,
            KS=ks, SILU=pre is not None, BLOCK_W=cfg[0], BLOCK_C=cfg[1], num_warps=cfg[2])

    key = (Bsz, C, H, W, ks, pre is not None, str(x.dtype))
    run_param(pick_config("dwconv_bwd_param", key, _candidates(BWD_CONFIGS, C, W), run_param, H * W,
                          x.element_size() == 2, x.device))
    dx = torch.empty(Bsz, H, W, C, device=x.device, dtype=x.dtype)

    def run_input(cfg):
        grid, n_ctiles, rows = _grid(Bsz, C, H, W, cfg, x.device)
        launch(_dwconv_bwd_input_kernel, grid, gp, dy, weight, dx, C, H, W, n_ctiles, rows,
               KS=ks, RESIDUAL=residual, BLOCK_W=cfg[0], BLOCK_C=cfg[1], num_warps=cfg[2])

    key = (Bsz, C, H, W, ks, residual, str(x.dtype))
    run_input(pick_config("dwconv_bwd_input", key, _candidates(FWD_CONFIGS, C, W), run_input, H * W,
                          x.element_size() == 2, x.device))
    part = out["part"]
    dweight = torch.empty_like(weight)
    dbias = None if bias is None else torch.empty_like(bias)
    # without a bias its slot is never written (the grid has no bias column), but a compiled graph that launches
    # the kernel itself takes it for written, and one tensor passed twice as written would be cloned twice: traced,
    # a spare tensor fills it
    spare = dweight if dbias is not None or not ahead.traced() else dweight.new_empty(C)
    launch(_dwconv_param_kernel, (cdiv(C, 32), ntap + (bias is not None)),
           part, dweight, spare if dbias is None else dbias, part.shape[0], C,
           NTAP=ntap, BLOCK_R=32, BLOCK_C=32)
    return dx, dweight, dbias


def _plan(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool, residual: bool) -> None:
    """A plan's dry run (`ahead.plan`): forward and backward on meta tensors of the inputs' shapes and strides."""
    x, weight, bias = (ahead.meta_like(t) for t in (x, weight, bias))
    y, pre = _forward(x, weight, bias, silu, residual)
    _backward(torch.empty_like(y), x, pre, weight, bias, residual)


class _DepthwiseConv(torch.autograd.Function):
    """x (B, H, W, C) with unit channel stride; weight (C, 1, k, k) contiguous; bias (C,) or None."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu, residual):
        y, pre = _forward(x, weight, bias, silu, residual)
        ctx.residual = residual
        ctx.save_for_backward(x, pre, weight, bias)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, pre, weight, bias = ctx.saved_tensors
        dx, dweight, dbias = _backward(dy, x, pre, weight, bias, ctx.residual)
        return dx, dweight, dbias, None, None


# ----------------------------------------------------------------------------------------------------
# spatial_mamba::depthwise_conv_traced — the convolution as a `torch.library.triton_op`, for compiled graphs on a GPU
# (with the backbone's `fused_convs`; `TRACED_CONVS`, SPATIAL_MAMBA_TRACED_CONVS=0 turns it off). Traced, its body
# becomes the graph's own launches of the kernels above (`ahead.tracing_launches`), as the fused SSM op's does
# (`ops.structure_aware_ssm_fused_traced`), instead of cuDNN's depthwise kernels with inductor's add or SiLU around
# them. Compiled T (bf16, batch 128, one H200, the same machine) trained at 1701 img/s instead of 1565, for 0.7 GB
# more peak memory (9.6 instead of 8.9). Called outside a trace it runs the eager launchers.
# Tiles are fixed when the graph is traced (measured picks, cached timings, or `tuning.tune_for_trace`); shapes
# symbolic in the trace take the plain module (`traced_fits`). Where the op itself meets symbolic sizes, or fake
# tensors under the Triton interpreter (which would launch the kernels on them for real), its body computes the
# same thing with PyTorch's convolution and its backward instead (`_plain_forward`, `_plain_backward`; fp32, rounded
# once at the end as the kernels round).

TRACED_CONVS = os.environ.get("SPATIAL_MAMBA_TRACED_CONVS", "1") != "0"


def _plain_forward(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool, residual: bool):
    """(y, pre or an empty tensor) as `_forward` computes them, with PyTorch's convolution in fp32."""
    ks = weight.shape[-1]
    acc = F.conv2d(x.float().permute(0, 3, 1, 2), weight.float(), None if bias is None else bias.float(),
                   padding=ks // 2, groups=x.shape[-1]).permute(0, 2, 3, 1)
    out = F.silu(acc) if silu else acc
    out = out + x.float() if residual else out
    pre = acc.to(x.dtype).contiguous() if silu else x.new_empty(0)
    return out.to(x.dtype).contiguous(), pre


def _plain_backward(dy: Tensor, x: Tensor, pre: Tensor, weight: Tensor, bias: Tensor | None, silu: bool,
                    residual: bool):
    """(dx, dweight, dbias or an empty tensor) as `_backward` computes them, with PyTorch's convolution backward
    in fp32."""
    ks, C = weight.shape[-1], x.shape[-1]
    gp = dy.float()
    if silu:
        s = torch.sigmoid(pre.float())
        gp = (gp * (s * (1 + pre.float() * (1 - s)))).to(dy.dtype).float()  # written in dy's dtype, as the kernel
    dx, dweight, dbias = torch.ops.aten.convolution_backward(
        gp.permute(0, 3, 1, 2), x.float().permute(0, 3, 1, 2), weight.float(), None if bias is None else [C],
        [1, 1], [ks // 2, ks // 2], [1, 1], False, [0, 0], C, [True, True, bias is not None])
    dx = dx.permute(0, 2, 3, 1) + dy.float() if residual else dx.permute(0, 2, 3, 1)
    dbias = weight.new_empty(0) if bias is None else dbias.to(bias.dtype)
    return dx.to(x.dtype).contiguous(), dweight.to(weight.dtype).contiguous(), dbias


@torch.library.triton_op("spatial_mamba::depthwise_conv_traced", mutates_args=())
def depthwise_conv_traced(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool,
                          residual: bool) -> tuple[Tensor, Tensor]:
    """(y, pre): `_DepthwiseConv`'s forward; pre is the SiLU's input with `silu`, else an empty tensor."""
    if ahead.untraceable(x, weight, bias):
        return _plain_forward(x, weight, bias, silu, residual)
    tune_for_trace(_forward, (x, weight, bias, silu, residual), x.element_size() == 2)
    with ahead.tracing_launches():
        y, pre = _forward(x, weight, bias, silu, residual)
    return y, x.new_empty(0) if pre is None else pre


@torch.library.triton_op("spatial_mamba::depthwise_conv_traced_backward", mutates_args=())
def depthwise_conv_traced_backward(dy: Tensor, x: Tensor, pre: Tensor, weight: Tensor, bias: Tensor | None,
                                   silu: bool, residual: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias): `_DepthwiseConv`'s backward; dbias is an empty tensor without a bias."""
    if ahead.untraceable(dy, x, pre, weight, bias):
        return _plain_backward(dy, x, pre, weight, bias, silu, residual)
    args = (dy, x, pre if silu else None, weight, bias, residual)
    tune_for_trace(_backward, args, x.element_size() == 2)
    with ahead.tracing_launches():
        dx, dweight, dbias = _backward(*args)
    return dx, dweight, weight.new_empty(0) if dbias is None else dbias


def _traced_setup_context(ctx, inputs, output):
    x, weight, bias, silu, residual = inputs
    ctx.save_for_backward(x, output[1], weight, bias)
    ctx.silu, ctx.residual = silu, residual


def _traced_autograd(ctx, dy, dpre):
    x, pre, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = depthwise_conv_traced_backward(dy, x, pre, weight, bias, ctx.silu, ctx.residual)
    return dx, dweight, None if bias is None else dbias, None, None


depthwise_conv_traced.register_autograd(_traced_autograd, setup_context=_traced_setup_context)


def _fits(x: Tensor, conv: nn.Conv2d) -> bool:
    """The convolution and x are of a kind the kernels compute (see `kernel_fits`), wherever it is called."""
    w = conv.weight
    C = x.shape[-1] if x.ndim == 4 else -1
    ks = w.shape[-1]
    return ((x.is_cuda or triton_interpreted()) and x.ndim == 4 and x.numel() > 0
            and conv.groups == C and tuple(w.shape) == (C, 1, ks, ks) and ks % 2 == 1
            and tuple(conv.stride) == (1, 1) and tuple(conv.dilation) == (1, 1)
            and tuple(conv.padding) == (ks // 2, ks // 2) and conv.padding_mode == "zeros"
            and w.dtype in KERNEL_DTYPES and (conv.bias is None or conv.bias.dtype == w.dtype)
            and w.device == x.device and max(x.stride(0), x.shape[1] * x.shape[2] * C) <= MAX_IMAGE_EXTENT)


def kernel_fits(x: Tensor, conv: nn.Conv2d) -> bool:
    """Whether the kernels compute `conv` on x (B, H, W, C) eagerly: a depthwise, square, odd, stride-1,
    dilation-1 convolution zero-padded to the same size, on CUDA (or the Triton interpreter), eager and not under a
    dispatch mode, with parameters of a kernel dtype, and one image's elements addressable with 32-bit offsets."""
    return not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None and _fits(x, conv)


def traced_fits(x: Tensor, conv: nn.Conv2d) -> bool:
    """Whether a compiled graph launches the kernels itself for `conv` on x (`depthwise_conv_traced`): unless
    turned off (`TRACED_CONVS`), while torch.compile traces, CUDA, static sizes and strides, and a convolution as for
    `kernel_fits`."""
    return (TRACED_CONVS and torch.compiler.is_compiling() and x.is_cuda
            and not any(isinstance(s, torch.SymInt) for s in (*x.shape, *x.stride(), *conv.weight.shape))
            and _fits(x, conv))


def depthwise_conv(x: Tensor, conv: nn.Conv2d, residual: bool = False, silu: bool = False,
                   kernel: bool = True) -> Tensor:
    """`conv` on channels-last activations x (B, H, W, C), then SiLU (`silu`) and/or plus x (`residual`).

    With `kernel` the Triton kernels run where they fit (`kernel_fits`; in a compiled graph on a GPU `traced_fits`:
    the graph then launches them itself): x of a kernel dtype, read in place if its channels have unit stride (else
    copied). Under autocast x is cast to autocast's dtype, the output is in it (as autocast's convolution would
    give), the weights are read in their own dtype and accumulated in fp32; with the residual and an x wider than
    autocast's dtype (whose plain sum stays in x's dtype) the plain path runs.
    Anywhere else (or with `kernel=False`) it is the plain module on a permuted view: the reference behaviour."""
    traced = kernel and traced_fits(x, conv)
    if not (traced or (kernel and kernel_fits(x, conv))):
        return plain_depthwise_conv(x, conv, residual, silu)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        if x.dtype != dtype and residual:  # the plain sum keeps x's wider dtype: so does this path, plainly
            return plain_depthwise_conv(x, conv, residual, silu)
        x = x if x.dtype == dtype else x.to(dtype)
    if x.dtype not in KERNEL_DTYPES:
        return plain_depthwise_conv(x, conv, residual, silu)
    if x.stride(-1) != 1:
        x = x.contiguous()
    weight = conv.weight if conv.weight.is_contiguous() else conv.weight.contiguous()
    if traced:
        return depthwise_conv_traced(x, weight, conv.bias, silu, residual)[0]
    return _DepthwiseConv.apply(x, weight, conv.bias, silu, residual)


__all__ = ["KERNEL_DTYPES", "MAX_IMAGE_EXTENT", "depthwise_conv", "depthwise_conv_traced", "dwconv_ref", "kernel_fits",
           "traced_fits"]
