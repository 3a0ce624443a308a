"""DDP scaling of a training recipe on one host: the same `main.py fit` on 1, 2, 4, ... devices with
`trainer.strategy=ddp`, reporting training img/s per device and the scaling efficiency
(N-device img/s ÷ (N × 1-device img/s)), and after every run three checks:

  * weights identical on every rank (SHA-256 of each rank's full state dict, EMA and BatchNorm buffers included);
  * the checkpoint files written once: every save by rank 0 and none by another rank, and the folder holds
    exactly the files the run's checkpoint callbacks keep (no `-v1` duplicates, no strays). Which epoch is
    "best" depends on the run (N devices train with an N times larger global batch), so file names are not
    compared across device counts;
  * the validation metrics the run logged equal a 1-device `main.py validate` of its `last.ckpt`.

    # GPU host: a JPEG class-folder set (benchmarks/data.py make), then the T recipe on 1, 2 and 4 GPUs
    python benchmarks/data.py make --root /tmp/imagefolder --classes 100 --train-per-class 160 --val-per-class 20
    python benchmarks/ddp_scaling.py --root /tmp/imagefolder --devices 1,2,4
    # CPU, gloo: the same machinery on a tiny model (what tests/test_ddp.py runs)
    python benchmarks/ddp_scaling.py --root /tmp/digits_folder --devices 1,2 --accelerator cpu --tiny --steps 3 --epochs 1 --warmup 1

Every run trains `--epochs` epochs of `--steps` optimizer steps per rank (`trainer.limit_train_batches`), so
each rank does the same work whatever N; give the folder at least steps × max(N) × batch training images.
Throughput is src.timing's training img/s: the steps after the first `--warmup` ones, without the first step
of every epoch (validation and loader start-up sit before it). Peak GPU memory is each rank's
`max_memory_allocated`, read before Lightning's teardown moves the model to the CPU; the table shows the
largest. Extra `main.py` options go after `--`. Output: a Markdown
table with date, device and commit (paste into benchmarks/RESULTS.md) and `<out>/summary.json`.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from src.callbacks import batch_images  # noqa: E402
from src.errors import UserError, reports_user_errors  # noqa: E402
from src.timing import StepTimer  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "imagenet" / "recipe.yaml"  # on its own: the T recipe
CKPT_SUBDIR = "ckpt"  # checkpoints of every run go to <run>/ckpt (the recipe's ModelCheckpoint dirpaths are redirected)
# `--tiny`: the recipe with a Spatial-Mamba of widths 8..64, one block per stage, 32², fp32, torch backend
TINY = ["--model.init_args.backbone.init_args.dims", "[8, 16, 32, 64]",
        "--model.init_args.backbone.init_args.depths", "[1, 1, 1, 1]",
        "--model.init_args.backbone.init_args.backend", "torch", "--model.init_args.compile", "false",
        "--data.init_args.batch_size", "8", "--data.init_args.val_batch_size", "16", "--data.init_args.image_size", "32",
        "--data.init_args.num_workers", "0", "--data.init_args.persistent_workers", "false",
        "--data.init_args.pin_memory", "false", "--trainer.precision", "32-true"]
VAL_KEYS = ("val/acc1", "val/acc5", "val/loss", "val_ema/acc1", "val_ema/acc5", "val_ema/loss")


def state_digest(module: torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of every tensor of the state dict."""
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        if not torch.is_tensor(value):
            continue
        value = value.detach().cpu().contiguous().reshape(-1)  # 0-d tensors cannot be viewed as bytes
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


