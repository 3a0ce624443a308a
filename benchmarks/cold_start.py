"""Cold start of training: the first step's wall time of a fresh process with empty Triton, inductor and tile
caches (what every new GPU machine pays: kernel compilation, tile choice, torch.compile), then steady training
img/s in a few repeated windows (compiled throughput varies from process to process: look at all of them).

    python benchmarks/cold_start.py                          # T, fused, bf16, batch 128: eager and compiled
    python benchmarks/cold_start.py --models t,s --modes compiled --windows 5
    python benchmarks/cold_start.py --modes compiled,regional     # whole graph against one graph per stage shape
    python benchmarks/cold_start.py --modes regional --parallel   # the stages' graphs compiled in parallel processes
    python benchmarks/cold_start.py --modes regional-cudagraphs --parallel --sanity   # an evaluation forward first
    python benchmarks/cold_start.py --modes compiled --profile prof   # where the first step's time goes
    python benchmarks/cold_start.py --modes graphed,cudagraphs --fused-norms   # no compile against compiled graphs
    python benchmarks/cold_start.py --modes regional --set _inductor.config.reorder_for_peak_memory=False
                                                             # a compiler setting's effect on the cold start

`--compile-cache FILE` gives the compiled modes torch.compile's artifacts in a file (src/compiling.py,
`CompileCache`, the LightningModules' `compile_cache`): loaded before the compile when it exists, written after the
first step. Run twice: the first run, from empty caches, writes it; the second, again from empty caches (a new
machine), loads it first.

`--set NAME=VALUE` (repeatable) sets `torch.NAME` (a dynamo, inductor or functorch config entry, e.g.
`_inductor.config.pattern_matcher=False`) in the child after the model's own compile settings, before the first
step; VALUE is a Python literal. For the compiled modes each row also gives dynamo's and inductor's phase times
(`torch._dynamo.utils.compilation_time_metrics`, summed over the graphs; phases nest, so they do not add up).

`--profile DIR` runs the first step under cProfile and writes DIR/<model>-<mode>.pstats (open it with
`python -m pstats` or snakeviz), prints its 30 costliest functions by cumulative time and 20 by own time and,
for compiled modes, dynamo's and inductor's phase times (`torch._dynamo.utils.compile_times`). The profiler
slows Python-heavy work (dynamo, inductor, Triton's front end) about twofold: read its shares, not its seconds.
It sees the main thread only (the backward runs on autograd's thread).

Each model × mode runs in its own child process (fresh caches under a temporary folder). Prints one JSON line
per run and a Markdown table at the end, with the number and seconds of the @triton.jit compiles inside the first
step (this project's kernels): those in the step's path, which it waits for, and those compiled ahead in
background threads (src/kernels/ahead.py; their seconds overlap each other and the step, so they do not add to
it). Inductor's own kernels compile in its worker processes and are not counted. For the compiled modes a
column gives the time from the compile call to the end of the first step: with `--parallel` the workers start
at that call, so their start-up counts there (the gap holds nothing else: an input tensor, the optimizer), and
each worker's timeline is printed (seconds from the first forward: spawned, started, imported, CUDA context,
warm, job received, ready, forward and backward compiled and run) with its longest compile phases.
`--sanity` runs an evaluation-mode forward without gradients before the first step, as a `fit`'s sanity check
does (timed apart, in the row's label; the from-the-compile-call column includes it). `SPATIAL_MAMBA_COMPILE_AHEAD=0`
in the environment turns the compiling ahead off (rows say so). Peak GB is that of the timed windows; for the
modes replayed as CUDA graphs it is the whole run's (their memory pool is allocated while recording). Needs a
CUDA GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from src.errors import UserError, reports_user_errors  # noqa: E402


@contextlib.contextmanager
def _slow_triton_compiles(threshold_s: float = 0.3):
    """Yields a list that collects (kernel name, seconds, in the step?) for each @triton.jit compile in the block
    that took longer than `threshold_s` (a real compile; a variant found in Triton's disk cache loads in
    milliseconds). Not in the step: compiled ahead by src/kernels/ahead.py's threads, in parallel with it (the
    step's own compiles run on the main thread or, in the backward, on autograd's thread)."""
    import threading

    from triton.runtime.jit import JITFunction

    found, do_compile = [], JITFunction._do_compile

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return do_compile(self, *args, **kwargs)
        finally:
            if time.perf_counter() - start > threshold_s:
                found.append((self.fn.__name__, time.perf_counter() - start,
                              not threading.current_thread().name.startswith("triton-ahead")))

    JITFunction._do_compile = timed
    try:
        yield found
    finally:
        JITFunction._do_compile = do_compile


MODES = ("eager", "compiled", "regional", "cudagraphs", "regional-cudagraphs", "graphed")


def _profiled(fn, path: str) -> None:
    """Run fn() under cProfile, save the stats to `path` and print the costliest entries to stderr."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(fn)
    prof.dump_stats(path)
    stats = pstats.Stats(prof, stream=sys.stderr)
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(20)


