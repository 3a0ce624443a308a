"""Structure-aware state fusion + observation in Triton, forward and backward (channels last).

    h  = Σ_directions scan(x, Δ = softplus(dt + dt_bias), A, B)     (B, L, D), kept for backward
    h' = Σ_i alpha_i · dwconv_k(replicate_pad(h), dilation d_i)      (h' = h for an empty dilation list), kept too
    y  = h'·C + D·x

Tiles: a program owns (a band of rows) × (BLOCK_C columns) × (BLOCK_D channels) of one image and walks its
rows. At row r a tap (dr, dc) reads the contiguous channel vectors of h at row clamp(r + dr) — one scalar
per row — and columns clamp(c + dc), so the replicate clamp costs a few integer operations per position
and tap, shared by BLOCK_D channels, and every load is a contiguous (16-byte) vector. The rows a program
walks overlap in their taps, so most of them come from the L1/L2 caches. The centre taps of all dilations
read the same element and are merged into one weight (`_mixed_weights`, one small kernel).

The forward also stores h' itself for the backward (not where none can follow: no gradients wanted, in eager
calls and traced graphs alike): the backward's dC needs h' at every position, and recomputing it there took a
weighted gather of h per tap.

Backward, given dy, in kernel order:
  parameter kernel (`_fusion_bwd_param_kernel`): g = dy·C, written once (state dtype) for the dh kernel;
       dC = Σ_channels dy·h' from the stored h', per channel block partials; and the weight gradient's
       G[tap] = Σ_p g[p]·h[tap source of p] from one gather of h per tap, per-program fp32 partials. One pass over
       the program's rows per dilation, each holding that dilation's KS² accumulator tiles only, reduced and
       stored at its end (the later passes find the rows in the L1/L2 caches).
  `_weight_grad_kernel`: G summed over the partials in fp64 in a fixed order; dweight_i[tap] = alpha_i·G[tap]
       and dalpha_i = Σ w_i·G (fp64: it often cancels).
  `_fusion_edge_kernel`: per row and column offset s = m·d of a tap, the sums of g over the columns [0, s) and
       [W−s, W) (fp32, a few vectors per row): what the replicate clamp folds onto column 0 and column W−1.
  dh kernel (`_fusion_bwd_state_kernel`): the fusion transposed applied to g. Tap (dr, dc) sends g at p to dh
       at clamp(p + (dr, dc)); so dh at q gathers g over the positions p with clamp(p + offset) = q: one
       position q − offset inside the map (zero outside it: the gather over the zero-padded domain), plus, on
       the border rows and columns, the positions whose shifted index was clamped onto q — the halo folded
       back. Rows: a scalar box [lo, hi] per row and tap (`_box_range`, more than one row only on the first
       and last row). Columns: the shifted gather, plus for column 0 (tap dc < 0) the sum of g over columns
       [0, −dc) and for column W−1 (dc > 0) over [W−dc, W): one load of the edge kernel's sums per tap, added
       at that column once per row (only in the tiles holding those columns). One load per tap (g precomputed),
       no per-element clamps, no separate border launches. Its 128- and 256-channel tiles load each tap's
       weights as a (BLOCK_C, BLOCK_D) tile in g's layout (`W2D`), not as a channel vector that the compiler
       would move through shared memory onto g's layout at every tap and row.
  Then the scan backward (triton_scan) with dh, which also adds D·dy into dx and returns dD = Σ dy·x.
Nothing uses atomics: the op gives the same bits on every run.

Block sizes: a few candidate tiles per kernel; the first call for a shape times them and keeps the fastest,
on disk too (`tuning.pick_config`), so later processes do not time or compile the others again (on Hopper, with
16-bit inputs, the tiles measured there are used untimed: `tuning.MEASURED_PICKS`). Launch
geometry is cached per shape: a forward+backward costs the host well under a millisecond.
"""

from __future__ import annotations

from collections.abc import Sequence

import functools

import torch
import triton
import triton.language as tl

from . import ahead
from .ahead import cdiv, launch
from .triton_scan import _num_sms, column_sums, scan_backward, scan_forward, state_dtype, triton_interpreted
from .tuning import pick_config

MAX_DILATIONS = 7  # dilations travel packed 8 bits each in one int64 kernel argument
MAX_DILATION = 255
# integer arguments that take many values but need no specialisation (Triton otherwise compiles a variant
# per "divisible by 16" / "equal to 1" pattern of each): map sizes, tile counts, packed dilations
_SHAPE_ARGS = ["H", "W", "n_ctiles", "rows", "dil_packed"]


def pack_dilations(dilations: Sequence[int]) -> int:
    packed = 0
    for i, d in enumerate(dilations):
        packed |= int(d) << (8 * i)
    return packed


@triton.jit
def _clamp(v, hi):
    return tl.minimum(tl.maximum(v, 0), hi)


