"""Tile choice for the Triton kernels: a few candidate configurations per kernel, timed on the first call for a
shape and the fastest kept — in memory and in a JSON file (`~/.cache/spatial_mamba/kernel_tuning.json`, or
$SPATIAL_MAMBA_CACHE), one entry per device, Triton version, kernel and shape — so later processes neither
time nor compile the other candidates again.

Timing means compiling every candidate first, and the dh kernel's candidates take several seconds each: on a
fresh machine the first training step of T spent 81 s there (H100). So on GPUs whose winners were measured
(`MEASURED_PICKS`: Hopper, 16-bit inputs) the measured winner for the map size is used without timing, and only
that tile is compiled; other GPUs, fp32, and shapes whose measured tile does not fit are timed (their candidates
compile in parallel, in background threads, as soon as the op first sees the shape: `ahead.py`).

SPATIAL_MAMBA_TUNE: `auto` (default) as above; `1` times every shape (kernel work; ignores the measured picks);
`0` never times (measured pick or the first candidate — the test suite does this).
SPATIAL_MAMBA_TUNE_LOG=1 prints every candidate's time when a shape is timed, and the measured picks used.

A compiled graph that launches the kernels itself (the ops' `triton_op` forms) fixes their tiles when it is traced,
on fake tensors that cannot be timed: `tune_for_trace` first runs the op's launchers once on real scratch tensors
of the same sizes, strides and dtypes wherever a tile would be timed, so the graph gets the tiles an eager call
would.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from collections.abc import Hashable
from pathlib import Path

import torch
import triton

from src.errors import UserError

from . import ahead

_TUNED: dict[tuple, tuple[int, ...]] = {}  # (kernel, shape key, device index) -> config

# Winners of the timing on an H100 (Triton 3.6, bf16, batch 128, Spatial-Mamba-T's four stages: 56², 28², 14², 7²
# maps of 128 ... 1024 state channels, and the blocks' convolutions at 64 ... 1024 channels;
# `SPATIAL_MAMBA_TUNE_LOG=1` shows every candidate's time). Per compute capability and kernel: (least tokens per
# map, config or configs in order of preference), largest first; the first row whose token count the map reaches
# applies, and of its configs the first among the shape's candidates (narrow maps or few channels clamp them).
# Every pick is within a few per cent of the best candidate at the other measured sizes too.
MEASURED_PICKS: dict[tuple[int, int], dict[str, tuple[tuple[int, tuple], ...]]] = {
    (9, 0): {  # H100, H200
        # (BLOCK_L, BLOCK_D, warps, loop stages): three-stage pipelined tile loops won the backward at every size,
        # the forward down to 14² (at 7² the unpipelined tile was as fast)
        "scan_fwd": ((3136, (64, 16, 2, 3)), (196, (16, 16, 1, 3)), (0, (16, 16, 1, 1))),
        "scan_bwd": ((0, (8, 16, 1, 3)),),
        # (BLOCK_C, BLOCK_D, warps[, 1: the weight-loading variant, `fused.FWD_CONFIGS`]); the forward's tiles with
        # the taps' weights loaded once (4 elements a thread) beat every other at all four sizes: the narrower the
        # map, the fewer columns a tile (14 % at 28² and 11 % at 14² over 8 × 64 on 4 warps, which wins at 7²); the
        # dh kernel's tiles with weights in g's layout won down to 28² (15 % and 23 %), the vector-weight 8 × 128
        # on 2 warps at 14² and 7²; the parameter kernel's 8 × 64 on 2 warps was the fastest tile or within 1.2 %
        # of it at every size (H200)
        "fusion_fwd": ((784, ((4, 128, 4, 1), (8, 64, 4, 1))), (196, ((2, 128, 2, 1), (8, 64, 4, 1))),
                       (0, ((8, 64, 4, 1), (8, 128, 8), (16, 64, 2)))),
        "fusion_bwd_param": ((0, (8, 64, 2)),),
        "fusion_bwd_state": ((784, ((4, 256, 4, 1), (8, 128, 4, 1))), (0, (8, 128, 2))),
        # (BLOCK_W, BLOCK_C, warps); 16 × 64 where 64 channels rule out 128-channel tiles
        "dwconv_fwd": ((3136, ((8, 128, 4), (16, 64, 2))), (0, ((8, 128, 2), (16, 64, 2)))),
        "dwconv_bwd_input": ((0, ((8, 128, 2), (16, 64, 2))),),
        "dwconv_bwd_param": ((196, (4, 64, 2)), (0, (8, 32, 2))),
    },
}
_CAPABILITY: dict[int, tuple[int, int]] = {}


def measured_pick(name: str, tokens: int, device_index: int, candidates=None) -> tuple[int, ...] | None:
    """The measured winner of kernel `name` for maps of `tokens` positions on this GPU (the first of the row's
    configs that is among `candidates`, if given), or None."""
    if device_index not in _CAPABILITY:
        _CAPABILITY[device_index] = torch.cuda.get_device_capability(device_index)
    for least, picks in MEASURED_PICKS.get(_CAPABILITY[device_index], {}).get(name, ()):
        if tokens >= least:
            picks = picks if isinstance(picks[0], tuple) else (picks,)
            return next((cfg for cfg in picks if candidates is None or cfg in candidates), None)
    return None


def _cache_file() -> Path:
    root = os.environ.get("SPATIAL_MAMBA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "spatial_mamba")
    return Path(root) / "kernel_tuning.json"


def pick_config(name: str, key: tuple, candidates, run, tokens: int | None = None,
                half: bool = False, device: torch.device | None = None) -> tuple[int, ...]:
    """The tile for this kernel and shape: this shape's earlier timing (memory, then the JSON file), else the
    measured pick for the map size (`tokens` positions, `half`: 16-bit inputs) on GPUs that have one, else
    the fastest candidate, timed once (a few short runs of each) and kept in memory and in the JSON file.
    Without a GPU (or with one candidate): the first candidate; while a CUDA graph is captured or with
    SPATIAL_MAMBA_TUNE=0: the measured pick or the first candidate, untimed.

    `device`: the launch's CUDA device, if the caller knows it. A shape seen before on it is then answered
    from memory before any CUDA query (`torch.cuda.is_available()` and `current_device()` cost the host a few
    microseconds each, and eager T asks for about 250 tiles per training step)."""
    if device is not None and device.type == "cuda":
        known = _TUNED.get((name, key, device.index))
        if known is not None:
            return known
    if len(candidates) == 1 or not torch.cuda.is_available():
        return candidates[0]
    device = torch.cuda.current_device()
    fast = (name, key, device)  # the per-call lookup: no strings built
    if fast in _TUNED:
        return _TUNED[fast]
    mode = os.environ.get("SPATIAL_MAMBA_TUNE", "auto")
    if mode not in ("auto", "0", "1"):
        raise UserError(f"SPATIAL_MAMBA_TUNE must be auto, 0 or 1, got {mode!r}")
    pick = measured_pick(name, tokens, device, candidates) if half and tokens is not None and mode != "1" else None
    if mode == "0" or torch.cuda.is_current_stream_capturing():
        return pick or candidates[0]
    full = f"{torch.cuda.get_device_name()}|triton {triton.__version__}|{name}|{key}"
    path = _cache_file()
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    if full in stored and tuple(stored[full]) in candidates:
        _TUNED[fast] = tuple(stored[full])
        return _TUNED[fast]
    log = os.environ.get("SPATIAL_MAMBA_TUNE_LOG") == "1"
    if pick is not None:  # not written to the file: a later measured-picks table applies at once
        if log:
            print(f"[tuning] {name} {key}: measured pick {pick}", file=sys.stderr, flush=True)
        _TUNED[fast] = pick
        return pick
    if ahead.traced():  # baked into the graph, and fake tensors cannot be timed (`tune_for_trace` timed it first)
        return candidates[0]
    if ahead.planning():  # a plan's dry run: every candidate the real call will time compiles now, in parallel
        for cfg in candidates:
            run(cfg)
        return candidates[0]
    from triton.testing import do_bench

    # compiles still running in the background (`ahead`: this op's other kernels and candidates) would share the
    # host with the timing, and launches held up behind them count as kernel time: on a fresh H100 the forward's
    # 0.3 ms tiles timed at 5-160 ms beside the backward's compiles, and the one kept was 24 % slower than the best
    ahead.wait_all()
    times = {cfg: do_bench(lambda: run(cfg), warmup=5, rep=20, return_mode="median") for cfg in candidates}
    best = min(times, key=times.get)
    if log:
        listed = ", ".join(f"{cfg}: {ms:.4f}" for cfg, ms in sorted(times.items(), key=lambda kv: kv[1]))
        print(f"[tuning] {name} {key} ms: {listed}", file=sys.stderr, flush=True)
    _TUNED[fast] = best
    try:  # written atomically: concurrent processes (DDP ranks) never read half a file
        path.parent.mkdir(parents=True, exist_ok=True)
        stored[full] = list(best)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(stored, f, indent=0)
        os.replace(f.name, path)
    except OSError:
        pass  # an unwritable cache only costs the timing again in the next process
    return best


# ----------------------------------------------------------------------------------------------------
# tiles for a traced op (a compiled graph's own launches)

_TRACE_TUNED: set = set()  # (launcher, argument signature) already run for a trace in this process


def _wants_timing(device: torch.device, half: bool) -> bool:
    """Whether `pick_config` would time tiles for data on `device` (`half`: 16-bit): a CUDA device, not the
    interpreter, SPATIAL_MAMBA_TUNE not 0, and no measured picks for it (unless SPATIAL_MAMBA_TUNE=1)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1" or not torch.cuda.is_available():
        return False
    mode = os.environ.get("SPATIAL_MAMBA_TUNE", "auto")
    if mode == "0":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return mode == "1" or not (half and torch.cuda.get_device_capability(index) in MEASURED_PICKS)


