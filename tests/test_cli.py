"""The command line: default fit, configs, checkpoints through Lightning, print_config, flops, errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
from src.checkpoints import CheckpointKeysError, load_checkpoint
from src.errors import UserError
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
    ckpt = str(Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt")
    assert Path(ckpt).is_file()
    model = cli.model.backbone.eval()
    fresh = spatial_mamba_digits(backend="torch").eval()
    load_pretrained(fresh, ckpt)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model.cpu()(x), rtol=0, atol=0)
    # the CLI validates the same checkpoint
    val = main.cli(["validate", "--ckpt_path", ckpt, "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=1"])
    assert "val/acc1" in val.trainer.callback_metrics


@pytest.mark.parametrize("config", ["default.yaml", "ablation_dilation.yaml", "spatial_mamba_t.yaml",
                                    "imagenet/recipe.yaml+imagenet/spatial_mamba_s.yaml"])
def test_last_checkpoint_holds_the_final_epoch(tmp_path, monkeypatch, config):
    """last.ckpt is rewritten at every epoch end, also after epochs that do not improve val/acc1 (Lightning >= 2.6
    refreshes `save_last` only together with a top-k file, so the configs give last.ckpt its own callback).
    lr 1e-12: the weights stay put and no epoch after the first improves val/acc1."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--trainer.max_epochs=3", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--model.init_args.lr=1e-12", "--model.init_args.warmup_lr=0", "--model.init_args.min_lr=0"]
    if config != "default.yaml":  # the published configs on the digits data, narrow and on the CPU
        configs = [arg for name in config.split("+") for arg in ("--config", str(ROOT / "configs" / name))]
        args = ["fit", *configs, *args[1:], "--data=src.data.DigitsDataModule",
                "--data.init_args.batch_size=8", "--trainer.accelerator=cpu", "--trainer.devices=1",
                "--trainer.strategy=auto", "--trainer.precision=32-true", "--model.init_args.num_classes=10",
                "--model.init_args.backbone.init_args.num_classes=10",
                "--model.init_args.backbone.init_args.dims=[8, 16, 32, 64]",
                "--model.init_args.backbone.init_args.depths=[1, 1, 1, 1]",
                "--model.init_args.backbone.init_args.backend=torch"]
        if config.startswith("imagenet/"):
            args += ["--model.init_args.lr_base_batch=null", "--model.init_args.compile=false",
                     "--model.init_args.mixup=0", "--model.init_args.cutmix=0", "--model.init_args.mesa=0"]
    cli = main.cli(args)
    trainer = cli.trainer
    assert trainer.global_step == 6
    best = trainer.checkpoint_callback
    assert best.monitor == "val/acc1" and "epoch00" in Path(best.best_model_path).name  # epochs 1, 2 did not improve
    last = load_checkpoint(Path(best.dirpath) / "last.ckpt")  # weights only, as every load
    assert last["epoch"] == 2 and last["global_step"] == 6
    if config.startswith("imagenet/"):  # the size file's run folder, fixed so that --ckpt_path last finds it
        assert Path(best.dirpath).resolve() == (tmp_path / "logs" / "imagenet" / "spatial_mamba_s" / "checkpoints").resolve()


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
        (["--model.init_args.lr", "0"], "error: model.init_args.lr must be > 0"),
        (["--model.init_args.min_lr", "0.1"], "error: model.init_args.min_lr must be in [0, lr=0.003]"),
        (["--model.init_args.compile_memory_budget", "1.5"],
         "error: model.init_args.compile_memory_budget must be a number in (0, 1]"),
    ],
)
def test_bad_input_gives_one_line(tmp_path, args, message):
    out = run_main("fit", *args, *FAST, cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(message), out.stderr


@pytest.mark.parametrize("error,line", [
    (CheckpointKeysError(5), "error: 5"), (CheckpointKeysError("dims"), "error: dims"),
    (UserError(("a", 1)), "error: ('a', 1)"), (UserError("two\nlines"), "error: two lines"), (UserError(), "error: UserError"),
])
def test_error_handler_takes_any_exception_argument(monkeypatch, capsys, error, line):
    """The one-line error handler itself never fails, whatever the user error carries, and prints one line."""
    def failing_cli():
        raise error

    monkeypatch.setattr(main, "cli", failing_cli)
    monkeypatch.setattr(sys, "argv", ["main.py", "fit"])
    monkeypatch.delenv("SPATIAL_MAMBA_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main.main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == line + "\n"


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access was encountered"),
                                   ValueError("not enough values to unpack"), KeyError("stages.0"), AssertionError()])
def test_errors_that_are_not_bad_input_keep_their_traceback(monkeypatch, capsys, error):
    """Only `src.errors.UserError` is printed as `error: ...`: a kernel bug or a failed assertion raised anywhere
    (also by the library) propagates with its traceback instead of being dressed as a config error."""
    def failing_cli():
        raise error

    monkeypatch.setattr(main, "cli", failing_cli)
    monkeypatch.setattr(sys, "argv", ["main.py", "fit"])
    monkeypatch.delenv("SPATIAL_MAMBA_TRACEBACK", raising=False)
    with pytest.raises(type(error)):
        main.main()
    assert "error:" not in capsys.readouterr().err


def test_user_error_wrapped_by_another_is_found_and_traceback_on_request(monkeypatch, capsys):
    """jsonargparse raises its own error `from` the one of the class it built; SPATIAL_MAMBA_TRACEBACK=1 re-raises."""
    def failing_cli():
        try:
            raise UserError("drop_path_rate must be in [0, 1)")
        except UserError as e:
            raise ValueError("Does not validate against any of the Union subtypes") from e

    monkeypatch.setattr(main, "cli", failing_cli)
    monkeypatch.setattr(sys, "argv", ["main.py", "fit"])
    monkeypatch.delenv("SPATIAL_MAMBA_TRACEBACK", raising=False)
    with pytest.raises(SystemExit):
        main.main()
    assert capsys.readouterr().err == "error: drop_path_rate must be in [0, 1)\n"
    monkeypatch.setenv("SPATIAL_MAMBA_TRACEBACK", "1")
    with pytest.raises(ValueError, match="Union subtypes"):
        main.main()
