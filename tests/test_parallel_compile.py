"""Regional compilation with the stages' graphs compiled in parallel worker processes (src/compiling.py,
`ParallelRegionalCompile`): the workers' graphs must be exactly the ones the parent then looks up (cache hits, no
compile of its own), the hook runs once per input signature, and a failing worker only costs its time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from src.compiling import ParallelRegionalCompile, compile_for_training
from src.errors import UserError
from src.models.spatial_mamba import SpatialMamba

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(**kwargs) -> SpatialMamba:
    # no fusion dilations: inductor on the CPU fails on the backward of the reference's replicate padding
    # (a stride assertion in its generated code), a CPU-only problem of the torch backend, not of this hook
    return SpatialMamba(num_classes=10, dims=(8, 16, 32, 64), depths=(1, 1, 0, 0), backend="torch", dilations=(),
                        **kwargs)


_CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from torch._dynamo.utils import counters
from src.compiling import compile_for_training
from tests.test_parallel_compile import _tiny

def main():
    torch.manual_seed(0)
    model = _tiny()
    compile_for_training(model, regional=True, parallel=True)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    hook = next(iter(model._forward_pre_hooks.values()))
    print("RESULT " + json.dumps({"seconds": hook.seconds, "aot": dict(counters["aot_autograd"]),
                                  "inductor": dict(counters["inductor"])}))

if __name__ == "__main__":
    main()
"""


def test_workers_compile_the_graphs_the_parent_then_finds_in_the_caches(tmp_path):
    """Fresh caches; two stages: each worker compiles its stage's block forward and backward, and the parent's
    own compile of both graphs is all cache hits (AOTAutograd's and inductor's), no misses."""
    script = tmp_path / "child.py"  # a file: the parent's main module is then importable by path, as in a `fit`
    script.write_text(_CHILD)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, str(script), ROOT], env=env, capture_output=True, text=True, timeout=900)
    lines = [line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    result = json.loads(lines[-1])
    assert len(result["seconds"]) == 1
    assert result["aot"].get("autograd_cache_hit") == 2 and not result["aot"].get("autograd_cache_miss"), result
    assert result["inductor"].get("fxgraph_cache_hit") == 4 and not result["inductor"].get("fxgraph_cache_miss")


def test_once_per_input_signature_and_only_the_stages_a_forward_runs(monkeypatch):
    runs = []
    monkeypatch.setattr(ParallelRegionalCompile, "_run",
                        lambda self, jobs, dtype, device, training, grad, autocast_dtype, meanwhile=None:
                        runs.append(([shape for _, shape in jobs], dtype, training, grad)))
    model = SpatialMamba(num_classes=10, dims=(8, 16, 32, 64), depths=(1, 2, 1, 1), backend="torch")
    model.register_forward_pre_hook(ParallelRegionalCompile({}))
    x = torch.randn(2, 3, 64, 64)
    model(x)
    model(x)  # same signature: nothing
    assert runs == [([(2, 16, 16, 8), (2, 8, 8, 16), (2, 4, 4, 32), (2, 2, 2, 64)], torch.float32, True, True)]
    with torch.no_grad():
        model(x)  # no grad: other graphs
    model.eval()
    model(torch.randn(4, 3, 64, 64))  # another batch, eval mode
    assert [r[2:] for r in runs[1:]] == [(True, False), (False, True)] and runs[2][0][0] == (4, 16, 16, 8)
    features = SpatialMamba(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), backend="torch", features_only=True,
                            out_indices=(0, 1))
    assert [shape for _, shape in features.stage_blocks((2, 3, 64, 64))] == [(2, 16, 16, 8), (2, 8, 8, 16)]


def test_a_failing_worker_warns_and_the_parent_compiles_itself():
    hook = ParallelRegionalCompile({})
    with pytest.warns(UserWarning, match="compile in this process instead"):
        hook._run([("not a block", (2, 16, 16, 8))], torch.float32, "cpu", True, True, None)
    assert len(hook.seconds) == 1


def test_a_worker_past_its_time_is_stopped(monkeypatch):
    import src.compiling as compiling

    monkeypatch.setattr(compiling, "WORKER_TIMEOUT_S", 0.5)  # a worker needs seconds just to import torch
    hook = ParallelRegionalCompile({})
    with pytest.warns(UserWarning, match="no result after"):
        hook._run([(None, (2, 16, 16, 8))], torch.float32, "cpu", True, True, None)


def test_parallel_needs_regional_and_skips_checkpointed_blocks():
    with pytest.raises(UserError, match="compile_regional"):
        compile_for_training(_tiny(), parallel=True)
    model = _tiny(grad_checkpointing=True)  # blocks run under checkpoint: other graphs than a worker's
    with pytest.warns(UserWarning, match="gradient checkpointing"):
        compile_for_training(model, regional=True, parallel=True)
    assert not model._forward_pre_hooks
    model = _tiny()
    compile_for_training(model, regional=True, parallel=True)
    assert [type(h) for h in model._forward_pre_hooks.values()] == [ParallelRegionalCompile]


