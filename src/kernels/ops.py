"""Public Triton-backed functions and their torch.library registration: ops `spatial_mamba::selective_scan`
and `spatial_mamba::structure_aware_ssm_fused`, each with a fake (meta) implementation, autograd through a
backward op of its own (so compiled backward graphs trace it too) and a FLOP formula; and, for compiled graphs
(CUDA tensors; SPATIAL_MAMBA_TRACED_OP=0 turns it off), `spatial_mamba::structure_aware_ssm_fused_traced`, the
fused op as a `triton_op` whose kernel launches the graph takes over.

Imports go one way: `triton_scan` (scan kernels) -> `fused` (fusion kernels) -> this module (checks, ops,
public functions) -> the package's dispatch (`structure_aware_ssm`).

Conventions of both ops (channels last, as the model's activations are):
- Activations x, dt (B, L, D) and B, C (B, L, 1) share one dtype (fp32, fp16 or bf16) and may have any
  strides: the kernels index through them, nothing is copied (D-contiguous is the fast layout). Parameters
  A (D, 1), D, dt_bias (D,), weight (K, D, k, k), alpha (K,) may be fp32/fp16/bf16 independently (the model
  keeps them fp32); small as they are, non-contiguous ones are made contiguous.
- All arithmetic is fp32. The scan op returns fp32 states; the fused op returns y in x's dtype and the
  states it keeps for the backward in bf16 for bf16 activations, fp32 otherwise (`state_dtype`).
- Autocast: no autocast kernel is registered, so under autocast the ops take their inputs as given
  (activations in the autocast dtype, parameters in fp32) and compute in fp32 as above.
- `check_inputs` raises ValueError/TypeError/RuntimeError for a wrong shape, dtype or device before any
  kernel runs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

from . import ahead
from .fused import MAX_DILATION, MAX_DILATIONS, fused_backward, fused_forward
from .reference import SCANS, observe, state_fusion_ref
from .triton_scan import scan_backward, scan_forward, state_dtype, triton_interpreted
from .tuning import tune_for_trace

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_ELEMENTS_PER_IMAGE = 2**31 - 1  # L·D: the kernels index one image with 32-bit offsets


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_inputs(x, dt, A, B, C, D, dt_bias, weight, alpha, dilations, H, W, scan, fused: bool = False) -> None:
    """Raise a clear error for anything the Triton kernels cannot take; say what was expected and given."""
    named = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, weight=weight, alpha=alpha)
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.ndim != 3:
        raise ValueError(f"x must be 3-D (B, L, D), got shape {_shape(x)}")
    Bsz, L, Dm = x.shape
    if Bsz == 0 or Dm == 0:
        raise ValueError(f"x must have at least one batch element and one channel, got shape {_shape(x)}")
    if A.ndim == 2 and A.shape[0] == Dm and A.shape[1] != 1:
        raise ValueError(f"the Triton kernels support d_state=1 only: A has shape {_shape(A)} (d_state "
                         f"{A.shape[1]}); use backend 'torch'")
    if B.ndim == 3 and B.shape[2] != 1 and B.shape[0] == Bsz and B.shape[1] == L:
        raise ValueError(f"the Triton kernels support d_state=1 only: B has shape {_shape(B)}; use backend 'torch'")
    expected = {
        "dt": (Bsz, L, Dm), "A": (Dm, 1), "B": (Bsz, L, 1), "C": (Bsz, L, 1), "D": (Dm,), "dt_bias": (Dm,),
    }
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (x is {_shape(x)}), got {_shape(named[name])}")
    K = len(dilations)
    if weight.ndim != 4 or weight.shape[0] != K or weight.shape[1] != Dm or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must have shape (K={K} dilations, D={Dm}, k, k), got {_shape(weight)}")
    k = weight.shape[-1]
    if K and k % 2 == 0:
        raise ValueError(f"fusion kernel size must be odd, got {k} (weight shape {_shape(weight)})")
    if tuple(alpha.shape) != (K,):
        raise ValueError(f"alpha must have shape ({K},) (one per dilation), got {_shape(alpha)}")
    if any(int(d) != d or d < 1 for d in dilations):
        raise ValueError(f"dilations must be positive integers, got {list(dilations)}")
    if fused and (K > MAX_DILATIONS or any(d > MAX_DILATION for d in dilations)):
        raise ValueError(f"the fused kernel takes at most {MAX_DILATIONS} dilations of at most "
                         f"{MAX_DILATION}, got {list(dilations)}; use backend 'triton' or 'torch'")
    if not (isinstance(H, int) and isinstance(W, int)) or H < 1 or W < 1 or H * W != L:
        raise ValueError(f"H·W must equal L={L} with H, W >= 1, got H={H}, W={W}")
    if L * Dm > MAX_ELEMENTS_PER_IMAGE:
        raise ValueError(f"L·D = {L}·{Dm} = {L * Dm} elements per image is more than the Triton kernels index "
                         f"({MAX_ELEMENTS_PER_IMAGE}); use a smaller image or backend 'torch'")
    if scan not in SCANS:
        raise ValueError(f"unknown scan {scan!r}; expected one of {tuple(SCANS)}")
    for name in ("x", "dt", "B", "C"):
        if named[name].dtype not in ACTIVATION_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {named[name].dtype} "
                            "(use backend 'torch' for float64)")
    for name in ("dt", "B", "C"):
        if named[name].dtype != x.dtype:
            raise TypeError(f"x, dt, B and C must share one dtype: x is {x.dtype}, {name} is {named[name].dtype}")
    for name in ("A", "D", "dt_bias", "weight", "alpha"):
        if named[name].dtype not in ACTIVATION_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {named[name].dtype}")
    for name, t in named.items():
        if t.device != x.device:
            raise RuntimeError(f"all tensors must be on one device: x is on {x.device}, {name} is on {t.device}")
    if x.device.type != "cuda" and not triton_interpreted():
        raise RuntimeError(f"the Triton kernels need CUDA tensors (got {x.device}); set TRITON_INTERPRET=1 "
                           "to run them in Triton's CPU interpreter")


# ----------------------------------------------------------------------------------------------------
# spatial_mamba::selective_scan — fp32 states (B, L, D) of a scan pattern, directions summed


@torch.library.custom_op("spatial_mamba::selective_scan", mutates_args=())
def selective_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, dt_bias: Tensor, H: int, W: int, scan: str) -> Tensor:
    A, dt_bias = A.contiguous(), dt_bias.contiguous()
    ahead.plan(("selective_scan", x.shape, x.stride(), dt.stride(), B.stride(), x.dtype, H, W, scan, x.device),
               x.device, lambda: _plan_scan(x, dt, A, B, dt_bias, H, W, scan))
    return scan_forward(x, dt, A, B, dt_bias, H, W, SCANS[scan])


def _plan_scan(x, dt, A, B, dt_bias, H: int, W: int, scan: str) -> None:
    """A plan's dry run (`ahead.plan`): the scan's forward and backward launchers on meta tensors."""
    x, dt, A, B, dt_bias = (ahead.meta_like(t) for t in (x, dt, A, B, dt_bias))
    h = scan_forward(x, dt, A, B, dt_bias, H, W, SCANS[scan])
    scan_backward(x, dt, A, B, dt_bias, h, torch.empty_like(h), H, W, SCANS[scan])


@selective_scan.register_fake
def _(x, dt, A, B, dt_bias, H, W, scan):
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.custom_op("spatial_mamba::selective_scan_backward", mutates_args=())
def selective_scan_backward(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, dt_bias: Tensor, h: Tensor, dh: Tensor, H: int, W: int, scan: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = scan_backward(x, dt, A.contiguous(), B, dt_bias.contiguous(), h, dh.float(), H, W, SCANS[scan])
    return tuple(g.contiguous() for g in grads[:5])


@selective_scan_backward.register_fake
def _(x, dt, A, B, dt_bias, h, dh, H, W, scan):
    return tuple(t.new_empty(t.shape) for t in (x, dt, A, B, dt_bias))  # the kernels return contiguous tensors


def _scan_setup_context(ctx, inputs, output):
    x, dt, A, B, dt_bias, H, W, scan = inputs
    ctx.save_for_backward(x, dt, A, B, dt_bias, output)
    ctx.H, ctx.W, ctx.scan = H, W, scan


def _scan_backward(ctx, dh):
    x, dt, A, B, dt_bias, h = ctx.saved_tensors
    dx, ddt, dA, dB, dbias = selective_scan_backward(x, dt, A, B, dt_bias, h, dh, ctx.H, ctx.W, ctx.scan)
    return dx, ddt, dA, dB, dbias, None, None, None


selective_scan.register_autograd(_scan_backward, setup_context=_scan_setup_context)


# ----------------------------------------------------------------------------------------------------
# spatial_mamba::structure_aware_ssm_fused — (y, h, h'): y in x's dtype, h and the fused states h' kept for backward
# (keep_fused=False: no backward will follow, h' is not written and an empty tensor stands in for it)


@torch.library.custom_op("spatial_mamba::structure_aware_ssm_fused", mutates_args=())
def structure_aware_ssm_fused_op(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor, weight: Tensor,
    alpha: Tensor, dilations: list[int], H: int, W: int, scan: str, keep_fused: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    y, h, hf = fused_forward(x, dt, A.contiguous(), B, C, D.contiguous(), dt_bias.contiguous(), weight.contiguous(),
                             alpha.contiguous(), dilations, H, W, SCANS[scan], for_backward=keep_fused)
    return y, h, h.new_empty(0) if hf is None else hf


@structure_aware_ssm_fused_op.register_fake
def _(x, dt, A, B, C, D, dt_bias, weight, alpha, dilations, H, W, scan, keep_fused=True):
    states = state_dtype(x.dtype)  # contiguous, as the kernels' outputs
    return (x.new_empty(x.shape), x.new_empty(x.shape, dtype=states),
            x.new_empty(x.shape if keep_fused else (0,), dtype=states))


@torch.library.custom_op("spatial_mamba::structure_aware_ssm_fused_backward", mutates_args=())
def structure_aware_ssm_fused_backward(
    dy: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
    weight: Tensor, alpha: Tensor, h: Tensor, hf: Tensor, dilations: list[int], H: int, W: int, scan: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = fused_backward(dy, x, dt, A.contiguous(), B, C, D.contiguous(), dt_bias.contiguous(),
                           weight.contiguous(), alpha.contiguous(), h, hf, dilations, H, W, SCANS[scan])
    return tuple(g.contiguous() for g in grads)


@structure_aware_ssm_fused_backward.register_fake
def _(dy, x, dt, A, B, C, D, dt_bias, weight, alpha, h, hf, dilations, H, W, scan):
    return tuple(t.new_empty(t.shape) for t in (x, dt, A, B, C, D, dt_bias, weight, alpha))


def _fused_setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, dt_bias, weight, alpha, dilations, H, W, scan, *_ = inputs
    y, h, hf = output
    ctx.mark_non_differentiable(h, hf)
    ctx.set_materialize_grads(False)  # h, h' get no gradient: no zero-filled (B, L, D) tensors for them
    ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, weight, alpha, h, hf)
    ctx.dilations, ctx.H, ctx.W, ctx.scan = list(dilations), H, W, scan


def _fused_autograd(backward_op):
    """The autograd formula of a fused op whose backward is the op `backward_op` (the custom op's or the traced
    op's)."""
    def backward(ctx, dy, _dh, _dhf):
        if dy is None:  # y did not reach the loss
            return (None,) * 14
        x, dt, A, B, C, D, dt_bias, weight, alpha, h, hf = ctx.saved_tensors
        grads = backward_op(dy, x, dt, A, B, C, D, dt_bias, weight, alpha, h, hf, ctx.dilations, ctx.H, ctx.W,
                            ctx.scan)
        return (*grads, None, None, None, None, None)

    return backward


structure_aware_ssm_fused_op.register_autograd(_fused_autograd(structure_aware_ssm_fused_backward),
                                               setup_context=_fused_setup_context)


# ----------------------------------------------------------------------------------------------------
# spatial_mamba::structure_aware_ssm_fused_traced — the fused op as a `torch.library.triton_op`, for compiled graphs
# (CUDA tensors; `TRACED_OP`, SPATIAL_MAMBA_TRACED_OP=0 turns it off). Traced, its body becomes the graph's own kernel
# launches (`ahead.tracing_launches`: `torch.library.wrap_triton`), so the compiled graph launches the kernels itself,
# with inductor's launcher, instead of calling back into this package's Python through the custom-op dispatch at every
# step. Measured on an H100 (bf16, B = 128): the op's forward+backward alone in a compiled graph cost the host 1.49 ms
# a call instead of 2.94 at 7² and 1.65 instead of 2.59 at 56², with the same GPU time; the whole compiled T trained
# at 1363 img/s instead of 1070 on the same machine (the host issuing a step in 64 instead of 100 ms), but took 244 s
# to compile instead of 154 (inductor analyses and compiles each kernel launch it takes over; the analysis is since
# kept once per kernel variant, `ahead.memoize_write_analysis`: an AOT trace of the op's forward+backward on a 2-core
# CPU 2.3 s a block before, 1.3 s for a stage's first block and 0.09 s for the next ones after; whole T on a fresh
# H100: 174 s). Inductor decides which tensors a launched kernel writes from the kernel's Triton IR and copies any
# input it takes for written at every call: `benchmarks/registers.py --writes` shows its verdict per kernel variant,
# and a test keeps it to the outputs. Called outside a trace it runs the same launchers as the custom op (bitwise the
# same results). Its tiles are fixed when the graph is traced: measured picks, cached timings, or timed then on real
# scratch tensors (`tuning.tune_for_trace`: fake tensors cannot be timed). Shapes that are symbolic in the trace
# (dynamic shapes) take the custom op, which reads them at run time, as do fake tensors under the Triton interpreter,
# which launches kernels for real.


@torch.library.triton_op("spatial_mamba::structure_aware_ssm_fused_traced", mutates_args=())
def structure_aware_ssm_fused_traced(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor, weight: Tensor,
    alpha: Tensor, dilations: list[int], H: int, W: int, scan: str, keep_fused: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    if ahead.untraceable(x, dt, B, C, H, W):  # the custom op reads the sizes at run time
        return structure_aware_ssm_fused_op(x, dt, A, B, C, D, dt_bias, weight, alpha, dilations, H, W, scan,
                                            keep_fused)
    A, D, dt_bias, weight, alpha = _fused_args(A, D, dt_bias, weight, alpha)
    args = (x, dt, A, B, C, D, dt_bias, weight, alpha, dilations, H, W, SCANS[scan])
    tune_for_trace(fused_forward, args, x.element_size() == 2)
    with ahead.tracing_launches():
        y, h, hf = fused_forward(*args, for_backward=keep_fused)
    return y, h, h.new_empty(0) if hf is None else hf


@torch.library.triton_op("spatial_mamba::structure_aware_ssm_fused_traced_backward", mutates_args=())
def structure_aware_ssm_fused_traced_backward(
    dy: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
    weight: Tensor, alpha: Tensor, h: Tensor, hf: Tensor, dilations: list[int], H: int, W: int, scan: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if ahead.untraceable(dy, x, dt, B, C, h, hf, H, W):
        return structure_aware_ssm_fused_backward(dy, x, dt, A, B, C, D, dt_bias, weight, alpha, h, hf, dilations, H,
                                                  W, scan)
    A, D, dt_bias, weight, alpha = _fused_args(A, D, dt_bias, weight, alpha)
    args = (dy, x, dt, A, B, C, D, dt_bias, weight, alpha, h, hf, dilations, H, W, SCANS[scan])
    tune_for_trace(fused_backward, args, x.element_size() == 2)
    with ahead.tracing_launches():
        grads = fused_backward(*args)
    return tuple(g.contiguous() for g in grads)


structure_aware_ssm_fused_traced.register_autograd(_fused_autograd(structure_aware_ssm_fused_traced_backward),
                                                   setup_context=_fused_setup_context)
TRACED_OP = os.environ.get("SPATIAL_MAMBA_TRACED_OP", "1") != "0"


# ----------------------------------------------------------------------------------------------------
# FLOP formulas (FlopCounterMode): counted per element of (B, L, D)
#   scan direction: softplus ~ 3, decay exp + mul 2, input Δ·B·x 2, recurrence 2 -> 7 (as in the paper's 7·B·L·D·N)
#   fusion: 2 per tap and dilation (multiply-add); observation h'·C + D·x: 3
#   backward: about twice the forward


def _scan_flops(x_shape, scan: str) -> int:
    Bsz, L, D = x_shape
    return 7 * Bsz * D * L * len(SCANS[scan])


def _fused_flops(x_shape, weight_shape, dilations: Sequence[int], scan: str) -> int:
    Bsz, L, D = x_shape
    taps = len(dilations) * weight_shape[-1] * weight_shape[-2]
    return _scan_flops(x_shape, scan) + (2 * taps + 3) * Bsz * D * L


@register_flop_formula(torch.ops.spatial_mamba.selective_scan)
def _(x_shape, dt_shape, A_shape, B_shape, bias_shape, H, W, scan, *args, out_shape=None, **kwargs) -> int:
    return _scan_flops(x_shape, scan)


@register_flop_formula(torch.ops.spatial_mamba.selective_scan_backward)
def _(x_shape, dt_shape, A_shape, B_shape, bias_shape, h_shape, dh_shape, H, W, scan, *args, out_shape=None,
      **kwargs) -> int:
    return 2 * _scan_flops(x_shape, scan)


@register_flop_formula([torch.ops.spatial_mamba.structure_aware_ssm_fused,
                        torch.ops.spatial_mamba.structure_aware_ssm_fused_traced])
def _(x_shape, dt_shape, A_shape, B_shape, C_shape, D_shape, bias_shape, weight_shape, alpha_shape, dilations, H,
      W, scan, *args, out_shape=None, **kwargs) -> int:
    return _fused_flops(x_shape, weight_shape, dilations, scan)


@register_flop_formula([torch.ops.spatial_mamba.structure_aware_ssm_fused_backward,
                        torch.ops.spatial_mamba.structure_aware_ssm_fused_traced_backward])
def _(dy_shape, x_shape, dt_shape, A_shape, B_shape, C_shape, D_shape, bias_shape, weight_shape, alpha_shape,
      h_shape, hf_shape, dilations, H, W, scan, *args, out_shape=None, **kwargs) -> int:
    return 2 * _fused_flops(x_shape, weight_shape, dilations, scan)


# ----------------------------------------------------------------------------------------------------
# eager fast path: the fused op's own forward and backward functions under a plain autograd.Function. The
# custom-op dispatch (schema binding, alias checks, its autograd wrapper and a second op for the backward)
# costs about half a millisecond of host time per forward+backward, more than the kernels take at the later
# stages of a model, where eager training is then launch-bound. Traced code keeps using the registered op.


def _fused_args(A, D, dt_bias, weight, alpha):
    return A.contiguous(), D.contiguous(), dt_bias.contiguous(), weight.contiguous(), alpha.contiguous()


class _FusedEager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dt_bias, weight, alpha, dilations, H, W, scan):
        A, D, dt_bias, weight, alpha = _fused_args(A, D, dt_bias, weight, alpha)
        # the mixed weights (K·k·k·D fp32) kept for the backward: one launch less per step
        y, h, hf, wa = fused_forward(x, dt, A, B, C, D, dt_bias, weight, alpha, dilations, H, W, SCANS[scan],
                                     keep_weights=True)
        ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, weight, alpha, h, hf, wa)
        ctx.static = (dilations, H, W, SCANS[scan])
        return y

    @staticmethod
    def backward(ctx, dy):
        x, dt, A, B, C, D, dt_bias, weight, alpha, h, hf, wa = ctx.saved_tensors
        grads = fused_backward(dy, x, dt, A, B, C, D, dt_bias, weight, alpha, h, hf, *ctx.static, wa=wa)
        return (*grads, None, None, None, None)


# ----------------------------------------------------------------------------------------------------
# public functions (checked inputs -> ops)


def structure_aware_ssm_fused(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor, weight: Tensor,
    alpha: Tensor, dilations: Sequence[int], H: int, W: int, scan: str = "row",
) -> Tensor:
    """One op (`spatial_mamba::structure_aware_ssm_fused`): scan -> fusion -> observation, y (B, L, D) in x's
    dtype. Shapes as in `reference.structure_aware_ssm_ref`, checks as in `check_inputs`."""
    check_inputs(x, dt, A, B, C, D, dt_bias, weight, alpha, dilations, H, W, scan, fused=True)
    # whether a backward can follow: else the forward does not store the fused states h' for one
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, B, C, D, dt_bias, weight, alpha))
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        # traced (torch.compile, export) or under a dispatch mode (fake tensors, FlopCounterMode): the op (on a GPU
        # its triton_op, whose kernels a compiled graph launches itself, unless SPATIAL_MAMBA_TRACED_OP=0)
        op = structure_aware_ssm_fused_traced if TRACED_OP and x.is_cuda else structure_aware_ssm_fused_op
        return op(x, dt, A, B, C, D, dt_bias, weight, alpha, list(dilations), H, W, scan, keep)[0]
    if not keep:  # no autograd node either
        A, D, dt_bias, weight, alpha = _fused_args(A, D, dt_bias, weight, alpha)
        return fused_forward(x, dt, A, B, C, D, dt_bias, weight, alpha, list(dilations), H, W, SCANS[scan],
                             for_backward=False)[0]
    return _FusedEager.apply(x, dt, A, B, C, D, dt_bias, weight, alpha, list(dilations), H, W, scan)


