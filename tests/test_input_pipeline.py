"""Input pipeline: the throughput measurement of benchmarks/data.py counts only work done while timed, and the
bytes-only loader of its GPU option crosses worker processes (its decode runs here on the CPU); the data module's
torchvision decoder (torchvision.io + the same augmentation on tensors) keeps the PIL path's contract."""

import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks import data as bench_data

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def write_jpegs(folder: Path, n: int, classes: int = 2, seed: int = 0) -> list[Path]:
    """n small JPEGs of varied sizes in `classes` class folders: folder/<class>/<i>.JPEG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(40, 90, size=2))
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * 255 // w), (yy * 255 // h), np.full((h, w), 40 * (i % 6))], -1).astype(np.uint8)
        img = np.clip(img + rng.integers(0, 30, img.shape), 0, 255).astype(np.uint8)  # smooth + a little noise
        path = folder / f"c{i % classes}" / f"{i:03d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=92)
        paths.append(path)
    return paths


class Sleepy(Dataset):
    """Each sample costs `cost` seconds of waiting (no CPU): a worker delivers 1 / cost images per second."""

    def __init__(self, n: int, cost: float):
        self.n, self.cost = n, cost

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        time.sleep(self.cost)
        return i


def test_measure_times_only_work_inside_the_window():
    """A slow first delivery (here a 0.6 s first step in the main process) used to let the workers decode the set
    before the clock started, and the rate came out several times too high; now the warm-up phase absorbs it."""
    cost, workers, batch, rounds = 0.01, 2, 4, 3
    calls = []

    def slow_first_step(b):
        calls.append(len(b))
        if len(calls) == 1:
            time.sleep(0.6)
        return b

    m = bench_data.measure(Sleepy(workers * (1 + rounds) * batch, cost), batch, workers, rounds, step=slow_first_step)
    assert m["images"] == workers * rounds * batch
    ceiling = workers / cost  # 200 img/s: both workers busy all the time
    assert 0.4 * ceiling < m["img_per_s"] <= 1.05 * ceiling, m
    assert len(calls) == workers + workers * rounds  # the warm-up batches, then the timed ones


def test_measure_refuses_too_few_images():
    with pytest.raises(ValueError, match="fewer than the 12 this measurement needs"):
        bench_data.measure(Sleepy(10, 0.0), 2, 2, 2)


def test_read_file_tensors_are_not_sent_between_processes(tmp_path):
    """The GPU option's workers return plain bytes, batched into one uint8 tensor plus sizes (one shared storage
    per batch); torchvision.io.read_file's file-mapped tensors failed to pickle (Errno 9) in the workers."""
    paths = [str(p) for p in write_jpegs(tmp_path, 12)]
    loader = DataLoader(bench_data._Bytes(paths), batch_size=4, num_workers=2, collate_fn=bench_data.collate_bytes)
    augment = bench_data.GPUAugment(32, device="cpu", group=2)
    batches = list(loader)
    assert len(batches) == 3
    for (data, sizes), names in zip(batches, [paths[i:i + 4] for i in range(0, 12, 4)]):
        assert data.dtype == torch.uint8 and data.ndim == 1 and int(sizes.sum()) == len(data)
        assert [bytes(t.numpy()) for t in bench_data.split_bytes((data, sizes))] == [Path(p).read_bytes() for p in names]
    out = augment(batches[0])
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_bench_rows_on_the_cpu(tmp_path):
    """Every option of `bench` that runs without a GPU (gpu-nvjpeg with the CPU decoder), one and two workers."""
    write_jpegs(tmp_path / "train", 48)
    rows = bench_data.bench(str(tmp_path), [1, 2], images=16, size=32, batch=4,
                            options=["pil-timm", "pil-decode", "tv-cpu", "gpu-nvjpeg"], gpu_device="cpu")
    assert [(r["option"], r["workers"]) for r in rows] == [
        (o, w) for o in ("pil-timm", "pil-decode", "tv-cpu", "gpu-nvjpeg") for w in (1, 2)]
    for r in rows:
        assert r["images"] == r["workers"] * 4 * (4 if r["workers"] == 1 else 2), r
        assert r["img_per_s"] > 0 and r["img_per_s_per_core"] <= r["img_per_s"]
    assert "| gpu-nvjpeg | 2 |" in bench_data.markdown(rows, str(tmp_path))