class ScalingProbe(Callback):
    """Times the training steps (src.timing), counts the checkpoint writes of every rank and, at the end of
    training (before the teardown moves the model to the CPU) or of `validate`, writes `out` (JSON) on rank 0:
    world size, images per step, timed steps, img/s, every rank's peak GPU memory, state-dict digest and
    checkpoint writes, the files the checkpoint callbacks keep, and the synced validation metrics."""

    def __init__(self, out: str, warmup_steps: int = 10):
        self.out, self.warmup_steps = out, warmup_steps
        self.timer, self.global_batch, self.writes = StepTimer(warmup_steps), 0, []

    def on_fit_start(self, trainer, pl_module):
        # after the LightningModule's setup, which may install its own CheckpointIO
        self.timer = StepTimer(self.warmup_steps, pl_module.device)
        io = trainer.strategy.checkpoint_io
        save = io.save_checkpoint

        def counted_save(checkpoint, path, *args, **kwargs):
            self.writes.append(os.path.basename(str(path)))
            return save(checkpoint, path, *args, **kwargs)

        io.save_checkpoint = counted_save

    def on_train_epoch_start(self, trainer, pl_module):
        self.timer.restart()  # the first step of an epoch follows validation and loader start-up: not timed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.global_batch = batch_images(batch, trainer.world_size)
        self.timer.step(self.global_batch)

    def _write(self, trainer, pl_module, stage: str) -> None:
        device = trainer.strategy.root_device
        mine = {"digest": state_digest(pl_module), "writes": self.writes,
                "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        if not trainer.is_global_zero:
            return
        kept = set()
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                kept.update(os.path.basename(p) for p in [cb.best_model_path, cb.last_model_path, *cb.best_k_models] if p)
        peaks = [r["peak_gpu_gib"] for r in ranks]
        record = {
            "stage": stage, "world_size": trainer.world_size, "global_step": trainer.global_step,
            "steps_per_rank": self.timer.steps, "global_batch": self.global_batch,
            "timed_steps": len(self.timer.durations), "img_per_s": self.timer.img_per_s,
            "peak_gpu_gib": max(peaks) if all(p is not None for p in peaks) else None,
            "peak_gpu_gib_per_rank": peaks,
            "rank_digests": [r["digest"] for r in ranks],
            "checkpoint_writes_per_rank": [r["writes"] for r in ranks],
            "checkpoints_kept": sorted(kept),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "val_ema/"))},
        }
        Path(self.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.out).write_text(json.dumps(record, indent=1))

    def on_train_end(self, trainer, pl_module):
        self._write(trainer, pl_module, "fit")

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "validate":
            self._write(trainer, pl_module, "validate")


def checkpoints_written_once(files: list[str], kept: list[str], writes_per_rank: list[list[str]]) -> tuple[bool, str]:
    """Every checkpoint write came from rank 0, none from another rank, and the folder (`files`) holds exactly the
    files the checkpoint callbacks keep. Returns (ok, what is wrong or "ok")."""
    problems = []
    if not writes_per_rank or not writes_per_rank[0]:
        problems.append("rank 0 wrote no checkpoint")
    for rank, writes in enumerate(writes_per_rank[1:], start=1):
        if writes:
            problems.append(f"rank {rank} wrote {sorted(set(writes))}")
    extra, missing = sorted(set(files) - set(kept)), sorted(set(kept) - set(files))
    if extra:
        problems.append(f"files no callback keeps: {extra}")
    if missing:
        problems.append(f"kept files missing: {missing}")
    return not problems, "; ".join(problems) or "ok"


def derived_config(config: Path, run_dir: Path, stage: str, warmup: int) -> Path:
    """The recipe with every ModelCheckpoint writing to <run>/ckpt, logs under <run>/logs (none for validate)
    and a ScalingProbe that writes <run>/<stage>.json."""
    import yaml

    cfg = yaml.safe_load(config.read_text())
    trainer = cfg.setdefault("trainer", {})
    callbacks = [cb for cb in trainer.get("callbacks") or [] if "ScalingProbe" not in str(cb.get("class_path", ""))]
    for cb in callbacks:
        if str(cb.get("class_path", "")).endswith("ModelCheckpoint"):
            cb.setdefault("init_args", {})["dirpath"] = str(run_dir / CKPT_SUBDIR)
    callbacks.append({"class_path": "benchmarks.ddp_scaling.ScalingProbe",
                      "init_args": {"out": str(run_dir / f"{stage}.json"), "warmup_steps": warmup}})
    trainer["callbacks"] = callbacks
    if stage == "validate":
        trainer["logger"] = False
    elif isinstance(trainer.get("logger"), dict):
        trainer["logger"].setdefault("init_args", {})["save_dir"] = str(run_dir / "logs")
    path = run_dir / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def count_classes(root: Path) -> int:
    train = root / "train"
    if not train.is_dir():
        raise UserError(f"{train} does not exist; --root must hold train/<class>/ and val/<class>/ folders "
                         f"(make one with `python benchmarks/data.py make --root {root}`)")
    classes = [d for d in train.iterdir() if d.is_dir()]
    if not classes:
        raise UserError(f"{train} has no class folders")
    return len(classes)


def run(cmd: list[str], log: Path, env: dict) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=log.parent).returncode
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise RuntimeError(f"`{' '.join(cmd[1:4])} ...` failed with exit code {code}; log {log}:\n{tail}")
    return time.perf_counter() - start


