"""Training img/s and compile seconds (src.timing), and the TrainSpeed callback that logs them during `fit`."""

import time

import lightning as L
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from src import timing
from src.callbacks import TrainSpeed, is_compiled
from src.timing import StepTimer, host_issue_s


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
    assert timer.step(images=8) is False
    clock.t += 1.0
    assert timer.step(images=8) is True and timer.durations[-1] == pytest.approx(1.0)
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


class FakeEvent:
    """A CUDA event stand-in: stamped with the fake device clock when the fake device reaches it."""

    def __init__(self, device):
        self.device, self.stamp = device, None

    def record(self):
        self.device.queue.append(self)

    def query(self):
        return self.stamp is not None

    def synchronize(self):
        self.device.run_until(self)

    def elapsed_time(self, end):  # milliseconds, as torch.cuda.Event's
        return (end.stamp - self.stamp) * 1e3


class FakeDevice:
    """Work queued by the host runs later: each queued event is stamped when `run` gets to it."""

    def __init__(self):
        self.queue, self.t, self.syncs = [], 0.0, 0

    def run(self, seconds_per_event):
        while self.queue:
            self.t += seconds_per_event
            self.queue.pop(0).stamp = self.t

    def run_until(self, event):
        while event.stamp is None:
            self.t += 2.0
            self.queue.pop(0).stamp = self.t


def test_step_timer_on_a_gpu_reads_device_timestamps_without_waiting(clock, monkeypatch):
    device = FakeDevice()
    timer = StepTimer(warmup=1, device="cuda")
    monkeypatch.setattr(timer, "_new_event", lambda: FakeEvent(device))
    waits = []
    monkeypatch.setattr(timing, "synchronize", lambda d: waits.append(d))
    timer.begin()
    clock.t += 9.0
    device.run(9.0)  # the first step: synchronised (warm-up)
    assert timer.step(images=4) is False and timer.first_step_s == pytest.approx(9.0)
    assert len(waits) == 2  # begin() and the warm-up boundary
    for _ in range(3):  # the host issues three steps ahead of the device: no wait, nothing resolved yet
        assert timer.step(images=4) is True
    assert len(waits) == 2 and timer.timed_steps == 3 and timer._images == 0
    device.run(2.0)  # the device stamps them 2 s apart
    timer.step(images=4)  # resolves what has passed without waiting
    assert timer._images == 3 * 4 and timer._durations == pytest.approx([2.0, 2.0, 2.0])
    device.run(2.0)
    timer.restart()  # validation in between: the next step is not timed
    device.t += 30.0
    assert timer.step(images=4) is False
    assert timer.step(images=4) is True
    # reading a result waits for the steps in flight (the fake device runs them at 2 s each)
    assert timer.images == 5 * 4 and timer.seconds == pytest.approx(5 * 2.0)
    assert timer.img_per_s == pytest.approx(2.0) and timer.compile_s == pytest.approx(7.0)
    assert len(waits) == 2


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


def test_first_step_work_names_compile_and_cuda_graph_recording():
    from types import SimpleNamespace

    from src.callbacks import first_step_work

    assert first_step_work(Tiny(None)) is None and first_step_work(Tiny("eager")) == "compile"
    graphed = Tiny(None)
    graphed.hparams["eager_cudagraphs"] = True
    assert first_step_work(graphed) is None  # on the CPU nothing is recorded
    fake = SimpleNamespace(modules=lambda: [], hparams={"eager_cudagraphs": True}, device=torch.device("cuda", 0))
    assert first_step_work(fake) == "CUDA-graph recording"


