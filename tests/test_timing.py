"""Training img/s and compile seconds (src.timing), and the TrainSpeed callback that logs them during `fit`."""

import lightning as L
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from src import timing
from src.callbacks import TrainSpeed, is_compiled
from src.timing import StepTimer


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", c)
    return c


def test_step_timer_counts_steps_between_boundaries_after_warmup(clock):
    timer = StepTimer(warmup=2)
    timer.begin()
    for seconds in (7.0, 1.5, 2.0, 2.0, 2.0):  # the first step compiles; the second is still warm-up
        clock.t += seconds
        timer.step(images=8)
    assert timer.steps == 5 and timer.images == 3 * 8 and timer.seconds == pytest.approx(6.0)
    assert timer.img_per_s == pytest.approx(4.0)
    assert timer.first_step_s == pytest.approx(7.0) and timer.compile_s == pytest.approx(5.0)

    timer.restart()  # an epoch start: validation took 30 s before the next step
    clock.t += 30.0
    assert timer.step(images=8) is None
    clock.t += 1.0
    assert timer.step(images=8) == pytest.approx(1.0)
    assert timer.images == 4 * 8 and timer.seconds == pytest.approx(7.0)
    assert timer.steady_step_s == pytest.approx(2.0)  # the median: one fast step does not move it


def test_step_timer_without_timed_steps(clock):
    timer = StepTimer(warmup=0)
    assert timer.img_per_s is None and timer.compile_s is None
    clock.t += 3.0
    timer.step(images=4)  # no boundary before the first step: never timed
    assert timer.img_per_s is None and timer.compile_s is None  # and no begin(): no first-step time
    with pytest.raises(ValueError, match="warmup must be >= 0 steps, got -1"):
        StepTimer(warmup=-1)


class Tiny(L.LightningModule):
    def __init__(self, compile_backend: str | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        if compile_backend:
            self.net.compile(backend=compile_backend)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.records = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))


@pytest.mark.parametrize("compiled", [False, True])
def test_train_speed_logs_img_per_s_and_compile_s(compiled, capsys):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(40, 6), torch.randint(0, 3, (40,)))
    logger = MemoryLogger()
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=logger, callbacks=[TrainSpeed(warmup_steps=2)],
                        log_every_n_steps=2, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    model = Tiny("eager" if compiled else None)  # dynamo tracing without inductor: a cheap, real first-step cost
    assert is_compiled(model) == compiled
    trainer.fit(model, DataLoader(data, batch_size=4))  # 10 steps per epoch
    speeds = [(step, m["train/img_per_s"]) for step, m in logger.records if "train/img_per_s" in m]
    assert [step for step, _ in speeds] == [4, 6, 8, 10, 12, 14, 16, 18, 20]  # every 2nd step with timed steps
    assert all(v > 0 for _, v in speeds)
    compile_logs = [m["compile_s"] for _, m in logger.records if "compile_s" in m]
    out = capsys.readouterr()
    text = out.out + out.err
    if compiled:
        assert len(compile_logs) == 1 and compile_logs[0] > 0
        assert text.count("compile: first training step") == 1
    else:
        assert compile_logs == [] and "compile:" not in text
    assert "train speed, epoch 0:" in text and "train speed, epoch 1:" in text
    timer = next(cb.timer for cb in trainer.callbacks if isinstance(cb, TrainSpeed))
    assert timer.steps == 20 and timer.images == (20 - 2 - 1) * 4  # warm-up steps and epoch 1's first step untimed
