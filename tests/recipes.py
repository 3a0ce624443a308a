"""Helpers of the tests that run the published recipes on the CPU: a recipe's trainer settings made small and
local, and a callback that stops a fit after some optimizer steps (for resume tests)."""

from pathlib import Path

from lightning.pytorch.callbacks import Callback


def on_cpu(cfg: dict, tmp_path: Path, **trainer) -> dict:
    """A recipe's trainer on one CPU process in float32, quiet, logging every step, its logs and fixed checkpoint
    folders under `tmp_path`; `trainer` overrides or adds trainer settings."""
    cfg["trainer"].update(accelerator="cpu", devices=1, strategy="auto", sync_batchnorm=False, precision="32-true",
                          enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, **trainer)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    for cb in cfg["trainer"]["callbacks"]:
        if "dirpath" in cb["init_args"]:
            cb["init_args"]["dirpath"] = str(tmp_path / "ckpt")
    return cfg


class StopAfterSteps(Callback):
    """Stops a fit once `steps` optimizer steps are done (its last checkpoint is then mid-run)."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def stopping_after(config: Path, steps: int) -> Path:
    """A copy of a config file (`stopped.yaml` beside it) whose fit stops after `steps` optimizer steps."""
    import yaml

    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"]["callbacks"].append({"class_path": "tests.recipes.StopAfterSteps", "init_args": {"steps": steps}})
    stopped = config.parent / "stopped.yaml"
    stopped.write_text(yaml.safe_dump(cfg))
    return stopped