def test_the_default_progress_bar_reads_metrics_at_most_every_few_seconds(monkeypatch, tmp_path):
    """The bar's counter moves every step, but the logged metrics (a copy from the GPU, i.e. a wait for it)
    are read once per `metrics_every_s`: main.py swaps Lightning's default bar for this one."""
    import main
    from lightning.pytorch.callbacks import TQDMProgressBar

    from src.callbacks import ProgressBar, use_progress_bar

    cli = main.cli(["--trainer.max_steps=6", "--trainer.logger=false", "--trainer.limit_val_batches=0",
                    "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}"], run=False)
    bar = cli.trainer.progress_bar_callback
    assert type(bar) is ProgressBar and bar.metrics_every_s == 2.0
    now = [0.0]
    monkeypatch.setattr("src.callbacks.time.monotonic", lambda: now[0])
    reads, counts = [], []
    real = TQDMProgressBar.get_metrics
    monkeypatch.setattr(ProgressBar, "get_metrics", lambda self, t, m: reads.append(t.global_step) or real(self, t, m))

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            now[0] += 0.75  # a step every 0.75 s
            counts.append(bar.train_progress_bar.n)

    cli.trainer.callbacks.insert(0, Clock())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert counts == [0, 1, 2, 3, 4, 5]  # the clock runs before the bar: the bar has shown every earlier step
    assert bar.train_progress_bar.n == 6
    assert reads[:3] == [1, 4, 6]  # steps 1, 4 (3 × 0.75 s later), then the epoch end; no read per step

    class OwnBar(TQDMProgressBar):
        pass

    own = L.Trainer(callbacks=[OwnBar()], logger=False, enable_checkpointing=False)
    use_progress_bar(own)
    assert type(own.progress_bar_callback) is OwnBar  # a bar chosen in the config stays
    slow = L.Trainer(callbacks=[TQDMProgressBar(refresh_rate=5, leave=True)], logger=False, enable_checkpointing=False)
    use_progress_bar(slow)
    assert type(slow.progress_bar_callback) is ProgressBar and slow.progress_bar_callback.refresh_rate == 5


def test_host_issue_time_is_the_median_of_the_calls():
    durations = iter([0.03, 0.001, 0.01])
    calls = []
    seconds = host_issue_s(lambda: calls.append(time.sleep(next(durations))), "cpu", repeats=3)
    assert len(calls) == 3 and 0.01 <= seconds < 0.03


class TinyConv(L.LightningModule):
    """An image classifier small enough for a few CPU steps; records, for each evaluation-mode forward, whether
    the strategy had already been torn down (`torn_down`, shared with the test)."""

    def __init__(self, torn_down: list, evals: list):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        self.torn_down, self.evals = torn_down, evals

    def forward(self, x):
        if not self.training:
            self.evals.append(bool(self.torn_down))
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_experiment_metrics_times_inference_before_the_module_leaves_its_device(monkeypatch):
    """Lightning's teardown moves the module to the CPU before the callbacks' `on_fit_end`: inference timed
    there gave a GPU run the CPU's figure, and a Triton backend failed on CPU tensors. It is timed at the end of
    training, before the teardown, and logged with the other summary metrics."""
    from lightning.pytorch.strategies import Strategy

    from src.callbacks import ExperimentMetrics

    torn_down, evals = [], []
    teardown = Strategy.teardown
    monkeypatch.setattr(Strategy, "teardown", lambda self: (torn_down.append(True), teardown(self))[1])
    data = TensorDataset(torch.randn(24, 3, 32, 32), torch.randint(0, 3, (24,)))
    logger = MemoryLogger()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        callbacks=[ExperimentMetrics(warmup_steps=1, infer_batches=2, image_size=32)])
    trainer.fit(TinyConv(torn_down, evals), DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    assert torn_down and evals and not any(evals)  # every timed forward ran before the teardown
    summary = {k: v for _, m in logger.records for k, v in m.items() if k.startswith("summary/")}
    assert summary["summary/infer_img_s"] > 0 and summary["summary/train_img_s"] > 0


def test_profile_step_sorts_kernels_into_kinds_and_refuses_a_cpu(capsys):
    """benchmarks/profile_step.py: kernels by name into kinds (PyTorch's own LayerNorm is not this project's),
    and without a GPU one line of error instead of a trace."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_step.py"
    spec = importlib.util.spec_from_file_location("profile_step", path)
    profile_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_step)
    kind = profile_step.kernel_kind
    assert kind("_fusion_bwd_param_kernel") == kind("_scan_fwd_kernel") == "SSM op (this project's kernels)"
    assert kind("_ln_fwd_kernel") == "LayerNorm (this project's kernels)"
    assert kind("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float>") == "normalisation"
    assert kind("triton_per_fused_native_layer_norm_3") == "inductor-generated"
    assert kind("sm90_xmma_gemm_bf16bf16_bf16f32") == kind("nvjet_tst_128x256_64x4") == "matrix product"
    assert kind("void cudnn::cnn::conv2d_grouped_direct_kernel") == "convolution"
    assert kind("void at::native::vectorized_elementwise_kernel<4, add>") == "other PyTorch"
    if not torch.cuda.is_available():
        import sys

        argv, sys.argv = sys.argv, ["profile_step.py", "--compile", "--regional"]
        try:
            assert profile_step.main() == 2
        finally:
            sys.argv = argv
        assert capsys.readouterr().err.startswith("error: profile_step.py profiles a step on a CUDA GPU")
