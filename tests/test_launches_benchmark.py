"""benchmarks/launches.py: a step's launches recorded and replayed by every path (stand-ins for Triton's kernels
and launchers, on the CPU); without a GPU a clear error."""

import pytest
import torch

from benchmarks import launches
from src.kernels import ahead


class _Compiled:
    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.runs = []

    def run(self, *args):
        self.runs.append(args)


class _Param:
    def __init__(self, name):
        self.name, self.is_constexpr, self.default = name, False, 5


class _Kernel:
    """A @triton.jit kernel stand-in with parameters (x, n, OPT=5)."""

    __name__ = "_stand_in_kernel"

    def __init__(self):
        self.params = [_Param("x"), _Param("n"), _Param("OPT")]
        self.params[0].default = self.params[1].default = None
        self.triton_launches, self.compiled = 0, _Compiled()

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.triton_launches += 1
            return self.compiled

        return run


def test_a_steps_launches_are_recorded_and_replayed_by_every_path(monkeypatch):
    runtime = type("Runtime", (), {"launch_enter_hook": None, "launch_exit_hook": None})()
    monkeypatch.setattr(ahead, "_fast", [lambda: 0, lambda device: 1234, runtime])
    monkeypatch.setattr(ahead, "_compiled", {})
    monkeypatch.setattr(ahead, "_direct", {})
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    kernel, x = _Kernel(), torch.zeros(8)

    def step():
        for n in (3, 4):
            ahead.launch(kernel, (n,), x, n)

    step()  # the variant's first launch through Triton, the second directly
    assert kernel.triton_launches == 1 and len(kernel.compiled.runs) == 1
    recorded = launches.record_step(step)
    assert [(grid, args) for _, grid, args, _ in recorded] == [((3,), (x, 3)), ((4,), (x, 4))]
    assert kernel.triton_launches == 1 and len(kernel.compiled.runs) == 3  # the recorded launches ran, directly
    paths = launches.replay_paths(recorded)
    assert set(paths) == {"package", "keys only", "general keys only", "compiled launcher", "direct launcher",
                          "through Triton"}
    for name, fn in paths.items():
        assert launches.host_ms(fn, reps=2) >= 0
    # package, compiled and direct launcher: 2 launches × 2 reps each, directly; through Triton: 2 × 2 more
    assert len(kernel.compiled.runs) == 3 + 4 + 4 + 4 and kernel.triton_launches == 1 + 4
    assert launches.kernel_name(kernel) == "_stand_in_kernel"


def test_without_a_gpu_it_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launches.main([]) == 2
    assert "CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--size", "8"], ["--reps", "0"]])
def test_bad_arguments_say_what_was_expected(monkeypatch, capsys, argv):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert launches.main(argv) == 2
    assert "must be at least" in capsys.readouterr().err
