"""Triton selective scan with state size 1: h_t = exp(Δ_t·A)·h_{t-1} + Δ_t·B_t·x_t, Δ = softplus(dt + dt_bias).

Every kernel here works on a (BLOCK_D channels × BLOCK_L steps) tile of one batch element and walks the
whole sequence, carrying the last state of each tile into the next (`tl.associative_scan` inside a tile),
all in fp32 whatever the input dtype. Scan directions are index arithmetic on the step t -> raster
position (`_raster`), never permuted copies. The backward walks the tiles from the last and scans each
ascending-loaded tile with `reverse=True` (descending index ranges defeat coalescing and vector loads; the
tests check the reverse scan against the reference), using the forward states of that direction.

Activations (x, dt, B) are read through their strides (any layout, no copies); states, state gradients
and everything the wrappers allocate are contiguous (B, D, L).

Public: `structure_aware_ssm_triton` (this scan + the plain-torch fusion and observation of reference.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .reference import SCANS

DIRECTION_FLAGS = {  # direction -> (REVERSED, COLUMN)
    "row": (False, False),
    "row_reversed": (True, False),
    "column": (False, True),
    "column_reversed": (True, True),
}


@triton.jit
def _softplus(v):
    """softplus with PyTorch's threshold 20; log1p(e) = log(1+e)·e/((1+e)-1) keeps tiny Δ accurate."""
    e = tl.exp(-tl.abs(v))
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    return tl.where(v > 20.0, v, tl.maximum(v, 0.0) + log1p)


@triton.jit
def _softplus_grad(v):
    return tl.where(v > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-v)))


@triton.jit
def _raster(t, L, H, W, REVERSED: tl.constexpr, COLUMN: tl.constexpr):
    """Raster position of scan step t (row: t; column: visits (0,0), (1,0), ... down each column)."""
    if REVERSED:
        t = L - 1 - t
    if COLUMN:
        t = (t % H) * W + t // H
    return t


@triton.jit
def _first_order(a1, b1, a2, b2):
    """Compose h -> a1·h + b1 then h -> a2·h + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _last_column(v, BLOCK_L: tl.constexpr):
    cols = tl.arange(0, BLOCK_L)
    return tl.sum(tl.where(cols[None, :] == BLOCK_L - 1, v, 0.0), axis=1)


@triton.jit
def _first_column(v, BLOCK_L: tl.constexpr):
    cols = tl.arange(0, BLOCK_L)
    return tl.sum(tl.where(cols[None, :] == 0, v, 0.0), axis=1)


@triton.jit
def _scan_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, bias_ptr, h_ptr,
    sx_b, sx_d, sx_l, sdt_b, sdt_d, sdt_l, sB_b, sB_l,
    D, L, H, W,
    REVERSED: tl.constexpr, COLUMN: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """States of one direction, written (or added, ACCUMULATE) at raster positions into fp32 h (B, D, L)."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    A = tl.load(A_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    x_base = x_ptr + b * sx_b + offs_d.to(tl.int64)[:, None] * sx_d
    dt_base = dt_ptr + b * sdt_b + offs_d.to(tl.int64)[:, None] * sdt_d
    h_base = h_ptr + (b * D + offs_d.to(tl.int64))[:, None] * L
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, L, BLOCK_L):
        t = start + tl.arange(0, BLOCK_L)
        mask_l = t < L
        pos = _raster(t, L, H, W, REVERSED, COLUMN)
        m = mask_d[:, None] & mask_l[None, :]
        xv = tl.load(x_base + pos[None, :] * sx_l, mask=m, other=0.0).to(tl.float32)
        dtv = tl.load(dt_base + pos[None, :] * sdt_l, mask=m, other=0.0).to(tl.float32)
        Bv = tl.load(B_ptr + b * sB_b + pos * sB_l, mask=mask_l, other=0.0).to(tl.float32)
        delta = _softplus(dtv + bias[:, None])
        decay = tl.where(m, tl.exp(delta * A[:, None]), 1.0)
        u = delta * xv * Bv[None, :]
        a_s, h_s = tl.associative_scan((decay, u), axis=1, combine_fn=_first_order)
        h = h_s + a_s * carry[:, None]
        carry = _last_column(h, BLOCK_L)  # this direction's state carries into the next tile
        h_ptrs = h_base + pos[None, :]
        if ACCUMULATE:
            h += tl.load(h_ptrs, mask=m, other=0.0)
        tl.store(h_ptrs, h, mask=m)