@pytest.mark.slow
def test_recipe_overhead_script_on_the_cpu(tmp_path):
    """benchmarks/gpu_recipe_overhead.py --cpu: a loop row, a recipe row with the real loader and a compiled
    recipe row with synthetic batches run, and the table compares them."""
    import json
    import subprocess

    from tests.test_imagenet import SUBPROCESS_ENV

    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_recipe_overhead.py"), "--cpu", "--root", str(tmp_path / "data"),
         "--out", str(tmp_path / "out"), "--only",
         "throughput.py loop; throughput.py loop + MESA teacher; full recipe; synthetic, EMA + MESA off",
         "--modes", "eager,compiled", "--budget-s", "100000"],
        cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "overhead.json").read_text())["rows"]
    assert [(r["name"], r["mode"]) for r in rows] == [
        ("throughput.py loop", "eager"), ("throughput.py loop + MESA teacher", "eager"), ("full recipe", "eager"),
        ("synthetic, EMA + MESA off", "eager"), ("throughput.py loop", "compiled"),
        ("throughput.py loop + MESA teacher", "compiled"), ("full recipe", "compiled")]
    for r in rows:
        assert r.get("img_per_s", 0) > 0 and "note" not in r, r
        assert (r["compile_s"] is not None) == (r["mode"] == "compiled"), r
    assert "| full recipe | eager |" in out.stdout and "| 1.00 |" in out.stdout
    # the full recipe (MESA on) is compared with the loop that runs the teacher too, the MESA-off row without it
    table = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.stdout.splitlines()
             if line.startswith("| ") and " | eager | " in line}
    ips = {r["name"]: r["img_per_s"] for r in rows if r["mode"] == "eager"}
    assert table["full recipe"][4] == f"{ips['full recipe'] / ips['throughput.py loop + MESA teacher']:.2f}"
    assert table["synthetic, EMA + MESA off"][4] == f"{ips['synthetic, EMA + MESA off'] / ips['throughput.py loop']:.2f}"
    assert table["throughput.py loop + MESA teacher"][4] == "–"


# ---------- ImageFolderDataModule(decoder="torchvision") ----------

# the recipe's interpolation and normalisation, 32-pixel crops; RandAugment and erasing as the recipe unless said
SMALL = dict(batch_size=4, val_batch_size=4, image_size=32, num_workers=0, persistent_workers=False, pin_memory=False,
             seed=3)


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpeg_folder")
    write_jpegs(root / "train", 12, classes=3)
    write_jpegs(root / "val", 6, classes=3, seed=1)
    return root


def data_module(root, decoder: str, **kw):
    from src.data.imagefolder import ImageFolderDataModule

    dm = ImageFolderDataModule(root=str(root), decoder=decoder, **{**SMALL, **kw})
    dm.setup("fit")
    return dm


def to_levels(x: torch.Tensor) -> torch.Tensor:
    """A normalised (3, H, W) image back in 0..255 units."""
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x * std.view(3, 1, 1) + mean.view(3, 1, 1)) * 255


