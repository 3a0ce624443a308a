"""Registers, spills and shared memory of the Triton kernels' compiled variants — on any machine, no GPU needed.

A tile that spills registers is slow whatever else it does well, and finding out on a GPU costs a timing run per
candidate. This script runs the ops' dry runs (their launchers on meta tensors, as `src/kernels/ahead.py` does
before a first call) at the shapes of Spatial-Mamba-T's four stages with every candidate tile, collects every
kernel variant they would launch, compiles each for the target architecture with Triton's compiler and asks
ptxas (`-v`, the copy inside the Triton wheel) what it uses, and reads the PTX's loops. Prints one row per
variant:

    python benchmarks/registers.py                          # the fused op's kernels, sm_90, bf16
    python benchmarks/registers.py --ops fused,dwconv,norms --arch 90 --dtype bf16
    python benchmarks/registers.py --ops norms --stages 1   # one stage only (quick)
    python benchmarks/registers.py --stages 4 --writes      # and what a compiled graph takes each to write

A row with spill stores, or at 255 registers with few warps, is one to time before choosing it. `--writes` adds a
column: the arguments that torch's inductor takes the variant to write (its analysis of the kernel's Triton IR, as
for the kernels of a `torch.library.triton_op` in a compiled graph); an input listed there is copied at every
call. The columns "loads in loops" and "barriers in loops" count what runs at every step of the kernel's loops
(between a loop's header and its back-branch in the PTX): global loads (and `cp.async` copies), and `bar.sync`
barriers. Barriers there are usually a layout conversion through shared memory, e.g. a (BLOCK_D,) weight vector
broadcast onto a tile that holds more channels a thread than the vector's own layout (the fusion dh kernel's
8 × 128 tile on 4 warps had two barriers per tap and row; its `W2D` variant loads the weights in the tile's layout
instead, without them). Loads there that do not change from one step to the next (Triton does not hoist them) are
worth loading before the loop, as the fusion forward's `HOISTED` tiles do.

The variants are compiled without the per-argument alignment hints of a real launch, so the counts can differ a
little from those of the GPU's compile; the installed Triton may also differ from the one on the GPU. Older
Tritons refuse some code that newer ones compile (Triton 3.6 a jit function's tuple default argument, which 3.8
and the interpreter accept), so a kernel change is worth compiling with the GPU machine's Triton too: run the
script from an environment that has that version (a `failed:` row names the error).
"""

from __future__ import annotations

import argparse
import glob
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from src.errors import UserError, reports_user_errors
from src.kernels import ahead, dwconv, fused, norms, triton_scan

STAGES = [(128, 56, 2), (256, 28, 4), (512, 14, 8), (1024, 7, 4)]  # T: (SSM channels, map side, blocks)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
               torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
_TUNED_MODULES = (triton_scan, fused, dwconv)  # modules that take tiles from `pick_config`


def capture(dry_runs) -> list[tuple]:
    """(kernel, positional arguments, keyword arguments) of every launch the dry runs make, each candidate tile
    of every tuned kernel included, in launch order."""
    launches: list[tuple] = []

    def every_candidate(name, key, candidates, run, *args, **kwargs):
        for cfg in candidates:
            run(cfg)
        return candidates[0]

    saved = {m: m.pick_config for m in _TUNED_MODULES}
    saved_submit, saved_sms = ahead._submit, dict(triton_scan._SMS)
    ahead._submit = lambda kernel, args, kwargs: launches.append((kernel, args, kwargs))
    triton_scan._SMS[0] = 132  # an H100's multiprocessors: the grids' row bands follow it
    for m in _TUNED_MODULES:
        m.pick_config = every_candidate
    ahead._local.device = torch.device("cuda", 0)
    ahead._add_mode(1)  # launches then read the thread's state (as inside `ahead.plan`)
    try:
        for run in dry_runs:
            run()
    finally:
        ahead._local.device = None
        ahead._add_mode(-1)
        ahead._submit = saved_submit
        triton_scan._SMS.clear()
        triton_scan._SMS.update(saved_sms)
        for m, fn in saved.items():
            m.pick_config = fn
    return launches