@triton.jit
def _scan_bwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, bias_ptr, h_ptr, dh_ptr, dy_ptr, Dskip_ptr,
    dx_ptr, ddt_ptr, dB_part_ptr, dA_part_ptr, dbias_part_ptr,
    sx_b, sx_d, sx_l, sdt_b, sdt_d, sdt_l, sB_b, sB_l, sdy_b, sdy_d, sdy_l,
    Bsz, D, L, H, W,
    REVERSED: tl.constexpr, COLUMN: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_DY: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Gradients of one direction's scan given dh (fp32, raster positions) and its states h (fp32).

    Reverse recurrence in scan order: g_t = dh_t + exp(dA_{t+1})·g_{t+1}; then with Δ, dA = Δ·A, u = Δ·B·x:
    d(dA_t) = g_t·exp(dA_t)·h_{t-1}, dx = g·Δ·B (+ D·dy), dΔ = d(dA)·A + g·B·x, ddt = dΔ·softplus'(dt+bias);
    dB (summed over this tile's channels), dA and d(dt_bias) (summed over steps) go to fp32 partial buffers."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    A = tl.load(A_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    offs_d64 = offs_d.to(tl.int64)
    x_base = x_ptr + b * sx_b + offs_d64[:, None] * sx_d
    dt_base = dt_ptr + b * sdt_b + offs_d64[:, None] * sdt_d
    row = (b * D + offs_d64)[:, None] * L  # contiguous (B, D, L) buffers
    if HAS_DY:
        Dskip = tl.load(Dskip_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        dy_base = dy_ptr + b * sdy_b + offs_d64[:, None] * sdy_d
    dB_base = dB_part_ptr + (pid_d * Bsz + b) * L
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_dA = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_dbias = tl.zeros([BLOCK_D], dtype=tl.float32)
    n_tiles = tl.cdiv(L, BLOCK_L)
    for i in range(0, n_tiles):
        t = (n_tiles - 1 - i) * BLOCK_L + tl.arange(0, BLOCK_L)  # tiles from the last, ascending inside
        mask_l = t < L
        m = mask_d[:, None] & mask_l[None, :]
        pos = _raster(t, L, H, W, REVERSED, COLUMN)
        # decay of the following step t+1, which carries g_{t+1} back to step t
        m_next = m & (t[None, :] + 1 < L)
        pos_next = _raster(t + 1, L, H, W, REVERSED, COLUMN)
        dt_next = tl.load(dt_base + pos_next[None, :] * sdt_l, mask=m_next, other=0.0).to(tl.float32)
        decay_next = tl.where(m_next, tl.exp(_softplus(dt_next + bias[:, None]) * A[:, None]), 0.0)
        dh = tl.load(dh_ptr + row + pos[None, :], mask=m, other=0.0)
        # suffix scan (flip, scan with the same combine, flip back): g_t = dh_t + decay_{t+1}·g_{t+1}
        g_a, g_b = tl.associative_scan((decay_next, dh), axis=1, combine_fn=_first_order, reverse=True)
        g = g_b + g_a * carry[:, None]
        carry = _first_column(g, BLOCK_L)

        m_prev = m & (t[None, :] >= 1)
        pos_prev = _raster(t - 1, L, H, W, REVERSED, COLUMN)
        h_prev = tl.load(h_ptr + row + pos_prev[None, :], mask=m_prev, other=0.0)
        xv = tl.load(x_base + pos[None, :] * sx_l, mask=m, other=0.0).to(tl.float32)
        v = tl.load(dt_base + pos[None, :] * sdt_l, mask=m, other=0.0).to(tl.float32) + bias[:, None]
        Bv = tl.load(B_ptr + b * sB_b + pos * sB_l, mask=mask_l, other=0.0).to(tl.float32)
        delta = _softplus(v)
        d_dA = g * tl.exp(delta * A[:, None]) * h_prev
        dx = g * delta * Bv[None, :]
        if HAS_DY:
            dx += Dskip[:, None] * tl.load(dy_base + pos[None, :] * sdy_l, mask=m, other=0.0).to(tl.float32)
        d_delta = d_dA * A[:, None] + g * Bv[None, :] * xv
        ddt = tl.where(m, d_delta * _softplus_grad(v), 0.0)
        dB = tl.sum(g * delta * xv, axis=0)
        acc_dA += tl.sum(d_dA * delta, axis=1)
        acc_dbias += tl.sum(ddt, axis=1)

        out = row + pos[None, :]
        if ACCUMULATE:
            dx += tl.load(dx_ptr + out, mask=m, other=0.0).to(tl.float32)
            ddt += tl.load(ddt_ptr + out, mask=m, other=0.0).to(tl.float32)
            dB += tl.load(dB_base + pos, mask=mask_l, other=0.0)
        tl.store(dx_ptr + out, dx.to(dx_ptr.dtype.element_ty), mask=m)
        tl.store(ddt_ptr + out, ddt.to(ddt_ptr.dtype.element_ty), mask=m)
        tl.store(dB_base + pos, dB, mask=mask_l)

    part = b * D + offs_d
    if ACCUMULATE:
        acc_dA += tl.load(dA_part_ptr + part, mask=mask_d, other=0.0)
        acc_dbias += tl.load(dbias_part_ptr + part, mask=mask_d, other=0.0)
    tl.store(dA_part_ptr + part, acc_dA, mask=mask_d)
    tl.store(dbias_part_ptr + part, acc_dbias, mask=mask_d)


# ----------------------------------------------------------------------------------------------------
# launchers (no checks: the public functions in ops.py check shapes, dtypes and devices first)


MAX_BLOCK_L = 512  # steps per tile (tests lower it to exercise the carry between tiles on small maps)


def _blocks(D: int, L: int) -> tuple[int, int]:
    BLOCK_L = min(MAX_BLOCK_L, max(16, triton.next_power_of_2(L)))
    BLOCK_D = min(8 if BLOCK_L >= 256 else 16, max(2, triton.next_power_of_2(D)))
    return BLOCK_D, BLOCK_L


def scan_forward(x, dt, A, B, dt_bias, H: int, W: int, directions: Sequence[str], out=None) -> torch.Tensor:
    """fp32 states (B, D, L), summed over `directions`; x, dt (B, D, L) and B (B, 1, L) any strides."""
    Bsz, D, L = x.shape
    h = torch.empty(Bsz, D, L, device=x.device, dtype=torch.float32) if out is None else out
    BLOCK_D, BLOCK_L = _blocks(D, L)
    grid = (triton.cdiv(D, BLOCK_D), Bsz)
    for i, direction in enumerate(directions):
        reversed_, column = DIRECTION_FLAGS[direction]
        _scan_fwd_kernel[grid](
            x, dt, A, B, dt_bias, h,
            x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1), dt.stride(2),
            B.stride(0), B.stride(2),
            D, L, H, W,
            REVERSED=reversed_, COLUMN=column, ACCUMULATE=i > 0,
            BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L, num_warps=4,
        )
    return h


def scan_backward(x, dt, A, B, dt_bias, h, dh, H: int, W: int, directions: Sequence[str], dy=None, D_skip=None):
    """Gradients (dx, ddt, dA, dB, d_dt_bias) of the summed-direction scan given dh (B, D, L) fp32.

    `h` holds the states of the single direction when len(directions) == 1; for several directions each
    direction's states are recomputed into a scratch buffer. With `dy`, dx also gets D_skip·dy."""
    Bsz, D, L = x.shape
    BLOCK_D, BLOCK_L = _blocks(D, L)
    n_dblk = triton.cdiv(D, BLOCK_D)
    several = len(directions) > 1
    acc_dtype = torch.float32 if several else x.dtype
    dx = torch.empty(Bsz, D, L, device=x.device, dtype=acc_dtype)
    ddt = torch.empty(Bsz, D, L, device=x.device, dtype=acc_dtype)
    dB_part = torch.empty(n_dblk, Bsz, L, device=x.device, dtype=torch.float32)
    dA_part = torch.empty(Bsz, D, device=x.device, dtype=torch.float32)
    dbias_part = torch.empty(Bsz, D, device=x.device, dtype=torch.float32)
    dh = dh.contiguous()
    states = torch.empty_like(dh) if several else h
    has_dy = dy is not None
    if not has_dy:
        dy, D_skip = dh, A  # placeholders, never read
    for i, direction in enumerate(directions):
        if several:
            scan_forward(x, dt, A, B, dt_bias, H, W, (direction,), out=states)
        reversed_, column = DIRECTION_FLAGS[direction]
        _scan_bwd_kernel[(n_dblk, Bsz)](
            x, dt, A, B, dt_bias, states, dh, dy, D_skip,
            dx, ddt, dB_part, dA_part, dbias_part,
            x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1), dt.stride(2),
            B.stride(0), B.stride(2), dy.stride(0), dy.stride(1), dy.stride(2),
            Bsz, D, L, H, W,
            REVERSED=reversed_, COLUMN=column, ACCUMULATE=i > 0, HAS_DY=has_dy and i == 0,
            BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L, num_warps=4,
        )
    dB = dB_part.sum(0)[:, None, :].to(B.dtype)  # (n_dblk, B, L) -> (B, 1, L)
    dA = dA_part.sum(0)[:, None].to(A.dtype)  # (B, D) -> (D, 1)
    dbias = dbias_part.sum(0).to(dt_bias.dtype)
    return dx.to(x.dtype), ddt.to(dt.dtype), dA, dB, dbias


def structure_aware_ssm_triton(
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
) -> torch.Tensor:
    """Triton scan (op `spatial_mamba::selective_scan`, fp32 states) + the reference's torch fusion and
    observation. Returns y (B, D, L) in x's dtype. Shapes and checks as in `ops.check_inputs`."""
    from . import ops
    from .reference import observe, state_fusion_ref

    ops.check_inputs(x, dt, A, B, C, D, dt_bias, weight, alpha, dilations, H, W, scan)
    h = ops.selective_scan(x, dt, A, B, dt_bias, H, W, scan)[:, :, None]  # (B, D, L) -> (B, D, 1, L)
    h = state_fusion_ref(h, weight.float(), alpha.float(), dilations, H, W)
    return observe(h, C.float(), D.float(), x.float()).to(x.dtype)


__all__ = ["SCANS", "scan_backward", "scan_forward", "structure_aware_ssm_triton"]