def test_torchvision_decoder_keeps_the_dataset_contract(jpeg_root):
    """Same classes, labels, sample tuple, shapes and dtypes as the PIL path, for single samples and batches."""
    pil, tv = data_module(jpeg_root, "pil"), data_module(jpeg_root, "torchvision")
    assert tv.classes == pil.classes == ["c0", "c1", "c2"]
    for split in ("train_set", "val_set"):
        a, b = getattr(pil, split), getattr(tv, split)
        assert list(b.labels) == list(a.labels) and list(b.paths) == list(a.paths)
        for key in [(0, 0), (7, 1)] if split == "train_set" else [0, 5]:
            (xa, ya), (xb, yb) = a[key], b[key]
            assert type(yb) is type(ya) is int and yb == ya
            assert xb.shape == xa.shape == (3, 32, 32) and xb.dtype == xa.dtype == torch.float32
    images, labels = next(iter(tv.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert torch.isfinite(images).all()
    assert type(tv.train_set[(0, 0)][0]) is torch.Tensor  # not a tv_tensors subclass: the collate is the same


def test_torchvision_pixels_close_to_pil(jpeg_root):
    """Eval: resize by the crop ratio (bicubic) + center crop on tensors is within 0.5 levels (of 255) per pixel on
    average of PIL's (measured: at most 0.01 here, 0.004 on benchmarks/data.py's photographs at 224). Train without
    RandAugment and erasing (colour jitter on): timm's crop draws, the flip and jitter draws are the same under the
    same seed, so the augmented images are within 1 level (measured: at most 0.3 here, 0.5 on the photographs); a
    crop drawn otherwise is off by tens of levels."""
    for kw, bound in (({}, 0.5), (dict(auto_augment=None, re_prob=0.0), 1.0)):
        pil, tv = data_module(jpeg_root, "pil", **kw), data_module(jpeg_root, "torchvision", **kw)
        diffs = [(to_levels(pil.val_set[i][0]) - to_levels(tv.val_set[i][0])).abs().mean() for i in range(6)]
        diffs += [(to_levels(pil.train_set[(i, 0)][0]) - to_levels(tv.train_set[(i, 0)][0])).abs().mean()
                  for i in range(12)] if kw else []
        assert max(diffs) < bound, [round(float(d), 2) for d in diffs]


def test_torchvision_train_transform_is_seeded_per_sample(jpeg_root):
    """The full recipe augmentation on tensors (RandAugment, erasing): a sample depends on (seed, epoch, index) only,
    leaves the global RNG streams as they were, and a second data module with the same seed repeats it."""
    import random

    import numpy as np

    dm = data_module(jpeg_root, "torchvision")
    samples = [dm.train_set[(i, 0)][0] for i in range(12)]
    torch.rand(50), np.random.rand(3), random.random()
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    again = data_module(jpeg_root, "torchvision")
    assert all(torch.equal(again.train_set[(i, 0)][0], samples[i]) for i in range(12))
    assert torch.equal(torch.get_rng_state(), states[0]) and (np.random.get_state()[1] == states[1]).all()
    assert random.getstate() == states[2]
    assert not torch.equal(dm.train_set[(5, 1)][0], samples[5])  # another epoch, another augmentation
    assert len({tuple(s.flatten()[:64].tolist()) for s in samples}) == 12


@pytest.mark.parametrize("name,args", [
    ("AutoContrast", ()), ("Equalize", ()), ("Invert", ()), ("Posterize", (3,)), ("Solarize", (128,)),
    ("SolarizeAdd", (80,)), ("Color", (1.7,)), ("Contrast", (0.4,)), ("Brightness", (1.5,)), ("Sharpness", (1.8,)),
    ("Rotate", (20.0,)), ("ShearX", (0.25,)), ("ShearY", (-0.25,)), ("TranslateX", (9.0,)), ("TranslateY", (-7.0,)),
    ("TranslateXRel", (0.3,)), ("TranslateYRel", (-0.3,)),
])
def test_tensor_augment_ops_match_timm_pil_ops(name, args):
    """Each RandAugment op on tensors against timm's PIL op with the same arguments: colour ops within 0.5 levels on
    average (measured <= 0.4), warps within 2 (measured <= 1.4: edges resampled differently); a warp with the
    wrong sign or origin is off by tens of levels."""
    import numpy as np
    from PIL import Image
    from timm.data.auto_augment import NAME_TO_OP

    from src.data.tensor_augment import _tensor_ops

    h, w = 48, 64
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (h + w)], -1)
    img = np.clip(img + np.random.default_rng(0).integers(0, 20, img.shape), 0, 255).astype(np.uint8)
    kw = dict(fillcolor=(124, 116, 104), resample=Image.BILINEAR)
    want = np.asarray(NAME_TO_OP[name](Image.fromarray(img), *args, **dict(kw))).astype(np.float64)
    got = _tensor_ops()[name](torch.from_numpy(img).permute(2, 0, 1), *args, **dict(kw))
    assert got.dtype == torch.uint8 and got.shape == (3, h, w)
    warp = name.startswith(("Rotate", "Shear", "Translate"))
    assert np.abs(got.permute(1, 2, 0).numpy() - want).mean() < (2.0 if warp else 0.5)


