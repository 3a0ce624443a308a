"""Ablation sweeps: YAML variants, the runner, the TensorBoard report, the ERF tool and their errors.

(The sweep runs a few real steps rather than `fast_dev_run`, which turns Lightning's loggers off, so that
the report has event files to read back.)
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import main
from ablations import erf, report, run

ROOT = Path(main.__file__).parent


def expected_knobs(axis: str, variant: str) -> dict:
    """The knobs a variant's YAML states, all of them (no fusion: no kernel size)."""
    if axis == "dilation":
        if variant == "none":
            return {"dilations": []}
        dilations = [int(d) for d in variant.removesuffix("-k5").split("-")]
        return {"dilations": dilations, "fusion_kernel_size": 5 if variant.endswith("-k5") else 3}
    return {axis: variant}


@pytest.mark.parametrize("axis,variant", [(a, v) for a, vs in run.AXES.items() for v in vs])
def test_variant_sets_its_knobs(axis, variant):
    cfg = yaml.safe_load(run.variant_config(axis, variant).read_text())
    knobs = cfg["model"]["init_args"]["backbone"]["init_args"]
    assert list(cfg) == ["model"]
    assert knobs == expected_knobs(axis, variant)  # every knob, not only those both sides name


@pytest.mark.parametrize("axis,variant", [("dilation", "none"), ("dilation", "1-3-5-k5"), ("scan", "cross"),
                                          ("backend", "fused")])
def test_variant_composes_with_default_config(axis, variant, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main.cli(["--config", str(ROOT / "configs" / "default.yaml"),
                    "--config", str(run.variant_config(axis, variant))], run=False)
    ssm = cli.model.backbone.stages[0][0].ssm
    built = {"dilations": list(ssm.state_fusion.dilations), "fusion_kernel_size": ssm.state_fusion.kernel_size,
             "scan": ssm.scan, "backend": ssm.backend}
    assert built == {"dilations": [1, 3, 5], "fusion_kernel_size": 3, "scan": "row", "backend": "auto",
                     **expected_knobs(axis, variant)}  # the variant's knobs, the rest from the base config
    assert cli.model.backbone.dims == [16, 32, 64, 128]  # the rest comes from the base config


def test_every_yaml_is_a_variant():
    on_disk = {(p.parent.name, p.stem) for p in (ROOT / "ablations").glob("*/*.yaml")}
    assert on_disk == {(a, v) for a, vs in run.AXES.items() for v in vs}


def test_sweep_then_report(tmp_path):
    """A 2-variant sweep of tiny runs (2 training steps, 1 validation batch), then its report."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "ablations" / "run.py"), "dilation", "--variants", "none,1-3-5",
           "--seeds", "1", "--epochs", "1", "--jobs", "2", "--threads", "1", "--logdir", str(tmp_path), "--no-report",
           "--", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
           "--trainer.enable_model_summary=false"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    axis_dir = tmp_path / "dilation"
    assert sorted(p.name for p in axis_dir.iterdir() if p.is_dir()) == ["1-3-5", "none"]

    # the HParams tab sees every knob of the run (ours is the run's first hparams record)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(axis_dir / "1-3-5" / "seed0"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hp["variant"].string_value == "1-3-5" and hp["dilations"].string_value == "[1, 3, 5]"
    assert hp["seed"].number_value == 0 and hp["params"].number_value > 0 and hp["macs"].number_value > 0
    # declaring the HParams metric columns wrote no placeholder point into the curves: one epoch, one val/acc1
    assert len(acc.Scalars("val/acc1")) == 1

    assert report.main([str(axis_dir), "--erf-images", "2", "--erf-image-size", "64"]) == 0
    text = (axis_dir / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| none | 1 |", "| 1-3-5 | 1 |"))]
    assert len(rows) == 2
    for row in rows:  # accuracy, params, MACs and both throughputs are numbers, not "–"
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert "–" not in cells[2:8], row
    assert (axis_dir / "val_curves.png").stat().st_size > 0
    assert (axis_dir / "erf.png").stat().st_size > 0
    assert (axis_dir / "erf" / "1-3-5_stage4.png").stat().st_size > 0


def test_erf_tool_writes_png(tmp_path):
    out = tmp_path / "erf.png"
    argv = ["--config", str(ROOT / "configs" / "default.yaml"), "--config", str(ROOT / "ablations/scan/cross.yaml"),
            "--out", str(out), "--image-size", "64", "--images", "2"]
    assert erf.main(argv) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_erf_of_plain_convolution_is_local():
    """Sanity of the gradient maths: with no fusion and a short stage-1 map, the ERF is finite and peaks
    near the centre."""
    import torch

    torch.manual_seed(0)
    backbone = erf.build_backbone([ROOT / "configs" / "default.yaml", ROOT / "ablations/dilation/none.yaml"])
    maps = erf.effective_receptive_field(backbone, torch.randn(2, 3, 64, 64), stages=(1,))
    m = maps[1]
    assert m.shape == (64, 64) and torch.isfinite(m).all()
    peak = divmod(int(m.argmax()), 64)
    assert abs(peak[0] - 32) <= 8 and abs(peak[1] - 32) <= 8


def _one_line_error(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert "Traceback" not in done.stderr
    for w in words:
        assert w in lines[0]


@pytest.mark.parametrize("argv,words", [
    (["nonsense"], ["unknown axis", "dilation, scan, backend"]),
    (["scan", "--variants", "row,diagonal"], ["unknown scan variant 'diagonal'", "row_reversed"]),
])
def test_runner_errors(argv, words, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "ablations" / "run.py"), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    _one_line_error(done, *words)


def test_report_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "no runs in" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_backend_axis_without_gpu_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "visible_gpus", lambda: [])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert run.main(["backend", "--logdir", str(tmp_path)]) == 2
    assert "need a CUDA GPU" in capsys.readouterr().err


def test_erf_tool_refuses_a_checkpoint_of_another_model_in_one_line(tmp_path, capsys):
    import torch

    ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"backbone.stem.conv1.conv.weight": torch.zeros(1)}}, ckpt)
    argv = ["--ckpt", str(ckpt), "--config", str(ROOT / "configs" / "default.yaml"), "--out", str(tmp_path / "erf.png")]
    assert erf.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {str(ckpt)!r} does not fit the model of the config") and err.count("\n") == 1
    assert not (tmp_path / "erf.png").exists()


def test_a_failed_run_is_marked_in_its_line(tmp_path):
    """A run that exits non-zero is labelled FAILED in the sweep's progress line, not only in the final summary
    (a run can print its summary line and still exit non-zero)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "ablations" / "run.py"), "scan", "--variants", "row", "--seeds", "1",
           "--epochs", "1", "--logdir", str(tmp_path), "--no-report", "--", "--data.init_args.batch_size=0"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    line = next(line for line in done.stdout.splitlines() if line.startswith("[1/1]"))
    assert "— FAILED: error:" in line and "batch_size" in line, done.stdout
    assert "1 run(s) failed: row seed0" in done.stderr
