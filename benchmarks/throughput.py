"""Whole-model throughput: training img/s (forward + backward + AdamW step), inference img/s and peak
training memory, per model × backend × precision × eager/compiled, with timm baselines measured in the
same run (ConvNeXt-T and Swin-T by default; `--baselines peers` adds ConvNeXt-S/B and MambaOut-T).

    python benchmarks/throughput.py                                  # T, auto backend, bf16, compiled
    python benchmarks/throughput.py --models t,s,b --backends fused,triton --precisions bf16,fp16 --modes eager,compiled
    python benchmarks/throughput.py --config configs/spatial_mamba_t.yaml
    python benchmarks/throughput.py --models t,s,b --modes eager,compiled --baselines peers --json /tmp/tp.json
    python benchmarks/throughput.py --mesa                           # + the recipe's MESA teacher forward
    python benchmarks/throughput.py --no-baselines --no-infer --ddp whole   # inside DDP (one process), as `fit` trains
    python benchmarks/throughput.py --cpu                            # quick look on a CPU (tiny batch)

Protocol: batch 128, 224², 10 warm-up + 30 timed steps, AMP. Prints a table (rows as they finish, the
table at the end), writes the rows as JSON (`--json`, default throughput.json) and, with --record, appends
the table to benchmarks/RESULTS.md with date, device, versions and commit. `--mesa` adds to every training
step what MESA adds in the recipe: a no-grad forward of a frozen copy of the model (the EMA teacher, in eval
mode), so the recipe's img/s can be compared with this loop's at the same work. On a GPU each training row
also gives the host's time to issue one step from an idle GPU beside the step's wall time ("host issue /
wall ms"): where the two are close, the host bounds the step (`--modes cudagraphs` replays the compiled graphs
as CUDA graphs, which takes the launches off the host; `--modes graphed` does the same for the eager step, with
no compile at all: with `--fused-norms on` the fastest start).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import subprocess
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.models.spatial_mamba import spatial_mamba_b, spatial_mamba_s, spatial_mamba_t  # noqa: E402
from src.compiling import DEFAULT_MEMORY_BUDGET, set_memory_budget  # noqa: E402
from src.cudagraphs import graph_step  # noqa: E402
from src.errors import UserError  # noqa: E402
from src.timing import StepTimer, host_issue_s  # noqa: E402

FACTORIES = {"t": spatial_mamba_t, "s": spatial_mamba_s, "b": spatial_mamba_b}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
BASELINES = {  # names for --baselines; anything else is passed to timm.create_model as is
    "default": ["convnext_tiny", "swin_tiny_patch4_window7_224"],
    "peers": ["convnext_tiny", "convnext_small", "convnext_base", "swin_tiny_patch4_window7_224", "mambaout_tiny"],
}
RATIO_BASES = ("convnext_tiny", "swin_tiny_patch4_window7_224")


def build(name: str, backend: str, fused_norms: bool = False, fused_convs: bool = False,
          fused_drop_path: bool = False) -> nn.Module:
    if name in FACTORIES:
        return FACTORIES[name](backend=backend, fused_norms=fused_norms, fused_convs=fused_convs,
                               fused_drop_path=fused_drop_path)
    if name.endswith((".yaml", ".yml")):
        import main

        model = main.cli(["--config", name], run=False).model
        model = getattr(model, "backbone", model)
        model.set_backend(backend, fused_norms, fused_convs, fused_drop_path)
        return model
    import timm  # baselines

    return timm.create_model(name, pretrained=False)


def measure(model: nn.Module, device, batch: int, size: int, dtype, compiled: bool | str, warmup: int, steps: int,
            train: bool, mesa: bool = False, ddp: str = "", extra: dict | None = None,
            backward_device_thread: bool | None = None) -> tuple[float, float, float]:
    """(img/s, peak GB, compile s) of training steps or inference passes, as src.timing defines them: `warmup`
    untimed steps, then `steps` timed ones between synchronised step boundaries; compile s = the first step's
    wall time (tracing, compiling, kernel tile tuning) less a steady step's. compiled: True = one graph,
    "regional" = `SpatialMamba.compile(regional=True)` (one graph per stage shape), "cudagraphs" = one graph
    replayed as CUDA graphs, "regional-cudagraphs" = the regional graphs replayed as CUDA graphs (as the
    LightningModules' compile_regional + compile_cudagraphs), "graphed" = no compile: the eager step (forward,
    loss, backward, AdamW) recorded once as one CUDA graph with `torch.cuda.graph` and replayed
    (`src.cudagraphs.graph_step`). `mesa`: every training step also runs a no-grad forward of a frozen eval-mode
    copy of the model (compiled with it), as MESA's EMA teacher.
    `ddp` ("split" or "whole", training only): the model compiled in place and wrapped in DistributedDataParallel
    over a one-process group, as Lightning's ddp strategy runs it, with dynamo's graph split at DDP's buckets
    (torch's default) or one graph (src/compiling.py)."""
    model = model.to(device).train(train)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats(device)  # (modes that keep their warm-up in the peak: not an earlier row's)
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if mesa and train else None
    fn = model
    if compiled in ("regional", "regional-cudagraphs"):  # the backbone's own, in place (as the LightningModules do)
        regional = dict(regional=True, mode="reduce-overhead" if compiled == "regional-cudagraphs" else None)
        model.compile(**regional)
        if teacher is not None:
            teacher.compile(**regional)
    elif compiled and ddp and train:
        torch._dynamo.config.optimize_ddp = ddp == "split"
        model.compile()
        teacher = torch.compile(teacher) if teacher is not None else None
    elif compiled and compiled != "graphed":
        # "cudagraphs": the graphs replayed as CUDA graphs (torch.compile's mode "reduce-overhead"), so the host no
        # longer launches each kernel of a step
        mode = "reduce-overhead" if compiled == "cudagraphs" else None
        fn = torch.compile(model, mode=mode)
        teacher = torch.compile(teacher, mode=mode) if teacher is not None else None
    if ddp and train:
        fn = _one_process_ddp(model, device)
    x = torch.randn(batch, 3, size, size, device=device)
    if device.type == "cuda":
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    graphed = compiled == "graphed"
    # the backward's thread (src/backward.py), as the LightningModules pick it: PyTorch's worker thread for compiled
    # graphs, the training thread for the eager step (recorded or not), unless `backward_device_thread` says
    device_thread = compiled not in (False, "graphed") if backward_device_thread is None else backward_device_thread
    if graphed and (device.type != "cuda" or (train and dtype == torch.float16)):
        raise ValueError("graphed needs a CUDA GPU and no loss scaling (bf16 or fp32)")
    # graphed: AdamW's step count stays on the GPU (capturable), so the step can be replayed from a CUDA graph
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda", capturable=graphed)
           if train else None)
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16 and train)
    crit = nn.CrossEntropyLoss()

    def step():
        # graphed: autocast's cache of cast weights would hand the graph tensors freed after the capture
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None,
                            cache_enabled=not graphed):
            if not train:
                with torch.inference_mode():
                    return fn(x)
            logits = fn(x).float()
            loss = crit(logits, y)
            if teacher is not None:  # MESA: cross-entropy against the teacher's softmax, as the recipe's
                with torch.no_grad():
                    soft = teacher(x).float().softmax(-1)
                loss = loss + torch.sum(-soft * logits.log_softmax(-1), dim=-1).mean()
        with torch.autograd.set_multithreading_enabled(device_thread):
            scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if not graphed:  # graphed: the captured backward writes the gradients where it wrote them when recorded
            opt.zero_grad(set_to_none=True)

    if graphed:
        step = graph_step(step, opt, device)

    timer = StepTimer(warmup, device)
    timer.begin()
    for _ in range(warmup + steps):
        step()
        timer.step(batch)
        if timer.steps == warmup and device.type == "cuda" and compiled not in ("cudagraphs", "regional-cudagraphs",
                                                                                 "graphed"):
            torch.cuda.reset_peak_memory_stats(device)  # (CUDA graphs: their pool is allocated while recording)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
    if extra is not None and device.type == "cuda":
        extra["host_ms"] = 1e3 * host_issue_s(step, device)
    return timer.img_per_s, peak, timer.compile_s


