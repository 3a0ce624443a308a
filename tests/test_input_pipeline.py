"""Input pipeline: the throughput measurement of benchmarks/data.py counts only work done while timed, and the
bytes-only loader of its GPU option crosses worker processes (its decode runs here on the CPU)."""

import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import data as bench_data  # noqa: E402  (benchmarks/data.py)

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
         "--out", str(tmp_path / "out"), "--only", "throughput.py loop; full recipe; synthetic, EMA + MESA off",
         "--modes", "eager,compiled", "--budget-s", "100000"],
        cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "overhead.json").read_text())["rows"]
    assert [(r["name"], r["mode"]) for r in rows] == [
        ("throughput.py loop", "eager"), ("full recipe", "eager"), ("synthetic, EMA + MESA off", "eager"),
        ("throughput.py loop", "compiled"), ("full recipe", "compiled")]
    for r in rows:
        assert r.get("img_per_s", 0) > 0 and "note" not in r, r
        assert (r["compile_s"] is not None) == (r["mode"] == "compiled"), r
    assert "| full recipe | eager |" in out.stdout and "| 1.00 |" in out.stdout
