"""Plain-PyTorch reference of the structure-aware SSM: the specification every kernel is tested against.

Readable, float64-capable and differentiable by autograd. The op's interface is channels last, as the
model's activations are (L = H·W tokens in raster order):

    x      (B, L, D)      input of the scan (after the depthwise conv and SiLU)
    dt     (B, L, D)      Δ before its bias: Δ = softplus(dt + dt_bias)
    A      (D, N)         negative decay rates, A = -exp(A_log)
    B, C   (B, L, N)      input and output projections, shared by all channels
    D      (D,)           skip connection
    weight (K, D, k, k)   one depthwise k×k fusion kernel per dilation
    alpha  (K,)           mixing weight per dilation
    y      (B, L, D)      output

Inside, the reference computes channels first (its helpers take x, dt (B, D, L) and B, C (B, N, L)): the
scan returns the states h (B, D, N, L) of every token, always at its raster position, whatever order the
scan visits the tokens in. The fusion mixes each state with its spatial neighbours:
h' = Σ_i alpha_i · dwconv_k(replicate_pad(h), dilation d_i). The output is y = Σ_n h'_n · C_n + D · x.

`padding="zeros"` is the fusion of the authors' evaluation code: the kernels merged into one kernel of side
(k − 1)·max(d) + 1 (11 for 3×3 kernels at dilations 1, 3, 5) run with zero padding, which equals the sum of
the dilated convolutions with zero padding. It differs from the replicate padding (their training, and
every backend here) within max(d)·(k // 2) pixels of the border.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

SCAN_DIRECTIONS = ("row", "row_reversed", "column", "column_reversed")
FUSION_PADDINGS = ("replicate", "zeros")
SCANS = {
    "row": ("row",),
    "row_reversed": ("row_reversed",),
    "column": ("column",),
    "column_reversed": ("column_reversed",),
    "bidirectional": ("row", "row_reversed"),
    "cross": ("row", "row_reversed", "column", "column_reversed"),
}


def scan_order(direction: str, H: int, W: int, device: torch.device | None = None) -> torch.Tensor:
    """Raster positions in the order the scan visits them: step t reads and writes token order[t]."""
    if direction not in SCAN_DIRECTIONS:
        raise ValueError(f"unknown scan direction {direction!r}; expected one of {SCAN_DIRECTIONS}")
    grid = torch.arange(H * W, device=device).view(H, W)
    if direction.startswith("column"):
        grid = grid.t()  # visit (0,0), (1,0), ... down each column
    order = grid.reshape(-1)
    return order.flip(0) if direction.endswith("reversed") else order


def softplus(v: torch.Tensor) -> torch.Tensor:
    """softplus with PyTorch's default threshold (linear above 20); every backend uses this one."""
    return F.softplus(v)


def _scan_inputs(x, dt, A, B, dt_bias):
    """Decay log-factors and inputs of h_t = exp(dA_t)·h_{t-1} + u_t, each (B, D, N, L)."""
    delta = softplus(dt + dt_bias[:, None])  # (B, D, L)
    dA = delta[:, :, None, :] * A[None, :, :, None]
    u = (delta * x)[:, :, None, :] * B[:, None, :, :]
    return dA, u


def selective_scan_loop(x, dt, A, B, dt_bias, H: int, W: int, direction: str = "row") -> torch.Tensor:
    """The recurrence exactly as written, one token at a time. Slow; the definition the tests use."""
    dA, u = _scan_inputs(x, dt, A, B, dt_bias)
    order = scan_order(direction, H, W, x.device).tolist()
    h = torch.zeros_like(u[..., 0])
    states = [None] * len(order)
    for pos in order:
        h = torch.exp(dA[..., pos]) * h + u[..., pos]
        states[pos] = h
    return torch.stack(states, dim=-1)


