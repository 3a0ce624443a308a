"""Read an ablation sweep's TensorBoard event files back and write its report.

    python ablations/report.py logs/<axis> [--erf | --no-erf] [--erf-images 16] [--erf-image-size 160]

Writes into the folder: `report.md` (a table of mean ± std over seeds of best and final val/acc1, params,
MACs, training and inference img/s), `val_curves.png` (val/acc1 and val/loss per epoch, mean over seeds
with the min-max band), and for the dilation and scan axes the effective receptive fields of each
variant's seed-0 checkpoint: `erf/<variant>.png` and `erf.png` (all variants side by side).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ablations.axes import AXES
from src.errors import UserError, reports_user_errors

ERF_AXES = ("dilation", "scan")
ERF_STAGES = (1, 4)


class NoRuns(UserError):
    """No sweep to report on: the folder is missing or holds no runs."""


def find_runs(axis_dir: Path) -> dict[str, dict[str, Path]]:
    """{variant: {seed name: run folder}} for every <variant>/<seed>/events.out.tfevents.* under axis_dir,
    variants in the axis' order (then any others by name)."""
    if not axis_dir.is_dir():
        raise NoRuns(f"no such folder: {axis_dir}")
    runs: dict[str, dict[str, Path]] = {}
    for events in sorted(axis_dir.glob("*/*/events.out.tfevents.*")):
        run = events.parent
        runs.setdefault(run.parent.name, {})[run.name] = run
    if not runs:
        raise NoRuns(
            f"no runs in {axis_dir} (expected {axis_dir}/<variant>/seed<k>/events.out.tfevents.*; "
            f"run `python ablations/run.py {axis_dir.name}` first)"
        )
    order = AXES.get(axis_dir.name, [])
    names = [v for v in order if v in runs] + sorted(v for v in runs if v not in order)
    return {v: runs[v] for v in names}


def read_run(run: Path) -> dict:
    """Scalars of one run: val curves per epoch and the `summary/*` values of src.callbacks.ExperimentMetrics."""
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in tags else []

    epoch_at = dict(series("epoch"))
    out = {"curves": {}}
    for tag in ("val/acc1", "val/loss"):
        # points at step 0 are placeholders logged with the hparams at fit start, not validations
        points = [(s, v) for s, v in series(tag) if s > 0]
        out["curves"][tag] = [(int(epoch_at.get(s, i)) + 1, v) for i, (s, v) in enumerate(points)]
    for tag in tags:
        if tag.startswith("summary/"):
            out[tag.removeprefix("summary/")] = series(tag)[-1][1]
    accs = [v for _, v in out["curves"]["val/acc1"]]
    out.setdefault("val_acc1_best", max(accs) if accs else None)
    out.setdefault("val_acc1_final", accs[-1] if accs else None)
    return out