def dry_runs(ops: list[str], dtype: torch.dtype, stages: list[int]) -> list:
    """The ops' dry runs at T's stage shapes (batch 128, meta tensors)."""
    def meta(*shape, dt=dtype):
        return torch.empty(*shape, device="meta", dtype=dt)

    runs = []
    for i in stages:
        D, side, _ = STAGES[i - 1]
        L, C = side * side, D // 2  # the block's width is half the SSM's channels
        if "fused" in ops:
            args = (meta(128, L, D), meta(128, L, D), meta(D, 1, dt=torch.float32), meta(128, L, 1), meta(128, L, 1),
                    meta(D, dt=torch.float32), meta(D, dt=torch.float32), meta(3, D, 3, 3, dt=torch.float32),
                    meta(3, dt=torch.float32))
            runs.append(lambda a=args, s=side: fused._plan_fused(*a, [1, 3, 5], s, s, ("row",)))
        if "dwconv" in ops:
            for ch, silu in ((C, False), (D, True)):  # the positional encodings, the SSM's convolution
                runs.append(lambda ch=ch, silu=silu, s=side: dwconv._plan(
                    meta(128, s, s, ch), meta(ch, 1, 3, 3, dt=torch.float32), meta(ch, dt=torch.float32), silu,
                    not silu))
        if "norms" in ops:
            for n, gated in ((C, False), (D, True)):  # the blocks' norms, the SSM's gated out-norm
                x = meta(128 * L, n)
                runs.append(lambda x=x, n=n, gated=gated: norms._plan(
                    x, x if gated else None, meta(n, dt=torch.float32), meta(n, dt=torch.float32), 1e-5))
    return runs


def signature(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """(Triton signature, constexpr values, 16-divisibility hints, compile options) of one launch, specialised
    as Triton's launcher does: an integer argument of 1 becomes a constant, pointers at 16-byte aligned addresses
    and integers divisible by 16 get the divisibility hint (except where the kernel asks not to specialise)."""
    sig, consts, attrs = {}, {}, {}
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    for i, p in enumerate(kernel.params):
        if i < len(args):
            v = args[i]
        elif p.name in kwargs:
            v = kwargs[p.name]
        else:
            v = p.default
        free = getattr(p, "do_not_specialize", False)
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _TYPE_NAMES[v.dtype]
            if v.data_ptr() % 16 == 0 and not getattr(p, "do_not_specialize_on_alignment", False):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            if v == 1 and not free:
                sig[p.name], consts[p.name] = "constexpr", 1
            else:
                sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0 and not free:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            sig[p.name], consts[p.name] = "constexpr", v
    return sig, consts, attrs, options


def _ptxas() -> str:
    import triton

    found = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))
    if not found:
        raise UserError("ptxas not found in the Triton wheel (triton/backends/nvidia/bin/ptxas); this script needs "
                        "Triton's CUDA backend")
    return found[0]


def usage(kernel, sig: dict, consts: dict, attrs: dict, options: dict, arch: int) -> dict:
    """Registers, spill stores / loads and stack bytes per thread (ptxas -v) and shared memory of one variant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    target = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([_ptxas(), "-v", f"--gpu-name={target}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)

    def number(pattern):
        m = re.search(pattern, out)
        return int(m.group(1)) if m else 0

    return dict(registers=number(r"Used (\d+) registers"), spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"), stack=number(r"(\d+) bytes stack frame"),
                shared=int(getattr(compiled.metadata, "shared", 0)), **loop_counts(ptx))


def loop_counts(ptx: str) -> dict:
    """Global loads (`ld.global`, and `cp.async` copies to shared memory of pipelined loops) and `bar.sync`
    barriers inside the PTX's loops: the lines between a label and a branch back to it (each line counted once,
    however many loops hold it)."""
    lines = ptx.splitlines()
    labels: dict[str, int] = {}
    inside: set[int] = set()
    for i, line in enumerate(lines):
        m = re.match(r"^(\$L__\w+):", line)
        if m:
            labels[m.group(1)] = i
            continue
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
        if m and labels.get(m.group(1), i) < i:
            inside.update(range(labels[m.group(1)] + 1, i))
    return dict(loop_loads=sum(1 for i in inside if re.search(r"\bld\.global\b|\bcp\.async\.c[ag]\.", lines[i])),
                loop_barriers=sum(1 for i in inside if "bar.sync" in lines[i]))


def variants(launches: list[tuple]) -> list[tuple]:
    """Distinct (kernel, signature, constexprs, hints, options, (args, kwargs) of its first launch) in first-launch
    order."""
    seen, out = set(), []
    for kernel, args, kwargs in launches:
        sig, consts, attrs, options = signature(kernel, args, kwargs)
        key = (id(kernel), tuple(sig.items()), tuple(sorted(consts.items())), tuple(sorted(attrs)),
               tuple(sorted(options.items())))
        if key not in seen:
            seen.add(key)
            out.append((kernel, sig, consts, attrs, options, (args, kwargs)))
    return out


class _TargetOnly:
    """The one thing of a GPU driver that generating a kernel's Triton IR asks for: the target."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target


