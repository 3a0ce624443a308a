"""DDP on the CPU: 2 processes (gloo) train the full recipe for a few steps through `main.py fit`; afterwards both
ranks hold identical weights (parameters, BatchNorm statistics, EMA), and the validation metrics synced over the
2 ranks equal those of one process validating the same weights on the whole (odd-sized) validation set."""

import os
import subprocess
import sys

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import main
from tests.test_imagenet import ROOT, SUBPROCESS_ENV, make_digits_folder, tiny_recipe_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class DumpEachRank(Callback):
    """At the end of fit: every rank saves its state dict and the synced validation metrics; then one checkpoint."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_fit_end(self, trainer, pl_module):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        torch.save({"state_dict": pl_module.state_dict(), "metrics": metrics, "world_size": trainer.world_size,
                    "steps": trainer.global_step}, os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))
        trainer.save_checkpoint(os.path.join(self.folder, "final.ckpt"))


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path, monkeypatch):
    data = make_digits_folder(tmp_path / "data", classes=3, train_per_class=12, val_per_class=7)  # 36 train, 21 val
    callbacks = [{"class_path": "tests.test_ddp.DumpEachRank", "init_args": {"folder": str(tmp_path)}}]
    config = tiny_recipe_config(tmp_path, data, classes=3, epochs=1, extra_callbacks=callbacks, name="ddp")
    out = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "fit", "--config", str(config),
         "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
        cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=400,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "global batch 16 = 8 per device × 2 devices" in out.stderr + out.stdout
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2 and r0["steps"] == 2  # 36 images / (8 × 2), drop_last
    assert r0["state_dict"].keys() == r1["state_dict"].keys()
    for k, v in r0["state_dict"].items():
        assert torch.equal(v, r1["state_dict"][k]), k
    assert r0["metrics"] == r1["metrics"]

    # one process, the same weights, the whole validation set
    monkeypatch.chdir(tmp_path)
    single = main.cli(["validate", "--config", str(config), "--ckpt_path", str(tmp_path / "final.ckpt")])
    metrics = single.trainer.callback_metrics
    for key in ("val/acc1", "val/acc5", "val_ema/acc1"):
        assert float(metrics[key]) == r0["metrics"][key], key
    for key in ("val/loss", "val_ema/loss"):
        assert float(metrics[key]) == pytest.approx(r0["metrics"][key], rel=1e-5), key


@pytest.mark.slow
def test_ddp_scaling_script_checks_on_cpu(tmp_path):
    """benchmarks/ddp_scaling.py with gloo: 1 and 2 processes of the tiny recipe, then its checks. The scan is
    split over two calls as on a time-limited GPU host: 1 process, then `--devices 1,2 --continue`, which keeps
    the first call's row (and baseline) and runs only the 2-process fit; other settings are refused."""
    import json

    data = make_digits_folder(tmp_path / "data", classes=3, train_per_class=12, val_per_class=7)  # 36 train, 21 val

    def scaling(devices, *more):
        return subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "ddp_scaling.py"), "--root", str(data), "--devices", devices,
             "--accelerator", "cpu", "--tiny", "--steps", "2", "--epochs", "2", "--warmup", "1", "--loss-rtol", "1e-5",
             "--out", str(tmp_path / "scaling"), *more, "--", "--model.init_args.ema_decay", "0.5"],
            cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600,
        )

    first = scaling("1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = scaling("1,2", "--continue")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "== 1 device(s): fit" not in out.stdout and "== 2 device(s): fit" in out.stdout
    assert "summary.json: 1 device(s)" in out.stdout
    refused = scaling("1,2,3", "--continue", "--steps", "3")
    assert refused.returncode == 2 and "other settings (steps)" in refused.stderr, refused.stderr[-2000:]
    summary = json.loads((tmp_path / "scaling" / "summary.json").read_text())
    runs = {r["devices"]: r for r in summary["runs"]}
    assert set(runs) == {1, 2}
    for n, r in runs.items():
        assert r["global_batch"] == 8 * n and r["steps_per_rank"] == 4 and r["timed_steps"] == 2, r
        assert r["img_per_s"] > 0 and r["weights_identical"] and r["checkpoints_once"], r
        assert r["val_agree"], r["val_detail"]
        assert "last.ckpt" in r["checkpoints"] and r["checkpoints_detail"] == "ok"
        assert len(r["peak_gpu_gib_per_rank"]) == n and r["peak_gpu_gib"] is None  # every rank reports; no GPU here
    # efficiency = img/s of n devices / (n × img/s of the 1-device baseline): 1.0 for the baseline by definition,
    # so the 2-device row is the one that checks the script's arithmetic
    assert runs[2]["efficiency"] == pytest.approx(runs[2]["img_per_s"] / (2 * runs[1]["img_per_s"]), rel=1e-9)
    assert runs[1]["efficiency"] == 1.0
    assert f"| {runs[2]['efficiency']:.1%} |" in out.stdout  # the Markdown table prints the same number
    assert "| 2 | 16 |" in out.stdout  # the Markdown table


def test_ddp_scaling_script_rejects_bad_input(tmp_path):
    script = str(ROOT / "benchmarks" / "ddp_scaling.py")
    out = subprocess.run([sys.executable, script, "--root", str(tmp_path / "nowhere"), "--accelerator", "cpu"],
                         env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "nowhere/train does not exist" in out.stderr, out.stderr[-2000:]
    out = subprocess.run([sys.executable, script, "--root", str(tmp_path), "--devices", "1,two", "--accelerator", "cpu"],
                         env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--devices must be comma-separated positive integers" in out.stderr, out.stderr


def test_checkpoints_written_once_check():
    """The check reads the run itself: a 2-device run whose best epoch differs from the 1-device run's
    (best-epoch001 against best-epoch000: another global batch, another trajectory) passes; writes by a rank
    other than 0, a stray or duplicate file, or a kept file that is missing fail, naming the problem."""
    from benchmarks.ddp_scaling import checkpoints_written_once

    kept = ["best-epoch001.ckpt", "last.ckpt"]
    rank0 = ["best-epoch000.ckpt", "last.ckpt", "best-epoch001.ckpt", "last.ckpt"]
    assert checkpoints_written_once(["best-epoch001.ckpt", "last.ckpt"], kept, [rank0, []]) == (True, "ok")
    ok, detail = checkpoints_written_once(kept, kept, [rank0, ["last.ckpt"]])
    assert not ok and detail == "rank 1 wrote ['last.ckpt']"
    ok, detail = checkpoints_written_once([*kept, "last-v1.ckpt"], kept, [rank0, []])
    assert not ok and detail == "files no callback keeps: ['last-v1.ckpt']"
    ok, detail = checkpoints_written_once(["last.ckpt"], kept, [rank0, []])
    assert not ok and detail == "kept files missing: ['best-epoch001.ckpt']"
    ok, detail = checkpoints_written_once(kept, kept, [[], []])
    assert not ok and detail == "rank 0 wrote no checkpoint"