def _one_process_ddp(model: nn.Module, device) -> nn.Module:
    """`model` in DistributedDataParallel over a process group of this process alone (made on first use)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_initialized():
        import socket

        with socket.socket() as s:  # a free port on this host
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=0, world_size=1)
    return DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)


MODES = ("eager", "compiled", "regional", "cudagraphs", "regional-cudagraphs", "graphed")
BACKWARD_THREADS = {"auto": None, "training": False, "device": True}  # --backward-thread: measure's argument


def run_one(name, backend, prec, mode, args, device, fused_norms: bool = False, fused_convs: bool = False) -> dict:
    ours = name in FACTORIES or name.endswith(".yaml")
    fused_drop_path = args.fused_drop_path == "on"
    label = backend + (", Triton norms" if fused_norms else "") + (", Triton convs" if fused_convs else "") + (
        ", Triton drop path" if fused_drop_path else "")
    row = dict(model=name, backend=label if ours else "-",
               precision=prec, mode=mode + (" + MESA" if args.mesa else "") + (f" + DDP {args.ddp}" if args.ddp else "")
               + ("" if args.backward_thread == "auto" else f" + backward on {args.backward_thread} thread"))
    for train in (True,) if args.no_infer else (True, False):
        key = "train" if train else "infer"
        try:
            torch.manual_seed(0)
            model = build(name, backend, fused_norms, fused_convs, fused_drop_path)
            # measure's `compiled`: False, True (one graph), "regional", "cudagraphs", "regional-cudagraphs" or
            # "graphed"; the timm baselines have no regional compilation and compile as one graph
            compiled = {"eager": False, "compiled": True, "cudagraphs": "cudagraphs", "graphed": "graphed",
                        "regional": "regional" if ours else True,
                        "regional-cudagraphs": "regional-cudagraphs" if ours else "cudagraphs"}[mode]
            extra = {}
            ips, peak, first = measure(model, device, args.batch, args.size, DTYPES[prec], compiled,
                                       args.warmup, args.steps, train, mesa=args.mesa, ddp=args.ddp, extra=extra,
                                       backward_device_thread=BACKWARD_THREADS[args.backward_thread])
            row[f"{key}_ips"] = ips
            row[f"{key}_compile_s"] = first
            if "host_ms" in extra:
                row[f"{key}_host_ms"] = extra["host_ms"]
            if train:
                row["peak_gb"] = peak
        except torch.OutOfMemoryError:
            row[f"{key}_ips"] = float("nan")
            row["note"] = "out of memory"
        except Exception as e:  # a failed row must not end the run: report it
            row[f"{key}_ips"] = float("nan")
            row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        finally:
            model = None
            gc.collect()
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"  {name:>28} {row['backend']:>7} {prec} {row['mode']:>8} {key}: {row.get(f'{key}_ips', float('nan')):8.1f} img/s"
              + (f"  {row['note']}" if "note" in row else ""), flush=True)
    return row


def host_wall(row: dict, batch: int) -> str:
    """"host / wall" ms of a training step: the host's time to issue it from an idle GPU (`host_issue_s`) and
    the steady step's wall time (batch ÷ img/s). Host close to wall: the host bounds the step."""
    host, ips = row.get("train_host_ms"), row.get("train_ips")
    if host is None or not ips or ips != ips:
        return "-"
    return f"{host:.0f} / {1e3 * batch / ips:.0f}"


