"""Exact resume: a run SIGKILLed mid-epoch and resumed with `--ckpt_path last` reproduces an uninterrupted run
bit for bit (every step's loss, the final weights and the EMA), with the full recipe and DataLoader workers."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

import main
from src.checkpoints import load_checkpoint
from tests.conftest import requires_cuda
from tests.test_imagenet import ROOT, SUBPROCESS_ENV, make_digits_folder, tiny_recipe_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class LossRecorder(Callback):
    """Appends `global_step loss` (loss as float.hex, exact) to a file after every training step."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {float(outputs['loss']).hex()}\n")


class KillAtStep(Callback):
    """SIGKILLs its own process after optimizer step `step` (no clean-up, like a lost node)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def read_losses(path: Path) -> dict[int, str]:
    losses = {}
    for line in path.read_text().splitlines():
        step, loss = line.split()
        assert losses.setdefault(int(step), loss) == loss, f"step {step} gave two losses"
    return losses


def recipe(tmp_path, data, name, losses, workers, kill_at=None, gpu=None, compiled=False):
    """The tiny recipe writing every step's loss to `losses`; `gpu`: None (the CPU) or a dict of trainer
    settings for a GPU run (fused backend, Triton LayerNorms, convolutions and drop path, bf16, stochastic
    depth), which records the eager kernels as CUDA graphs (`eager_cudagraphs`), or with `compiled` compiles as
    the ImageNet recipe does on a GPU (regional graphs compiled in parallel workers, replayed as CUDA graphs)."""
    callbacks = [{"class_path": "tests.test_resume.LossRecorder", "init_args": {"path": str(losses)}}]
    if kill_at is not None:
        callbacks.append({"class_path": "tests.test_resume.KillAtStep", "init_args": {"step": kill_at}})
    config = tiny_recipe_config(tmp_path / name, data, epochs=2, every_n_steps=2, extra_callbacks=callbacks, name=name)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["init_args"]["num_workers"] = workers
    cfg["model"]["init_args"]["mesa_start"] = 0.5
    if gpu is not None:
        cfg["trainer"].update(accelerator="gpu", devices=1, precision="bf16-mixed", **gpu)
        cfg["model"]["init_args"].update(eager_cudagraphs=not compiled, compile=None)
        if compiled:
            cfg["model"]["init_args"].update(compile_regional=True, compile_parallel=True, compile_cudagraphs=True)
        cfg["model"]["init_args"]["backbone"]["init_args"].update(backend="fused", fused_norms=True, fused_convs=True,
                                                                  fused_drop_path=True, drop_path_rate=0.2)
    config.write_text(yaml.safe_dump(cfg))
    return config


def test_sigkill_mid_epoch_then_resume_is_bit_exact(tmp_path, monkeypatch):
    kill_resume_and_compare(tmp_path, monkeypatch)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.minutes(0.75)
def test_sigkill_then_resume_with_recorded_cuda_graphs_is_bit_exact(tmp_path, monkeypatch):
    """On a GPU with the recipe's CUDA-graph path as it ships (bf16, fused kernels, Triton LayerNorms,
    convolutions and drop path, stochastic depth; the resumed process records its graphs again): every step's
    loss, the weights and the EMA equal the uninterrupted run's."""
    kill_resume_and_compare(tmp_path, monkeypatch, gpu={})


@requires_cuda
@pytest.mark.gpu
@pytest.mark.minutes(2.5)
def test_sigkill_then_resume_compiled_regionally_with_cuda_graphs_is_bit_exact(tmp_path, monkeypatch):
    """The same with the ImageNet recipe's compiled GPU path: regional graphs, compiled in parallel worker
    processes, replayed as CUDA graphs (the resumed process compiles and records again)."""
    kill_resume_and_compare(tmp_path, monkeypatch, gpu={}, compiled=True)


def kill_resume_and_compare(tmp_path, monkeypatch, gpu=None, compiled=False):
    data = make_digits_folder(tmp_path / "data")  # 48 training images: 6 steps of 8 per epoch
    monkeypatch.chdir(tmp_path)

    # in the background: the run with 2 loader workers, killed after step 9 (epoch 1, batch 3); last-step.ckpt is
    # from step 8. The two runs are independent, and side by side the test takes one compile's time less.
    (tmp_path / "b").mkdir()
    config = recipe(tmp_path, data, "b", tmp_path / "bc.txt", workers=2, kill_at=9, gpu=gpu, compiled=compiled)
    with open(tmp_path / "b.log", "w+") as log:
        killed = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "fit", "--config", str(config)],
                                  cwd=tmp_path, env=SUBPROCESS_ENV, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            # meanwhile the uninterrupted run, loading in the main process
            (tmp_path / "a").mkdir()
            ref = main.cli(["fit", "--config", str(recipe(tmp_path, data, "a", tmp_path / "a.txt", workers=0,
                                                               gpu=gpu, compiled=compiled))])
            returncode = killed.wait(timeout=300)
        finally:
            killed.kill()  # a no-op once it has ended
        log.seek(0)
        assert returncode == -signal.SIGKILL, log.read()[-3000:]
    assert ref.trainer.global_step == 12
    if gpu is not None and not compiled:
        assert ref.model._graphed and ref.model._teacher_graph is not None
    last = load_checkpoint(tmp_path / "b" / "ckpt" / "last-step.ckpt")  # weights only
    assert last["global_step"] == 8 and last["epoch"] == 1

    # resumed with `--ckpt_path last` (the newest of last.ckpt, last-step.ckpt): the same config without the kill
    config = recipe(tmp_path, data, "b", tmp_path / "bc.txt", workers=2, gpu=gpu, compiled=compiled)
    resumed = main.cli(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 12

    expected, got = read_losses(tmp_path / "a.txt"), read_losses(tmp_path / "bc.txt")
    assert sorted(got) == sorted(expected) == list(range(1, 13))
    assert got == expected  # every step's loss, bit for bit (including step 9, run twice)
    a, c = ref.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == c.keys() and any(k.startswith("ema.") for k in a)
    for k in a:
        assert torch.equal(a[k], c[k]), k
