"""Where does the full training recipe lose speed against benchmarks/throughput.py at the same settings?

    # one GPU (about 7 minutes; writes a JPEG folder first unless --root holds one)
    python benchmarks/gpu_recipe_overhead.py --root /tmp/overhead_imagefolder --out /tmp/recipe_overhead
    # CPU smoke test of every code path: tiny model, 32², fp32, dynamo without inductor for "compiled"
    python benchmarks/gpu_recipe_overhead.py --cpu --root /tmp/overhead_tiny --out /tmp/overhead_cpu

Every row is training img/s as src.timing defines it (images of timed steps ÷ wall time between synchronised
step boundaries, after `--warmup` steps), batch 128, bf16, 224², fused backend, in one process:

  loop rows      the loop of throughput.py (synthetic tensors on the GPU, channels_last, fused AdamW, cudnn
                 benchmark and TF32 on), the same loop plus MESA's teacher forward (`throughput.py --mesa`: the
                 work the recipe does with MESA on), then the loop with the recipe's layout and optimizer
                 (contiguous NCHW, foreach AdamW, cudnn benchmark off).
  recipe rows    `main.py fit` of configs/imagenet/recipe.yaml (the T recipe: ImageFolder loader with timm
                 augmentation in `--workers` processes, mixup/cutmix, EMA, MESA active, clipping 5, TensorBoard +
                 LearningRateMonitor logging, strategy auto: no DDP on one GPU) for warm-up + timed steps, without validation and
                 checkpoint files; then one change at a time: synthetic in-memory batches instead of the loader,
                 and from there MESA off, EMA (and MESA) off, logging off, mixup/cutmix off, clipping off,
                 cudnn benchmark + TF32 on, and everything off at once; DDP wrapping the one GPU (as
                 ddp_scaling.py's 1-GPU baseline runs); then the
                 synthetic run made to wait for the GPU at every step (what `fit` did before its timer,
                 non-finite-loss check and progress bar stopped reading values back each step), and the full
                 recipe with the progress bar on (as an interactive run).
  compiled       the throughput.py loop (with and without MESA's teacher), the recipe with synthetic batches,
                 the full recipe, the synthetic run synchronised every step and the full recipe with the
                 progress bar, compiled
                 (`model.init_args.compile true`; compile s = first step less a steady one), last, each only
                 while the time budget (`--budget-s`) allows; a skipped row says so.
  cudagraphs     the loop (with and without MESA's teacher), the recipe with synthetic batches and the full
                 recipe, compiled and replayed as CUDA graphs (`compile_cudagraphs true`; not in the default
                 --modes).
  regional-cudagraphs  the same four rows with one graph per stage shape replayed as CUDA graphs (the recipe's
                 compile_regional, compile_parallel and compile_cudagraphs true; throughput.py's mode of that name
                 for the loops, whose graphs compile in this process); not in the default --modes.
  graphed        the same four rows without compiling: the loop's whole eager step recorded as one CUDA graph
                 (`throughput.py --modes graphed`), the recipe with `eager_cudagraphs true` (what the recipe
                 ships: the backbone's forward/backward and MESA's teacher recorded, the rest eager; not in the
                 default --modes).

Every row sets the recipe's compile knobs for its mode (eager: no compile, no CUDA graphs), and the loops build
the backbone with the recipe's `fused_norms`.

Output: one Markdown table (img/s, ÷ the throughput.py loop of the same mode, ÷ the full recipe, peak GPU
memory, compile s) at the end, and after every row `<out>/overhead.md` and `<out>/overhead.json` (a run cut
short keeps the rows it finished).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from src.callbacks import batch_images  # noqa: E402
from src.compiling import DEFAULT_MEMORY_BUDGET, set_memory_budget  # noqa: E402
from src.data.imagefolder import ImageFolderDataModule  # noqa: E402
from src.timing import StepTimer  # noqa: E402

RECIPE = ROOT / "configs" / "imagenet" / "recipe.yaml"
TINY_BACKBONE = {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "backend": "torch"}


class SyntheticBatches(ImageFolderDataModule):
    """The ImageFolder data module (classes, hyper-parameters) whose training loader yields one batch of random
    normalised images and labels, made once and held in (pinned) host memory: the step still copies it to the
    device, as with the real loader, but nothing is decoded or augmented."""

    def train_dataloader(self):
        hp = self.hparams
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(self.batch_size, 3, hp.image_size, hp.image_size, generator=generator)
        labels = torch.randint(0, self.num_classes, (self.batch_size,), generator=generator)
        if hp.pin_memory and torch.cuda.is_available():
            images, labels = images.pin_memory(), labels.pin_memory()
        return _Repeat((images, labels), len(self.train_set) // self.batch_size)


class _Timer(Callback):
    """src.timing's img/s and compile s of a fit, with this script's warm-up."""

    def __init__(self, warmup: int):
        self.timer = StepTimer(warmup)

    def on_fit_start(self, trainer, pl_module):
        self.timer = StepTimer(self.timer.warmup, pl_module.device)

    def on_train_epoch_start(self, trainer, pl_module):
        self.timer.restart()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.timer.begin()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.timer.step(batch_images(batch, trainer.world_size))


class _Repeat:
    def __init__(self, batch, length: int):
        self.batch, self.length = batch, length

    def __len__(self):
        return self.length

    def __iter__(self):
        return (self.batch for _ in range(self.length))


# ---------------------------------------------------------------- variants
# recipe variants: (name, data, changes to the recipe); data "real" = the ImageFolder loader, "synthetic" = above
RECIPE_VARIANTS = [
    ("full recipe", "real", []),
    ("synthetic data", "synthetic", []),
    ("synthetic, MESA off", "synthetic", ["mesa"]),
    ("synthetic, EMA + MESA off", "synthetic", ["mesa", "ema"]),
    ("synthetic, logging off", "synthetic", ["logging"]),
    ("synthetic, mixup/cutmix off", "synthetic", ["mixup"]),
    ("synthetic, clipping off", "synthetic", ["clip"]),
    ("synthetic, DDP on one GPU", "synthetic", ["ddp"]),
    ("synthetic, cudnn benchmark + TF32", "synthetic", ["cudnn"]),
    ("synthetic, all of the above off", "synthetic", ["mesa", "ema", "logging", "mixup", "clip", "cudnn"]),
    ("synthetic, synchronised every step", "synthetic", ["sync"]),
    ("full recipe, progress bar on", "real", ["bar"]),
]


class SyncEveryStep(Callback):
    """Waits for the GPU at the end of every training step, as `fit` did before its timer, non-finite-loss
    check and progress bar stopped reading values back every step (one such read is enough to stall)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def variant_config(recipe: dict, out: Path, name: str, data: str, changes: list[str]) -> Path:
    """The recipe without checkpoint files and with its logs under `out`, `data` "real" or "synthetic"
    (SyntheticBatches), with `changes` applied."""
    cfg = copy.deepcopy(recipe)
    if data == "synthetic":
        cfg["data"]["class_path"] = "benchmarks.gpu_recipe_overhead.SyntheticBatches"
    trainer, model = cfg["trainer"], cfg["model"]["init_args"]
    trainer["callbacks"] = [cb for cb in trainer.get("callbacks") or []
                            if not str(cb.get("class_path", "")).endswith("ModelCheckpoint")]
    if isinstance(trainer.get("logger"), dict):
        trainer["logger"].setdefault("init_args", {}).update(save_dir=str(out / "logs"), version=None)
    for change in changes:
        if change == "mesa":
            model["mesa"] = 0.0
        elif change == "ema":
            model["mesa"], model["ema_decay"] = 0.0, None
        elif change == "logging":
            trainer["logger"] = False
            trainer["callbacks"] = [cb for cb in trainer["callbacks"]
                                    if not str(cb.get("class_path", "")).endswith("LearningRateMonitor")]
        elif change == "mixup":
            model["mixup"], model["cutmix"] = 0.0, 0.0
        elif change == "clip":
            trainer["gradient_clip_val"] = None
        elif change == "ddp":
            trainer["strategy"] = "ddp"
        elif change == "sync":
            trainer["callbacks"].append({"class_path": "benchmarks.gpu_recipe_overhead.SyncEveryStep"})
        elif change not in ("cudnn", "bar"):  # cudnn: a process setting, applied around the run; bar: an override
            raise ValueError(f"unknown change {change!r}")
    path = out / "configs" / (name.replace(" ", "_").replace(",", "").replace("/", "-").replace("+", "and") + ".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def set_cudnn(fast: bool) -> None:
    """throughput.py's settings (fast) or PyTorch's defaults, which the recipe runs with."""
    torch.backends.cudnn.benchmark = fast
    torch.backends.cuda.matmul.allow_tf32 = fast
    torch.backends.cudnn.allow_tf32 = fast if fast else True  # cuDNN's TF32 default is on


def free_memory() -> None:
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def run_recipe(args, recipe: dict, name: str, data: str, mode: str, classes: int, changes: list[str]) -> dict:
    """One `fit` of a recipe variant; `mode` eager, compiled (one graph), cudagraphs (compiled, replayed as CUDA
    graphs), regional-cudagraphs (one graph per stage shape, compiled in parallel workers, replayed as CUDA graphs)
    or graphed (eager kernels recorded as CUDA graphs, `eager_cudagraphs`)."""
    import main

    config = variant_config(recipe, args.out, name, data, changes)
    steps = args.warmup + args.steps + 1  # + 1: the epoch's first step has no boundary before it
    overrides = [
        "--data.init_args.root", str(args.root), "--data.init_args.num_workers", str(args.workers),
        "--data.init_args.batch_size", str(args.batch), "--data.init_args.image_size", str(args.size),
        "--model.init_args.num_classes", str(classes), "--model.init_args.backbone.init_args.num_classes", str(classes),
        "--model.init_args.compile", str(mode in COMPILED_MODES).lower(),
        "--model.init_args.compile_cudagraphs", str(mode in ("cudagraphs", "regional-cudagraphs")).lower(),
        "--model.init_args.compile_regional", str(mode == "regional-cudagraphs").lower(),
        "--model.init_args.compile_parallel", str(mode == "regional-cudagraphs").lower(),
        "--model.init_args.eager_cudagraphs", str(mode == "graphed").lower(), "--model.init_args.warmup_epochs", "0",
        "--trainer.devices", "1", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(steps),
        "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", str("bar" in changes).lower(), "--trainer.enable_model_summary", "false",
        "--trainer.log_every_n_steps", str(min(50, args.steps)),
    ]
    if args.cpu:
        overrides += ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
                      "--data.init_args.pin_memory", "false"]
        for key, value in TINY_BACKBONE.items():
            overrides += [f"--model.init_args.backbone.init_args.{key}", str(value)]
    else:
        overrides += ["--model.init_args.backbone.init_args.backend", args.backend]
    set_cudnn("cudnn" in changes)
    cli = main.cli(["--config", str(config), *overrides], run=False)
    probe = _Timer(args.warmup)
    cli.trainer.callbacks.append(probe)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        timer = probe.timer
        return {"img_per_s": timer.img_per_s, "compile_s": timer.compile_s if mode != "eager" else None,
                "timed_steps": len(timer.durations), "peak_gib": peak_gib()}
    finally:
        del cli
        set_cudnn(False)


