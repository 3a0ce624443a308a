"""Test set-up: without a CUDA GPU the Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before Triton compiles anything, so it is set here, first."""

import os
import shutil

if not shutil.which("nvidia-smi") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# the fused kernels' first tile candidate, untimed: tests check results, and timing every candidate for every
# test shape would compile them all (test_fp32_gpu_large_tiles runs each candidate explicitly)
os.environ.setdefault("SPATIAL_MAMBA_TUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist turns "no" into "load"
def pytest_cmdline_main(config):
    """With `-n N` and no `--dist`, pytest-xdist's worksteal scheduler: an idle worker takes queued tests from a
    busy one. (A hook, not `addopts`: without pytest-xdist an unknown `--dist` would stop every run.)"""
    if getattr(config.option, "numprocesses", None) and getattr(config.option, "dist", None) == "no":
        config.option.dist = "worksteal"


@pytest.hookimpl(trylast=True)  # after `-m` / `-k` deselection
def pytest_collection_modifyitems(config, items):
    """Tests marked `minutes(n)` (GPU tests that compile for a minute or more) start first, one at the head of
    each xdist worker's share. With `--dist worksteal` (`pytest_cmdline_main` above) each worker is first sent a
    contiguous share of the list and idle workers later take queued tests from busy ones, but never the one
    queued behind a running test; so the long tests go to the heads of the shares, longest first, and a short
    test follows each. In one process the order stays as collected."""
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    weight = {id(item): item.get_closest_marker("minutes").args[0] for item in items
              if item.get_closest_marker("minutes")}
    if not weight or workers < 2:
        return
    long = sorted((item for item in items if id(item) in weight), key=lambda item: -weight[id(item)])
    rest = [item for item in items if id(item) not in weight]
    heads, left = set(), len(items)  # the worksteal scheduler's first shares: an even split, in order
    for i in range(workers):
        heads.add(len(items) - left)
        left -= left // (workers - i)
    heads = sorted(heads)[:len(long)]
    # more long tests than shares: the rest go last, where idle workers take them first
    fill = iter(rest + long[len(heads):])
    at_head = dict(zip(heads, long))
    items[:] = [at_head[i] if i in at_head else next(fill) for i in range(len(items))]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread during the test (for modules that start data-loader worker processes), restored
    after it; modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_backbone_both_ways(monkeypatch, flag: str, module, batch: int = 2, drop_path_rate: float = 0.0):
    """The 4-block backbone (fused backend) with the eager kernels of `flag` (a SpatialMamba argument: fused_norms,
    fused_convs, fused_drop_path) on and off, from one seed, a forward and backward each. The SSM op runs as the
    torch reference in both (the interpreter's fused op is slow, and its own tests are elsewhere), so any
    difference is `flag`'s kernels'. Returns ({on: (logits, parameter gradients, the next random draw)}, the
    argument tuples of the calls of `module._forward`, the kernels' host entry)."""
    from src.models import spatial_mamba

    device = "cuda" if HAS_CUDA else "cpu"
    op = spatial_mamba.structure_aware_ssm
    monkeypatch.setattr(spatial_mamba, "structure_aware_ssm", lambda *a, **k: op(*a, **{**k, "backend": "torch"}))
    calls = []
    forward = module._forward
    monkeypatch.setattr(module, "_forward", lambda *a: calls.append(a) or forward(*a))
    x = torch.randn(batch, 3, 64, 64, device=device)
    out = {}
    for on in (True, False):
        torch.manual_seed(0)
        model = spatial_mamba.SpatialMamba(num_classes=5, dims=[8, 16, 16, 16], depths=[1, 1, 1, 1], backend="fused",
                                           drop_path_rate=drop_path_rate, **{flag: on}).to(device)
        logits = model(x)
        logits.square().sum().backward()
        out[on] = (logits, {n: p.grad for n, p in model.named_parameters()}, torch.rand(3, device=device))
    return out, calls
