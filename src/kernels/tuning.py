"""Tile choice for the Triton kernels: a few candidate configurations per kernel, timed on the first call for a
shape and the fastest kept — in memory and in a JSON file (`~/.cache/spatial_mamba/kernel_tuning.json`, or
$SPATIAL_MAMBA_CACHE), one entry per device, Triton version, kernel and shape — so later processes neither
time nor compile the other candidates again.

SPATIAL_MAMBA_TUNE=0 turns the timing off (the first candidate is used; the test suite does this);
SPATIAL_MAMBA_TUNE_LOG=1 prints every candidate's time when a shape is timed (for kernel work).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import triton

_TUNED: dict[tuple, tuple[int, ...]] = {}  # (kernel, shape key, device index) -> config


def _cache_file() -> Path:
    root = os.environ.get("SPATIAL_MAMBA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "spatial_mamba")
    return Path(root) / "kernel_tuning.json"


def pick_config(name: str, key: tuple, candidates, run) -> tuple[int, ...]:
    """The fastest candidate for this kernel and shape: timed once (a few short runs of each) on the first
    call, then kept in memory and in a JSON file (one entry per device, Triton version, kernel and shape).
    Without a GPU, while a CUDA graph is captured, or with SPATIAL_MAMBA_TUNE=0: the first candidate."""
    if len(candidates) == 1 or os.environ.get("SPATIAL_MAMBA_TUNE", "1") == "0" or \
            torch.cuda.is_current_stream_capturing():
        return candidates[0]
    fast = (name, key, torch.cuda.current_device())  # the per-call lookup: no strings built
    if fast in _TUNED:
        return _TUNED[fast]
    full = f"{torch.cuda.get_device_name()}|triton {triton.__version__}|{name}|{key}"
    path = _cache_file()
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    if full in stored and tuple(stored[full]) in candidates:
        _TUNED[fast] = tuple(stored[full])
        return _TUNED[fast]
    from triton.testing import do_bench

    times = {cfg: do_bench(lambda: run(cfg), warmup=5, rep=20, return_mode="median") for cfg in candidates}
    best = min(times, key=times.get)
    if os.environ.get("SPATIAL_MAMBA_TUNE_LOG") == "1":
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
