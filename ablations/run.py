"""Run every variant of one ablation axis through `main.py fit`, for several seeds, then write the report.

    python ablations/run.py AXIS [--seeds 3] [--variants a,b] [--epochs N] [--base-config FILE]
                                 [--logdir logs] [--jobs N] [--threads N] [--overwrite] [-- main.py overrides]

Run `variant` with seed k logs to `<logdir>/<AXIS>/<variant>/seed<k>` (TensorBoardLogger save_dir
`<logdir>/<AXIS>`, name `<variant>`, version `seed<k>`), so `tensorboard --logdir <logdir>/<AXIS>` shows the
variants side by side; `src.callbacks.ExperimentMetrics` adds hparams, params, MACs, throughput and
best / final val/acc1 (HParams tab). Finished runs are kept (re-running a sweep resumes it) unless
`--overwrite`. Runs go one after another; with several GPUs, one per GPU at a time (`--jobs`).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from ablations.axes import AXES
from src.errors import UserError, reports_user_errors

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_EPOCHS = 5  # dilation axis, 7 variants × 3 seeds on 2 CPU cores in < 30 min (ablations/RESULTS.md)
FINISHED = "Finished fit"  # first words of the closing line of a successful `main.py fit`


def variant_config(axis: str, variant: str) -> Path:
    if axis not in AXES:
        raise UserError(f"unknown axis {axis!r}; expected one of {', '.join(AXES)}")
    if variant not in AXES[axis]:
        raise UserError(f"unknown {axis} variant {variant!r}; expected some of {','.join(AXES[axis])}")
    return HERE / axis / f"{variant}.yaml"


def fit_command(axis: str, variant: str, seed: int, args: argparse.Namespace, extra: list[str]) -> list[str]:
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(Path(args.logdir) / axis), "name": variant, "version": f"seed{seed}",
                      "default_hp_metric": False},
    }
    callback = {"class_path": "src.callbacks.ExperimentMetrics", "init_args": {"axis": axis, "variant": variant}}
    cmd = [sys.executable, str(ROOT / "main.py"), "fit", "--config", str(args.base_config),
           "--config", str(variant_config(axis, variant)), f"--seed_everything={seed}",
           f"--trainer.logger={json.dumps(logger)}", f"--trainer.callbacks+={json.dumps(callback)}",
           "--trainer.enable_progress_bar=false"]
    if args.epochs is not None:
        cmd.append(f"--trainer.max_epochs={args.epochs}")
    return cmd + extra


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="ablations/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("axis", help=f"one of {', '.join(AXES)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant (default 3)")
    p.add_argument("--variants", default=None, help="comma-separated subset of the axis' variants (default all)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                   help=f"trainer.max_epochs of every run (default {DEFAULT_EPOCHS}; 0 keeps the base config's)")
    p.add_argument("--base-config", default=str(ROOT / "configs" / "default.yaml"), help="config the variants modify")
    p.add_argument("--logdir", default="logs", help="runs go to LOGDIR/AXIS/<variant>/seed<k> (default logs)")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (default: number of GPUs, at least 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per run (OMP_NUM_THREADS); 1 is much faster on a busy shared CPU")
    p.add_argument("--overwrite", action="store_true", help="re-run finished runs too")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    if args.axis not in AXES:
        raise UserError(f"unknown axis {args.axis!r}; expected one of {', '.join(AXES)}")
    args.variants = args.variants.split(",") if args.variants else list(AXES[args.axis])
    for v in args.variants:
        variant_config(args.axis, v)
    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {args.seeds}")
    if args.epochs == 0:
        args.epochs = None
    base = Path(args.base_config)
    if not base.is_file() and (ROOT / base).is_file():
        base = ROOT / base
    if not base.is_file():
        raise UserError(f"base config not found: {args.base_config!r}")
    args.base_config = base.resolve()
    return args, extra


def check_backends(args: argparse.Namespace, gpus: list[str]) -> None:
    """Triton backends need a GPU; fail before the sweep rather than in every run."""
    if args.axis != "backend" or gpus or os.environ.get("TRITON_INTERPRET") == "1":
        return
    triton = [v for v in args.variants if v != "torch"]
    if triton:
        raise UserError(
            f"backend variants {','.join(triton)} need a CUDA GPU (none found); run them on a GPU machine "
            "(ablations/gpu_backend_sweep.sh), pick --variants torch, or set TRITON_INTERPRET=1 (very slow)"
        )


def visible_gpus() -> list[str]:
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip() not in ("", "-1")]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def finished(log: Path) -> bool:
    return log.is_file() and any(line.startswith(FINISHED) for line in log.read_text(errors="replace").splitlines())


def run_one(job: dict, slot: int, gpus: list[str], args: argparse.Namespace) -> tuple[bool, float, str]:
    run_dir, log = job["run_dir"], job["run_dir"] / "run.log"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a half-written run would mix its events with the new one
    run_dir.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(job["cmd"]) + "\n")
        f.flush()
        rc = subprocess.run(job["cmd"], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd()).returncode
    lines = log.read_text(errors="replace").splitlines()
    last = next((line for line in reversed(lines) if line.startswith((FINISHED, "error:"))), lines[-1] if lines else "")
    return rc == 0, time.perf_counter() - start, last


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args, extra = parse(sys.argv[1:] if argv is None else argv)
    gpus = visible_gpus()
    check_backends(args, gpus)
    axis_dir = Path(args.logdir) / args.axis
    jobs, skipped = [], 0
    for variant in args.variants:
        for seed in range(args.seeds):
            run_dir = axis_dir / variant / f"seed{seed}"
            if not args.overwrite and finished(run_dir / "run.log"):
                skipped += 1
                continue
            jobs.append({"name": f"{variant} seed{seed}", "run_dir": run_dir,
                         "cmd": fit_command(args.axis, variant, seed, args, extra)})
    if args.dry_run:
        for job in jobs:
            print(shlex.join(job["cmd"]))
        return 0
    n_workers = max(1, args.jobs or len(gpus) or 1)
    where = f"GPUs {','.join(gpus)}" if gpus else "CPU"
    print(f"{args.axis}: {len(jobs)} runs ({len(args.variants)} variants × {args.seeds} seeds"
          + (f", {skipped} already finished" if skipped else "") + f") on {where}, {n_workers} at a time; "
          f"logs in {axis_dir}", flush=True)

    todo: queue.Queue = queue.Queue()
    for i, job in enumerate(jobs):
        todo.put((i, job))
    lock, failures = threading.Lock(), []
    sweep_start = time.perf_counter()

    def worker(slot: int) -> None:
        while True:
            try:
                i, job = todo.get_nowait()
            except queue.Empty:
                return
            ok, seconds, last = run_one(job, slot, gpus, args)
            with lock:
                status = "" if ok else "FAILED: "  # a run can print its summary line and still exit non-zero
                print(f"[{i + 1}/{len(jobs)}] {args.axis}/{job['name']}: {seconds:.0f} s — {status}{last}", flush=True)
                if not ok:
                    failures.append(f"{job['name']} (see {job['run_dir'] / 'run.log'})")

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - sweep_start
    print(f"{args.axis}: sweep finished in {seconds / 60:.1f} min", flush=True)

    axis_dir.mkdir(parents=True, exist_ok=True)
    command = "python ablations/run.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    (axis_dir / "sweep.json").write_text(json.dumps({
        "command": command, "runs": len(jobs), "skipped_finished": skipped, "wall_s": round(seconds, 1),
        "jobs": n_workers, "device": where, "failed": failures,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }, indent=1) + "\n")
    if not args.no_report:
        from ablations import report

        try:
            report.write_report(axis_dir)
        except report.NoRuns as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    if failures:
        print(f"error: {len(failures)} run(s) failed: {'; '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
