"""Fused structure-aware SSM in Triton: scan -> state fusion -> observation, forward and backward.

    h  = Σ_directions scan(x, Δ = softplus(dt + dt_bias), A, B)            fp32 (B, D, L), the one saved tensor
    h' = Σ_i alpha_i · dwconv_k(replicate_pad(h), dilation d_i)            (h' = h for an empty dilation list)
    y  = h'·C + D·x

Replicate padding is index clamping: tap (a, b) of dilation d at raster position (r, c) reads
h[clamp(r + (a - k//2)·d), clamp(c + (b - k//2)·d)]. Forward = scan kernel(s) + `_fusion_fwd_kernel`;
h' is never stored (the backward recomputes it from h).

Backward, given dy:
  g = dy·C, dC = Σ_channels dy·h', dD = Σ dy·x, dweight_i = alpha_i·G_i, dalpha_i = Σ w_i·G_i with
  G_i[tap] = Σ g·h[tap source]   -> `_fusion_bwd_kernel` (fp32 per-program partial sums, no atomics)
  dh = fusion transposed applied to g. For a position q not on the border the transpose is a gather of g
  at q − offset; a border position also collects every clamped tap that lands on it, i.e. a box sum
  over the rows/columns that clamp onto it -> `_fusion_border_kernel` for border positions only.
  Then the scan backward (triton_scan) with dh, adding D·dy into dx.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .triton_scan import scan_backward, scan_forward

MAX_DILATIONS = 7  # dilations travel packed 8 bits each in one int64 kernel argument
MAX_DILATION = 255


def pack_dilations(dilations: Sequence[int]) -> int:
    packed = 0
    for i, d in enumerate(dilations):
        packed |= int(d) << (8 * i)
    return packed


@triton.jit
def _clamp(v, hi):
    return tl.minimum(tl.maximum(v, 0), hi)


@triton.jit
def _fusion_fwd_kernel(
    h_ptr, x_ptr, C_ptr, Dskip_ptr, w_ptr, alpha_ptr, y_ptr,
    sx_b, sx_d, sx_l, sC_b, sC_l,
    D, L, H, W, dil_packed,
    NDIL: tl.constexpr, KS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """y = fusion(h)·C + D·x on a (BLOCK_D channels × BLOCK_P raster positions) tile."""
    pid_d = tl.program_id(0)
    pid_p = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_d = offs_d < D
    mask_p = offs_p < L
    m = mask_d[:, None] & mask_p[None, :]
    offs_d64 = offs_d.to(tl.int64)
    row = (b * D + offs_d64)[:, None] * L
    hc = tl.load(h_ptr + row + offs_p[None, :], mask=m, other=0.0)
    if NDIL == 0:
        hf = hc
    else:
        r0 = offs_p // W
        c0 = offs_p % W
        hf = tl.zeros([BLOCK_D, BLOCK_P], dtype=tl.float32)
        for k in tl.static_range(NDIL):
            d = (dil_packed >> (8 * k)) & 255
            alpha = tl.load(alpha_ptr + k).to(tl.float32)
            for a in tl.static_range(KS):
                r = _clamp(r0 + (a - KS // 2) * d, H - 1)
                for c in tl.static_range(KS):
                    w = tl.load(w_ptr + ((k * D + offs_d) * KS + a) * KS + c, mask=mask_d, other=0.0)
                    w = w.to(tl.float32) * alpha
                    if a == KS // 2 and c == KS // 2:
                        hv = hc
                    else:
                        src = r * W + _clamp(c0 + (c - KS // 2) * d, W - 1)
                        hv = tl.load(h_ptr + row + src[None, :], mask=m, other=0.0)
                    hf += w[:, None] * hv
    Cv = tl.load(C_ptr + b * sC_b + offs_p * sC_l, mask=mask_p, other=0.0).to(tl.float32)
    xv = tl.load(x_ptr + b * sx_b + offs_d64[:, None] * sx_d + offs_p[None, :] * sx_l, mask=m, other=0.0)
    Dskip = tl.load(Dskip_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    y = hf * Cv[None, :] + Dskip[:, None] * xv.to(tl.float32)
    tl.store(y_ptr + row + offs_p[None, :], y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _fusion_bwd_kernel(
    h_ptr, x_ptr, C_ptr, dy_ptr, w_ptr, alpha_ptr,
    dh_ptr, dC_part_ptr, dD_part_ptr, G_part_ptr,
    sx_b, sx_d, sx_l, sC_b, sC_l, sdy_b, sdy_d, sdy_l,
    Bsz, D, L, H, W, dil_packed, n_pchunks, n_pblk,
    NDIL: tl.constexpr, KS: tl.constexpr, NTAP: tl.constexpr, P_ITERS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Per (channel block, chunk of P_ITERS·BLOCK_P positions, batch): dh at positions off the border,
    and fp32 partial sums of dC (over this block's channels), dD (over this chunk's positions) and G (over
    each BLOCK_P positions)."""
    pid_d = tl.program_id(0)
    pid_p = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_d64 = offs_d.to(tl.int64)
    row = (b * D + offs_d64)[:, None] * L
    x_base = x_ptr + b * sx_b + offs_d64[:, None] * sx_d
    dy_base = dy_ptr + b * sdy_b + offs_d64[:, None] * sdy_d
    C_base = C_ptr + b * sC_b
    acc_dD = tl.zeros([BLOCK_D], dtype=tl.float32)
    for it in range(P_ITERS):
        pblk = pid_p * P_ITERS + it
        offs_p = pblk * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < L
        m = mask_d[:, None] & mask_p[None, :]
        dy = tl.load(dy_base + offs_p[None, :] * sdy_l, mask=m, other=0.0).to(tl.float32)
        xv = tl.load(x_base + offs_p[None, :] * sx_l, mask=m, other=0.0).to(tl.float32)
        Cv = tl.load(C_base + offs_p * sC_l, mask=mask_p, other=0.0).to(tl.float32)
        acc_dD += tl.sum(dy * xv, axis=1)
        g = dy * Cv[None, :]
        hc = tl.load(h_ptr + row + offs_p[None, :], mask=m, other=0.0)
        if NDIL == 0:
            hf = hc
            dh = g
            store_dh = m
        else:
            r0 = offs_p // W
            c0 = offs_p % W
            interior = (r0 > 0) & (r0 < H - 1) & (c0 > 0) & (c0 < W - 1)
            store_dh = m & interior[None, :]
            hf = tl.zeros([BLOCK_D, BLOCK_P], dtype=tl.float32)
            dh = tl.zeros([BLOCK_D, BLOCK_P], dtype=tl.float32)
            for k in tl.static_range(NDIL):
                d = (dil_packed >> (8 * k)) & 255
                alpha = tl.load(alpha_ptr + k).to(tl.float32)
                for a in tl.static_range(KS):
                    for c in tl.static_range(KS):
                        w = tl.load(w_ptr + ((k * D + offs_d) * KS + a) * KS + c, mask=mask_d, other=0.0)
                        w = w.to(tl.float32) * alpha
                        if a == KS // 2 and c == KS // 2:
                            hv = hc
                            gv = g
                        else:
                            dr = (a - KS // 2) * d
                            dc = (c - KS // 2) * d
                            src = _clamp(r0 + dr, H - 1) * W + _clamp(c0 + dc, W - 1)
                            hv = tl.load(h_ptr + row + src[None, :], mask=m, other=0.0)
                            # transpose at interior q: g at q - offset, when that position exists
                            rt = r0 - dr
                            ct = c0 - dc
                            ok = mask_p & (rt >= 0) & (rt < H) & (ct >= 0) & (ct < W)
                            tgt = rt * W + ct
                            Ct = tl.load(C_base + tgt * sC_l, mask=ok, other=0.0).to(tl.float32)
                            dyt = tl.load(dy_base + tgt[None, :] * sdy_l, mask=mask_d[:, None] & ok[None, :],
                                          other=0.0).to(tl.float32)
                            gv = dyt * Ct[None, :]
                        hf += w[:, None] * hv
                        dh += w[:, None] * gv
                        tap = (k * KS + a) * KS + c
                        G_ptrs = G_part_ptr + ((b * n_pblk + pblk) * NTAP + tap) * D + offs_d
                        tl.store(G_ptrs, tl.sum(g * hv, axis=1), mask=mask_d)
        tl.store(dh_ptr + row + offs_p[None, :], dh, mask=store_dh)
        tl.store(dC_part_ptr + (pid_d * Bsz + b) * L + offs_p, tl.sum(dy * hf, axis=0), mask=mask_p)
    part = (b * n_pchunks + pid_p)
    tl.store(dD_part_ptr + part * D + offs_d, acc_dD, mask=mask_d)


@triton.jit
def _box_range(q, s, N):
    """Rows (or columns) i' in [lo, hi] with clamp(i' + s) == q, for a border-aware transpose."""
    lo = tl.where(q == 0, 0, q - s)
    hi = tl.where(q == N - 1, N - 1, q - s)
    return tl.maximum(lo, 0), tl.minimum(hi, N - 1)


@triton.jit
def _fusion_border_kernel(
    C_ptr, dy_ptr, w_ptr, alpha_ptr, dh_ptr,
    sC_b, sC_l, sdy_b, sdy_d, sdy_l,
    D, L, H, W, dil_packed, count,
    KIND: tl.constexpr, NDIL: tl.constexpr, KS: tl.constexpr, NBOX: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dh at border positions: KIND 0 corners, 1 top/bottom rows, 2 left/right columns (corners excluded).
    Each tap contributes w·Σ g over the box of positions that clamp onto the border position; the box
    (at most NBOX rows, or columns, or NBOX×NBOX for corners) is a third tile axis, summed at once."""
    pid_d = tl.program_id(0)
    pid_e = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_d64 = offs_d.to(tl.int64)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = e < count
    if KIND == 0:
        q_r = tl.where(e >= 2, H - 1, 0)
        q_c = tl.where((e % 2) == 1, W - 1, 0)
        box = tl.arange(0, NBOX * NBOX)
        er = box // NBOX
        ec = box % NBOX
    elif KIND == 1:
        q_r = tl.where(e >= W - 2, H - 1, 0)
        q_c = 1 + e % tl.maximum(W - 2, 1)
        er = tl.arange(0, NBOX)
        ec = tl.zeros([NBOX], dtype=tl.int32)
    else:
        q_r = 1 + e % tl.maximum(H - 2, 1)
        q_c = tl.where(e >= H - 2, W - 1, 0)
        er = tl.zeros([NBOX], dtype=tl.int32)
        ec = tl.arange(0, NBOX)
    dy_base = dy_ptr + b * sdy_b + offs_d64[:, None, None] * sdy_d
    C_base = C_ptr + b * sC_b
    dh = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)
    for k in tl.static_range(NDIL):
        d = (dil_packed >> (8 * k)) & 255
        alpha = tl.load(alpha_ptr + k).to(tl.float32)
        for a in tl.static_range(KS):
            lo_r, hi_r = _box_range(q_r, (a - KS // 2) * d, H)
            rr = lo_r[:, None] + er[None, :]  # (BLOCK_E, box)
            for c in tl.static_range(KS):
                lo_c, hi_c = _box_range(q_c, (c - KS // 2) * d, W)
                cc = lo_c[:, None] + ec[None, :]
                ok = mask_e[:, None] & (rr <= hi_r[:, None]) & (cc <= hi_c[:, None])
                src = rr * W + cc
                Cv = tl.load(C_base + src * sC_l, mask=ok, other=0.0).to(tl.float32)
                dyv = tl.load(dy_base + src[None, :, :] * sdy_l, mask=mask_d[:, None, None] & ok[None, :, :],
                              other=0.0).to(tl.float32)
                w = tl.load(w_ptr + ((k * D + offs_d) * KS + a) * KS + c, mask=mask_d, other=0.0)
                dh += (w.to(tl.float32) * alpha)[:, None] * tl.sum(dyv * Cv[None, :, :], axis=2)
    pos = q_r * W + q_c
    tl.store(dh_ptr + (b * D + offs_d64)[:, None] * L + pos[None, :], dh, mask=mask_d[:, None] & mask_e[None, :])


# ----------------------------------------------------------------------------------------------------
# launchers (no checks: ops.py checks shapes, dtypes and devices first)


MAX_BLOCK_P = 256  # positions per fusion tile (tests lower it to exercise several tiles on small maps)


def _fusion_blocks(D: int, L: int) -> tuple[int, int]:
    BLOCK_P = min(MAX_BLOCK_P, max(16, triton.next_power_of_2(L)))
    BLOCK_D = min(8, max(2, triton.next_power_of_2(D)))
    return BLOCK_D, BLOCK_P


def fused_forward(x, dt, A, B, C, D, dt_bias, weight, alpha, dilations, H: int, W: int, directions):
    """(y in x's dtype, fp32 states h) — h is what the backward needs."""
    Bsz, Dm, L = x.shape
    h = scan_forward(x, dt, A, B, dt_bias, H, W, directions)
    y = torch.empty(Bsz, Dm, L, device=x.device, dtype=x.dtype)
    BLOCK_D, BLOCK_P = _fusion_blocks(Dm, L)
    grid = (triton.cdiv(Dm, BLOCK_D), triton.cdiv(L, BLOCK_P), Bsz)
    _fusion_fwd_kernel[grid](
        h, x, C, D, weight, alpha, y,
        x.stride(0), x.stride(1), x.stride(2), C.stride(0), C.stride(2),
        Dm, L, H, W, pack_dilations(dilations),
        NDIL=len(dilations), KS=weight.shape[-1], BLOCK_D=BLOCK_D, BLOCK_P=BLOCK_P, num_warps=4,
    )
    return y, h


def fused_backward(dy, x, dt, A, B, C, D, dt_bias, weight, alpha, h, dilations, H: int, W: int, directions):
    """Gradients (dx, ddt, dA, dB, dC, dD, d_dt_bias, dweight, dalpha)."""
    Bsz, Dm, L = x.shape
    K, KS = len(dilations), weight.shape[-1]
    dev = x.device
    BLOCK_D, BLOCK_P = _fusion_blocks(Dm, L)
    n_dblk = triton.cdiv(Dm, BLOCK_D)
    n_pblk = triton.cdiv(L, BLOCK_P)
    P_ITERS = min(4, n_pblk)
    n_pchunks = triton.cdiv(n_pblk, P_ITERS)
    NTAP = K * KS * KS
    dh = torch.empty(Bsz, Dm, L, device=dev, dtype=torch.float32)
    dC_part = torch.empty(n_dblk, Bsz, L, device=dev, dtype=torch.float32)
    dD_part = torch.empty(Bsz, n_pchunks, Dm, device=dev, dtype=torch.float32)
    G_part = torch.empty(Bsz, n_pchunks * P_ITERS, max(NTAP, 1), Dm, device=dev, dtype=torch.float32)
    packed = pack_dilations(dilations)
    _fusion_bwd_kernel[(n_dblk, n_pchunks, Bsz)](
        h, x, C, dy, weight, alpha,
        dh, dC_part, dD_part, G_part,
        x.stride(0), x.stride(1), x.stride(2), C.stride(0), C.stride(2), dy.stride(0), dy.stride(1), dy.stride(2),
        Bsz, Dm, L, H, W, packed, n_pchunks, n_pchunks * P_ITERS,
        NDIL=K, KS=KS, NTAP=NTAP, P_ITERS=P_ITERS, BLOCK_D=BLOCK_D, BLOCK_P=BLOCK_P, num_warps=4,
    )
    if K:
        # a box is at most (k//2)·max(d) + 1 positions along a clamped axis, and never more than the map
        NBOX = triton.next_power_of_2(min(max(H, W), (KS // 2) * max(dilations) + 1))
        counts = (4, 2 * max(W - 2, 0), 2 * max(H - 2, 0))  # corners, top/bottom rows, left/right columns
        for kind, count in enumerate(counts):
            if count == 0:
                continue
            BLOCK_E = 4 if kind == 0 else 32
            _fusion_border_kernel[(n_dblk, triton.cdiv(count, BLOCK_E), Bsz)](
                C, dy, weight, alpha, dh,
                C.stride(0), C.stride(2), dy.stride(0), dy.stride(1), dy.stride(2),
                Dm, L, H, W, packed, count,
                KIND=kind, NDIL=K, KS=KS, NBOX=NBOX, BLOCK_D=BLOCK_D, BLOCK_E=BLOCK_E, num_warps=4,
            )
    dx, ddt, dA, dB, dbias = scan_backward(x, dt, A, B, dt_bias, h, dh, H, W, directions, dy=dy, D_skip=D)
    dC = dC_part.sum(0)[:, None, :].to(C.dtype)  # (n_dblk, B, L) -> (B, 1, L)
    dD = dD_part.sum((0, 1)).to(D.dtype)
    if K:
        G = G_part.sum((0, 1)).view(K, KS, KS, Dm).permute(0, 3, 1, 2)  # (K, D, k, k)
        dweight = (alpha.float()[:, None, None, None] * G).to(weight.dtype)
        dalpha = (weight.float() * G).sum((1, 2, 3)).to(alpha.dtype)
    else:
        dweight, dalpha = torch.zeros_like(weight), torch.zeros_like(alpha)
    return dx, ddt, dA, dB, dC, dD, dbias, dweight, dalpha


def structure_aware_ssm_fused(
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
    """One op (`spatial_mamba::structure_aware_ssm_fused`): scan -> fusion -> observation, y (B, D, L)
    in x's dtype. Shapes and checks as in `ops.check_inputs`."""
    from . import ops

    ops.check_inputs(x, dt, A, B, C, D, dt_bias, weight, alpha, dilations, H, W, scan, fused=True)
    return ops.structure_aware_ssm_fused_op(x, dt, A, B, C, D, dt_bias, weight, alpha, list(dilations), H, W, scan)[0]


__all__ = ["fused_backward", "fused_forward", "structure_aware_ssm_fused"]