def _signature(a) -> Hashable:
    if isinstance(a, torch.Tensor):
        return ("tensor", tuple(a.shape), tuple(a.stride()), a.dtype, str(a.device))
    if isinstance(a, (list, tuple)):
        return tuple(_signature(v) for v in a)
    try:
        hash(a)
    except TypeError:
        return repr(a)
    return a


def _scratch(t: torch.Tensor) -> torch.Tensor:
    """A real zero-filled tensor of t's sizes, strides, dtype and device (overlapping strides included)."""
    extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) if t.numel() else 0
    return torch.zeros(extent, dtype=t.dtype, device=t.device).as_strided(t.shape, t.stride())


def tune_for_trace(launcher, args: tuple, half: bool) -> None:
    """Called in a traced op's body before its launches are traced: where the arguments are fake tensors (a trace)
    on a device whose tiles would be timed (`_wants_timing`), run `launcher(*args)` once on real scratch tensors
    (`_scratch`) outside the trace's modes, so that every `pick_config` in it times its tile now, under the key the
    traced launches then find. Once per launcher and argument signature per process. Never fails the trace: an
    error only leaves the untimed tiles (a warning says so)."""
    from torch._subclasses.fake_tensor import is_fake
    from torch.utils._python_dispatch import _disable_current_modes

    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or not any(is_fake(t) for t in tensors) or not _wants_timing(tensors[0].device, half):
        return
    key = (launcher, _signature(args))
    if key in _TRACE_TUNED:
        return
    _TRACE_TUNED.add(key)
    try:
        with _disable_current_modes(), torch.no_grad():
            launcher(*(_scratch(a) if isinstance(a, torch.Tensor) else a for a in args))
    except Exception as e:  # noqa: BLE001 - the trace goes on with untimed tiles
        warnings.warn(f"tiles of {getattr(launcher, '__name__', launcher)} not timed for a compiled graph "
                      f"({type(e).__name__}: {e}); it uses the measured picks or the first candidates", stacklevel=2)
