"""Where does a training step's time go? Profiles a few training steps of a backbone on the GPU and prints
the device time per kind of kernel (this project's SSM kernels, inductor's generated kernels, convolutions,
matrix products, normalisations, other PyTorch kernels) and the top kernels, then the wall time of a step
measured without the profiler: a wall time well above the kernels' sum means the GPU waits for the host
(launch-bound or synchronising). Compiled, it first prints the first step's time and torch's own timers of the
compile's phases (tracing, AOT autograd, inductor's lowering and code generation, kernel compiles).

    python benchmarks/profile_step.py --model t --backend fused --compile --batch 128
    python benchmarks/profile_step.py --compile --regional --cudagraphs    # as compile_regional + compile_cudagraphs

Compiled steps compile as the LightningModules do (`src.compiling.compile_for_training`: the activation memory
budget, in place; `--regional`: one graph per stage shape; `--cudagraphs`: the graphs replayed as CUDA graphs),
so two runs of the script put the whole graph's and the regional graphs' steps side by side, kind by kind.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.compiling import DEFAULT_MEMORY_BUDGET, compile_for_training  # noqa: E402
from src.errors import UserError, reports_user_errors  # noqa: E402
from src.timing import host_issue_s  # noqa: E402
from src.models.spatial_mamba import spatial_mamba_b, spatial_mamba_s, spatial_mamba_t  # noqa: E402

FACTORIES = {"t": spatial_mamba_t, "s": spatial_mamba_s, "b": spatial_mamba_b}
# kinds of kernels, by name: the first whose pattern occurs in the kernel's name (lower case) wins
KINDS = (
    ("SSM op (this project's kernels)", ("_scan_fwd_kernel", "_scan_bwd_kernel", "_fusion_fwd_kernel",
                                         "_fusion_bwd_state_kernel", "_fusion_bwd_param_kernel",
                                         "_weight_grad_kernel", "_mix_weights_kernel", "_fusion_edge_kernel",
                                         "_column_sums_kernel")),
    ("LayerNorm (this project's kernels)", ("_ln_fwd_kernel", "_ln_bwd_kernel")),
    ("depthwise conv (this project's kernels)", ("_dwconv_",)),
    ("drop path (this project's kernels)", ("_drop_path_",)),
    ("inductor-generated", ("triton_",)),
    ("convolution", ("conv", "cudnn", "implicit_gemm", "winograd", "dgrad", "wgrad", "fprop")),
    ("matrix product", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "ampere_", "cublas")),
    ("normalisation", ("norm", "welford")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("other PyTorch", ("",)),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next(kind for kind, patterns in KINDS if any(p in low for p in patterns))


@reports_user_errors
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="t")
    p.add_argument("--backend", default="fused")
    p.add_argument("--compile", action="store_true", help="compile as the LightningModules do (one graph)")
    p.add_argument("--regional", action="store_true", help="with --compile: one graph per stage shape")
    p.add_argument("--cudagraphs", action="store_true", help="with --compile: replay the graphs as CUDA graphs")
    p.add_argument("--compile-stem", action="store_true",
                   help="with --regional: compile the stem and each downsampling as graphs of their own too (the "
                        "backbone's regional compilation leaves them eager)")
    p.add_argument("--memory-budget", type=float, default=DEFAULT_MEMORY_BUDGET,
                   help="activation memory budget of the compiled graphs (src/compiling.py)")
    p.add_argument("--fused-norms", choices=["on", "off"], default="off",
                   help="the fused backend's LayerNorms as Triton kernels (on) or nn.LayerNorm (off, the default)")
    p.add_argument("--fused-convs", choices=["on", "off"], default="off",
                   help="the fused backend's depthwise convolutions as Triton kernels (on) or nn.Conv2d (off, the "
                        "default)")
    p.add_argument("--fused-drop-path", choices=["on", "off"], default="off",
                   help="the fused backend's residual adds with stochastic depth as Triton kernels (on) or plain ops")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace", default=None, help="write a Chrome trace here")
    p.add_argument("--cpu-top", type=int, default=0, help="also list this many host-side ops by self CPU time")
    args = p.parse_args()
    if (args.regional or args.cudagraphs or args.compile_stem) and not args.compile:
        raise UserError("--regional, --cudagraphs and --compile-stem choose how --compile compiles; add --compile")
    if args.compile_stem and not args.regional:
        raise UserError("--compile-stem adds the stem and the downsamplings to --regional's graphs; add --regional")
    if not torch.cuda.is_available():
        raise UserError("profile_step.py profiles a step on a CUDA GPU; none is visible to torch")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    model = FACTORIES[args.model](backend=args.backend, fused_norms=args.fused_norms == "on",
                                  fused_convs=args.fused_convs == "on", fused_drop_path=args.fused_drop_path == "on")
    model = model.to(device).to(memory_format=torch.channels_last)
    if args.compile:
        compile_for_training(model, memory_budget=args.memory_budget, regional=args.regional,
                             cudagraphs=args.cudagraphs)
        if args.compile_stem:
            for module in (model.stem, *model.downsamples):
                module.compile(**({"mode": "reduce-overhead"} if args.cudagraphs else {}))
    fn = model
    how = ("compiled" + (", regional" if args.regional else ", whole graph")
           + (" + stem and downsamplings" if args.compile_stem else "")
           + (", CUDA graphs" if args.cudagraphs else "")) if args.compile else "eager"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(fn(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(4):
        step()
    torch.cuda.synchronize()
    if args.compile:
        # the first step's tracing and compiling by phase (torch's own timers; nested phases overlap)
        names, times = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
        phases = sorted(((float(t), n) for n, t in zip(names, times)), reverse=True)[:args.top]
        print(f"first step {first:.1f} s; its longest compile phases (s, summed over graphs):")
        for t, name in phases:
            print(f"{t:9.2f}  {name}")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    print(f"{args.model} {args.backend} {how} batch {args.batch}: {total / 1e3 / args.steps:.1f} ms of kernels per "
          f"step, {sum(e.count for e in events) // args.steps} kernel launches")
    kinds: dict[str, list[float]] = {}
    for e in events:
        k = kinds.setdefault(kernel_kind(e.key), [0.0, 0])
        k[0] += e.self_device_time_total
        k[1] += e.count
    print(f"{'share':>6} {'ms/step':>8} {'kernels':>7}  kind")
    for kind, (t, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        print(f"{100 * t / total:5.1f}% {t / 1e3 / args.steps:8.2f} {n // args.steps:7d}  {kind}")
    print(f"{'share':>6} {'ms/step':>8} {'calls':>6}  kernel")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[: args.top]:
        print(f"{100 * e.self_device_time_total / total:5.1f}% {e.self_device_time_total / 1e3 / args.steps:8.2f} "
              f"{e.count // args.steps:6d}  {e.key[:110]}")
    if args.trace:
        prof.export_chrome_trace(args.trace)
    wall_steps = max(10, args.steps)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(wall_steps):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / wall_steps
    print(f"wall time per step (no profiler, {wall_steps} steps): {wall * 1e3:.1f} ms = {args.batch / wall:.0f} img/s; "
          f"kernels {total / 1e3 / args.steps:.1f} ms ({100 * total / 1e6 / args.steps / wall:.0f} % of the wall "
          f"time); peak memory since the start {torch.cuda.max_memory_allocated() / 1e9:.1f} GB")
    # the host's share: from an idle GPU, how long the host takes to issue one step (until step() returns) and
    # how many times the step makes the host wait for the GPU (torch's sync debug mode warns on each)
    issue = host_issue_s(step, device, repeats=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0][:100] for w in caught  # (less torch's notice that the mode is a prototype)
             if "synchroniz" in str(w.message).lower() and "prototype" not in str(w.message)]
    print(f"host time to issue one step: {1e3 * issue:.1f} ms (median of 5); "
          f"synchronising calls in a step: {len(syncs)}" + "".join(f"\n  {m}" for m in syncs[:10]))
    if args.cpu_top:
        with profile(activities=[ProfilerActivity.CPU]) as cpu_prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        ops = [e for e in cpu_prof.key_averages() if e.self_cpu_time_total > 0]
        cpu_total = sum(e.self_cpu_time_total for e in ops)
        print(f"host (CPU) time per step under the profiler: {cpu_total / 1e3 / args.steps:.1f} ms; top ops by self time:")
        for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[: args.cpu_top]:
            print(f"{e.self_cpu_time_total / 1e3 / args.steps:8.2f} ms {e.count // args.steps:6d}  {e.key[:100]}")


if __name__ == "__main__":
    sys.exit(main())
