"""ImageNet-style data and the published recipe, on a tiny class-folder set written from scikit-learn's digits.

The helpers here (`make_digits_folder`, `tiny_recipe_config`) are shared with test_ddp.py and test_resume.py.
"""

import csv
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import main
from src.checkpoints import load_checkpoint
from src.data.imagefolder import ImageFolderDataModule, ImageFolderDataset

ROOT = Path(main.__file__).parent
T_CONFIG = ROOT / "configs" / "imagenet" / "recipe.yaml"  # the recipe on its own is the T recipe


# One intra-op thread: these tiny models gain nothing from two, and on a loaded 2-core machine OpenMP threads
# waiting for each other make each op ~50x slower. Subprocesses get the same through OMP_NUM_THREADS.
# the repo first on the path, then whatever the caller had there (a GPU machine's extra site folder)
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                  "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_digits_folder(root: Path, classes: int = 4, train_per_class: int = 12, val_per_class: int = 6,
                       size: int = 32) -> Path:
    """root/train/<digit>/*.JPEG and root/val/<digit>/*.JPEG from the digits scans (upscaled, RGB)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c in range(classes):
        images = digits.images[digits.target == c]
        for split, chunk in (("train", images[:train_per_class]),
                             ("val", images[train_per_class:train_per_class + val_per_class])):
            folder = root / split / f"digit_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(chunk):
                pixels = (img * (255 / 16)).astype(np.uint8)
                Image.fromarray(pixels).resize((size, size), Image.BICUBIC).convert("RGB").save(
                    folder / f"{i:03d}.JPEG", quality=95)
    return root


def tiny_recipe_config(tmp_path: Path, data_root: Path, *, classes: int = 4, epochs: int = 2, train_batches: int | None = None,
                       every_n_steps: int = 1000, extra_callbacks: list | None = None, name: str = "recipe") -> Path:
    """The T recipe of configs/imagenet with a tiny Spatial-Mamba (dims 8..64, depths 1,1,1,1) on the CPU:
    RandAugment, random erasing, mixup/cutmix, label smoothing, EMA, MESA (from the first epoch), clipping."""
    cfg = yaml.safe_load(T_CONFIG.read_text())
    trainer = cfg["trainer"]
    trainer.update(accelerator="cpu", devices=1, strategy="auto", precision="32-true", max_epochs=epochs,
                   enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0)
    if train_batches is not None:
        trainer["limit_train_batches"] = train_batches
    trainer["logger"]["init_args"].update(save_dir=str(tmp_path / "logs"), name=name)
    for cb in trainer["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["dirpath"] = str(tmp_path / "ckpt")
        if "every_n_train_steps" in cb["init_args"]:
            cb["init_args"]["every_n_train_steps"] = every_n_steps
    trainer["callbacks"] += extra_callbacks or []
    model = cfg["model"]["init_args"]
    model.update(num_classes=classes, ema_decay=0.5, compile=False, warmup_epochs=0.5)
    model["backbone"]["init_args"].update(num_classes=classes, dims=[8, 16, 32, 64], depths=[1, 1, 1, 1], backend="torch")
    data = cfg["data"]["init_args"]
    data.update(root=str(data_root), batch_size=8, val_batch_size=16, image_size=32, num_workers=0,
                persistent_workers=False, pin_memory=False)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    return make_digits_folder(tmp_path_factory.mktemp("digits_folder"))


def test_full_recipe_trains_validates_and_predicts(tmp_path, monkeypatch, digits_root):
    monkeypatch.chdir(tmp_path)
    config = tiny_recipe_config(tmp_path, digits_root, train_batches=3, every_n_steps=2)
    cli = main.cli(["fit", "--config", str(config)])
    trainer, model = cli.trainer, cli.model
    assert trainer.state.finished and trainer.global_step == 6
    metrics = trainer.callback_metrics
    for key in ["train/loss", "train/mesa_loss", "val/acc1", "val/acc5", "val/loss", "val_ema/acc1", "val_ema/loss", "lr"]:
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert model.mixup_fn is not None and model.mesa_active() and trainer.gradient_clip_val == 5.0
    # the recipe's transforms are timm's: RandomResizedCrop, flip, RandAugment, ToTensor, Normalize, RandomErasing
    names = [type(t).__name__ for t in cli.datamodule.train_transform().transforms]
    assert "RandAugment" in names and "RandomErasing" in names, names
    # linear scaling: 5e-4 per 512 images at a global batch of 8
    assert model.lr_scale == pytest.approx(8 / 512)
    # EMA weights differ from the trained ones, and checkpoints carry EMA, RNG streams, MESA and class names
    ckpt = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")  # weights only, as every load
    sd = ckpt["state_dict"]
    assert any(k.startswith("ema.module.") for k in sd)
    assert not torch.equal(sd["ema.module.head.weight"], sd["backbone.head.weight"])
    assert ckpt["rng_states"] and ckpt["mesa"]["active"] and ckpt["mesa"]["weight"] == 1.0
    assert ckpt["ImageFolderDataModule"]["classes"] == [f"digit_{c}" for c in range(4)]
    assert len(ckpt["optimizer_states"]) == 1 and len(ckpt["lr_schedulers"]) == 1

    # predict on a folder of images (no training folder needed: class names come from the checkpoint)
    images = tmp_path / "to_predict"
    images.mkdir()
    for i, src in enumerate(sorted((digits_root / "val" / "digit_1").iterdir())[:3]):
        (images / f"img{i}.jpg").write_bytes(src.read_bytes())
    out = tmp_path / "pred.csv"
    main.cli(["predict", "--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
              "--data.init_args.root", str(tmp_path / "nowhere"), "--data.init_args.predict_root", str(images),
              "--data.init_args.predict_output", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["path"]).name for r in rows] == ["img0.jpg", "img1.jpg", "img2.jpg"]
    for r in rows:
        assert r["class_name"] == f"digit_{r['class_index']}" and 0 < float(r["probability"]) <= 1


def test_augmentation_is_seeded_per_sample(digits_root):
    """A sample's augmented image depends on (seed, epoch, index) only, not on what was drawn before."""
    dm = ImageFolderDataModule(root=str(digits_root), batch_size=8, image_size=32, num_workers=0, seed=3)
    dm.setup("fit")
    a = dm.train_set[(5, 0)][0]
    torch.rand(100), np.random.rand(7)
    before = torch.get_rng_state()
    assert torch.equal(dm.train_set[(5, 0)][0], a)
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is left as it was
    assert not torch.equal(dm.train_set[(5, 1)][0], a)


