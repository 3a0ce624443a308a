"""Compilation of the backbone (`SpatialMamba.compile`, in place): the whole forward as one graph by default;
regional on request (each block compiled on its own, the blocks of a stage sharing one graph; stem and
downsamples eager), with the same outputs and gradients as eager. Dynamo's "eager" backend keeps it fast on a
CPU: what is checked is the graph capture and reuse, not Inductor's code."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from src.models.spatial_mamba import SpatialMamba
from tests.conftest import requires_cuda


def _model(drop_path_rate=0.0, **kw):
    torch.manual_seed(0)
    return SpatialMamba(num_classes=10, dims=(8, 16, 32, 64), depths=(2, 3, 2, 1), drop_path_rate=drop_path_rate,
                        backend="torch", **kw)


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.3])
def test_regional_compile_shares_one_graph_per_stage_and_matches_eager(drop_path_rate):
    """With stochastic depth on, every block has its own rate; it is an input of the block's graph (a buffer),
    not a constant, so the blocks of a stage still share one graph."""
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _model(drop_path_rate), _model(drop_path_rate)
    compiled.compile(backend="eager", regional=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoint keys unchanged
    x = torch.randn(2, 3, 64, 64)
    eager.train()
    compiled.train()
    torch.manual_seed(1)
    out_eager = eager(x)
    torch.manual_seed(1)
    out_compiled = compiled(x)
    torch.testing.assert_close(out_compiled, out_eager, rtol=0, atol=0)
    out_compiled.sum().backward()
    out_eager.sum().backward()
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
    # 8 blocks in 4 stages: one graph per stage, reused by the stage's blocks (stem and downsamples stay eager)
    assert counters["stats"]["unique_graphs"] == 4
    compiled(x)  # a second step compiles nothing
    assert counters["stats"]["unique_graphs"] == 4


def test_drop_path_rates_are_kept_and_not_in_checkpoints():
    model = _model(0.3)
    rates = [float(block.drop_prob) for stage in model.stages for block in stage]
    assert rates == pytest.approx([0.3 * i / 7 for i in range(8)])
    assert not any("drop_prob" in key for key in model.state_dict())


def test_whole_graph_compile_is_the_default():
    torch._dynamo.reset()
    counters.clear()
    model = _model(0.3)
    model.compile(backend="eager")
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1


@requires_cuda
@pytest.mark.gpu
@pytest.mark.minutes(1)
@pytest.mark.parametrize("features_only", [False, True])
def test_regional_cuda_graphs_evaluate_without_gradients(features_only):
    """Regional compilation replayed as CUDA graphs, no backward pending: a block's output is the next block's
    input (one graph per stage, called again) and the stage maps are returned. Without the copies the forward
    raised "accessing tensor output of CUDAGraphs that has been overwritten". Same values as eager; a training
    step afterwards still works."""
    torch._dynamo.reset()
    kw = dict(features_only=True, out_indices=(0, 1)) if features_only else {}
    eager = SpatialMamba(num_classes=10, dims=(16, 32, 64, 128), depths=(2, 2, 0, 0), backend="fused", **kw).cuda()
    compiled = SpatialMamba(num_classes=10, dims=(16, 32, 64, 128), depths=(2, 2, 0, 0), backend="fused", **kw).cuda()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(regional=True, mode="reduce-overhead")
    eager.eval()
    compiled.eval()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.no_grad():
        expected = eager(x)
        for _ in range(3):  # warm-up, recording, replay
            out = compiled(x)
    for got, want in zip(out if features_only else [out], expected if features_only else [expected]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    compiled.train()
    outs = compiled(x)
    sum(o.float().sum() for o in (outs if features_only else [outs])).backward()


def test_block_compile_arguments_turn_off_layout_optimisation_and_keep_the_mode():
    kwargs = SpatialMamba.block_compile_kwargs(mode="reduce-overhead")
    assert kwargs == dict(dynamic=False, options={"triton.cudagraphs": True, "layout_optimization": False})
    assert SpatialMamba.block_compile_kwargs() == dict(dynamic=False, options={"layout_optimization": False})
    # what the caller says wins; other backends take no inductor options
    assert SpatialMamba.block_compile_kwargs(dynamic=True, options={"layout_optimization": True}) == dict(
        dynamic=True, options={"layout_optimization": True})
    assert SpatialMamba.block_compile_kwargs(backend="eager", mode="default") == dict(
        backend="eager", mode="default", dynamic=False)


def test_regional_compile_gives_every_block_the_block_arguments(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: seen.append((type(self).__name__, k)))
    model = _model()
    model.compile(regional=True, mode="reduce-overhead")
    assert [name for name, _ in seen] == ["Block"] * 8
    assert all(k == SpatialMamba.block_compile_kwargs(mode="reduce-overhead") for _, k in seen)
    assert model._cudagraph_blocks


@requires_cuda
@pytest.mark.gpu
@pytest.mark.minutes(0.75)
def test_regional_block_backward_runs_cudnn_depthwise_kernels():
    """A block compiled regionally by inductor, bf16, under the activation memory budget (whose backward
    recomputes the depthwise convolutions' inputs): its convolutions' backward runs in cuDNN, not in PyTorch's
    native depthwise kernels, which inductor's layout optimisation made it take (block_compile_kwargs)."""
    from torch._functorch import config as functorch_config
    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()
    model = SpatialMamba(num_classes=10, dims=(64, 128, 256, 512), depths=(1, 0, 0, 0), backend="fused").cuda()
    block = model.stages[0][0]
    model.compile(regional=True)
    x = torch.randn(4, 16, 16, 64, device="cuda", requires_grad=True)
    with functorch_config.patch(activation_memory_budget=0.8):
        for _ in range(2):
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = block(x)
                y.float().square().sum().backward()
                torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert not [n for n in names if "conv_depthwise2d" in n], names