def _config_owner(name: str):
    """(object, attribute) for a dotted NAME under torch, e.g. "_inductor.config.triton.autotune_pointwise":
    the longest importable module prefix, then attributes down to the last one; None where there is none."""
    import importlib

    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module("torch." + ".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:-1]:
            owner = getattr(owner, attr, None)
        return (owner, parts[-1]) if owner is not None and hasattr(owner, parts[-1]) else None
    return None


def parse_settings(items: list[str]) -> list[tuple[str, object]]:
    """`--set` entries "NAME=VALUE" as (NAME, value); a bad entry or a NAME that is not a config entry under
    torch is a UserError naming it."""
    import ast

    out = []
    for item in items:
        name, sep, raw = item.partition("=")
        bad = object()
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = bad
        if not sep or value is bad or _config_owner(name.strip()) is None:
            raise UserError(f"--set {item!r}: expected NAME=VALUE with NAME a config entry under torch (e.g. "
                            "_inductor.config.pattern_matcher) and VALUE a Python literal (False, 64, 0.8)")
        out.append((name.strip(), value))
    return out


def apply_settings(settings: list[tuple[str, object]]) -> None:
    for name, value in settings:
        owner, attr = _config_owner(name)
        setattr(owner, attr, value)


def _phase_times(top: int = 10) -> dict:
    """Dynamo's timed compile phases, seconds summed over the graphs, the `top` longest."""
    from torch._dynamo.utils import compilation_time_metrics

    sums = {k: round(sum(v), 1) for k, v in compilation_time_metrics.items()}
    return dict(sorted(sums.items(), key=lambda kv: -kv[1])[:top])


def child(model_name: str, mode: str, batch: int, size: int, warmup: int, steps: int, windows: int,
          profile: str | None = None, fused_norms: bool = False, settings: list | None = None,
          compile_cache: str | None = None, parallel: bool = False, sanity: bool = False) -> dict:
    import torch
    import torch.nn as nn

    from src.cudagraphs import graph_step
    from src.models import spatial_mamba

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = getattr(spatial_mamba, f"spatial_mamba_{model_name}")(backend="fused", fused_norms=fused_norms)
    model = model.to(device).to(memory_format=torch.channels_last)
    graphed = mode == "graphed"
    cache, loaded, compile_call = None, 0, None
    if mode not in ("eager", "graphed"):
        from src.compiling import CompileCache, compile_for_training

        if compile_cache:
            cache = CompileCache(compile_cache, key="--compile-cache")
            start = time.perf_counter()
            loaded = cache.load()
            loaded_s = time.perf_counter() - start

        # the LightningModules' default memory budget; with `parallel` the workers start here
        compile_call = time.perf_counter()
        compile_for_training(model, regional=mode.startswith("regional"), cudagraphs=mode.endswith("cudagraphs"),
                             parallel=parallel)
    apply_settings(settings or [])
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=graphed)
    criterion = nn.CrossEntropyLoss()

    def one_step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graphed):
            loss = criterion(model(x).float(), y)
        loss.backward()
        opt.step()
        if not graphed:  # graphed: the recorded backward writes the gradients in place at every replay
            opt.zero_grad(set_to_none=True)

    # graphed: the eager step recorded as one CUDA graph at its first call (three warm-up runs, then the recording)
    one = graph_step(one_step, opt, device) if graphed else one_step

    def run(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            one()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    def sanity_check() -> float:
        """An evaluation-mode forward without gradients before training, as a `fit`'s sanity check runs one:
        its graphs compile first (and the parallel compile's workers serve both)."""
        start = time.perf_counter()
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)
        torch.cuda.synchronize()
        model.train()
        return round(time.perf_counter() - start, 1)

    sanity_s = sanity_check() if sanity else None

    def first_step() -> dict:
        start = time.perf_counter()
        with _slow_triton_compiles() as compiled_in_step:
            run(1)
        main = [s for _, s, in_step in compiled_in_step if in_step]
        ahead = [s for _, s, in_step in compiled_in_step if not in_step]
        end = time.perf_counter()
        # from the compile call: what the first step owes to work started before it (the parallel compile's
        # workers warm up from that call on); the gap holds no other work here (an input tensor, the optimizer)
        since = {} if compile_call is None else dict(since_compile_s=round(end - compile_call, 1))
        since.update({} if sanity_s is None else dict(sanity_s=sanity_s))
        return dict(first_step_s=round(end - start, 1), **since, triton_compiles=len(main),
                    triton_compile_s=round(sum(main), 1), ahead_compiles=len(ahead),
                    ahead_compile_s=round(sum(ahead), 1))

    if cache is not None:
        first_step_inner = first_step

        def first_step() -> dict:  # the loading counts towards the first step, as it does in a `fit`
            out = first_step_inner()
            out["first_step_s"] = round(out["first_step_s"] + loaded_s, 1)
            return dict(out, cache_loaded=loaded, cache_written=cache.save())

    if profile:
        first = {}
        _profiled(lambda: first.update(first_step()), os.path.join(profile, f"{model_name}-{mode}.pstats"))
        if mode not in ("eager", "graphed"):
            print(torch._dynamo.utils.compile_times(repr="str"), file=sys.stderr, flush=True)
    else:
        first = first_step()
    run(warmup)
    if "cudagraphs" not in mode and not graphed:  # (CUDA graphs: their pool is allocated while recording)
        torch.cuda.reset_peak_memory_stats()
    rates = [round(batch * steps / run(steps)) for _ in range(windows)]
    label = mode + (" + Triton norms" if fused_norms else "") + "".join(f", {k}={v}" for k, v in settings or [])
    hooks = [h for h in model._forward_pre_hooks.values() if hasattr(h, "seconds")]
    parallel = [f"{s:.1f}" for h in hooks for s in h.seconds]  # one per input signature (evaluation, training)
    label += f", graphs compiled in parallel processes ({' + '.join(parallel)} s)" if parallel else ""
    label += f", {loaded} cached artifacts loaded" if loaded else ""
    label += f", sanity check first ({sanity_s} s)" if sanity else ""
    label += ", compile ahead off" if os.environ.get("SPATIAL_MAMBA_COMPILE_AHEAD") == "0" else ""
    phases = _phase_times(40 if profile else 10) if mode not in ("eager", "graphed") else {}
    workers = [r for h in hooks for rs in h.reports for r in rs]
    return dict(model=model_name, mode=label, **first, img_s=rates, phases=phases, workers=workers,
                peak_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2), device=torch.cuda.get_device_name())