def table(rows: list[dict], baselines: dict, batch: int) -> str:
    head = ("| model | backend | precision | mode | train img/s | infer img/s | peak train GB | train ÷ ConvNeXt-T | "
            "train ÷ Swin-T | compile s (train / infer) | train step: host issue / wall ms | note |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        compile_s = (f"{r.get('train_compile_s', float('nan')):.0f} / {r.get('infer_compile_s', float('nan')):.0f}"
                     if r["mode"].startswith(("compiled", "regional", "cudagraphs", "graphed")) else "-")
        ratios = []
        for base in RATIO_BASES:
            b = baselines.get((base, r["precision"], r["mode"]))
            ratios.append(f"{r['train_ips'] / b:.2f}" if b else "-")
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['precision']} | {r['mode']} | {r.get('train_ips', float('nan')):.0f} | "
            f"{r.get('infer_ips', float('nan')):.0f} | {r.get('peak_gb', float('nan')):.1f} | {ratios[0]} | {ratios[1]} | "
            f"{compile_s} | {host_wall(r, batch)} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="t", help="comma list of t,s,b")
    p.add_argument("--config", action="append", default=[], help="a config file whose backbone to measure")
    p.add_argument("--backends", default="auto")
    p.add_argument("--precisions", default="bf16")
    p.add_argument("--modes", default="compiled", help="eager,compiled,regional,cudagraphs,regional-cudagraphs,"
                   "graphed (regional: Spatial-Mamba's one graph per stage shape, the baselines compile whole; "
                   "cudagraphs: one graph replayed as CUDA graphs, torch.compile mode 'reduce-overhead'; "
                   "regional-cudagraphs: the regional graphs so replayed; graphed: no compile, the eager "
                   "step's kernels recorded as one CUDA graph with torch.cuda.graph, bf16/fp32 only)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--baselines", default="default",
                   help="timm models measured first, comma list; 'default' = ConvNeXt-T, Swin-T; 'peers' = "
                        "ConvNeXt-T/S/B, Swin-T, MambaOut-T")
    p.add_argument("--no-baselines", action="store_true", help="skip the timm baselines")
    p.add_argument("--baseline-modes", default="", help="modes of the baselines if not --modes (e.g. eager: compiling "
                   "the five peers takes several minutes); the ÷ columns compare rows of one mode")
    p.add_argument("--mesa", action="store_true", help="add MESA's teacher forward to every training step")
    p.add_argument("--memory-budget", type=float, default=DEFAULT_MEMORY_BUDGET,
                   help="activation memory budget of compiled training graphs, as the LightningModules' "
                        "compile_memory_budget (src/compiling.py; 1 = the partitioner's default, less = recompute "
                        "more in the backward)")
    p.add_argument("--fused-norms", default="off", choices=["on", "off", "on,off", "off,on"],
                   help="the fused backend's LayerNorms as Triton kernels in eager mode (on), nn.LayerNorm (off, "
                        "the models' default), or a row of each")
    p.add_argument("--fused-convs", default="off", choices=["on", "off", "on,off", "off,on"],
                   help="the fused backend's depthwise convolutions as Triton kernels in eager mode (on), nn.Conv2d "
                        "(off, the models' default), or a row of each")
    p.add_argument("--fused-drop-path", default="off", choices=["on", "off"],
                   help="the fused backend's residual adds with stochastic depth as Triton kernels in eager training")
    p.add_argument("--backward-thread", choices=list(BACKWARD_THREADS), default="auto",
                   help="which thread runs the backward: auto (the LightningModules' default: PyTorch's autograd "
                        "worker thread of the GPU for compiled modes, the training thread for eager and graphed), "
                        "training, or device (the worker); see src/backward.py")
    p.add_argument("--no-infer", action="store_true", help="training rows only")
    p.add_argument("--ddp", choices=["split", "whole"], default="",
                   help="train inside a one-process DistributedDataParallel, as Lightning's ddp strategy does; "
                        "compiled: dynamo's graph split at DDP's gradient buckets (torch's default) or one whole graph")
    p.add_argument("--json", default="throughput.json", help="the rows as JSON (with device, versions, commit)")
    p.add_argument("--cpu", action="store_true", help="quick look on the CPU: batch 4, 2 + 3 steps, eager fp32")
    p.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = p.parse_args()
    for flag, value in (("--modes", args.modes), ("--baseline-modes", args.baseline_modes)):
        unknown = [m for m in value.split(",") if value and m not in MODES]
        if unknown:
            p.error(f"{flag}: unknown {unknown}; expected any of {','.join(MODES)}")
    if args.cpu:
        device = torch.device("cpu")
        args.batch, args.warmup, args.steps = min(args.batch, 4), 2, 3
        args.precisions, args.modes, args.backends = "fp32", "eager", "torch"
    else:
        if not torch.cuda.is_available():
            sys.exit("error: no CUDA GPU; use --cpu for a quick look on the CPU")
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    models = [m for m in args.models.split(",") if m] + args.config
    try:
        set_memory_budget(args.memory_budget, key="--memory-budget")
    except UserError as e:
        p.error(str(e))
    precisions, modes = args.precisions.split(","), args.modes.split(",")

    baseline_names = []
    for item in args.baselines.split(","):
        baseline_names += [b for b in BASELINES.get(item.strip(), [item.strip()]) if b and b not in baseline_names]
    baselines, rows = {}, []
    have_timm = False
    try:
        import timm  # noqa: F401

        have_timm = not args.no_baselines
    except ImportError:
        print("timm is not installed: no baselines")
    baseline_modes = args.baseline_modes.split(",") if args.baseline_modes else modes
    for prec in precisions:
        for mode in dict.fromkeys(modes + baseline_modes):  # in order, each once
            if have_timm and mode in baseline_modes:
                for base in baseline_names:
                    r = run_one(base, "-", prec, mode, args, device)
                    baselines[(base, prec, r["mode"])] = r.get("train_ips")
                    rows.append(r)
            for name in models if mode in modes else []:
                for backend in args.backends.split(","):
                    for norms in args.fused_norms.split(","):
                        for convs in args.fused_convs.split(","):
                            rows.append(run_one(name, backend, prec, mode, args, device, fused_norms=norms == "on",
                                                fused_convs=convs == "on"))

    dev = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    import triton

    header = (f"{datetime.date.today()} · {dev} · torch {torch.__version__} · triton {triton.__version__} · commit "
              f"{commit or '?'} · batch {args.batch}, {args.size}², {args.warmup} warm-up + {args.steps} timed steps"
              + (f" · compiled with activation memory budget {args.memory_budget}"
                 if {"compiled", "regional", "cudagraphs", "regional-cudagraphs"} & set(modes) else ""))
    text = f"{header}\n\n{table(rows, baselines, args.batch)}\n"
    print("\n" + text)
    with open(args.json, "w") as f:
        json.dump({"header": header, "device": dev, "torch": torch.__version__, "triton": triton.__version__,
                   "commit": commit, "argv": sys.argv[1:],
                   "rows": [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in rows]},
                  f, indent=1)
    print(f"rows written to {args.json}")
    if args.record:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
        with open(path, "a") as f:
            f.write(f"\n### Throughput ({' '.join(sys.argv[1:])})\n\n{text}")


if __name__ == "__main__":
    main()