def test_torchvision_decoder_reads_odd_modes_as_the_pil_path(tmp_path):
    """Grayscale, CMYK, palette and RGBA JPEG/PNG, 16-bit PNG (scaled, not clipped) and BMP (PIL's) give the PIL
    path's RGB pixels exactly."""
    import numpy as np
    from PIL import Image

    from src.data.imagefolder import read_rgb_pil, read_rgb_tensor

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    files = {"gray.jpg": rgb.convert("L"), "cmyk.jpg": rgb.convert("CMYK"), "palette.png": rgb.convert("P"),
             "rgba.png": rgb.convert("RGBA"), "image.bmp": rgb,
             "deep.png": Image.fromarray(rng.integers(0, 65535, (20, 24)).astype(np.uint16))}
    for name, img in files.items():
        img.save(tmp_path / name)
        got = read_rgb_tensor(str(tmp_path / name))
        assert got.dtype == torch.uint8 and got.shape == (3, 20, 24), name
        assert np.array_equal(got.permute(1, 2, 0).numpy(), np.asarray(read_rgb_pil(str(tmp_path / name)))), name
    assert 100 < float(read_rgb_tensor(str(tmp_path / "deep.png")).float().mean()) < 155  # not clipped to white


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_corrupt_image_is_one_data_error_line(tmp_path, monkeypatch, capsys, decoder):
    """on_bad_image error: a corrupt file stops the run with one `error:` line naming it (a DataError), with either
    decoder and from a worker process; skip: the next readable image instead."""
    from src.data.imagefolder import ImageFolderDataset
    from src.errors import DataError, one_line, user_error_of

    good = write_jpegs(tmp_path / "train", 2)
    corrupt = tmp_path / "train" / "c0" / "bad.JPEG"
    corrupt.write_bytes(good[0].read_bytes()[:300])  # truncated
    paths, labels = [str(corrupt), str(good[1])], [0, 1]
    assert ImageFolderDataset(paths, labels, decoder=decoder)[0][1] == 1  # skipped
    strict = ImageFolderDataset(paths, labels, on_bad_image="error", decoder=decoder)
    with pytest.raises(DataError, match="unreadable image .*bad.JPEG"):
        strict[0]
    with pytest.raises(Exception) as caught:  # re-raised by the loader from its worker
        next(iter(DataLoader(strict, batch_size=2, num_workers=1)))
    error = user_error_of(caught.value)
    assert isinstance(error, DataError) and one_line(error).startswith("unreadable image") and "bad.JPEG" in one_line(error)


def test_decoder_key_reachable_from_the_recipe(capsys, monkeypatch):
    """`--data.init_args.decoder torchvision` on the ImageNet recipe: printed by --print_config; another value is
    refused by the parser."""
    import main

    monkeypatch.setattr(sys, "argv", ["main.py"])
    recipe = str(ROOT / "configs" / "imagenet" / "recipe.yaml")
    with pytest.raises(SystemExit) as done:
        main.cli(["fit", "--config", recipe, "--data.init_args.decoder", "torchvision", "--print_config"])
    assert done.value.code in (0, None)
    out = capsys.readouterr().out
    data = out[out.index("\ndata:"):]
    assert "  decoder: torchvision\n" in data, data[:1500]
    with pytest.raises(SystemExit) as refused:
        main.cli(["fit", "--config", recipe, "--data.init_args.decoder", "nvjpeg", "--print_config"])
    assert refused.value.code != 0 and "decoder" in capsys.readouterr().err


