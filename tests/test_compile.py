"""Compilation of the backbone (`SpatialMamba.compile`, in place): the whole forward as one graph by default;
regional (one graph per stage shape shared by the blocks of that stage) on request, same outputs as eager. Dynamo's "eager" backend keeps it fast on a CPU: what is
checked is the graph capture and reuse, not Inductor's code."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from src.models.spatial_mamba import SpatialMamba


def _model(**kw):
    torch.manual_seed(0)
    return SpatialMamba(num_classes=10, dims=(8, 16, 32, 64), depths=(2, 3, 2, 1), drop_path_rate=0.0,
                        backend="torch", **kw)


def test_regional_compile_shares_one_graph_per_stage_and_matches_eager():
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _model(), _model()
    compiled.compile(backend="eager", regional=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoint keys unchanged
    x = torch.randn(2, 3, 64, 64)
    eager.train()
    compiled.train()
    out_eager, out_compiled = eager(x), compiled(x)
    torch.testing.assert_close(out_compiled, out_eager, rtol=0, atol=0)
    out_compiled.sum().backward()
    out_eager.sum().backward()
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
    # 8 blocks, stem and 3 downsamples: one graph per block stage (4), one for the stem, one per downsample
    # (3 shapes) — the blocks of a stage reuse their stage's graph
    assert counters["stats"]["unique_graphs"] == 8
    compiled(x)  # a second step compiles nothing
    assert counters["stats"]["unique_graphs"] == 8


def test_whole_graph_compile_is_the_default():
    torch._dynamo.reset()
    counters.clear()
    model = _model().eval()
    model.compile(backend="eager")
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert counters["stats"]["unique_graphs"] == 1