def writes(kernel, args: tuple, kwargs: dict, arch: int) -> list[str]:
    """The pointer arguments that torch's inductor takes this launch to write, from its analysis of the kernel's
    Triton IR — what a compiled graph assumes of a kernel launched inside a `torch.library.triton_op`. An input
    among them costs the graph a copy of that tensor at every call (it is cloned before the launch, and copied
    back where it is a graph input); the analysis takes every pointer argument of a helper call whose results a
    store's address depends on for written. Raises where the analysis fails (the graph then copies every tensor)."""
    import triton
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    named = {}
    for param, a in zip(kernel.params, args):
        named[param.name] = torch.empty(2, dtype=a.dtype) if isinstance(a, torch.Tensor) else a
    for param in kernel.params[len(args):]:
        if param.name in kwargs:
            named[param.name] = kwargs[param.name]
        elif param.default is not inspect.Parameter.empty:
            named[param.name] = param.default
    drivers = triton.runtime.driver
    before = getattr(drivers, "_active", None)  # (resetting would look for a GPU driver; there may be none)
    drivers.set_active(_TargetOnly(arch))
    try:
        if hasattr(wrap, "identify_accessed_tensors"):  # torch >= 2.12
            written = {dep.name for dep in wrap.identify_accessed_tensors(kernel, named, {}).read_writes.writes}
        else:
            written = set(wrap.identify_mutated_tensors(kernel, named, {}))
    finally:
        drivers._active = before
    tensors = [name for name, v in named.items() if isinstance(v, torch.Tensor)]
    if set(tensors) <= written and len(tensors) > 1:  # also what the analysis answers when it fails
        raise RuntimeError(f"every tensor argument taken for written: {sorted(written)}")
    return sorted(written)


def _label(consts: dict) -> str:
    """The kernel's own constexprs (upper-case names), not the arguments specialised to 1."""
    return " ".join(f"{k}={v}" for k, v in consts.items() if k.isupper() and v is not None)


@reports_user_errors
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="fused", help="comma list of fused, dwconv, norms")
    p.add_argument("--arch", type=int, default=90, help="compute capability × 10 (90: H100 / H200)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--stages", default="1,2,3,4", help="which of T's stages (1 = 56×56 ... 4 = 7×7)")
    p.add_argument("--writes", action="store_true",
                   help="also list the arguments a compiled graph takes each variant to write (inductor's analysis of "
                        "its Triton IR, as for a torch.library.triton_op): an input among them is copied at every call")
    args = p.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(ops) - {"fused", "dwconv", "norms"})
    if unknown:
        raise UserError(f"--ops: unknown {unknown}; expected a comma list of fused, dwconv, norms")
    try:
        stages = sorted({int(s) for s in args.stages.split(",")})
    except ValueError:
        raise UserError(f"--stages must be a comma list of 1 ... 4, got {args.stages!r}") from None
    if not stages or not set(stages) <= {1, 2, 3, 4}:
        raise UserError(f"--stages must be a comma list of 1 ... 4, got {args.stages!r}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise UserError("TRITON_INTERPRET=1 is set: the interpreter's kernels cannot be compiled; unset it")
    found = variants(capture(dry_runs(ops, DTYPES[args.dtype], stages)))
    print(f"{len(found)} kernel variants, sm_{args.arch}, {args.dtype}, T's stages {stages}\n", flush=True)
    print("| kernel | constexprs | warps | registers | spill stores / loads (bytes) | stack | shared | loads in loops "
          "| barriers in loops |" + (" written (compiled graph) |" if args.writes else ""))
    print("|---|---|---:|---:|---|---:|---:|---:|---:|" + ("---|" if args.writes else ""))
    for kernel, sig, consts, attrs, options, (launch_args, launch_kwargs) in found:
        extra = ""
        if args.writes:
            try:
                extra = " " + ", ".join(writes(kernel, launch_args, launch_kwargs, args.arch)) + " |"
            except Exception as e:  # noqa: BLE001 - report it in the row
                extra = f" failed: {type(e).__name__}: {str(e).splitlines()[0][:80]} |"
        try:
            u = usage(kernel, sig, consts, attrs, options, args.arch)
        except Exception as e:  # noqa: BLE001 - report the variant and go on
            print(f"| {kernel.__name__} | {_label(consts)} | {options.get('num_warps', 4)} | failed: "
                  f"{type(e).__name__}: {str(e).splitlines()[0][:80]} | | | | | |{extra}", flush=True)
            continue
        print(f"| {kernel.__name__} | {_label(consts)} | {options.get('num_warps', 4)} | {u['registers']} | "
              f"{u['spill_stores']} / {u['spill_loads']} | {u['stack']} | {u['shared']} | {u['loop_loads']} | "
              f"{u['loop_barriers']} |{extra}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