def test_augmix_refused_for_the_torchvision_decoder(jpeg_root):
    from src.data.imagefolder import ImageFolderDataModule
    from src.errors import UserError

    dm = ImageFolderDataModule(root=str(jpeg_root), decoder="torchvision", auto_augment="augmix-m5-w3", **SMALL)
    with pytest.raises(UserError, match=r"data.init_args.auto_augment: AugMix .* decoder 'torchvision'"):
        dm.train_transform()


def test_automatic_worker_count(monkeypatch):
    """num_workers null: the CPUs this process may use ÷ the node's loading processes (devices), less one
    each, at most MAX_AUTO_WORKERS; a number is taken as given."""
    from types import SimpleNamespace

    from src.data import sharded
    from src.data.imagefolder import ImageFolderDataModule

    dm = ImageFolderDataModule(root=None, num_workers=None)
    for cpus, devices, want in ((32, 2, 15), (16, 1, 15), (128, 8, 15), (2, 1, 1), (1, 1, 0), (256, 1, 32)):
        monkeypatch.setattr(sharded.os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        dm.trainer = SimpleNamespace(num_devices=devices)
        assert dm.num_workers() == want, (cpus, devices)
        assert dm._loader_kwargs()["num_workers"] == want
    dm.trainer = None
    assert dm.num_workers() == 32  # no trainer: one process (256 CPUs, capped)
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    monkeypatch.setattr(sharded.os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    dm.trainer = SimpleNamespace(num_devices=8, strategy=SimpleNamespace(cluster_environment=SLURMEnvironment()))
    assert dm.num_workers() == 11  # srun: each rank a task with its own 12 CPUs (cpus-per-task)
    assert ImageFolderDataModule(root=None, num_workers=3).num_workers() == 3


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_posterize_keeping_no_bit_gives_a_black_image(decoder):
    """The published RandAugment ("rand-m9-mstd0.5-inc1") draws magnitudes around 9, clamped at 10, where
    "PosterizeIncreasing" keeps 0 bits. Pillow 13 raises for 0 bits ("bits must be between or equal to 1 and
    8"), which stopped a loader worker about once per 750 training images; both decoders now drop every bit, as
    older Pillow and torchvision do."""
    import numpy as np
    from PIL import Image

    from src.data.imagefolder import ImageFolderDataModule

    dm = ImageFolderDataModule(root=None, decoder=decoder, image_size=32)
    (randaug,) = [s for s in dm.train_transform().transforms if type(s).__name__ == "RandAugment"]
    (op,) = [op for op in randaug.ops if op.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # the draw that keeps no bit
    rgb = (np.random.default_rng(0).random((24, 20, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(rgb) if decoder == "pil" else torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    out = op(img)
    out = np.asarray(out) if decoder == "pil" else out.permute(1, 2, 0).numpy()
    assert out.shape == rgb.shape and not out.any()
    op.magnitude = 5  # 2 bits kept: Pillow's own posterize
    if decoder == "pil":
        from PIL import ImageOps

        assert np.array_equal(np.asarray(op(img)), np.asarray(ImageOps.posterize(img, 2)))


def test_the_published_augmentation_runs_on_many_draws():
    """Every draw of the recipe's PIL augmentation on a small image: no op raises (before the posterize fix,
    4 of 3000 did with Pillow 13)."""
    import random

    import numpy as np
    from PIL import Image

    from src.data.imagefolder import ImageFolderDataModule

    transform = ImageFolderDataModule(root=None, image_size=32).train_transform()
    img = Image.fromarray((np.random.default_rng(1).random((40, 40, 3)) * 255).astype(np.uint8))
    for i in range(3000):
        random.seed(i)
        torch.manual_seed(i)
        transform(img)