def build_backbone(args, classes: int) -> nn.Module:
    """T (the tiny one with --cpu), with the recipe's `fused_norms` (`args.fused_norms`)."""
    from src.models.spatial_mamba import SpatialMamba, spatial_mamba_t

    if args.cpu:
        return SpatialMamba(num_classes=classes, **TINY_BACKBONE)
    return spatial_mamba_t(backend=args.backend, num_classes=classes, fused_norms=args.fused_norms)


def run_loop(args, compiled: bool | str, as_throughput_py: bool, classes: int = 1000, mesa: bool = False) -> dict:
    """throughput.py's training loop (`measure`; with `mesa`, plus MESA's teacher forward as the recipe runs it),
    or the same loop with the recipe's layout and optimizer. compiled: False, True, or "cudagraphs",
    "regional-cudagraphs" or "graphed" (the throughput.py loop only)."""
    device = torch.device("cpu" if args.cpu else "cuda")
    dtype = None if args.cpu else torch.bfloat16
    torch.manual_seed(0)
    model = build_backbone(args, classes)  # 1000 classes, as throughput.py
    set_cudnn(as_throughput_py and not args.cpu)
    try:
        if as_throughput_py:
            import throughput

            set_memory_budget(DEFAULT_MEMORY_BUDGET)  # as the recipe's compile_memory_budget default
            ips, peak, compile_s = throughput.measure(model, device, args.batch, args.size, dtype, compiled,
                                                      args.warmup, args.steps, train=True, mesa=mesa)
            return {"img_per_s": ips, "compile_s": compile_s if compiled else None, "timed_steps": args.steps,
                    "peak_gib": peak if device.type == "cuda" else None}
        model = model.to(device).train()
        fn = torch.compile(model) if compiled else model
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        y = torch.randint(0, classes, (args.batch,), device=device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # the recipe's: foreach, not fused
        timer = StepTimer(args.warmup, device)
        timer.begin()
        for _ in range(args.warmup + args.steps):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = nn.functional.cross_entropy(fn(x).float(), y)
            with torch.autograd.set_multithreading_enabled(bool(compiled)):  # as the recipe's (src/backward.py)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            timer.step(args.batch)
        return {"img_per_s": timer.img_per_s, "compile_s": timer.compile_s if compiled else None,
                "timed_steps": len(timer.durations), "peak_gib": peak_gib()}
    finally:
        set_cudnn(False)


# ---------------------------------------------------------------- table
MESA_OFF = ("MESA off", "all of the above off")
COMPILED_MODES = ("compiled", "cudagraphs", "regional-cudagraphs")
LOOP, LOOP_MESA = "throughput.py loop", "throughput.py loop + MESA teacher"


def table(rows: list[dict]) -> str:
    """One line per row; "÷ same-work loop" divides a recipe row by the throughput.py loop doing the same model
    work: with MESA's teacher forward where the row has MESA on, without where it is off."""
    loop = {r["mode"]: r["img_per_s"] for r in rows if r["name"] == LOOP and r.get("img_per_s")}
    loop_mesa = {r["mode"]: r["img_per_s"] for r in rows if r["name"] == LOOP_MESA and r.get("img_per_s")}
    full = {r["mode"]: r["img_per_s"] for r in rows if r["name"] == "full recipe" and r.get("img_per_s")}
    lines = ["| variant | mode | train img/s | ÷ throughput.py loop | ÷ same-work loop | ÷ full recipe | peak GiB | "
             "compile s | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ips = r.get("img_per_s")

        def ratio(base):
            b = base.get(r["mode"])
            return f"{ips / b:.2f}" if ips and b else "–"

        fmt = lambda v, d: f"{v:.{d}f}" if isinstance(v, (int, float)) else "–"  # noqa: E731
        recipe_row = not r["name"].startswith("throughput.py loop") and not r["name"].startswith("loop,")
        same_work = (loop if any(k in r["name"] for k in MESA_OFF) else loop_mesa) if recipe_row else {}
        lines.append(f"| {r['name']} | {r['mode']} | {fmt(ips, 0)} | {ratio(loop)} | {ratio(same_work)} | {ratio(full)} | "
                     f"{fmt(r.get('peak_gib'), 1)} | {fmt(r.get('compile_s'), 0)} | {r.get('note', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="JPEG class folder (train/, val/); made here if missing")
    p.add_argument("--out", type=Path, default=Path("recipe_overhead"), help="configs, logs and overhead.json")
    p.add_argument("--config", type=Path, default=RECIPE, help="the recipe (default: configs/imagenet/recipe.yaml, T)")
    p.add_argument("--backend", default="fused")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per row")
    p.add_argument("--steps", type=int, default=30, help="timed steps per row")
    p.add_argument("--workers", type=int, default=max(1, min(15, (os.cpu_count() or 2) - 1)))
    p.add_argument("--modes", default="eager,compiled",
                   help="any of eager,compiled,cudagraphs,regional-cudagraphs,graphed")
    p.add_argument("--budget-s", type=float, default=420, help="rows that would start after this many seconds "
                   "(compiled ones: after budget − --compile-estimate-s) are skipped")
    p.add_argument("--compile-estimate-s", type=float, default=150, help="expected length of a compiled row")
    p.add_argument("--only", default="", help="row names to run, separated by ';' (default: all)")
    p.add_argument("--cpu", action="store_true", help="smoke test: tiny model, 32², batch 8, 2 + 3 steps, "
                   "2 workers, fp32, 'compiled' = dynamo with its eager backend (no inductor)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.cpu:
        args.batch, args.size, args.warmup, args.steps = 8, 32, 2, 3
        args.workers = min(args.workers, 2)
        torch.compile = functools.partial(torch.compile, backend="eager")  # tracing without code generation
        nn.Module.compile = functools.partialmethod(nn.Module.compile, backend="eager")
    elif not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU; use --cpu for the smoke test")
    if not args.config.is_file():
        sys.exit(f"error: --config {args.config} does not exist")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.root = args.root.resolve()
    images_needed = (args.warmup + args.steps + 2) * args.batch
    if not (args.root / "train").is_dir():
        import data as bench_data

        classes = 10 if args.cpu else 100
        per_class = -(-images_needed // classes) + 4
        bench_data.make_folder(str(args.root), classes, per_class, 2, os.cpu_count() or 1)
    classes = len([d for d in (args.root / "train").iterdir() if d.is_dir()])
    have = sum(1 for _ in (args.root / "train").rglob("*.JPEG"))
    if have < images_needed:
        sys.exit(f"error: {args.root}/train has {have} images; {images_needed} are needed "
                 f"(({args.warmup} + {args.steps} + 2) steps × batch {args.batch})")
    recipe = yaml.safe_load(args.config.read_text())
    args.fused_norms = bool(recipe["model"]["init_args"].get("backbone", {}).get("init_args", {}).get("fused_norms"))
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - {"eager", *COMPILED_MODES, "graphed"}
    if unknown:
        sys.exit(f"error: --modes: unknown {sorted(unknown)}; expected any of eager,{','.join(COMPILED_MODES)},graphed")
    only = {n.strip() for n in args.only.split(";") if n.strip()}

    plan = []  # (name, mode, runner)
    if "eager" in modes:
        plan.append((LOOP, "eager", lambda: run_loop(args, False, True)))
        plan.append((LOOP_MESA, "eager", lambda: run_loop(args, False, True, mesa=True)))
        plan.append(("loop, recipe layout + AdamW", "eager", lambda: run_loop(args, False, False)))
        for name, data, changes in RECIPE_VARIANTS:
            plan.append((name, "eager",
                         functools.partial(run_recipe, args, recipe, name, data, "eager", classes, changes)))
    if "compiled" in modes:
        # the loop first: it compiles the backbone's training graph, whose cache entries the recipe rows reuse
        plan.append((LOOP, "compiled", lambda: run_loop(args, True, True)))
        plan.append((LOOP_MESA, "compiled", lambda: run_loop(args, True, True, mesa=True)))
        plan.append(("synthetic data", "compiled",
                     functools.partial(run_recipe, args, recipe, "synthetic data", "synthetic", "compiled", classes,
                                       [])))
        plan.append(("full recipe", "compiled",
                     functools.partial(run_recipe, args, recipe, "full recipe", "real", "compiled", classes, [])))
        for name in ("synthetic, synchronised every step", "full recipe, progress bar on"):
            data, changes = next((d, c) for n, d, c in RECIPE_VARIANTS if n == name)
            plan.append((name, "compiled",
                         functools.partial(run_recipe, args, recipe, name, data, "compiled", classes, changes)))

    for mode in ("cudagraphs", "regional-cudagraphs", "graphed"):  # compiled, replayed as CUDA graphs; eager, recorded
        if mode in modes:
            plan.append((LOOP, mode, functools.partial(run_loop, args, mode, True)))
            plan.append((LOOP_MESA, mode, functools.partial(run_loop, args, mode, True, mesa=True)))
            for name, data in (("synthetic data", "synthetic"), ("full recipe", "real")):
                plan.append((name, mode, functools.partial(run_recipe, args, recipe, name, data, mode, classes, [])))

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "?"
    except OSError:
        commit = "?"
    device = torch.cuda.get_device_name() if not args.cpu else f"CPU ({os.cpu_count()} cores)"
    header = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC · {device} · torch {torch.__version__}"
              f" · commit {commit} · {args.config.name}{' (tiny)' if args.cpu else ''}, batch {args.batch}, "
              f"{args.size}², backend {'torch' if args.cpu else args.backend}, {args.warmup} warm-up + {args.steps} "
              f"timed steps, {args.workers} loader workers, {classes} classes")
    rows = []
    for name, mode, runner in plan:
        if only and name not in only:
            continue
        elapsed = time.perf_counter() - start
        reserve = args.compile_estimate_s if mode != "eager" else 0.0
        row = {"name": name, "mode": mode}
        if elapsed + reserve > args.budget_s:
            row["note"] = f"skipped: {elapsed:.0f} s elapsed of a {args.budget_s:.0f} s budget"
        else:
            free_memory()
            t0 = time.perf_counter()
            try:
                row.update(runner())
            except Exception as e:  # a failed row must not end the run: report it
                traceback.print_exc()
                row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
            row["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(f"== {name} ({mode}): {row.get('img_per_s') or float('nan'):.1f} img/s, {row.get('wall_s', 0):.0f} s"
              + (f"  {row['note']}" if row.get("note") else ""), flush=True)
        (args.out / "overhead.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
        (args.out / "overhead.md").write_text(f"{header}\n\n{table(rows)}\n")
    print(f"\n{header}\n\n{table(rows)}\n\ntotal {time.perf_counter() - start:.0f} s; {args.out / 'overhead.json'}",
          flush=True)
    return rows


if __name__ == "__main__":
    main()
