"""The command line: default fit, configs, checkpoints through Lightning, print_config, flops, errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
from src.models.spatial_mamba import load_pretrained, spatial_mamba_digits

ROOT = Path(main.__file__).parent
FAST = ["--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def run_main(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_default_fit_smoke(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main.cli(["fit", *FAST])
    assert cli.trainer.state.finished
    assert type(cli.model.backbone).__name__ == "SpatialMamba"


def test_ablation_config_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main.cli(["fit", "--config", str(ROOT / "configs" / "ablation_dilation.yaml"), *FAST])
    assert cli.trainer.state.finished
    assert list(cli.model.backbone.stages[0][0].ssm.state_fusion.dilations) == [1, 2, 3]


def test_checkpoint_save_load_same_logits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main.cli(["fit", "--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--trainer.max_epochs=1",
                    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    assert ckpt and Path(ckpt).is_file()
    model = cli.model.backbone.eval()
    fresh = spatial_mamba_digits(backend="torch").eval()
    load_pretrained(fresh, ckpt)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model.cpu()(x), rtol=0, atol=0)
    # the CLI validates the same checkpoint
    val = main.cli(["validate", "--ckpt_path", ckpt, "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=1"])
    assert "val/acc1" in val.trainer.callback_metrics


def test_print_config_shows_every_model_knob(tmp_path):
    out = run_main("fit", "--print_config", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for knob in ["dims:", "depths:", "mlp_ratio:", "drop_path_rate:", "d_state:", "dilations:", "fusion_kernel_size:",
                 "scan:", "backend:", "num_classes:", "pretrained:", "lr:", "weight_decay:", "warmup_epochs:",
                 "label_smoothing:", "batch_size:", "image_size:"]:
        assert knob in out.stdout, knob


def test_flops_command_on_published_config(tmp_path):
    out = run_main("flops", "--config", str(ROOT / "configs" / "spatial_mamba_t.yaml"), "--image_size", "224", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "26,748,862" in out.stdout and "4.411" in out.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model.init_args.backbone.init_args.backend", "nope"], "error: unknown backend 'nope'"),
        (["--model.init_args.backbone.init_args.scan", "zigzag"], "error: unknown scan 'zigzag'"),
        (["--model.init_args.backbone.init_args.fusion_kernel_size", "4"], "error: fusion kernel_size must be a positive odd"),
        (["--model.init_args.backbone.init_args.pretrained", "missing.pth"], "error: pretrained checkpoint not found"),
        (["--data.init_args.image_size", "48"], "error: data.image_size must be a multiple of 32"),
        (["--model.init_args.num_classes", "7"], "error: model.init_args.num_classes=7 but the backbone's head has 10"),
    ],
)
def test_bad_input_gives_one_line(tmp_path, args, message):
    out = run_main("fit", *args, *FAST, cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(message), out.stderr