def metrics_agree(logged: dict, single: dict, loss_rtol: float) -> tuple[bool, str]:
    """Accuracies exactly equal, losses within loss_rtol (bf16 kernels may round per batch shape)."""
    worst = []
    for key in VAL_KEYS:
        if key not in logged or key not in single:
            continue
        a, b = logged[key], single[key]
        ok = a == b if "acc" in key else abs(a - b) <= loss_rtol * max(abs(b), 1e-12)
        if not ok:
            worst.append(f"{key} {a:.6g} vs {b:.6g}")
    return not worst, "; ".join(worst) or "equal"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="image folder with train/<class>/ and val/<class>/")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="training recipe (default: the T recipe)")
    p.add_argument("--devices", default="1,2,4", help="comma-separated device counts; the first is the baseline")
    p.add_argument("--accelerator", default="gpu", help="gpu, or cpu for a gloo smoke test")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per rank per epoch")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the throughput")
    p.add_argument("--tiny", action="store_true", help="tiny model, 32², fp32, torch backend (CPU smoke test)")
    p.add_argument("--loss-rtol", type=float, default=1e-3, help="tolerance of val losses, DDP vs 1 device")
    p.add_argument("--out", type=Path, default=Path("ddp_scaling"), help="runs and summary.json go here")
    p.add_argument("--continue", dest="resume", action="store_true",
                   help="keep the rows of <out>/summary.json written by an earlier call with the same settings and "
                        "run only the device counts it lacks (the baseline stays its first row): a scan longer "
                        "than one time-limited call, e.g. --devices 1,2 then --devices 1,2,4 --continue")
    args = p.parse_args(argv)
    try:
        devices = [int(d) for d in args.devices.split(",")]
    except ValueError:
        devices = []
    if not devices or min(devices) < 1:
        p.error(f"--devices must be comma-separated positive integers, got {args.devices!r}")
    if not args.config.is_file():
        p.error(f"--config {args.config} does not exist")
    if args.accelerator == "gpu" and torch.cuda.device_count() < max(devices):
        p.error(f"--devices asks for {max(devices)} GPUs, this machine has {torch.cuda.device_count()}")
    root = args.root.resolve()
    classes = count_classes(root)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.accelerator == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    common = ["--data.init_args.root", str(root),
              "--model.init_args.num_classes", str(classes),
              "--model.init_args.backbone.init_args.num_classes", str(classes),
              *(TINY if args.tiny else [])]

    settings = {"config": str(args.config), "root": str(root), "classes": classes, "tiny": args.tiny,
                "epochs": args.epochs, "steps": args.steps, "warmup": args.warmup, "extra": extra}
    rows, baseline = [], None
    if args.resume and (out / "summary.json").is_file():
        earlier = json.loads((out / "summary.json").read_text())
        differ = sorted(k for k, v in settings.items() if earlier.get(k) != v)
        if differ:
            raise UserError(f"--continue: {out / 'summary.json'} was written with other settings ({', '.join(differ)}"
                            f"); use the same ones or another --out")
        rows = [r for r in earlier["runs"] if r["devices"] in devices]
        if rows:
            baseline = (rows[0]["devices"], rows[0]["img_per_s"])
            print(f"kept from {out / 'summary.json'}: {', '.join(str(r['devices']) for r in rows)} device(s)", flush=True)

    def write_summary() -> dict:
        try:
            commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip() or "?"
        except OSError:
            commit = "?"
        device = torch.cuda.get_device_name() if args.accelerator == "gpu" else f"CPU ({os.cpu_count()} cores, gloo)"
        summary = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   "device": device, "torch": torch.__version__, "commit": commit, **settings,
                   "runs": sorted(rows, key=lambda r: devices.index(r["devices"]))}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))  # after every run: a cut-off call keeps it
        return summary

    for n in devices:
        if any(r["devices"] == n for r in rows):
            continue
        run_dir = out / f"{n}dev"
        run_dir.mkdir(exist_ok=True)
        for stale in [*run_dir.glob("*.json"), *(run_dir / CKPT_SUBDIR).glob("*.ckpt")]:
            stale.unlink()  # a checkpoint of an earlier run would be counted, or make the new one a -v1
        fit = [sys.executable, str(ROOT / "main.py"), "fit", "--config", str(derived_config(args.config, run_dir, "fit",
               args.warmup)), *common,
               "--trainer.accelerator", args.accelerator, "--trainer.devices", str(n), "--trainer.strategy", "ddp",
               "--trainer.num_nodes", "1", "--trainer.max_epochs", str(args.epochs),
               "--trainer.limit_train_batches", str(args.steps), "--trainer.enable_progress_bar", "false",
               *extra]
        print(f"== {n} device(s): fit", flush=True)
        wall = run(fit, run_dir / "fit.log", env)
        trained = json.loads((run_dir / "fit.json").read_text())
        files = sorted(f.name for f in (run_dir / CKPT_SUBDIR).glob("*.ckpt"))
        last = run_dir / CKPT_SUBDIR / "last.ckpt"
        if not last.is_file():
            raise RuntimeError(f"the {n}-device run wrote no {last} (checkpoints: {files})")
        validate = [sys.executable, str(ROOT / "main.py"), "validate", "--config",
                    str(derived_config(args.config, run_dir, "validate", args.warmup)), *common,
                    "--trainer.accelerator", args.accelerator, "--trainer.devices", "1", "--trainer.strategy", "auto",
                    "--trainer.enable_progress_bar", "false", "--ckpt_path", str(last), *extra]
        print(f"== {n} device(s): validate last.ckpt on 1 device", flush=True)
        run(validate, run_dir / "validate.log", env)
        single = json.loads((run_dir / "validate.json").read_text())

        identical = len(set(trained["rank_digests"])) == 1 and len(trained["rank_digests"]) == n
        once, once_detail = checkpoints_written_once(files, trained["checkpoints_kept"],
                                                     trained["checkpoint_writes_per_rank"])
        agree, detail = metrics_agree(trained["metrics"], single["metrics"], args.loss_rtol)
        ips = trained["img_per_s"]
        if ips is None:
            raise UserError(f"no timed steps in the {n}-device run (--steps × --epochs must exceed --warmup "
                             f"+ --epochs; the loader gave {trained['steps_per_rank']} steps per rank)")
        baseline = baseline or (devices[0], ips)
        efficiency = ips / (n / baseline[0] * baseline[1])
        rows.append({"devices": n, "global_batch": trained["global_batch"], "steps_per_rank": trained["steps_per_rank"],
                     "timed_steps": trained["timed_steps"], "img_per_s": ips, "img_per_s_per_device": ips / n,
                     "efficiency": efficiency, "peak_gpu_gib": trained["peak_gpu_gib"],
                     "peak_gpu_gib_per_rank": trained["peak_gpu_gib_per_rank"], "wall_s": wall,
                     "weights_identical": identical, "checkpoints": files, "checkpoints_once": once,
                     "checkpoints_detail": once_detail,
                     "val_logged": trained["metrics"], "val_single_device": single["metrics"],
                     "val_agree": agree, "val_detail": detail})
        print(f"   {ips:.0f} img/s ({ips / n:.0f} per device, efficiency {efficiency:.1%}), weights identical "
              f"{identical}, checkpoints {files} ({once_detail}), val {detail}", flush=True)
        write_summary()

    summary = write_summary()
    rows, device, commit = summary["runs"], summary["device"], summary["commit"]
    print(f"\n{summary['date']} · {device} · torch {torch.__version__} · commit {commit} · {args.config.name}"
          f"{' (tiny)' if args.tiny else ''}, {classes} classes, {args.epochs} × {args.steps} steps per rank, "
          f"first {args.warmup} steps untimed\n")
    print("| devices | global batch | train img/s | img/s per device | scaling efficiency | peak GPU GiB "
          "| weights identical | checkpoints once | val = 1-device validate |")
    print("|---:|---:|---:|---:|---:|---:|---|---|---|")
    for r in rows:
        mem = f"{r['peak_gpu_gib']:.1f}" if r["peak_gpu_gib"] is not None else "–"
        print(f"| {r['devices']} | {r['global_batch']} | {r['img_per_s']:.0f} | {r['img_per_s_per_device']:.0f} "
              f"| {r['efficiency']:.1%} | {mem} | {'yes' if r['weights_identical'] else 'NO'} "
              f"| {'yes' if r['checkpoints_once'] else 'NO: ' + r['checkpoints_detail']} "
              f"| {'yes' if r['val_agree'] else 'NO: ' + r['val_detail']} |")
    print(f"\nsummary: {out / 'summary.json'}")
    return summary


@reports_user_errors
def cli() -> None:
    """The command: main()'s summary is printed and written by main itself; bad input exits 2 with one line."""
    main()


if __name__ == "__main__":
    sys.exit(cli())