def structure_aware_ssm_triton(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor, weight: Tensor,
    alpha: Tensor, dilations: Sequence[int], H: int, W: int, scan: str = "row",
) -> Tensor:
    """Triton scan (op `spatial_mamba::selective_scan`, fp32 states) + the reference's torch fusion and
    observation. Returns y (B, L, D) in x's dtype. Shapes and checks as for the fused op."""
    check_inputs(x, dt, A, B, C, D, dt_bias, weight, alpha, dilations, H, W, scan)
    # (B, L, D) -> (B, D, 1, L), contiguous as the reference's own states are: a transposed view would reach the
    # fusion's convolutions as a channels-last map, which cuDNN convolves with other kernels than the reference's
    # (the T model's fp32 gradients then parted from the reference's by up to 8e-4 at some training steps, on an
    # H100, where the reference's own error to a float64 pass was 1e-6); this backend is the reference's fusion
    h = selective_scan(x, dt, A, B, dt_bias, H, W, scan).transpose(1, 2).contiguous()[:, :, None]
    h = state_fusion_ref(h, weight.float(), alpha.float(), dilations, H, W)
    y = observe(h, C.float().transpose(1, 2), D.float(), x.float().transpose(1, 2))  # (B, D, L)
    return y.transpose(1, 2).to(x.dtype)


__all__ = [
    "check_inputs",
    "selective_scan",
    "selective_scan_backward",
    "structure_aware_ssm_fused_backward",
    "structure_aware_ssm_fused",
    "structure_aware_ssm_fused_op",
    "structure_aware_ssm_fused_traced",
    "structure_aware_ssm_fused_traced_backward",
    "structure_aware_ssm_triton",
]