@reports_user_errors
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="t", help="comma list of t, s, b")
    p.add_argument("--modes", default="eager,compiled", help="comma list of eager, compiled (whole graph), "
                   "regional (one graph per stage shape), cudagraphs and regional-cudagraphs (the same replayed as "
                   "CUDA graphs), graphed (no compile: the eager step recorded as one CUDA graph, src/cudagraphs.py)")
    p.add_argument("--fused-norms", action="store_true", help="the backbone's LayerNorms as Triton kernels in eager "
                   "mode and in graphed (fused_norms; compiled modes trace plain LayerNorms either way)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps after the first")
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--windows", type=int, default=3, help="timed windows")
    p.add_argument("--profile", metavar="DIR", help="profile the first step (cProfile stats into DIR, summary "
                   "printed; the profiler itself slows the step)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="set torch.NAME (a dynamo / "
                   "inductor / functorch config entry) in every run, e.g. _inductor.config.pattern_matcher=False")
    p.add_argument("--parallel", action="store_true", help="regional modes: compile the stages' block graphs in "
                   "parallel worker processes first (src/compiling.py, ParallelRegionalCompile)")
    p.add_argument("--sanity", action="store_true", help="before the first training step, an evaluation-mode "
                   "forward without gradients (a fit's sanity check), timed apart; 'from the compile call' includes it")
    p.add_argument("--compile-cache", metavar="FILE", help="compiled modes: load torch.compile's artifacts from FILE "
                   "if it exists, write them there after the first step (see above)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    settings = parse_settings(args.set)
    if args.child:
        model_name, mode = args.child.split(":")
        print("RESULT " + json.dumps(child(model_name, mode, args.batch, args.size, args.warmup, args.steps,
                                           args.windows, args.profile, args.fused_norms, settings,
                                           args.compile_cache, args.parallel, args.sanity)), flush=True)
        return
    bad = [m for m in args.modes.split(",") if m not in MODES]
    bad += [m for m in args.models.split(",") if m not in ("t", "s", "b")]
    if bad:
        raise UserError(f"unknown model or mode {bad}; models are t, s, b and modes {', '.join(MODES)}")
    rows = []
    for model_name in args.models.split(","):
        for mode in args.modes.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(tmp, "triton"),
                           TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"),
                           SPATIAL_MAMBA_CACHE=os.path.join(tmp, "tiles"))
                cmd = [sys.executable, __file__, "--child", f"{model_name}:{mode}", "--batch", str(args.batch),
                       "--size", str(args.size), "--warmup", str(args.warmup), "--steps", str(args.steps),
                       "--windows", str(args.windows)] + (["--fused-norms"] if args.fused_norms else [])
                cmd += [f"--set={item}" for item in args.set]
                if args.compile_cache:
                    cmd += ["--compile-cache", os.path.abspath(args.compile_cache)]
                cmd += ["--parallel"] if args.parallel else []
                cmd += ["--sanity"] if args.sanity else []
                if args.profile:
                    os.makedirs(args.profile, exist_ok=True)
                    cmd += ["--profile", os.path.abspath(args.profile)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if args.profile:
                    print(out.stderr[-20000:], file=sys.stderr, flush=True)
            lines = [line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            row = json.loads(lines[-1]) if lines else dict(model=model_name, mode=mode, error=out.stderr[-300:])
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| model | mode | first step s (cold) | from the compile call s | @triton.jit compiles in the step: "
          "count / s | the same in the background | train img/s per window | peak GB |\n"
          "|---|---|---:|---:|---:|---:|---|---:|")
    for r in rows:
        if "error" in r:
            error = r["error"].splitlines()[-1] if r["error"] else ""
            print(f"| {r['model']} | {r['mode']} | failed | | | | {error} | |")
        else:
            print(f"| {r['model']} | {r['mode']} | {r['first_step_s']} | {r.get('since_compile_s', '')} | "
                  f"{r['triton_compiles']} / "
                  f"{r['triton_compile_s']} | {r['ahead_compiles']} / {r['ahead_compile_s']} | "
                  f"{' / '.join(map(str, r['img_s']))} | {r['peak_gb']} |")
    for r in rows:
        for w in r.get("workers", []):
            print(f"worker, {r['model']} {r['mode']}, stage input {tuple(w['shape'])}: "
                  + ", ".join(f"{k} {w[k]:+.1f}" for k in ("spawned", "started", "imported", "cuda", "warm", "job",
                                                          "ready", "forward", "backward") if k in w)
                  + " s (from the first forward); phases: " + ", ".join(f"{k} {v}" for k, v in
                                                                         list(w["phases"].items())[:5]))
        if r.get("phases"):
            print(f"\ncompile phases, {r['model']} {r['mode']} (s, summed over graphs; nested): "
                  + ", ".join(f"{k} {v}" for k, v in r["phases"].items()))


if __name__ == "__main__":
    sys.exit(main())
