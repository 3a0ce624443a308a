"""Effective receptive field (ERF), as in the paper's figures: how strongly each input pixel moves the
centre of a feature map.

ERF = mean over images of |∂ out / ∂ image|, summed over the image's channels, where `out` is the centre
pixel of a stage's feature map summed over its channels (default: the last stage). Images are the digits
validation images upscaled to `--image-size` (default 160: the last map is 5×5, so it has a true centre).

    python ablations/erf.py --ckpt logs/dilation/1-3-5/seed0/checkpoints/last.ckpt --out erf.png
    python ablations/erf.py --config configs/default.yaml --config ablations/scan/cross.yaml --out init.png

With `--ckpt` the model is rebuilt from the run's config.yaml (next to `checkpoints/`) unless `--config`
is given; with only `--config` the model keeps its random initialisation.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import yaml  # noqa: E402

from src.checkpoints import CheckpointKeysError  # noqa: E402
from src.checkpoints import load_checkpoint as read_checkpoint  # noqa: E402
from src.data.imagefolder import check_output_file  # noqa: E402
from src.errors import InputNotFoundError, UserError, reports_user_errors  # noqa: E402

LOG_FLOOR = 1e-8  # heat maps show |grad| / max on a log scale down to this (paths through the scan are ~1e-7)


def _merge(base: dict, update: dict) -> dict:
    """LightningCLI-style composition of configs: later files override keys, lists are replaced."""
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_backbone(configs: list[str | Path]) -> nn.Module:
    """The backbone of `model.init_args.backbone` of the merged configs, on the `torch` backend."""
    cfg: dict = {}
    for path in configs:
        cfg = _merge(cfg, yaml.safe_load(Path(path).read_text()) or {})
    spec = cfg.get("model", {}).get("init_args", {}).get("backbone")
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise UserError(f"no model.init_args.backbone.class_path in {[str(c) for c in configs]}")
    module, _, name = spec["class_path"].rpartition(".")
    kwargs = {k: v for k, v in (spec.get("init_args") or {}).items() if k != "pretrained"}
    if "backend" in kwargs:
        kwargs["backend"] = "torch"  # same function on every backend; this one runs on the CPU
    return getattr(importlib.import_module(module), name)(**kwargs)


def load_checkpoint(backbone: nn.Module, ckpt: str | Path) -> None:
    """Weights of a Lightning checkpoint (`backbone.*` keys) or of a raw backbone state dict."""
    state = read_checkpoint(ckpt)  # weights only: a file holding code is refused before it runs
    state = state.get("state_dict", state)
    own = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    try:
        backbone.load_state_dict(own or state)
    except RuntimeError as e:  # missing, unexpected or mis-shaped tensors: weights of another model
        first = str(e).strip().splitlines()[0]
        raise CheckpointKeysError(f"checkpoint {str(ckpt)!r} does not fit the model of the config: {first}") from None


def digits_images(n: int = 32, image_size: int = 160) -> torch.Tensor:
    """The first n digits validation images (fixed split), upscaled to image_size, normalised."""
    from src.data import DigitsDataModule

    data = DigitsDataModule(image_size=image_size, augment=False)
    data.setup("fit")
    return data.val_set.tensors[0][:n]


def effective_receptive_field(backbone: nn.Module, images: torch.Tensor, stages: Sequence[int] = (4,),
                              batch_size: int = 16) -> dict[int, torch.Tensor]:
    """Per stage: (H, W) mean over images of |∂ centre of the stage map / ∂ image|, summed over image
    channels. The centre is pixel (h // 2, w // 2) of the (B, C, h, w) map, summed over its C channels."""
    backbone.eval()
    totals = {s: torch.zeros(images.shape[-2:]) for s in stages}
    for chunk in images.split(batch_size):
        x = chunk.clone().requires_grad_(True)
        features = backbone.forward_features(x)  # four (B, C, h, w) maps
        for i, s in enumerate(stages):
            f = features[s - 1]
            centre = f[:, :, f.shape[-2] // 2, f.shape[-1] // 2].sum()
            (grad,) = torch.autograd.grad(centre, x, retain_graph=i + 1 < len(stages))
            totals[s] += grad.abs().sum(1).sum(0)
    return {s: t / len(images) for s, t in totals.items()}


def erf_stats(erf: torch.Tensor) -> dict[str, float]:
    """area90: share of pixels holding 90 % of the |grad| mass (ERF size, dominated by local paths);
    support: share of pixels with |grad| >= LOG_FLOOR · max (what the heat map shows, including the weak
    long-range paths through the scan); up/down: mass above the centre row over mass below it."""
    flat = erf.flatten().sort(descending=True).values
    area90 = float((flat.cumsum(0) < 0.9 * flat.sum()).sum() + 1) / flat.numel()
    H = erf.shape[0]
    up, down = erf[: H // 2].sum(), erf[(H + 1) // 2:].sum()
    support = float((erf >= LOG_FLOOR * erf.max()).float().mean())
    return {"area90": area90, "support": support, "up_down": float(up / down.clamp_min(1e-30))}


def _show(ax, erf: torch.Tensor, title: str):
    img = np.log10((erf / erf.max()).clamp_min(LOG_FLOOR).numpy())
    handle = ax.imshow(img, cmap="inferno", vmin=np.log10(LOG_FLOOR), vmax=0.0)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return handle


def save_erf_png(erf: torch.Tensor, path: str | Path, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(3.4, 3.0))
    handle = _show(ax, erf, title)
    fig.colorbar(handle, ax=ax, label="log10 |grad| / max")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_erf_grid(rows: dict[str, dict[str, torch.Tensor]], path: str | Path) -> None:
    """One row per setting (e.g. random init / trained), one column per variant, same colour scale."""
    names = list(next(iter(rows.values())))
    fig, axes = plt.subplots(len(rows), len(names), figsize=(2.1 * len(names) + 0.8, 2.2 * len(rows)), squeeze=False)
    handle = None
    for r, (row_name, erfs) in enumerate(rows.items()):
        for c, name in enumerate(names):
            handle = _show(axes[r][c], erfs[name], f"{name} ({row_name})")
    fig.colorbar(handle, ax=axes, label="log10 |grad| / max", shrink=0.8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ablations/erf.py", description="Effective receptive field PNG of a model.")
    p.add_argument("--ckpt", help="Lightning checkpoint (default: random initialisation)")
    p.add_argument("--config", action="append", default=[],
                   help="config(s) describing the model, merged in order (default with --ckpt: the run's config.yaml)")
    p.add_argument("--out", required=True, help="PNG to write (an existing file is refused unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--images", type=int, default=32, help="digits validation images averaged over")
    p.add_argument("--stage", type=int, default=4, choices=[1, 2, 3, 4], help="feature map whose centre is used")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    args = p.parse_args(argv)
    check_output_file(args.out, args.overwrite, "--out", "--overwrite")  # before the model runs
    configs = args.config
    if not configs:
        if not args.ckpt:
            raise UserError("give --ckpt (a run's checkpoint) and/or --config (a model config)")
        configs = [Path(args.ckpt).resolve().parent.parent / "config.yaml"]
    for c in configs:
        if not Path(c).is_file():
            raise InputNotFoundError(f"config not found: {c}")
    if args.ckpt and not Path(args.ckpt).is_file():
        raise InputNotFoundError(f"checkpoint not found: {args.ckpt}")
    torch.manual_seed(args.seed)
    backbone = build_backbone(configs)
    if args.ckpt:
        load_checkpoint(backbone, args.ckpt)
    erf = effective_receptive_field(backbone, digits_images(args.images, args.image_size), [args.stage])[args.stage]
    stats = erf_stats(erf)
    title = f"{'trained' if args.ckpt else 'random init'}, stage {args.stage}"
    save_erf_png(erf, args.out, title)
    print(f"wrote {args.out} (area90 {stats['area90']:.3f}, support {stats['support']:.3f}, "
          f"up/down {stats['up_down']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