# ---------- bad data ----------

def run_main_inprocess(args, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["main.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        main.main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("damage,message", [
    ("missing_root", "error: data.root not found"),
    ("empty_class", "has no images"),
    ("val_extra_class", "are not training classes"),
    ("no_root", "error: data.init_args.root is not set"),
])
def test_bad_folders_give_one_line(tmp_path, monkeypatch, capsys, damage, message):
    monkeypatch.chdir(tmp_path)
    root = make_digits_folder(tmp_path / "data", classes=3, train_per_class=4, val_per_class=2)
    if damage == "empty_class":
        (root / "train" / "digit_9").mkdir()
    elif damage == "val_extra_class":
        (root / "val" / "digit_7").mkdir()
        (root / "val" / "digit_0" / "000.JPEG").rename(root / "val" / "digit_7" / "000.JPEG")
    config = tiny_recipe_config(tmp_path, root, classes=3, epochs=1, train_batches=1)
    args = ["fit", "--config", str(config)]
    if damage == "missing_root":
        args += ["--data.init_args.root", str(tmp_path / "missing")]
    elif damage == "no_root":
        args += ["--data.init_args.root", "null"]
    code, err = run_main_inprocess(args, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert message in err.strip().splitlines()[-1], err


def test_wrong_num_classes_gives_one_line(tmp_path, monkeypatch, capsys, digits_root):
    monkeypatch.chdir(tmp_path)
    config = tiny_recipe_config(tmp_path, digits_root, classes=5, epochs=1, train_batches=1)
    code, err = run_main_inprocess(["fit", "--config", str(config)], monkeypatch, capsys)
    assert code == 2 and "the data has 4 classes but model.init_args.num_classes=5" in err.strip().splitlines()[-1], err


def test_unreadable_images_are_skipped_and_odd_modes_become_rgb(tmp_path, caplog):
    good = tmp_path / "good.JPEG"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(good, quality=90)
    truncated = tmp_path / "truncated.JPEG"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    corrupt = tmp_path / "corrupt.JPEG"
    corrupt.write_bytes(b"not an image at all")
    gray, cmyk, png, rgba = (tmp_path / n for n in ("gray.JPEG", "cmyk.JPEG", "palette.png", "rgba.png"))
    Image.open(good).convert("L").save(gray)
    Image.open(good).convert("CMYK").save(cmyk)
    Image.open(good).convert("P").save(png)
    Image.open(good).convert("RGBA").save(rgba)
    paths = [str(p) for p in (truncated, corrupt, good, gray, cmyk, png, rgba)]
    ds = ImageFolderDataset(paths, list(range(len(paths))), transform=None)
    with caplog.at_level(logging.WARNING):
        img, label = ds[0]  # truncated, then corrupt: both skipped, the next readable image is used
    assert label == 2 and img.mode == "RGB"
    assert "truncated.JPEG" in caplog.text and "corrupt.JPEG" in caplog.text
    for i in range(3, 7):
        img, label = ds[i]
        assert img.mode == "RGB" and img.size == (48, 40) and label == i
    strict = ImageFolderDataset(paths, list(range(len(paths))), transform=None, on_bad_image="error")
    with pytest.raises(RuntimeError, match="unreadable image .*truncated.JPEG"):
        strict[0]
    with pytest.raises(RuntimeError, match="unreadable images in a row"):
        ImageFolderDataset([str(corrupt)] * 3, [0, 0, 0], max_bad_in_a_row=3)[0]


def test_predict_output_checked_before_any_work(tmp_path):
    """An existing predict_output is refused unless overwrite is asked for; a folder or an unwritable place
    is refused too — all in setup, before a single image is predicted."""
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(images / "a.png")
    existing = tmp_path / "model.ckpt"
    existing.write_bytes(b"a trained checkpoint")

    def setup(output, **kw):
        dm = ImageFolderDataModule(image_size=32, num_workers=0, predict_root=str(images), predict_output=str(output),
                                   **kw)
        dm.setup("predict")
        return dm

    with pytest.raises(FileExistsError, match=r"model.ckpt' exists and would be overwritten; pass "
                                              r"--data.init_args.predict_overwrite true"):
        setup(existing)
    assert existing.read_bytes() == b"a trained checkpoint"
    with pytest.raises(ValueError, match="is a folder"):
        setup(images)
    blocked = tmp_path / "file_not_folder"
    blocked.write_text("x")
    with pytest.raises(PermissionError, match="cannot be written"):
        setup(blocked / "out.csv")
    assert len(setup(existing, predict_overwrite=True).predict_set) == 1
    assert len(setup(tmp_path / "new" / "deeper" / "p.csv").predict_set) == 1  # folders made at write time


@pytest.mark.parametrize("size,variant,mesa", [("t", "tiny", 1.0), ("s", "small", 1.5), ("b", "base", 2.0)])
def test_imagenet_configs_are_one_recipe_and_a_short_size_file(size, variant, mesa):
    """The T/S/B recipes were three 121-line copies differing in about ten lines: the recipe is one file, a size
    file states only the published sizes, MESA weight and run folder (and the recipe on its own is T)."""
    from src.models.spatial_mamba import VARIANTS

    published = {k: list(v) if isinstance(v, tuple) else v for k, v in VARIANTS[variant].items()}
    size_file = ROOT / "configs" / "imagenet" / f"spatial_mamba_{size}.yaml"
    settings = [line for line in size_file.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(settings) <= 12, settings
    override = yaml.safe_load(size_file.read_text())
    assert override["model"]["init_args"]["backbone"]["init_args"] == published
    assert override["model"]["init_args"]["mesa"] == mesa
    assert override["trainer"] == {"logger": {"init_args": {"version": f"spatial_mamba_{size}"}}}
    recipe = yaml.safe_load(T_CONFIG.read_text())
    assert {k: recipe["model"]["init_args"]["backbone"]["init_args"][k] for k in published} == VARIANTS["tiny"] | {
        "dims": list(VARIANTS["tiny"]["dims"]), "depths": list(VARIANTS["tiny"]["depths"])}
    assert not any("dirpath" in (cb.get("init_args") or {}) for cb in recipe["trainer"]["callbacks"])  # in the run folder


def test_fused_optimizer_gradients_clipped_by_the_module():
    """On a GPU the recipe steps with the fused AdamW, for which Lightning refuses to clip; the module clips the
    (unscaled, bf16-mixed) gradients itself, by norm or by value, like Lightning would for another optimizer."""
    from src.models.classifier import ImageClassifier
    from src.models.spatial_mamba import SpatialMamba

    torch.manual_seed(0)
    backbone = SpatialMamba(num_classes=4, dims=(8, 8, 8, 8), depths=(1, 1, 1, 1), backend="torch")
    module = ImageClassifier(backbone, num_classes=4, compile=False)
    params = list(module.parameters())

    class FusedLike(torch.optim.AdamW):  # what configure_gradient_clipping looks at: defaults["fused"]
        def __init__(self, params):
            super().__init__(params)
            self.defaults["fused"] = True

    optimizer = FusedLike(params)
    for algorithm, limit in (("norm", 0.5), ("value", 1e-3)):
        for p in params:
            p.grad = torch.randn_like(p)
        module.configure_gradient_clipping(optimizer, 0.5 if algorithm == "norm" else limit, algorithm)
        grads = [p.grad for p in params]
        if algorithm == "norm":
            assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) == \
                pytest.approx(0.5, rel=1e-4)
        else:
            assert max(g.abs().max().item() for g in grads) <= torch.tensor(limit, dtype=torch.float32).item()


def test_channels_last_only_on_the_gpu():
    """The channels-last layout leaves CPU images untouched (the layout is a GPU speed choice)."""
    from src.models.classifier import ImageClassifier
    from src.models.spatial_mamba import SpatialMamba

    backbone = SpatialMamba(num_classes=4, dims=(8, 8, 8, 8), depths=(1, 1, 1, 1), backend="torch")
    module = ImageClassifier(backbone, num_classes=4, compile=False)
    images = torch.randn(2, 3, 32, 32)
    assert module._layout(images) is images
    assert module.hparams.channels_last is True