def selective_scan_ref(
    x, dt, A, B, dt_bias, H: int, W: int, direction: str = "row", chunk: int = 32
) -> torch.Tensor:
    """Same function as `selective_scan_loop`, computed chunk-parallel in log space.

    Inside a chunk of T tokens, with S_t the running sum of dA, h_t = Σ_{s≤t} exp(S_t − S_s)·u_s
    (a masked T×T product, every exponent ≤ 0 so nothing overflows); a short loop over chunks
    carries the last state of each chunk into the next. Cost O(L·T) per channel instead of L steps.
    """
    dA, u = _scan_inputs(x, dt, A, B, dt_bias)
    L = dA.shape[-1]
    order = scan_order(direction, H, W, x.device)
    if direction != "row":
        dA, u = dA[..., order], u[..., order]  # raster -> scan order
    T = max(1, min(chunk, L))
    n_chunks = -(-L // T)
    pad = n_chunks * T - L
    if pad:  # zero padding at the end never reaches earlier states
        dA, u = F.pad(dA, (0, pad)), F.pad(u, (0, pad))
    dA = dA.unflatten(-1, (n_chunks, T))  # (B, D, N, n_chunks, T)
    u = u.unflatten(-1, (n_chunks, T))
    S = dA.cumsum(-1)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    gap = (S[..., :, None] - S[..., None, :]).masked_fill(~causal, float("-inf"))
    # within-chunk states from a zero initial state; an elementwise product and sum rather than a matmul,
    # so that FlopCounterMode counts the model's convolutions and projections, not this reference's maths
    h = (gap.exp() * u[..., None, :]).sum(-1)
    decay = S.exp()  # carry factor from the chunk's start to each token
    carried = [h[..., 0, :]]
    for c in range(1, n_chunks):
        carried.append(h[..., c, :] + decay[..., c, :] * carried[-1][..., -1:])
    h = torch.stack(carried, dim=-2).flatten(-2)[..., :L]
    if direction != "row":
        h = torch.empty_like(h).index_copy_(-1, order, h)  # scan order -> raster
    return h


def scan_states(x, dt, A, B, dt_bias, H: int, W: int, scan: str = "row") -> torch.Tensor:
    """States of a scan pattern: multi-direction patterns sum the states of their directions."""
    if scan not in SCANS:
        raise ValueError(f"unknown scan {scan!r}; expected one of {tuple(SCANS)}")
    return sum(selective_scan_ref(x, dt, A, B, dt_bias, H, W, d) for d in SCANS[scan])


def merge_fusion_kernels(weight: torch.Tensor, alpha: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """The K (D, k, k) kernels at their dilations, weighted by alpha, as one (D, S, S) kernel of side
    S = (k − 1)·max(d) + 1: tap (u, v) of kernel i sits at (c + d_i·(u − k//2), c + d_i·(v − k//2)), c = S // 2."""
    k = weight.shape[-1]
    side = (k - 1) * max(dilations) + 1
    merged = weight.new_zeros(weight.shape[1], side, side)
    offsets = torch.arange(k, device=weight.device) - k // 2
    for i, d in enumerate(dilations):
        taps = side // 2 + d * offsets
        merged[:, taps[:, None], taps[None, :]] += alpha[i] * weight[i]
    return merged


def replicate_pad(x: torch.Tensor, r: int) -> torch.Tensor:
    """`F.pad(x, (r, r, r, r), mode="replicate")` of a (…, H, W) tensor, built from its edge rows and columns by
    concatenation: the same values, and a backward (sums over the repeated edges) whose strides compiled graphs
    predict — compiled on a CPU (torch 2.14), `replication_pad2d_backward` returned contiguous gradients where its
    meta kernel had promised inductor's channels-last ones, and the backward stopped on a stride assertion."""
    if r == 0:
        return x
    *lead, H, W = x.shape
    x = torch.cat([x[..., :1].expand(*lead, H, r), x, x[..., -1:].expand(*lead, H, r)], dim=-1)
    return torch.cat([x[..., :1, :].expand(*lead, r, W + 2 * r), x, x[..., -1:, :].expand(*lead, r, W + 2 * r)],
                     dim=-2)


def state_fusion_ref(h: torch.Tensor, weight, alpha, dilations: Sequence[int], H: int, W: int,
                     padding: str = "replicate") -> torch.Tensor:
    """Structure-aware state fusion of (B, D, N, L) states; an empty dilation list returns h as is.
    `padding`: "replicate" (this project, everywhere) or "zeros" (the authors' evaluation: one merged kernel)."""
    if padding not in FUSION_PADDINGS:
        raise ValueError(f"unknown fusion padding {padding!r}; expected one of {FUSION_PADDINGS}")
    if len(dilations) == 0:
        return h
    # in h's dtype even under autocast, which would run the convolutions in bf16 / fp16: the op computes in fp32
    # at least on every backend, so that mixed precision changes only its inputs' and output's rounding
    with torch.autocast(h.device.type, enabled=False):
        return _state_fusion(h, weight.to(h.dtype), alpha.to(h.dtype), dilations, H, W, padding)


def _state_fusion(h, weight, alpha, dilations: Sequence[int], H: int, W: int, padding: str) -> torch.Tensor:
    Bsz, D, N, L = h.shape
    k = weight.shape[-1]
    hm = h.reshape(Bsz, D * N, H, W)  # (B, D, N, L) -> (B, D·N, H, W)
    if padding == "zeros":
        merged = merge_fusion_kernels(weight, alpha, dilations).repeat_interleave(N, dim=0)[:, None]  # (D·N, 1, S, S)
        return F.conv2d(hm, merged, padding=merged.shape[-1] // 2, groups=D * N).reshape(Bsz, D, N, L)
    fused = 0
    for i, d in enumerate(dilations):
        w = weight[i].repeat_interleave(N, dim=0)[:, None]  # (D·N, 1, k, k): one kernel per channel
        padded = replicate_pad(hm, d * (k // 2))
        fused = fused + alpha[i] * F.conv2d(padded, w, dilation=d, groups=D * N)
    return fused.reshape(Bsz, D, N, L)


def observe(h: torch.Tensor, C: torch.Tensor, D: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y_t = Σ_n h_{t,n}·C_{t,n} + D·x_t, (B, D, N, L) states -> (B, D, L) outputs."""
    return (h * C[:, None]).sum(2) + D[None, :, None] * x


def structure_aware_ssm_ref(
    x, dt, A, B, C, D, dt_bias, weight, alpha, dilations: Sequence[int], H: int, W: int, scan: str = "row",
    padding: str = "replicate",
) -> torch.Tensor:
    """The whole op: scan -> structure-aware state fusion -> observation, channels last: x, dt (B, L, D),
    B, C (B, L, N) -> y (B, L, D). `padding` of the fusion as in `state_fusion_ref`.

    Computed in the widest dtype of the inputs, fp32 at least (as the Triton kernels compute), so that a model
    cast to fp16/bf16 with its A kept in fp32 runs on the CPU too; y is returned in x's dtype."""
    tensors = (x, dt, A, B, C, D, dt_bias, weight, alpha)
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)
    out_dtype = x.dtype
    x, dt, A, B, C, D, dt_bias, weight, alpha = (t.to(dtype) for t in tensors)
    x, dt, B, C = (t.transpose(1, 2) for t in (x, dt, B, C))  # (B, L, ·) -> (B, ·, L)
    h = scan_states(x, dt, A, B, dt_bias, H, W, scan)
    h = state_fusion_ref(h, weight, alpha, dilations, H, W, padding)
    return observe(h, C, D, x).transpose(1, 2).to(out_dtype)