@triton.jit
def _box_range(q, s, N):
    """Indices i in [lo, hi] with clamp(i + s, 0, N−1) == q (lo > hi: none), for row or column q."""
    lo = tl.where(q == 0, 0, q - s)
    hi = tl.where(q == N - 1, N - 1, q - s)
    return tl.maximum(lo, 0), tl.minimum(hi, N - 1)


@triton.jit
def _fused_states(h_base, wa_ptr, offs_d, mask_d, m, r, cols, D, H, W, dil_packed,
                  NDIL: tl.constexpr, KS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, WV,
                  HOISTED: tl.constexpr):
    """h' at row r, columns `cols`: Σ_taps wa[tap]·h[clamp(r + dr), clamp(cols + dc)], a (BLOCK_C, BLOCK_D)
    fp32 tile (h itself for an empty dilation list). HOISTED: the taps' weights are the tuple WV
    (`_tap_weights`, loaded once by the caller), else loaded here, at every row."""
    if NDIL == 0:
        hf = tl.load(h_base + (r * W + cols)[:, None] * D, mask=m, other=0.0).to(tl.float32)
    else:
        hf = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(NDIL):
            d = (dil_packed >> (8 * k)) & 255
            for a in tl.static_range(KS):
                src_row = _clamp(r + (a - KS // 2) * d, H - 1) * W
                for c in tl.static_range(KS):
                    if k == 0 or a != KS // 2 or c != KS // 2:  # later centre taps are merged into k = 0's
                        src = src_row + _clamp(cols + (c - KS // 2) * d, W - 1)
                        hv = tl.load(h_base + src[:, None] * D, mask=m, other=0.0).to(tl.float32)
                        if HOISTED:
                            w = WV[(k * KS + a) * KS + c]
                        else:
                            w = tl.load(wa_ptr + ((k * KS + a) * KS + c) * D + offs_d, mask=mask_d, other=0.0)
                        hf += w[None, :] * hv
    return hf


@triton.jit
def _tap_weights(wa_ptr, offs_d, mask_d, D, NDIL: tl.constexpr, KS: tl.constexpr):
    """Every tap's mixed weights for the channels offs_d: a tuple of NDIL·KS² (BLOCK_D,) fp32 vectors, indexed
    as `wa`'s rows (the later dilations' centre rows are loaded too, and never used)."""
    WV = ()
    for t in tl.static_range(NDIL * KS * KS):
        WV = WV + (tl.load(wa_ptr + t * D + offs_d, mask=mask_d, other=0.0),)
    return WV


@triton.jit
def _program_tile(n_ctiles, W, D, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (program index over positions, column tile, row band, channel block, image, columns,
    their mask, channels, their mask, the tile's mask): grid (row bands × column tiles, channel blocks, B)."""
    pid = tl.program_id(0)
    ct = pid % n_ctiles
    pid_d = tl.program_id(1)
    cols = ct * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < W
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    m = mask_c[:, None] & mask_d[None, :]
    return pid, ct, pid // n_ctiles, pid_d, tl.program_id(2).to(tl.int64), cols, mask_c, offs_d, mask_d, m


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _fusion_fwd_kernel(
    h_ptr, x_ptr, C_ptr, Dskip_ptr, wa_ptr, y_ptr, hf_ptr,
    sx_b, sx_l, sx_d, sC_b, sC_l,
    D, H, W, dil_packed, n_ctiles, rows,
    NDIL: tl.constexpr, KS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, HOISTED: tl.constexpr,
    STORE_HF: tl.constexpr,
):
    """y = h'·C + D·x for `rows` rows × BLOCK_C columns × BLOCK_D channels of image b; STORE_HF: h' itself too
    (contiguous (B, L, D), the state dtype), for the backward's dC. HOISTED: every tap's weights loaded once,
    before the row loop, instead of at every row (Triton does not hoist loop-invariant loads; 26 of the 53 loads
    a row at three 3×3 dilations were these)."""
    pid, ct, band, pid_d, b, cols, mask_c, offs_d, mask_d, m = _program_tile(n_ctiles, W, D, BLOCK_C, BLOCK_D)
    L = H * W
    h_base = h_ptr + b * L * D + offs_d[None, :]
    x_base = x_ptr + b * sx_b + offs_d[None, :] * sx_d
    y_base = y_ptr + b * L * D + offs_d[None, :]
    Dskip = tl.load(Dskip_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    WV = ()
    if HOISTED:
        WV = _tap_weights(wa_ptr, offs_d, mask_d, D, NDIL, KS)
    r0 = band * rows
    for r in range(r0, tl.minimum(r0 + rows, H)):
        pos = r * W + cols
        hf = _fused_states(h_base, wa_ptr, offs_d, mask_d, m, r, cols, D, H, W, dil_packed, NDIL, KS, BLOCK_C,
                           BLOCK_D, WV, HOISTED)
        Cv = tl.load(C_ptr + b * sC_b + pos * sC_l, mask=mask_c, other=0.0).to(tl.float32)
        xv = tl.load(x_base + pos[:, None] * sx_l, mask=m, other=0.0).to(tl.float32)
        y = hf * Cv[:, None] + Dskip[None, :] * xv
        tl.store(y_base + pos[:, None] * D, y.to(y_ptr.dtype.element_ty), mask=m)
        if STORE_HF:
            tl.store(hf_ptr + b * L * D + pos[:, None] * D + offs_d[None, :], hf.to(hf_ptr.dtype.element_ty), mask=m)


@triton.jit
def _g_tile(g_base, D, p, ok, mask_d):
    """g at raster positions p (zero where not ok), a (BLOCK_C, BLOCK_D) fp32 tile."""
    return tl.load(g_base + p[:, None] * D, mask=ok[:, None] & mask_d[None, :], other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["H", "W", "dil_packed"])
def _fusion_edge_kernel(g_ptr, el_ptr, er_ptr, D, H, W, dil_packed,
                        NDIL: tl.constexpr, KS: tl.constexpr, BLOCK_D: tl.constexpr):
    """For row `row` of image b and each column offset s = m·d_k (m = 1 … KS // 2) of a tap: the sums of g over
    the columns that the replicate clamp of offset −s moves onto column 0 (EL: columns [0, min(s, W))) and of +s
    onto column W − 1 (ER: the last min(s, W) columns), fp32, (B, H, NDIL·(KS // 2), D). The dh kernel's column
    folds then cost one vector load per tap instead of a loop over s columns. Grid (H, channel blocks, B)."""
    row = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    b = tl.program_id(2).to(tl.int64)
    P: tl.constexpr = KS // 2
    g_row = g_ptr + (b * H + row) * W * D + offs_d
    out = (b * H + row) * (NDIL * P) * D + offs_d
    for k in tl.static_range(NDIL):
        d = (dil_packed >> (8 * k)) & 255
        left = tl.zeros([BLOCK_D], dtype=tl.float32)
        right = tl.zeros([BLOCK_D], dtype=tl.float32)
        done = 0
        for m in tl.static_range(1, P + 1):  # the sums grow outward from each edge: s = d, 2d, ... reuse them
            n = tl.minimum(m * d, W)
            for j in range(done, n):
                left += tl.load(g_row + j * D, mask=mask_d, other=0.0).to(tl.float32)
                right += tl.load(g_row + (W - 1 - j) * D, mask=mask_d, other=0.0).to(tl.float32)
            done = n
            tl.store(el_ptr + out + (k * P + m - 1) * D, left, mask=mask_d)
            tl.store(er_ptr + out + (k * P + m - 1) * D, right, mask=mask_d)


@triton.jit
def _edge_vector(el_ptr, er_ptr, bH, row, D, offs_d, mask_d, left, right, KP: tl.constexpr, COL_STEP: tl.constexpr,
                 NS: tl.constexpr):
    """The precomputed column fold (`_fusion_edge_kernel`) of source row `row` for the tap of column offset
    COL_STEP·d_k (KP = k·(KS // 2); bH = b·H, int64): EL's sum for COL_STEP < 0 in a tile holding column 0,
    ER's for COL_STEP > 0 in one holding column W − 1, zero otherwise; a (BLOCK_D,) fp32 vector."""
    if COL_STEP < 0:
        v = tl.load(el_ptr + ((bH + row) * NS + KP - COL_STEP - 1) * D + offs_d, mask=mask_d & left, other=0.0)
    else:
        v = tl.load(er_ptr + ((bH + row) * NS + KP + COL_STEP - 1) * D + offs_d, mask=mask_d & right, other=0.0)
    return v


@triton.jit
def _weight_tile(wa_ptr, tap, D, offs_d, mask_d, w_offs, W2D: tl.constexpr):
    """Tap `tap`'s mixed weights for the channels offs_d, ready to multiply a (BLOCK_C, BLOCK_D) tile: loaded
    as that tile (W2D; w_offs: offs_d in every row) or as a (BLOCK_D,) vector broadcast over the columns."""
    if W2D:
        w = tl.load(wa_ptr + tap * D + w_offs, mask=w_offs < D, other=0.0)
    else:
        w = tl.load(wa_ptr + tap * D + offs_d, mask=mask_d, other=0.0)[None, :]
    return w


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _fusion_bwd_state_kernel(
    g_ptr, wa_ptr, el_ptr, er_ptr, dh_ptr,
    D, H, W, dil_packed, n_ctiles, rows,
    NDIL: tl.constexpr, KS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, W2D: tl.constexpr,
):
    """dh = the fusion's adjoint applied to g = dy·C (written by the parameter kernel, contiguous (B, L, D)),
    for `rows` rows × BLOCK_C columns × BLOCK_D channels of image b (NDIL ≥ 1); el, er: the column folds of
    `_fusion_edge_kernel` (unused for KS = 1). W2D: each tap's weights are loaded as a (BLOCK_C, BLOCK_D) tile
    whose rows are all the same vector, in g's layout; a (BLOCK_D,) vector broadcast against g instead costs a
    conversion through shared memory (a barrier) at every tap and row on some tiles."""
    pid, ct, band, pid_d, b, cols, mask_c, offs_d, mask_d, m = _program_tile(n_ctiles, W, D, BLOCK_C, BLOCK_D)
    w_offs = offs_d[None, :] + 0 * cols[:, None]  # W2D: the weight tile's offsets, each row the channels
    P: tl.constexpr = KS // 2
    NS: tl.constexpr = NDIL * P
    dh_base = dh_ptr + b * H * W * D + offs_d[None, :]
    g_base = g_ptr + b * H * W * D + offs_d[None, :]
    bH = b * H  # (int64) rows of the images before b, for the edge sums
    left = ct == 0  # this tile holds column 0
    right = (ct + 1) * BLOCK_C >= W  # ... and column W-1
    r0 = band * rows
    for r in range(r0, tl.minimum(r0 + rows, H)):
        pos = r * W + cols
        # main gathers: tap (dr, dc) sends g at (r − dr, c − dc) to (r, c) when that position exists —
        # straight-line code, so all taps' loads are in flight together
        dh = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(NDIL):
            d = (dil_packed >> (8 * k)) & 255
            for a in tl.static_range(KS):
                sr = r - (a - P) * d
                row_ok = (sr >= 0) & (sr < H)
                for c in tl.static_range(KS):
                    if k == 0 or a != P or c != P:
                        src_c = cols - (c - P) * d
                        ok = mask_c & (src_c >= 0) & (src_c < W) & row_ok
                        dh += _weight_tile(wa_ptr, (k * KS + a) * KS + c, D, offs_d, mask_d, w_offs, W2D) * \
                            _g_tile(g_base, D, sr * W + src_c, ok, mask_d)
        # the halo folded back: the columns clamped onto column 0 / W-1 (edge tiles only; one vector each,
        # placed at that column once per row) ...
        fold_l = tl.zeros([BLOCK_D], dtype=tl.float32)
        fold_r = tl.zeros([BLOCK_D], dtype=tl.float32)
        if left | right:
            for k in tl.static_range(NDIL):
                d = (dil_packed >> (8 * k)) & 255
                for a in tl.static_range(KS):
                    sr = r - (a - P) * d
                    if (sr >= 0) & (sr < H):
                        for c in tl.static_range(KS):
                            if c != P:
                                w = tl.load(wa_ptr + ((k * KS + a) * KS + c) * D + offs_d, mask=mask_d, other=0.0)
                                e = _edge_vector(el_ptr, er_ptr, bH, sr, D, offs_d, mask_d, left, right,
                                                 k * P, c - P, NS)
                                if c < P:
                                    fold_l += w * e
                                else:
                                    fold_r += w * e
        # ... and the rows clamped onto the first / last row: for tap (dr, dc) the source rows [lo, hi] whose
        # clamp lands on row r (`_box_range`) other than the main gather's, each gathered like it, with their
        # column folds
        if (r == 0) | (r == H - 1):
            for k in tl.static_range(NDIL):
                d = (dil_packed >> (8 * k)) & 255
                for a in tl.static_range(KS):
                    if a != P:
                        dr = (a - P) * d
                        lo, hi = _box_range(r, dr, H)
                        for c in tl.static_range(KS):
                            w = tl.load(wa_ptr + ((k * KS + a) * KS + c) * D + offs_d, mask=mask_d, other=0.0)
                            w_tile = _weight_tile(wa_ptr, (k * KS + a) * KS + c, D, offs_d, mask_d, w_offs, W2D)
                            src_c = cols - (c - P) * d
                            ok_c = mask_c & (src_c >= 0) & (src_c < W)
                            box = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
                            edge = tl.zeros([BLOCK_D], dtype=tl.float32)
                            for sr in range(lo, hi + 1):
                                if sr != r - dr:  # the main gather has that one
                                    box += _g_tile(g_base, D, sr * W + src_c, ok_c, mask_d)
                                    if c != P:
                                        edge += _edge_vector(el_ptr, er_ptr, bH, sr, D, offs_d, mask_d, left,
                                                             right, k * P, c - P, NS)
                            dh += w_tile * box
                            if c < P:
                                fold_l += w * edge
                            if c > P:
                                fold_r += w * edge
        if left | right:
            dh += tl.where((cols == 0)[:, None], fold_l[None, :], 0.0)
            dh += tl.where((cols == W - 1)[:, None], fold_r[None, :], 0.0)
        tl.store(dh_base + pos[:, None] * D, dh.to(dh_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _fusion_bwd_param_kernel(
    h_ptr, hf_ptr, C_ptr, dy_ptr, g_ptr, dC_part_ptr, G_part_ptr,
    sC_b, sC_l, sdy_b, sdy_l, sdy_d,
    Bsz, D, H, W, dil_packed, n_ctiles, rows,
    NDIL: tl.constexpr, KS: tl.constexpr, NTAP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """g = dy·C itself (contiguous (B, L, D), the state dtype), which the dh kernel gathers; fp32 partials of
    dC = Σ_channels dy·h' over this block's channels (h' as the forward stored it); and of the weight gradient's
    G[tap] = Σ_p g[p]·h[tap source of p] over this program's positions. One pass over the program's rows per
    dilation, each holding only that dilation's KS² accumulator tiles (the later passes find the rows in the
    L1/L2 caches): all taps' accumulators at once, with their loads in flight, took every register and spilled."""
    pid, ct, band, pid_d, b, cols, mask_c, offs_d, mask_d, m = _program_tile(n_ctiles, W, D, BLOCK_C, BLOCK_D)
    L = H * W
    h_base = h_ptr + b * L * D + offs_d[None, :]
    dy_base = dy_ptr + b * sdy_b + offs_d[None, :] * sdy_d
    P: tl.constexpr = KS // 2
    part = (b * tl.num_programs(0) + pid) * NTAP * D + offs_d  # (B, programs over positions, NTAP, D)
    r0 = band * rows
    r1 = tl.minimum(r0 + rows, H)
    for k in tl.static_range(max(NDIL, 1)):  # (one pass for g and dC alone without dilations)
        d = (dil_packed >> (8 * k)) & 255
        G = (tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32),) * (KS * KS)
        for r in range(r0, r1):
            pos = r * W + cols
            dyc = tl.load(dy_base + pos[:, None] * sdy_l, mask=m, other=0.0).to(tl.float32)
            g = dyc * tl.load(C_ptr + b * sC_b + pos * sC_l, mask=mask_c, other=0.0).to(tl.float32)[:, None]
            if k == 0:
                tl.store(g_ptr + b * L * D + pos[:, None] * D + offs_d[None, :], g.to(g_ptr.dtype.element_ty), mask=m)
                hfc = tl.load(hf_ptr + b * L * D + pos[:, None] * D + offs_d[None, :], mask=m, other=0.0)
                tl.store(dC_part_ptr + (pid_d * Bsz + b) * L + pos, tl.sum(dyc * hfc.to(tl.float32), axis=1),
                         mask=mask_c)
            if NDIL > 0:
                G_new = ()
                for a in tl.static_range(KS):
                    src_row = _clamp(r + (a - P) * d, H - 1) * W
                    for c in tl.static_range(KS):
                        if k == 0 or a != P or c != P:  # later centre taps are merged into k = 0's
                            src = src_row + _clamp(cols + (c - P) * d, W - 1)
                            hv = tl.load(h_base + src[:, None] * D, mask=m, other=0.0).to(tl.float32)
                            G_new = G_new + (G[a * KS + c] + g * hv,)
                        else:  # (tuple indices inline: they must stay compile-time constants)
                            G_new = G_new + (G[a * KS + c],)
                G = G_new
        if NDIL > 0:
            for i in tl.static_range(KS * KS):
                tl.store(G_part_ptr + part + (k * KS * KS + i) * D, tl.sum(G[i], axis=0), mask=mask_d)


@triton.jit
def _mix_weights_kernel(w_ptr, alpha_ptr, wa_ptr, D, NDIL: tl.constexpr, KS: tl.constexpr, BLOCK_D: tl.constexpr):
    """wa[(k·KS + a)·KS + c, d] = alpha_k·w[k, d, a, c] in fp32 (tap-major: each tap's channels contiguous), the
    centre taps of all dilations — one and the same element — summed into dilation 0's."""
    offs = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = offs < D
    centre = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(NDIL):
        al = tl.load(alpha_ptr + k).to(tl.float32)
        centre += al * tl.load(w_ptr + (k * D + offs) * (KS * KS) + (KS // 2) * (KS + 1), mask=m).to(tl.float32)
    for k in tl.static_range(NDIL):
        al = tl.load(alpha_ptr + k).to(tl.float32)
        for a in tl.static_range(KS):
            for c in tl.static_range(KS):
                v = al * tl.load(w_ptr + (k * D + offs) * (KS * KS) + a * KS + c, mask=m).to(tl.float32)
                if k == 0 and a == KS // 2 and c == KS // 2:
                    v = centre
                tl.store(wa_ptr + ((k * KS + a) * KS + c) * D + offs, v, mask=m)


@triton.jit(do_not_specialize=["R"])  # R follows the parameter kernel's tile: one variant for every tile
def _weight_grad_kernel(G_part_ptr, w_ptr, alpha_ptr, dw_ptr, dalpha_part_ptr, R, D,
                        NDIL: tl.constexpr, KS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """For one tap and block of channels, from the parameter kernel's fp32 partials G_part (R rows, taps, D):
    G = Σ_rows in fp64 (fixed order), dweight[k, d, a, c] = alpha_k·G, and the share Σ_d w·G of dalpha_k.
    A merged centre tap (k > 0) takes dilation 0's sums."""
    pid_d = tl.program_id(0)
    tap = tl.program_id(1)
    NTAP: tl.constexpr = NDIL * KS * KS
    k = tap // (KS * KS)
    ac = tap % (KS * KS)
    src = tl.where(ac == (KS // 2) * (KS + 1), ac, tap)  # centre taps: dilation 0's
    offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m = offs < D
    rows = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float64)
    for r0 in range(0, R, BLOCK_R):
        rr = (r0 + rows).to(tl.int64)
        acc += tl.load(G_part_ptr + (rr[:, None] * NTAP + src) * D + offs[None, :],
                       mask=(rr < R)[:, None] & m[None, :], other=0.0).to(tl.float64)
    G = tl.sum(acc, axis=0)
    w_offs = (k * D + offs) * (KS * KS) + ac
    al = tl.load(alpha_ptr + k).to(tl.float64)
    tl.store(dw_ptr + w_offs, (al * G).to(dw_ptr.dtype.element_ty), mask=m)
    wv = tl.load(w_ptr + w_offs, mask=m, other=0.0).to(tl.float64)
    tl.store(dalpha_part_ptr + tap * tl.num_programs(0) + pid_d, tl.sum(wv * G, axis=0))


# ----------------------------------------------------------------------------------------------------
# launchers (no checks: ops.py checks shapes, dtypes and devices first)

# candidate tiles (BLOCK_C columns, BLOCK_D channels, warps[, 1]). The dh kernel holds all taps' loads in flight,
# so its tiles keep about 4 elements per thread: at 8 they spill registers (ptxas, sm_90). A fourth entry 1 asks
# for a kernel's weight-loading variant:
# - forward (`HOISTED`): every tap's weights loaded once, before the row loop (26 weight vectors held in
#   registers: 166 registers in bf16 and no spills at 4 elements a thread). Hoisted tiles won at every size of T on
#   Hopper, by 9-21 % over the best unhoisted one; which of them depends on the map (`tuning.MEASURED_PICKS`).
#   Measured and left out: hoisted 8 × 128 on 8 warps, 16 × 64 and 32 × 32 on 4 or 8 (slower than unhoisted).
# - dh kernel (`W2D`): each tap's weights loaded as a tile in g's layout. A (BLOCK_D,) vector broadcast against
#   g is converted through shared memory at every tap and row on the 128-channel tiles (two `bar.sync` a tap;
#   `benchmarks/registers.py`); the W2D 8 × 128 tile on 4 warps is 15 % faster at 56², 4 × 256 on 4 warps 23 % at
#   28² than the vector-weight 8 × 128 on 4 warps picked before (7 % and 9 % than the best vector-weight tile);
#   on the 64-channel tiles the two variants compile alike.
# The parameter kernel holds one dilation's KS² accumulator tiles at a time and no weights: 80-136 registers and no
# spills at 2-8 elements a thread (ptxas, sm_90; all taps' accumulators at once took 255 and spilled). Measured and
# left out: 16 × 128 on 8 warps (the slowest at every size, by 1.6-2.5 ×).
FWD_CONFIGS = ((8, 64, 4, 1), (4, 128, 4, 1), (2, 128, 2, 1), (4, 64, 2, 1), (2, 64, 1, 1), (8, 128, 8), (16, 64, 2))
BWD_CONFIGS = ((8, 64, 2), (8, 64, 4), (8, 32, 2), (16, 64, 4), (4, 128, 4), (8, 128, 4))
# the dh kernel holds one load per tap in flight but no per-tap accumulators
STATE_CONFIGS = ((8, 128, 4, 1), (4, 256, 4, 1), (8, 128, 2), (4, 128, 2, 1), (8, 128, 4), (16, 64, 4), (8, 64, 4),
                 (32, 32, 4))
EDGE_BLOCK_D = 128  # channels per program of the column-fold sums (`_fusion_edge_kernel`)
INTERPRETER_CONFIG = (8, 16, 1)  # tile in the CPU interpreter (the kernel tests lower it)
ROWS_PER_PROGRAM = None  # None: enough row bands to give every multiprocessor 8 programs (tests set it)


@functools.lru_cache(maxsize=4096)
def _candidates_of(configs, D: int, W: int, interpreted: bool, interpreter_config):
    if interpreted:
        return (interpreter_config,)
    fit = tuple(cfg for cfg in configs
                if cfg[0] <= max(8, triton.next_power_of_2(W)) and cfg[1] <= max(16, triton.next_power_of_2(D)))
    return fit or (configs[0],)


def _candidates(configs, D: int, W: int):
    return _candidates_of(tuple(configs), D, W, triton_interpreted(), INTERPRETER_CONFIG)


@functools.lru_cache(maxsize=4096)
def _grid_of(Bsz: int, D: int, H: int, W: int, cfg, n_sms: int, rows_per_program):
    bc, bd = cfg[0], cfg[1]
    n_ctiles, n_dblk = cdiv(W, bc), cdiv(D, bd)
    if rows_per_program is not None:
        rows = rows_per_program
    else:
        bands = min(H, cdiv(8 * n_sms, n_ctiles * n_dblk * Bsz))
        rows = cdiv(H, bands)
    return (n_ctiles * cdiv(H, rows), n_dblk, Bsz), n_ctiles, rows


def _grid(Bsz: int, D: int, H: int, W: int, cfg, device) -> tuple[tuple[int, int, int], int, int]:
    """(grid, columns tiles, rows per program) for a tile config (pure arithmetic, cached: a call costs the
    host little more than its launches)."""
    return _grid_of(Bsz, D, H, W, tuple(cfg), _num_sms(device), ROWS_PER_PROGRAM)


def _mixed_weights(weight: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """(K·k·k, D) fp32 taps alpha_i·w_i, tap-major so each tap's channels are contiguous; the centre taps of
    all dilations (one and the same element) summed into dilation 0's. One launch (`_mix_weights_kernel`)."""
    K, D, ks, _ = weight.shape
    wa = torch.empty(K * ks * ks, D, device=weight.device, dtype=torch.float32)
    if K:
        launch(_mix_weights_kernel, (cdiv(D, 256),), weight, alpha, wa, D, NDIL=K, KS=ks, BLOCK_D=256)
    return wa


def fused_forward(x, dt, A, B, C, D, dt_bias, weight, alpha, dilations, H: int, W: int, directions,
                  keep_weights: bool = False, for_backward: bool = True):
    """(y (B, L, D) in x's dtype, states h and fused states h' (B, L, D) in `state_dtype`) — h and h' are what the
    backward needs (h' is None unless `for_backward`, and then not written); with `keep_weights` also the
    mixed weights (`_mixed_weights`), which the backward then takes as `wa`. The first call for a shape class also
    compiles the backward's kernels in the background (`ahead`)."""
    Bsz, L, Dm = x.shape
    ahead.plan(("fused", x.shape, x.stride(), dt.stride(), B.stride(), C.stride(), x.dtype, H, W, tuple(dilations),
                weight.shape[-1], tuple(directions), x.device), x.device,
               lambda: _plan_fused(x, dt, A, B, C, D, dt_bias, weight, alpha, dilations, H, W, directions))
    h = scan_forward(x, dt, A, B, dt_bias, H, W, directions, dtype=state_dtype(x.dtype))
    y = torch.empty(Bsz, L, Dm, device=x.device, dtype=x.dtype)
    hf = torch.empty_like(h) if for_backward else None
    wa = _mixed_weights(weight, alpha)
    packed, K, ks = pack_dilations(dilations), len(dilations), weight.shape[-1]

    def run(cfg):
        grid, n_ctiles, rows = _grid(Bsz, Dm, H, W, cfg, x.device)
        launch(_fusion_fwd_kernel, grid,
            h, x, C, D, wa, y, h if hf is None else hf,
            x.stride(0), x.stride(1), x.stride(2), C.stride(0), C.stride(1),
            Dm, H, W, packed, n_ctiles, rows,
            NDIL=K, KS=ks, BLOCK_C=cfg[0], BLOCK_D=cfg[1], num_warps=cfg[2], HOISTED=len(cfg) > 3 and bool(cfg[3]),
            STORE_HF=hf is not None,
        )

    key = (Bsz, Dm, H, W, K, ks, str(x.dtype))
    run(pick_config("fusion_fwd", key, _candidates(FWD_CONFIGS, Dm, W), run, H * W, x.element_size() == 2,
                    x.device))
    return (y, h, hf, wa) if keep_weights else (y, h, hf)


def _plan_fused(x, dt, A, B, C, D, dt_bias, weight, alpha, dilations, H: int, W: int, directions) -> None:
    """A plan's dry run (`ahead.plan`): the forward and backward launchers on meta tensors of the inputs' shapes,
    strides and dtypes, with the contiguous dy that the next layer's backward hands over; and the forward of
    inference (it stores no h': another variant of the forward kernel)."""
    m = [ahead.meta_like(t) for t in (x, dt, A, B, C, D, dt_bias, weight, alpha)]
    fused_forward(*m, dilations, H, W, directions, for_backward=False)
    y, h, hf = fused_forward(*m, dilations, H, W, directions)
    fused_backward(torch.empty_like(y), *m, h, hf, dilations, H, W, directions)


def fused_backward(dy, x, dt, A, B, C, D, dt_bias, weight, alpha, h, hf, dilations, H: int, W: int, directions,
                   wa=None):
    """Gradients (dx, ddt, dA, dB, dC, dD, d_dt_bias, dweight, dalpha) from the forward's states h and fused states
    h'; `wa`: the forward's mixed weights (else computed again)."""
    Bsz, L, Dm = x.shape
    K, ks = len(dilations), weight.shape[-1]
    dev = x.device
    wa = _mixed_weights(weight, alpha) if wa is None else wa
    packed, NTAP = pack_dilations(dilations), K * ks * ks
    g = torch.empty(Bsz, L, Dm, device=dev, dtype=h.dtype)  # dy·C; for an empty dilation list it is dh
    key = (Bsz, Dm, H, W, K, ks, str(x.dtype))
    half = x.element_size() == 2
    out = {}

    def run_param(cfg):
        grid, n_ctiles, rows = _grid(Bsz, Dm, H, W, cfg, dev)
        out["dC_part"] = torch.empty(grid[1], Bsz, L, device=dev, dtype=torch.float32)
        out["G_part"] = torch.empty(Bsz, grid[0], max(NTAP, 1), Dm, device=dev, dtype=torch.float32)
        launch(_fusion_bwd_param_kernel, grid,
            h, hf, C, dy, g, out["dC_part"], out["G_part"],
            C.stride(0), C.stride(1), dy.stride(0), dy.stride(1), dy.stride(2),
            Bsz, Dm, H, W, packed, n_ctiles, rows,
            NDIL=K, KS=ks, NTAP=NTAP, BLOCK_C=cfg[0], BLOCK_D=cfg[1], num_warps=cfg[2],
        )

    run_param(pick_config("fusion_bwd_param", key, _candidates(BWD_CONFIGS, Dm, W), run_param, L, half, dev))
    if K:
        dh = torch.empty_like(g)
        NS = K * (ks // 2)  # column offsets m·d of the taps (m = 1 ... k // 2): their folds, summed once
        el = torch.empty(Bsz, H, max(NS, 1), Dm, device=dev, dtype=torch.float32)
        er = torch.empty_like(el)
        if NS:
            launch(_fusion_edge_kernel, (H, cdiv(Dm, EDGE_BLOCK_D), Bsz), g, el, er, Dm, H, W, packed,
                   NDIL=K, KS=ks, BLOCK_D=EDGE_BLOCK_D, num_warps=4)

        def run_state(cfg):
            grid, n_ctiles, rows = _grid(Bsz, Dm, H, W, cfg, dev)
            launch(_fusion_bwd_state_kernel, grid,
                g, wa, el, er, dh, Dm, H, W, packed, n_ctiles, rows,
                NDIL=K, KS=ks, BLOCK_C=cfg[0], BLOCK_D=cfg[1], num_warps=cfg[2], W2D=len(cfg) > 3 and bool(cfg[3]),
            )

        run_state(pick_config("fusion_bwd_state", key, _candidates(STATE_CONFIGS, Dm, W), run_state, L, half,
                              dev))
        g = el = er = None  # freed before the scan backward
    else:
        dh = g
    dx, ddt, dA, dB, dbias, dD = scan_backward(x, dt, A, B, dt_bias, h, dh, H, W, directions, dy=dy, D_skip=D)
    dC = torch.empty(Bsz, L, 1, device=dev, dtype=C.dtype)  # (channel blocks, B, L) -> (B, L, 1)
    column_sums(out["dC_part"].view(1, -1, Bsz * L), (dC,))
    if K:
        # fp64 from the fp32 partials on: dalpha = Σ w·G often cancels (terms of both signs), so its rounding
        # error would otherwise be that of the largest terms, not of the result
        G_part = out["G_part"]
        dweight = torch.empty_like(weight)
        n_dblk = cdiv(Dm, 32)
        dalpha_part = torch.empty(NTAP, n_dblk, device=dev, dtype=torch.float64)
        launch(_weight_grad_kernel, (n_dblk, NTAP),
            G_part, weight, alpha, dweight, dalpha_part, G_part.shape[0] * G_part.shape[1], Dm,
            NDIL=K, KS=ks, BLOCK_R=32, BLOCK_D=32,
        )
        dalpha = dalpha_part.view(K, -1).sum(1).to(alpha.dtype)
    else:
        dweight, dalpha = torch.zeros_like(weight), torch.zeros_like(alpha)
    return dx, ddt, dA, dB, dC, dD, dbias, dweight, dalpha


__all__ = ["MAX_DILATION", "MAX_DILATIONS", "fused_backward", "fused_forward"]