def test_the_modules_pass_the_knob_on(monkeypatch):
    import src.models.classifier as classifier
    import src.models.segmenter as segmenter
    from tests.test_segmentation import tiny_segmenter

    seen = []
    monkeypatch.setattr(classifier, "compile_for_training", lambda *a, **k: seen.append(k["parallel"]))
    monkeypatch.setattr(segmenter, "compile_for_training", lambda *a, **k: seen.append(k["parallel"]))
    model = classifier.ImageClassifier(_tiny(), num_classes=10, compile=True, compile_regional=True,
                                       compile_parallel=True)
    model.setup("fit")
    tiny_segmenter(compile=True, compile_regional=True, compile_parallel=True).setup("fit")
    assert seen == [True, True]


def test_the_parents_eager_pass_leaves_no_trace():
    """While the workers compile, the parent runs the backbone once without its compiled regions and without
    gradients: no parameter gets a .grad, BatchNorm statistics and the random state are as before, and the
    compiled regions are back in place."""
    from src.compiling import _eager_pass

    model = _tiny(drop_path_rate=0.2)
    model.compile(backend="eager", regional=True)
    impls = [m.__dict__.get("_compiled_call_impl") for m in model.modules()]
    buffers = [b.clone() for b in model.buffers()]
    x = torch.randn(2, 3, 64, 64)
    state = torch.random.get_rng_state()
    _eager_pass(model, x)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers)) and buffers
    assert torch.equal(torch.random.get_rng_state(), state)
    assert [m.__dict__.get("_compiled_call_impl") for m in model.modules()] == impls and any(impls)


def test_a_failing_eager_pass_only_warns():
    from src.compiling import _eager_pass

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise ValueError("not today")

    with pytest.warns(UserWarning, match="eager pass .* failed .*not today"):
        _eager_pass(Broken(), torch.randn(2, 3, 64, 64))


def test_workers_start_ahead_and_serve_later_signatures():
    """Started for the hook (one per stage), the workers warm up before the first forward and, once done, take
    the next signature's jobs too, also another hook's (a model's EMA copy): the same processes, none new."""
    from src.compiling import _POOL, release_compile_workers

    release_compile_workers()
    hook = ParallelRegionalCompile({}, workers=2)
    ParallelRegionalCompile({}, workers=2)  # the EMA copy's hook: the two idle workers suffice
    first = sorted(proc.pid for proc in _POOL.idle)
    assert len(first) == 2
    model = _tiny()
    jobs = [(hook._block_copy(block), shape) for block, shape in model.stage_blocks((2, 3, 64, 64))]
    hook._run(jobs, torch.float32, "cpu", True, True, None)
    assert sorted(proc.pid for proc in _POOL.idle) == first
    report = hook.reports[0]
    assert len(report) == 2 and all(r["spawned"] < r["job"] <= r["ready"] <= r["forward"] <= r["backward"]
                                    for r in report)
    jobs = [(hook._block_copy(block), shape) for block, shape in model.stage_blocks((3, 3, 64, 64))]
    model.eval()
    other = ParallelRegionalCompile({})
    other._run(jobs, torch.float32, "cpu", False, False, None)  # evaluation, another batch, another hook
    assert sorted(proc.pid for proc in _POOL.idle) == first and len(other.reports[0]) == 2
    idle = list(_POOL.idle)
    release_compile_workers()
    for proc in idle:  # an empty stdin ends them
        assert proc.wait(timeout=60) == 0


_CHATTY = """
import torch


class Chatty(torch.nn.Module):
    # prints while it runs, as libraries sometimes do
    def forward(self, x):
        print("ok?\\nfailed: not really")
        return x * 2
"""


def test_what_a_job_prints_is_not_taken_for_the_workers_answer(tmp_path, monkeypatch):
    (tmp_path / "chatty_block.py").write_text(_CHATTY)  # importable by the parent and the worker alike
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    from chatty_block import Chatty

    from src.compiling import _POOL, release_compile_workers

    release_compile_workers()
    hook = ParallelRegionalCompile({"backend": "eager"}, workers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a misread answer would warn (and kill the worker)
        hook._run([(Chatty(), (2, 4, 4, 8))], torch.float32, "cpu", True, True, None)
        hook._run([(Chatty(), (2, 4, 4, 8))], torch.float32, "cpu", False, False, None)
    assert len(_POOL.idle) == 1 and _POOL.idle[0].poll() is None
    release_compile_workers()
