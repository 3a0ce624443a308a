"""src/backward.py: the LightningModules run a step's backward on the training thread where the backbone runs
eagerly and on PyTorch's autograd worker thread of the GPU where it is compiled, unless `backward_device_thread`
says which; `benchmarks/throughput.py` likewise unless `--backward-thread` says. On the CPU the backward runs on
the calling thread either way, so the CPU tests read the engine's thread-local switch from inside the backward;
the GPU test checks the thread itself."""

import inspect
import threading

import lightning as L
import pytest
import torch
import torch.nn as nn

from benchmarks import throughput
from src.backward import TrainingThreadBackward
from src.data.digits import DigitsDataModule
from src.models.classifier import ImageClassifier
from src.models.detector import Detector
from src.models.segmenter import SemanticSegmenter
from tests.conftest import requires_cuda


class Probe(nn.Module):
    """A linear classifier whose backward records, per call, the engine's multithreading switch and the thread
    it runs on."""

    def __init__(self, inputs: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.linear = nn.Linear(inputs, num_classes)
        self.seen: list[tuple[bool, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x.flatten(1))
        if y.requires_grad:
            y.register_hook(lambda g: self.seen.append((torch._C._is_multithreading_enabled(), threading.get_ident())))
        return y


def _step(module: ImageClassifier, device: str = "cpu") -> None:
    x = torch.randn(4, 3, 8, 8, device=device)
    loss = module(x).logsumexp(-1).mean()
    module.backward(loss)


@pytest.mark.parametrize("flag, compiled, device_thread", [(None, False, False), (None, True, True),
                                                           (False, True, False), (True, False, True)])
def test_classifier_backward_thread_switch(flag, compiled, device_thread):
    """`backward_device_thread` None: the worker thread if the module compiled its backbone, else the training
    thread; true / false: as said."""
    probe = Probe(3 * 8 * 8, 10)
    module = ImageClassifier(probe, num_classes=10, compile=False, backward_device_thread=flag)
    module._compiled = compiled  # as `setup` marks a compiled backbone
    assert module.backward_on_device_thread() is device_thread
    _step(module)
    assert probe.seen and all(on == device_thread for on, _ in probe.seen)
    assert torch._C._is_multithreading_enabled()  # undone after the backward
    assert probe.linear.weight.grad is not None


def test_every_lightning_module_picks_the_backward_thread():
    for cls in (ImageClassifier, SemanticSegmenter, Detector):
        assert issubclass(cls, TrainingThreadBackward) and cls.__mro__[1] is TrainingThreadBackward, cls
        assert inspect.signature(cls.__init__).parameters["backward_device_thread"].default is None, cls


def test_fit_runs_its_backward_on_the_training_thread(tmp_path):
    """Through Lightning's loop (automatic optimisation, its precision plugin's backward): every step's backward
    saw the engine's multithreading off, and the switch is back on after `fit`."""
    L.seed_everything(0)
    probe = Probe(3 * 32 * 32, 10)
    module = ImageClassifier(probe, num_classes=10, compile=False, warmup_epochs=0)
    data = DigitsDataModule(batch_size=32, image_size=32, augment=False)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert len(probe.seen) == 3 and not any(on for on, _ in probe.seen)
    assert torch._C._is_multithreading_enabled()


@pytest.mark.parametrize("flag, device_thread", [(None, False), (False, False), (True, True)])
def test_throughput_benchmark_backward_thread(flag, device_thread):
    """`measure`'s eager training step runs its backward on the calling thread unless asked for the device's
    (`--backward-thread`: auto, training, device)."""
    assert throughput.BACKWARD_THREADS == {"auto": None, "training": False, "device": True}
    probe = Probe(3 * 8 * 8, 1000)
    throughput.measure(probe, torch.device("cpu"), 2, 8, None, False, 1, 1, True, backward_device_thread=flag)
    assert len(probe.seen) == 2 and all(on == device_thread for on, _ in probe.seen)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("device_thread", [False, True])
def test_gpu_backward_thread(device_thread):
    """On a GPU the backward runs on the training thread by default and on another (the engine's worker for the
    device) with `backward_device_thread`; the gradients are bitwise the same both ways."""
    grads = []
    for flag in (device_thread, not device_thread):
        torch.manual_seed(0)
        probe = Probe(3 * 8 * 8, 10).cuda()
        module = ImageClassifier(probe, num_classes=10, compile=False, backward_device_thread=flag)
        torch.manual_seed(1)
        _step(module, "cuda")
        torch.cuda.synchronize()
        threads = {t for _, t in probe.seen}
        assert len(threads) == 1
        assert (threads == {threading.get_ident()}) is (not flag)
        grads.append(probe.linear.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])