def mean_std(values: list, scale: float = 1.0, digits: int = 2) -> str:
    values = [scale * v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(results: dict[str, list[dict]]) -> list[str]:
    lines = [
        "| variant | runs | best val/acc1 (%) | final val/acc1 (%) | params | MACs (M) | train img/s | infer img/s | fit (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, runs in results.items():
        col = lambda key: [r.get(key) for r in runs]  # noqa: E731
        params = [p for p in col("params") if p is not None]
        macs = [m for m in col("macs") if m is not None]
        lines.append(
            f"| {variant} | {len(runs)} | {mean_std(col('val_acc1_best'), 100)} | {mean_std(col('val_acc1_final'), 100)} "
            f"| {f'{int(params[0]):,}' if params else '–'} | {f'{macs[0] / 1e6:.2f}' if macs else '–'} "
            f"| {mean_std(col('train_img_s'), digits=0)} | {mean_std(col('infer_img_s'), digits=0)} "
            f"| {mean_std(col('fit_s'), digits=0)} |"
        )
    return lines


def plot_curves(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for tag, ax, scale in (("val/acc1", axes[0], 100.0), ("val/loss", axes[1], 1.0)):
        for variant, runs in results.items():
            by_epoch: dict[int, list[float]] = {}
            for r in runs:
                for epoch, v in r["curves"][tag]:
                    by_epoch.setdefault(epoch, []).append(scale * v)
            if not by_epoch:
                continue
            epochs = sorted(by_epoch)
            mean = [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
            (line,) = ax.plot(epochs, mean, marker="o", ms=3, label=f"{variant} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(epochs, [min(by_epoch[e]) for e in epochs], [max(by_epoch[e]) for e in epochs],
                                color=line.get_color(), alpha=0.15)
        ax.set_xlabel("epoch")
        ax.set_ylabel(tag + (" (%)" if scale != 1.0 else ""))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_title("validation top-1 (mean over seeds, band: min–max)")
    axes[1].set_title("validation loss")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def erf_section(axis_dir: Path, runs: dict[str, dict[str, Path]], n_images: int, image_size: int) -> list[str]:
    """ERF of each variant's first seed (its last checkpoint): a PNG per variant and stage, and a grid."""
    from ablations import erf

    images = erf.digits_images(n_images, image_size)
    out_dir = axis_dir / "erf"
    out_dir.mkdir(exist_ok=True)
    grid: dict[str, dict[str, object]] = {f"stage {s}": {} for s in ERF_STAGES}
    rows = []
    for variant, seeds in runs.items():
        run = seeds[sorted(seeds)[0]]
        ckpt = run / "checkpoints" / "last.ckpt"
        if not ckpt.is_file() or not (run / "config.yaml").is_file():
            print(f"report: no {ckpt} or config.yaml; skipping the ERF of {variant}", file=sys.stderr)
            continue
        backbone = erf.build_backbone([run / "config.yaml"])
        erf.load_checkpoint(backbone, ckpt)
        maps = erf.effective_receptive_field(backbone, images, ERF_STAGES)
        cells = [variant, run.name]
        for s, m in maps.items():
            erf.save_erf_png(m, out_dir / f"{variant}_stage{s}.png", f"{axis_dir.name} {variant}, stage {s}")
            grid[f"stage {s}"][variant] = m
            st = erf.erf_stats(m)
            cells += [f"{st['area90']:.3f}", f"{st['support']:.2f}", f"{st['up_down']:.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    erf.save_erf_grid(grid, axis_dir / "erf.png")
    head = " | ".join(f"stage {s} area90 | stage {s} support | stage {s} up/down" for s in ERF_STAGES)
    return [
        "## Effective receptive fields",
        "",
        f"|∂(centre of the stage map, summed over channels)/∂ image|, mean over {len(images)} digits validation "
        f"images at {image_size}×{image_size}, trained weights of each variant's first seed; log scale, "
        f"normalised to its maximum, floor {erf.LOG_FLOOR:g}. area90: share of pixels holding 90 % of the "
        f"gradient mass (local paths dominate it); support: share of pixels above the floor (includes the weak "
        "long-range paths through the scan); up/down: mass above / below the centre row.",
        "",
        "![ERF](erf.png)",
        "",
        f"| variant | run | {head} |",
        "|---|---|" + "---|" * (3 * len(ERF_STAGES)),
        *rows,
        "",
        "One PNG per variant and stage in `erf/`.",
        "",
    ]


def write_report(axis_dir: str | Path, erf: bool | None = None, erf_images: int = 16,
                 erf_image_size: int = 160) -> Path:
    axis_dir = Path(axis_dir)
    runs = find_runs(axis_dir)
    results = {v: [read_run(r) for _, r in sorted(seeds.items())] for v, seeds in runs.items()}
    plot_curves(results, axis_dir / "val_curves.png")
    lines = [f"# Ablation: {axis_dir.name}", ""]
    sweep = axis_dir / "sweep.json"
    if sweep.is_file():
        info = json.loads(sweep.read_text())
        lines += [f"Command: `{info['command']}`", "",
                  f"Sweep wall time {info['wall_s'] / 60:.1f} min for {info['runs']} runs on {info['device']} "
                  f"({info['jobs']} at a time), {info['date']}."
                  + (f" {info['skipped_finished']} more runs had finished in an earlier invocation (kept, "
                     "not timed here)." if info.get("skipped_finished") else "")
                  + (f" Failed: {', '.join(info['failed'])}." if info.get("failed") else ""), ""]
    lines += [
        "Mean ± std over seeds (sample std). best: highest val/acc1 of any epoch; final: after the last epoch. "
        "MACs: one image at the run's image size (conv + matmul). img/s: training steps (forward, backward, "
        "optimiser) and eval-mode forward, measured inside each run on its device — runs that share a CPU or a "
        "GPU carry each other's load.",
        "",
        *table(results),
        "",
        "![validation curves](val_curves.png)",
        "",
    ]
    if erf is None:
        erf = axis_dir.name in ERF_AXES
    if erf:
        lines += erf_section(axis_dir, runs, erf_images, erf_image_size)
    report = axis_dir / "report.md"
    report.write_text("\n".join(lines))
    print(f"wrote {report}")
    return report


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ablations/report.py", description="Markdown table and plots of a sweep.")
    p.add_argument("axis_dir", help="a sweep's folder, e.g. logs/dilation")
    p.add_argument("--erf", action=argparse.BooleanOptionalAction, default=None,
                   help="effective receptive field PNGs (default: on for the dilation and scan axes)")
    p.add_argument("--erf-images", type=int, default=16, help="digits validation images averaged over")
    p.add_argument("--erf-image-size", type=int, default=160, help="side of those images (a multiple of 32)")
    args = p.parse_args(argv)
    write_report(args.axis_dir, args.erf, args.erf_images, args.erf_image_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
