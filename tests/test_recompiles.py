"""A compiled fit compiles during its first epoch only: training, validation (eval mode, another batch size
and a smaller last batch) and the sanity check all get their graphs then, and later epochs reuse them.
Dynamo's "eager" backend stands in for inductor (what is checked is graph capture, not generated code)."""

import torch
from lightning.pytorch.callbacks import Callback
from torch._dynamo.utils import counters

import main
from src.models.spatial_mamba import SpatialMamba


class GraphCount(Callback):
    def __init__(self):
        self.at_epoch_start = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.at_epoch_start.append(counters["stats"]["unique_graphs"])


def test_no_recompiles_after_the_first_epoch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(SpatialMamba, "compile", lambda self, *a, **k: torch.nn.Module.compile(self, backend="eager"),
                        raising=False)
    torch._dynamo.reset()
    counters.clear()
    cli = main.cli(["--trainer.max_epochs=3", "--trainer.limit_train_batches=3", "--trainer.enable_progress_bar=false",
                    "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu", "--trainer.logger=false",
                    "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
                    "--model.init_args.compile=true", "--data.init_args.batch_size=48"], run=False)
    graphs = GraphCount()
    cli.trainer.callbacks.append(graphs)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.model._compiled
    first_epoch = graphs.at_epoch_start[1]  # graphs after epoch 0 and its validation (last batch 360 % 48 = 24)
    assert first_epoch >= 2  # at least a training and an evaluation graph
    assert graphs.at_epoch_start[2] == first_epoch
    assert counters["stats"]["unique_graphs"] == first_epoch, "a later epoch compiled again"
