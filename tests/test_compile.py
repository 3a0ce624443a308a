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
