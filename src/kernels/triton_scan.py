"""Triton selective scan with state size 1: h_t = exp(Δ_t·A)·h_{t-1} + Δ_t·B_t·x_t, Δ = softplus(dt + dt_bias).

Layout: channels last. Activations x, dt are (B, L, D) and B is (B, L, 1), read through their strides (any
layout, nothing copied; D-contiguous is the fast one, as the model produces them). States h and every buffer
the launchers allocate are contiguous (B, L, D). A tile is (BLOCK_L steps × BLOCK_D channels): each step of
it is one contiguous vector of channels, the scan runs down the tile (`tl.associative_scan`, axis 0) in fp32
whatever the input dtype, and the last state carries into the next tile. Scan directions are index
arithmetic on the step t -> raster position (`_raster`), never permuted copies.

Chunks: when batch × channel blocks alone would leave the GPU idle (long sequences of dense tasks, small
batches), the steps are split into chunks that run in parallel. A first pass writes, per chunk, its total
log-decay and its end state from a zero start (`SUMMARY`); the second pass starts each chunk from the states
of the chunks before it (combined from those summaries, a few fp32 vectors) and writes the states. The
backward does the same in the reverse direction.

Backward (reverse recurrence in scan order, g_t = dh_t + exp(dA_{t+1})·g_{t+1}); with dA = Δ·A, u = Δ·B·x:
d(dA_t) = g_t·exp(dA_t)·h_{t-1}, dx = g·Δ·B (+ D·dy), dΔ = d(dA)·A + g·B·x, ddt = dΔ·softplus'(dt + bias).
dB (over the tile's channels) and dA, d(dt_bias), dD (over the chunk's steps) go to fp32 partial buffers
that one more launch sums in a fixed order, in fp64 (`column_sums`): no atomics, the same bits on every run.

Public: `scan_forward`, `scan_backward` (launchers, no checks: `ops.py` checks inputs first).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import ahead
from .ahead import cdiv, launch, real_device
from .tuning import pick_config

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
def _row(v, i, BLOCK_L: tl.constexpr):
    """Row i of a (BLOCK_L, BLOCK_D) tile as a (BLOCK_D,) vector."""
    rows = tl.arange(0, BLOCK_L)
    return tl.sum(tl.where(rows[:, None] == i, v, 0.0), axis=0)


@triton.jit
def _program_channels(D, BLOCK_D: tl.constexpr):
    """This program's channel block, chunk and image (grid: channel blocks, chunks, batch), its channels and
    their mask. No pointers pass through here: a compiled graph that launches these kernels itself
    (`torch.library.triton_op`) decides which tensors a kernel writes by following each store's address back
    through the kernel, and takes every pointer argument of a helper call met on the way for written."""
    pid_d = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    return pid_d, tl.program_id(1), b, offs_d, mask_d


@triton.jit
def _channel_values(A_ptr, bias_ptr, offs_d, mask_d):
    """A and dt_bias of the channels offs_d, fp32."""
    A = tl.load(A_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return A, tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)


@triton.jit
def _scan_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, bias_ptr, h_ptr, sum_ptr, end_ptr,
    sx_b, sx_l, sx_d, sdt_b, sdt_l, sdt_d, sB_b, sB_l,
    D, L, H, W, chunk_len, n_chunks,
    REVERSED: tl.constexpr, COLUMN: tl.constexpr, ACCUMULATE: tl.constexpr, SUMMARY: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, STAGES: tl.constexpr,
):
    """One chunk of one direction's scan for (BLOCK_D channels, batch b). SUMMARY: write the chunk's total
    log-decay and end state (from zero) only; else: write (or add, ACCUMULATE) its states into h."""
    pid_d, pid_c, b, offs_d, mask_d = _program_channels(D, BLOCK_D)
    A, bias = _channel_values(A_ptr, bias_ptr, offs_d, mask_d)
    x_base = x_ptr + b * sx_b + offs_d[None, :] * sx_d
    dt_base = dt_ptr + b * sdt_b + offs_d[None, :] * sdt_d
    h_base = h_ptr + b * L * D + offs_d[None, :]
    summaries = b * n_chunks * D + offs_d
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    if not SUMMARY:  # the state entering this chunk, composed from the summaries of the chunks before it
        for j in range(0, pid_c):
            s = tl.load(sum_ptr + summaries + j * D, mask=mask_d, other=0.0)
            e = tl.load(end_ptr + summaries + j * D, mask=mask_d, other=0.0)
            carry = tl.exp(s) * carry + e
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = pid_c * chunk_len
    end = tl.minimum(start + chunk_len, L)
    for t0 in tl.range(start, end, BLOCK_L, num_stages=STAGES):
        t = t0 + tl.arange(0, BLOCK_L)
        mask_l = t < end
        pos = _raster(t, L, H, W, REVERSED, COLUMN)
        m = mask_l[:, None] & mask_d[None, :]
        xv = tl.load(x_base + pos[:, None] * sx_l, mask=m, other=0.0).to(tl.float32)
        dtv = tl.load(dt_base + pos[:, None] * sdt_l, mask=m, other=0.0).to(tl.float32)
        Bv = tl.load(B_ptr + b * sB_b + pos * sB_l, mask=mask_l, other=0.0).to(tl.float32)
        delta = _softplus(dtv + bias[None, :])
        dA = delta * A[None, :]
        decay = tl.where(m, tl.exp(dA), 1.0)  # steps past the end leave the state as it is
        u = tl.where(m, delta * xv * Bv[:, None], 0.0)
        a_s, h_s = tl.associative_scan((decay, u), axis=0, combine_fn=_first_order)
        h = h_s + a_s * carry[None, :]
        carry = _row(h, BLOCK_L - 1, BLOCK_L)
        if SUMMARY:
            total += tl.sum(tl.where(m, dA, 0.0), axis=0)
        else:
            h_ptrs = h_base + pos[:, None] * D
            if ACCUMULATE:
                h += tl.load(h_ptrs, mask=m, other=0.0).to(tl.float32)
            tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=m)
    if SUMMARY:
        tl.store(sum_ptr + summaries + pid_c * D, total, mask=mask_d)
        tl.store(end_ptr + summaries + pid_c * D, carry, mask=mask_d)


@triton.jit
def _scan_bwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, bias_ptr, h_ptr, dh_ptr, dy_ptr, Dskip_ptr,
    dx_ptr, ddt_ptr, dB_part_ptr, dA_part_ptr, dbias_part_ptr, dD_part_ptr, sum_ptr, end_ptr,
    sx_b, sx_l, sx_d, sdt_b, sdt_l, sdt_d, sB_b, sB_l, sdy_b, sdy_l, sdy_d,
    Bsz, D, L, H, W, chunk_len, n_chunks,
    REVERSED: tl.constexpr, COLUMN: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_DY: tl.constexpr,
    SUMMARY: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, STAGES: tl.constexpr,
):
    """Gradients of one chunk of one direction's scan, given dh and that direction's states h (both
    (B, L, D) at raster positions). Tiles are walked from the chunk's last, each loaded ascending and
    suffix-scanned (`reverse=True`). SUMMARY: write the chunk's total log-decay of the following steps and
    its g at the first step (from a zero start after the chunk) only."""
    pid_d, pid_c, b, offs_d, mask_d = _program_channels(D, BLOCK_D)
    A, bias = _channel_values(A_ptr, bias_ptr, offs_d, mask_d)
    x_base = x_ptr + b * sx_b + offs_d[None, :] * sx_d
    dt_base = dt_ptr + b * sdt_b + offs_d[None, :] * sdt_d
    state_base = b * L * D + offs_d[None, :]  # contiguous (B, L, D) buffers
    summaries = b * n_chunks * D + offs_d
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)  # g at the first step after this chunk
    if not SUMMARY:
        for jj in range(0, n_chunks - 1 - pid_c):
            j = n_chunks - 1 - jj
            s = tl.load(sum_ptr + summaries + j * D, mask=mask_d, other=0.0)
            e = tl.load(end_ptr + summaries + j * D, mask=mask_d, other=0.0)
            carry = tl.exp(s) * carry + e
    if HAS_DY:
        Dskip = tl.load(Dskip_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        dy_base = dy_ptr + b * sdy_b + offs_d[None, :] * sdy_d
    dB_base = dB_part_ptr + (pid_d * Bsz + b) * L
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_dA = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_dbias = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_dD = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = pid_c * chunk_len
    end = tl.minimum(start + chunk_len, L)
    n_tiles = tl.cdiv(end - start, BLOCK_L)
    for i in tl.range(0, n_tiles, num_stages=STAGES):
        t = start + (n_tiles - 1 - i) * BLOCK_L + tl.arange(0, BLOCK_L)  # tiles from the last, ascending inside
        mask_l = t < end
        m = mask_l[:, None] & mask_d[None, :]
        pos = _raster(t, L, H, W, REVERSED, COLUMN)
        # decay of the following step t+1, which carries g_{t+1} back to step t (none after the sequence's
        # end); steps past the chunk's end pass g through unchanged (decay 1, dh 0)
        has_next = mask_l & (t + 1 < L)
        m_next = has_next[:, None] & mask_d[None, :]
        pos_next = _raster(t + 1, L, H, W, REVERSED, COLUMN)
        dt_next = tl.load(dt_base + pos_next[:, None] * sdt_l, mask=m_next, other=0.0).to(tl.float32)
        dA_next = _softplus(dt_next + bias[None, :]) * A[None, :]
        decay_next = tl.where(m_next, tl.exp(dA_next), tl.where(m, 0.0, 1.0))
        dh = tl.load(dh_ptr + state_base + pos[:, None] * D, mask=m, other=0.0).to(tl.float32)
        g_a, g_b = tl.associative_scan((decay_next, dh), axis=0, combine_fn=_first_order, reverse=True)
        g = g_b + g_a * carry[None, :]
        carry = _row(g, 0, BLOCK_L)
        if SUMMARY:
            total += tl.sum(tl.where(m_next, dA_next, 0.0), axis=0)
        else:
            m_prev = m & (t >= 1)[:, None]
            pos_prev = _raster(t - 1, L, H, W, REVERSED, COLUMN)
            h_prev = tl.load(h_ptr + state_base + pos_prev[:, None] * D, mask=m_prev, other=0.0).to(tl.float32)
            xv = tl.load(x_base + pos[:, None] * sx_l, mask=m, other=0.0).to(tl.float32)
            v = tl.load(dt_base + pos[:, None] * sdt_l, mask=m, other=0.0).to(tl.float32) + bias[None, :]
            Bv = tl.load(B_ptr + b * sB_b + pos * sB_l, mask=mask_l, other=0.0).to(tl.float32)
            delta = _softplus(v)
            d_dA = g * tl.exp(delta * A[None, :]) * h_prev
            dx = g * delta * Bv[:, None]
            if HAS_DY:
                dyv = tl.load(dy_base + pos[:, None] * sdy_l, mask=m, other=0.0).to(tl.float32)
                dx += Dskip[None, :] * dyv
                acc_dD += tl.sum(dyv * xv, axis=0)
            d_delta = d_dA * A[None, :] + g * Bv[:, None] * xv
            ddt = tl.where(m, d_delta * _softplus_grad(v), 0.0)
            dB = tl.sum(g * delta * xv, axis=1)
            acc_dA += tl.sum(d_dA * delta, axis=0)
            acc_dbias += tl.sum(ddt, axis=0)
            out = state_base + pos[:, None] * D
            if ACCUMULATE:
                dx += tl.load(dx_ptr + out, mask=m, other=0.0).to(tl.float32)
                ddt += tl.load(ddt_ptr + out, mask=m, other=0.0).to(tl.float32)
                dB += tl.load(dB_base + pos, mask=mask_l, other=0.0)
            tl.store(dx_ptr + out, dx.to(dx_ptr.dtype.element_ty), mask=m)
            tl.store(ddt_ptr + out, ddt.to(ddt_ptr.dtype.element_ty), mask=m)
            tl.store(dB_base + pos, dB, mask=mask_l)
    if SUMMARY:
        tl.store(sum_ptr + summaries + pid_c * D, total, mask=mask_d)
        tl.store(end_ptr + summaries + pid_c * D, carry, mask=mask_d)
    else:
        part = summaries + pid_c * D  # (B, n_chunks, D) partial sums
        if ACCUMULATE:
            acc_dA += tl.load(dA_part_ptr + part, mask=mask_d, other=0.0)
            acc_dbias += tl.load(dbias_part_ptr + part, mask=mask_d, other=0.0)
        tl.store(dA_part_ptr + part, acc_dA, mask=mask_d)
        tl.store(dbias_part_ptr + part, acc_dbias, mask=mask_d)
        if HAS_DY:
            tl.store(dD_part_ptr + part, acc_dD, mask=mask_d)


@triton.jit(do_not_specialize=["R", "N"])
def _column_sums_kernel(src_ptr, out0_ptr, out1_ptr, out2_ptr, R, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out_j[n] = Σ_r src[j, r, n] for the job j = program_id(1) < 3 of a contiguous (jobs, R, N) buffer of
    partials: accumulated in fp64 in a fixed order (the same bits on every run), stored in out_j's dtype."""
    job = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    rows = tl.arange(0, BLOCK_R)
    base = src_ptr + job.to(tl.int64) * R * N + cols[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float64)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + rows
        acc += tl.load(base + rr[:, None].to(tl.int64) * N, mask=(rr < R)[:, None] & mask_n[None, :],
                       other=0.0).to(tl.float64)
    total = tl.sum(acc, axis=0)
    if job == 0:
        tl.store(out0_ptr + cols, total.to(out0_ptr.dtype.element_ty), mask=mask_n)
    elif job == 1:
        tl.store(out1_ptr + cols, total.to(out1_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.store(out2_ptr + cols, total.to(out2_ptr.dtype.element_ty), mask=mask_n)


# ----------------------------------------------------------------------------------------------------
# launchers (no checks: the public functions in ops.py check shapes, dtypes and devices first)


MAX_BLOCK_L = 64  # cap on the steps per tile (tests lower it to exercise the carry between tiles on small maps)
MAX_CHUNK_L = None  # steps per chunk; None: chosen to fill the GPU (tests set it to exercise chunking)
MIN_CHUNK_TILES = 8  # a chunk spans at least this many tiles (the summary pass reads the chunk once more)


# candidate tiles (BLOCK_L steps, BLOCK_D channels, warps, loop stages), the first the default. The scan runs down
# the steps axis; the fewer warps share it, the fewer barriers each tile's scan needs (the combine crosses warps
# through shared memory), so one-warp programs win the backward at every stage of T (H100, bf16: 0.76 vs 0.89 ms at
# 56×56, 0.17 vs 0.25 ms at 14×14 against 32 × 16 × 4 warps). Loop stages: the tile loop is software-pipelined
# (`tl.range(num_stages=...)`), the loads of the next tiles issued while the current one is scanned — a program
# walks its steps one tile after another, so without it every tile waits for its loads. Three stages took the
# backward from 0.76 to 0.57 ms at 56×56 and 0.17 to 0.13 ms at 14×14, the forward from 0.26 to 0.23 ms at
# 56×56 (H100, bf16; in the backward 2, 4, 5 and 6 stages were slower than 3 at all four of T's map sizes; the
# fusion kernels' row loops only got slower pipelined). 1: not pipelined.
SCAN_FWD_CONFIGS = ((64, 16, 2, 3), (16, 16, 1, 3), (64, 16, 2, 1), (32, 16, 1, 1), (16, 16, 1, 1), (32, 16, 4, 1))
SCAN_BWD_CONFIGS = ((8, 16, 1, 3), (16, 16, 1, 3), (16, 16, 1, 1), (8, 16, 1, 1), (16, 32, 1, 1), (32, 32, 4, 1))
SCAN_INTERPRETER_CONFIG = (32, 16, 1, 3)
_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    device = real_device(device)  # a plan's meta tensors stand for a GPU
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


# Launch geometry is pure arithmetic on the shape; it is cached (the module's tile knobs are part of each key,
# tests change them) so that a call costs the host little more than its kernel launches.

@functools.lru_cache(maxsize=4096)
def _blocks_of(D: int, L: int, cfg, max_block_l: int) -> tuple[int, int]:
    BLOCK_L = min(cfg[0], max_block_l, max(16, triton.next_power_of_2(L)))
    BLOCK_D = min(cfg[1], max(2, triton.next_power_of_2(D)))
    return BLOCK_D, BLOCK_L


def _blocks(D: int, L: int, cfg) -> tuple[int, int]:
    return _blocks_of(D, L, tuple(cfg), MAX_BLOCK_L)


@functools.lru_cache(maxsize=4096)
def _candidates_of(configs, D: int, L: int, max_block_l: int, interpreted: bool, interpreter_config):
    out = []
    for cfg in (interpreter_config,) if interpreted else configs:
        eff = (*reversed(_blocks_of(D, L, cfg, max_block_l)), *cfg[2:])
        if eff not in out:
            out.append(eff)
    return tuple(out)


def _scan_candidates(configs, D: int, L: int):
    """Distinct effective tiles of the candidates for this shape (small maps and widths clamp them)."""
    return _candidates_of(tuple(configs), D, L, MAX_BLOCK_L, triton_interpreted(), SCAN_INTERPRETER_CONFIG)


@functools.lru_cache(maxsize=4096)
def _chunking_of(Bsz: int, n_dblk: int, L: int, BLOCK_L: int, n_sms: int, max_chunk_l) -> tuple[int, int]:
    if max_chunk_l is not None:
        chunk = max(BLOCK_L, max_chunk_l // BLOCK_L * BLOCK_L)
    else:
        wanted = cdiv(2 * n_sms, Bsz * n_dblk)
        n = min(wanted, max(1, L // (MIN_CHUNK_TILES * BLOCK_L)))
        chunk = cdiv(cdiv(L, max(n, 1)), BLOCK_L) * BLOCK_L
    return chunk, cdiv(L, chunk)


def _chunking(Bsz: int, n_dblk: int, L: int, BLOCK_L: int, device: torch.device) -> tuple[int, int]:
    """(chunk length, number of chunks): one chunk while batch × channel blocks give every multiprocessor
    two programs; otherwise enough chunks of at least MIN_CHUNK_TILES tiles to do so."""
    return _chunking_of(Bsz, n_dblk, L, BLOCK_L, _num_sms(device), MAX_CHUNK_L)


def column_sums(parts: torch.Tensor, outs: Sequence[torch.Tensor]) -> None:
    """outs[j] (contiguous, N elements, any shape and float dtype) = parts[j].sum(0) for a contiguous fp32/fp64
    (jobs, R, N) buffer of partials, j < len(outs) <= 3: one launch instead of a reduction and a cast per output
    (host time: the backward's launcher runs once per block and step)."""
    jobs, R, N = parts.shape
    # the unused output slots (never written): outs[0] again, except in a traced op, whose graph would take
    # one tensor in three written slots for three outputs and keep the last
    spare = [outs[0].new_empty(1) for _ in range(3 - len(outs))] if ahead.traced() else [outs[0]] * (3 - len(outs))
    # one variant for every R (the number of partials follows the picked tiles, which a plan's dry run cannot
    # know): rows past R are masked, and adding their zeros changes no sum
    launch(_column_sums_kernel, (cdiv(N, 256), len(outs)), parts, *outs, *spare, R, N, BLOCK_R=8, BLOCK_N=256)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of the states (and their gradients) kept between kernels: bf16 for bf16 activations
    (halves their memory and traffic; all arithmetic stays fp32), fp32 otherwise."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def scan_forward(x, dt, A, B, dt_bias, H: int, W: int, directions: Sequence[str], out=None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """States (B, L, D) in `dtype` (or into `out`), summed over `directions`; x, dt (B, L, D) and B (B, L, 1)
    any strides."""
    Bsz, L, D = x.shape
    h = torch.empty(Bsz, L, D, device=x.device, dtype=dtype) if out is None else out

    def run(cfg):
        BLOCK_L, BLOCK_D, warps, stages = cfg
        n_dblk = cdiv(D, BLOCK_D)
        chunk, n_chunks = _chunking(Bsz, n_dblk, L, BLOCK_L, x.device)
        sums = torch.empty(Bsz, n_chunks, D, device=x.device, dtype=torch.float32)
        ends = torch.empty_like(sums)
        for i, direction in enumerate(directions):
            reversed_, column = DIRECTION_FLAGS[direction]
            for summary in (True, False) if n_chunks > 1 else (False,):
                launch(_scan_fwd_kernel, (n_dblk, n_chunks, Bsz),
                    x, dt, A, B, dt_bias, h, sums, ends,
                    x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1), dt.stride(2),
                    B.stride(0), B.stride(1),
                    D, L, H, W, chunk, n_chunks,
                    REVERSED=reversed_, COLUMN=column, ACCUMULATE=i > 0, SUMMARY=summary,
                    BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L, num_warps=warps, STAGES=stages,
                )

    key = (Bsz, D, H, W, tuple(directions), str(x.dtype), str(dtype))
    run(pick_config("scan_fwd", key, _scan_candidates(SCAN_FWD_CONFIGS, D, L), run, L, x.element_size() == 2,
                    x.device))
    return h


def scan_backward(x, dt, A, B, dt_bias, h, dh, H: int, W: int, directions: Sequence[str], dy=None, D_skip=None):
    """Gradients (dx, ddt, dA, dB, d_dt_bias, dD) of the summed-direction scan given dh (B, L, D).

    `h` holds the states of the single direction when len(directions) == 1; for several directions each
    direction's states are recomputed (fp32) into a scratch buffer. With `dy`, dx also gets D_skip·dy and
    dD = Σ dy·x is returned (else dD is None)."""
    Bsz, L, D = x.shape
    dev = x.device
    several = len(directions) > 1
    acc_dtype = torch.float32 if several else x.dtype
    dx = torch.empty(Bsz, L, D, device=dev, dtype=acc_dtype)
    ddt = torch.empty(Bsz, L, D, device=dev, dtype=acc_dtype)
    dh = dh.contiguous()
    states = torch.empty(Bsz, L, D, device=dev, dtype=torch.float32) if several else h
    has_dy = dy is not None
    if not has_dy:
        dy, D_skip = dh, A  # placeholders, never read
    out = {}

    def run(cfg):
        BLOCK_L, BLOCK_D, warps, stages = cfg
        n_dblk = cdiv(D, BLOCK_D)
        chunk, n_chunks = _chunking(Bsz, n_dblk, L, BLOCK_L, dev)
        out["dB_part"] = torch.empty(n_dblk, Bsz, L, device=dev, dtype=torch.float32)
        # dA, d(dt_bias), dD partials side by side in one buffer: one reduction for the three (without dy the
        # dD partials stay unwritten and unused)
        out["parts"] = parts = torch.empty(3, Bsz, n_chunks, D, device=dev, dtype=torch.float32)
        sums, ends = torch.empty(2, Bsz, n_chunks, D, device=dev, dtype=torch.float32)
        for i, direction in enumerate(directions):
            if several:
                scan_forward(x, dt, A, B, dt_bias, H, W, (direction,), out=states)
            reversed_, column = DIRECTION_FLAGS[direction]
            for summary in (True, False) if n_chunks > 1 else (False,):
                launch(_scan_bwd_kernel, (n_dblk, n_chunks, Bsz),
                    x, dt, A, B, dt_bias, states, dh, dy, D_skip,
                    dx, ddt, out["dB_part"], parts[0], parts[1], parts[2], sums, ends,
                    x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1), dt.stride(2),
                    B.stride(0), B.stride(1), dy.stride(0), dy.stride(1), dy.stride(2),
                    Bsz, D, L, H, W, chunk, n_chunks,
                    REVERSED=reversed_, COLUMN=column, ACCUMULATE=i > 0, HAS_DY=has_dy and i == 0,
                    SUMMARY=summary, BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L, num_warps=warps,
                    STAGES=stages,
                )

    key = (Bsz, D, H, W, tuple(directions), str(x.dtype), str(h.dtype))
    run(pick_config("scan_bwd", key, _scan_candidates(SCAN_BWD_CONFIGS, D, L), run, L, x.element_size() == 2,
                    dev))
    dB = torch.empty(Bsz, L, 1, device=dev, dtype=B.dtype)  # (n_dblk, B, L) -> (B, L, 1)
    column_sums(out["dB_part"].view(1, -1, Bsz * L), (dB,))
    # (B, n_chunks, D) -> (D,), each its own tensor (the ops' outputs must not share storage)
    dA = torch.empty(D, 1, device=dev, dtype=A.dtype)
    dbias = torch.empty(D, device=dev, dtype=dt_bias.dtype)
    dD = torch.empty(D, device=dev, dtype=D_skip.dtype) if has_dy else None
    parts = out["parts"].view(3, -1, D)
    column_sums(parts, (dA, dbias, dD) if has_dy else (dA, dbias))
    return dx.to(x.dtype), ddt.to(dt.dtype), dA, dB, dbias, dD


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


__all__ = [
    "DIRECTION_FLAGS", "column_sums", "scan_backward", "scan_forward", "state_dtype", "triton_interpreted",
]
