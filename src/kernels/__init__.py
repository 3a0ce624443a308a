"""Kernels of the structure-aware SSM (scan -> state fusion -> observation) and the backend switch.

Backends compute the same function (tests prove it against `reference.py`):
    torch   plain PyTorch reference, runs everywhere (CPU, any dtype, any d_state)
    triton  Triton scan kernel + PyTorch fusion
    fused   one Triton op: scan -> fusion -> observation
    auto    `fused` on CUDA, `torch` elsewhere

`layer_norm` is the blocks' LayerNorm (optionally gated): Triton kernels (`norms.py`) with the fused backend
in eager mode, `nn.LayerNorm` otherwise. `depthwise_conv` likewise for the blocks' depthwise convolutions (with
their residual or SiLU): Triton kernels (`dwconv.py`) or `nn.Conv2d`; `residual_drop_path` for the residual
adds with stochastic depth (`droppath.py`). `autocast_weights` casts a block's matmul weights for autocast at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from src.errors import UserError

from .reference import FUSION_PADDINGS, SCANS, structure_aware_ssm_ref

BACKENDS = ("torch", "triton", "fused", "auto")

__all__ = ["BACKENDS", "FUSION_PADDINGS", "SCANS", "autocast_weights", "depthwise_conv", "drop_path", "drop_path_mask",
           "layer_norm", "plain_depthwise_conv", "residual_drop_path", "resolve_backend", "structure_aware_ssm",
           "structure_aware_ssm_ref"]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs on `device`: `auto` becomes `fused` on CUDA and `torch` elsewhere; a Triton
    backend on a CPU tensor is an error unless TRITON_INTERPRET=1 (the Triton interpreter)."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "fused" if device.type == "cuda" else "torch"
    if backend in ("triton", "fused") and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise UserError(
            f"backend {backend!r} needs a CUDA GPU (tensors are on {device}); use backend 'torch' or 'auto', "
            "or set TRITON_INTERPRET=1 to run the Triton kernels on the CPU (slow, for tests)"
        )
    return backend


def structure_aware_ssm(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    dilations: Sequence[int],
    H: int,
    W: int,
    scan: str = "row",
    backend: str = "torch",
    padding: str = "replicate",
) -> torch.Tensor:
    """y = fusion(scan(x, Δ=softplus(dt + dt_bias), A, B))·C + D·x, channels last: x, dt (B, L, D) and
    B, C (B, L, N) -> y (B, L, D). Shapes as in `reference.py`. The fusion pads by replication; `padding="zeros"`
    (the authors' evaluation, `reference.state_fusion_ref`) runs on the torch reference whatever the backend."""
    if padding not in FUSION_PADDINGS:
        raise UserError(f"unknown fusion padding {padding!r}; expected one of {FUSION_PADDINGS}")
    backend = "torch" if padding != "replicate" else resolve_backend(backend, x.device)
    if backend == "torch":
        return structure_aware_ssm_ref(x, dt, A, B, C, D, dt_bias, weight, alpha, dilations, H, W, scan, padding)
    if A.shape[-1] != 1:
        raise UserError(f"backend {backend!r} supports d_state=1 only (got {A.shape[-1]}); use backend 'torch'")
    from . import ops  # imports Triton: only when a Triton backend runs

    fn = ops.structure_aware_ssm_triton if backend == "triton" else ops.structure_aware_ssm_fused
    return fn(x, dt, A, B, C, D, dt_bias, weight, alpha, dilations, H, W, scan)


def _kernels_run(backend: str, x: torch.Tensor) -> bool:
    """Whether the Triton kernels of an eager layer run for `backend` on x's device: backend `fused` (or `auto`
    on CUDA), on CUDA or under the Triton interpreter."""
    resolved = ("fused" if x.device.type == "cuda" else "torch") if backend == "auto" else backend
    return resolved == "fused" and (x.device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1")


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm, gate: torch.Tensor | None = None,
               backend: str = "torch") -> torch.Tensor:
    """`norm(x)` over the last dim of channels-last activations, times `silu(gate)` if a gate is given. With
    backend `fused` (or `auto` on CUDA), on CUDA or under the Triton interpreter, the Triton kernels of
    `norms.py` compute it (in autocast's dtype, eager only: see there); with any other backend it is
    `norm(x) · F.silu(gate)`, the plain PyTorch modules. Never raises where `norm(x)` would not."""
    if _kernels_run(backend, x):
        from .norms import layer_norm as kernel_layer_norm  # imports Triton: only when it runs

        return kernel_layer_norm(x, norm, gate)
    y = norm(x)
    return y if gate is None else y * F.silu(gate)


def depthwise_conv(x: torch.Tensor, conv: torch.nn.Conv2d, residual: bool = False, silu: bool = False,
                   backend: str = "torch") -> torch.Tensor:
    """`conv` on channels-last activations x (B, H, W, C), then `silu` and/or plus x (`residual`). With backend
    `fused` (or `auto` on CUDA), on CUDA or under the Triton interpreter, the Triton kernels of `dwconv.py`
    compute it where they fit (eager, and opt-in in compiled graphs: see there); otherwise the plain module on a
    permuted view. Never raises where `conv` would not."""
    if _kernels_run(backend, x):
        from .dwconv import depthwise_conv as kernel_depthwise_conv  # imports Triton: only when it runs

        return kernel_depthwise_conv(x, conv, residual, silu)
    return plain_depthwise_conv(x, conv, residual, silu)


def residual_drop_path(x: torch.Tensor, branch: torch.Tensor, keep_prob: torch.Tensor, training: bool,
                       backend: str = "torch") -> torch.Tensor:
    """x + drop_path(branch) (stochastic depth: in training each sample's branch kept with probability keep_prob,
    a 0-d tensor, and scaled by 1 / keep_prob). With backend `fused` (or `auto` on CUDA), on CUDA or under the
    Triton interpreter, one Triton kernel each way (`droppath.py`, eager only); otherwise the plain ops. The mask is
    drawn the same way either way."""
    if _kernels_run(backend, x):
        from .droppath import residual_drop_path as kernel_residual_drop_path  # imports Triton: only when it runs

        return kernel_residual_drop_path(x, branch, keep_prob, training)
    return x + drop_path(branch, keep_prob, training)


class _CastWeights(torch.autograd.Function):
    """Tensors cast to one dtype by one multi-tensor copy, as one autograd node; backward casts their gradients
    back the same way (a gradient left undefined stays undefined)."""

    @staticmethod
    def forward(ctx, dtype, *weights):
        ctx.set_materialize_grads(False)
        ctx.dtypes = [w.dtype for w in weights]
        out = [torch.empty_like(w, dtype=dtype) for w in weights]
        torch._foreach_copy_(out, list(weights))
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        given = [i for i, g in enumerate(grads) if g is not None]
        out = [None] * len(grads)
        if given:
            cast = [torch.empty_like(grads[i], dtype=ctx.dtypes[i]) for i in given]
            torch._foreach_copy_(cast, [grads[i] for i in given])
            for i, g in zip(given, cast):
                out[i] = g
        return None, *out


def autocast_weights(x: torch.Tensor, weights: Sequence[torch.Tensor], backend: str = "torch") -> tuple:
    """`weights` (fp32 matmul weights and biases of a block) as autocast's matmuls would read them, cast at once.

    Under autocast each linear casts its weight and bias on its own: per tensor an op, a kernel and an autograd
    node, forward and backward, which an eager step bound by its host pays for (T casts 144 of them in its
    blocks). Where the Triton kernels run for `backend` (see `layer_norm`), eagerly under autocast to a 16-bit
    dtype, with every weight fp32 on x's device, this casts them by one multi-tensor copy (one autograd node,
    one copy back in the backward) and the linears, finding them in autocast's dtype already, cast nothing: the
    same values (a cast rounds alike either way), the same gradients. Anywhere else it returns them unchanged."""
    weights = tuple(weights)
    device = x.device.type
    if not (_kernels_run(backend, x) and torch.is_autocast_enabled(device) and not torch.compiler.is_compiling()):
        return weights
    dtype = torch.get_autocast_dtype(device)
    if dtype not in (torch.bfloat16, torch.float16) or any(
            w.dtype != torch.float32 or w.device != x.device for w in weights):
        return weights
    return _CastWeights.apply(dtype, *weights)


def drop_path(x: torch.Tensor, keep_prob: torch.Tensor, training: bool) -> torch.Tensor:
    """Stochastic depth: keep the whole residual branch of a sample with probability keep_prob, a 0-d tensor (a
    compiled graph takes it as an input instead of a constant), and scale the kept ones by 1 / keep_prob."""
    if not training:
        return x
    return x * drop_path_mask(x, keep_prob) / keep_prob


def drop_path_mask(x: torch.Tensor, keep_prob: torch.Tensor) -> torch.Tensor:
    """One Bernoulli(keep_prob) draw per sample of x, shaped (B, 1, …) in x's dtype: the only random numbers
    stochastic depth draws (the Triton path draws them here too, so the random stream is the same either way)."""
    return x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)


def plain_depthwise_conv(x: torch.Tensor, conv: torch.nn.Conv2d, residual: bool, silu: bool) -> torch.Tensor:
    """`depthwise_conv` as plain PyTorch: the module on a permuted view (cuDNN's channels-last kernels)."""
    y = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    if silu:
        y = F.silu(y)
    return x + y if residual else y
