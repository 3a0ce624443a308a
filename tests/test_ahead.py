"""Compiling the Triton kernels ahead (src/kernels/ahead.py): a plan's dry run on meta tensors must foresee exactly
the kernel variants the real forward and backward launch (else the head start compiles the wrong variants), a
launch waits for its kernel's background compile, and nothing in the background can fail a real call.

On the CPU the kernels run in Triton's interpreter, where plans are off; the tests turn them on and record the
submitted compiles instead of compiling. The GPU test compiles for real, in a fresh process with empty caches."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn as nn

from src.kernels import ahead, dwconv, norms
from src.kernels.ops import selective_scan, structure_aware_ssm_fused
from tests.conftest import requires_cuda

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _signature(kernel, args, kwargs) -> tuple:
    """What selects a compiled variant, near enough: the kernel, each argument's dtype and 16-byte alignment
    (tensors) or value (an integer the kernel does not specialise on: only its type)."""
    def one(a):
        return ("tensor", a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a

    if hasattr(kernel, "params"):
        loose = {i for i, p in enumerate(kernel.params) if p.do_not_specialize}
    else:  # the interpreter's stand-in
        names = getattr(kernel, "kwargs", {}).get("do_not_specialize") or ()
        loose = {i for i, name in enumerate(getattr(kernel, "arg_names", ())) if name in names or i in names}
    return (getattr(kernel, "fn", kernel).__name__,
            tuple(type(a).__name__ if i in loose and type(a) is int else one(a) for i, a in enumerate(args)),
            tuple(sorted((k, one(v)) for k, v in kwargs.items())))


@pytest.fixture
def recorded(monkeypatch):
    """Plans on (even in the interpreter); a plan's submissions and the real launches recorded, not compiled.
    At the end, every launched variant must have been planned before its first launch (a kernel launched ahead
    of its op's plan would compile in the step)."""
    planned, launched, order = [], [], []
    launch_now = ahead._launch_now
    monkeypatch.setattr(ahead, "enabled", lambda: True)

    def submit(kernel, args, kwargs):
        planned.append(_signature(kernel, args, kwargs))
        order.append(("planned", planned[-1]))

    def record(kernel, grid, args, kwargs):
        launched.append(_signature(kernel, args, kwargs))
        order.append(("launched", launched[-1]))
        launch_now(kernel, grid, args, kwargs)

    monkeypatch.setattr(ahead, "_submit", submit)
    monkeypatch.setattr(ahead, "_launch_now", record)
    ahead.reset()
    yield planned, launched
    ahead.reset()
    seen = set()
    for event, signature in order:
        if event == "planned":
            seen.add(signature)
        else:
            assert signature in seen, f"{signature[0]} launched before its op's plan foresaw it"


def _fused_inputs(dtype=torch.float32, Bsz=2, D=4, H=5, W=6, K=3):
    """Activations as the model hands them over: x and dt halves of one projection (strided), fp32 parameters."""
    L = H * W
    xdt = torch.randn(Bsz, L, 2 * D, device=DEVICE, dtype=dtype)
    x, dt = xdt[..., :D], xdt[..., D:]
    BC = torch.randn(Bsz, L, 2, device=DEVICE, dtype=dtype)
    par = [-torch.rand(D, 1) - 0.1, torch.randn(D), torch.randn(D) * 0.5 - 2, torch.randn(K, D, 3, 3), torch.randn(K)]
    A, Dskip, dt_bias, weight, alpha = (p.to(DEVICE) for p in par)
    leaves = [t.requires_grad_() for t in (x, dt, A, BC, Dskip, dt_bias, weight, alpha)]
    return leaves, (x, dt, A, BC[..., :1], BC[..., 1:], Dskip, dt_bias, weight, alpha)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_plan_of_the_fused_op_foresees_every_variant_it_launches(recorded, dtype):
    planned, launched = recorded
    leaves, args = _fused_inputs(dtype)
    assert args[4].data_ptr() % 16  # C is not 16-byte aligned (the plan must say so too)
    y = structure_aware_ssm_fused(*args, [1, 2, 3], 5, 6, "row")
    y.backward(torch.randn_like(y))
    with torch.no_grad():  # inference: a forward variant that stores no h'
        structure_aware_ssm_fused(*args, [1, 2, 3], 5, 6, "row")
    assert launched and planned, "nothing launched or planned"
    assert set(planned) == set(launched)
    names = {p[0] for p in planned}
    assert {"_scan_fwd_kernel", "_fusion_fwd_kernel", "_scan_bwd_kernel", "_fusion_bwd_param_kernel",
            "_fusion_bwd_state_kernel", "_weight_grad_kernel", "_mix_weights_kernel"} <= names
    # once per shape class: a second call plans nothing
    n = len(planned)
    structure_aware_ssm_fused(*args, [1, 2, 3], 5, 6, "row").backward(torch.randn_like(y))
    assert len(planned) == n


def test_plan_foresees_the_variants_after_a_timed_pick_other_than_its_own(recorded, monkeypatch):
    """On a GPU without measured picks the real call times the candidate tiles, while the dry run takes the first
    after compiling them all: the kernels after the timed one (the column sums, whose number of partials follows
    the tiles) must launch variants the plan foresaw whichever candidate wins."""
    from src.kernels import fused, triton_scan

    planned, launched = recorded
    monkeypatch.setattr(fused, "_candidates", lambda configs, D, W: ((8, 16, 1), (8, 8, 1)))

    def pick(name, key, candidates, run, *rest):
        if ahead.planning():
            for cfg in candidates:
                run(cfg)
            return candidates[0]
        return candidates[-1]  # another tile won the timing

    for module in (fused, triton_scan):
        monkeypatch.setattr(module, "pick_config", pick)
    _, args = _fused_inputs(torch.float16, D=16)  # dC in fp16: no other column sum of that signature
    y = structure_aware_ssm_fused(*args, [1, 2, 3], 5, 6, "row")
    y.backward(torch.randn_like(y))
    assert launched and set(launched) <= set(planned)
    assert "_column_sums_kernel" in {p[0] for p in launched}


def test_plan_of_the_scan_op_foresees_every_variant_it_launches(recorded):
    planned, launched = recorded
    x = torch.randn(2, 20, 3, device=DEVICE, requires_grad=True)
    dt = torch.randn(2, 20, 3, device=DEVICE, requires_grad=True)
    A = (-torch.rand(3, 1, device=DEVICE) - 0.1).requires_grad_()
    B = torch.randn(2, 20, 1, device=DEVICE, requires_grad=True)
    bias = torch.randn(3, device=DEVICE, requires_grad=True)
    selective_scan(x, dt, A, B, bias, 4, 5, "cross").sum().backward()
    assert launched and set(planned) == set(launched)


@pytest.mark.parametrize("gate", ["none", "strided", "contiguous"])
def test_plan_of_the_layer_norm_foresees_every_variant_it_launches(recorded, gate):
    planned, launched = recorded
    norm = nn.LayerNorm(8).to(DEVICE)
    x = torch.randn(3, 5, 8, device=DEVICE, requires_grad=True)
    zz = torch.randn(3, 5, 16, device=DEVICE, requires_grad=True)
    z = {"none": None, "strided": zz[..., 8:], "contiguous": zz[..., 8:].contiguous()}[gate]
    norms.layer_norm(x, norm, z).backward(torch.randn(3, 5, 8, device=DEVICE))
    assert launched and set(planned) == set(launched)


@pytest.mark.parametrize("mode", ["residual", "silu"])
def test_plan_of_the_depthwise_conv_foresees_every_variant_it_launches(recorded, mode):
    planned, launched = recorded
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8).to(DEVICE)
    xx = torch.randn(2, 4, 5, 16, device=DEVICE, requires_grad=True)
    x = xx[..., :8] if mode == "silu" else xx[..., :8].contiguous()  # the SSM reads one half in place
    dwconv.depthwise_conv(x, conv, residual=mode == "residual", silu=mode == "silu").sum().backward()
    assert launched and set(planned) == set(launched)
    assert {p[0] for p in planned} == {"_dwconv_fwd_kernel", "_dwconv_bwd_param_kernel", "_dwconv_bwd_input_kernel",
                                      "_dwconv_param_kernel"}


def test_plan_of_the_drop_path_foresees_every_variant_it_launches(recorded):
    from src.kernels.droppath import residual_drop_path

    planned, launched = recorded
    x = torch.randn(3, 4, 5, 8, device=DEVICE, requires_grad=True)
    branch = torch.randn(3, 4, 5, 8, device=DEVICE, requires_grad=True)
    residual_drop_path(x, branch, torch.tensor(0.5, device=DEVICE), True).sum().backward()
    assert launched and set(planned) == set(launched)
    assert {p[0] for p in planned} == {"_drop_path_fwd_kernel", "_drop_path_bwd_kernel"}


class _FakeKernel:
    """Stands for a @triton.jit kernel: `warmup` (a slow compile, optionally failing) and `kernel[grid](...)`."""

    def __init__(self, fail: bool = False):
        self.events, self.fail, self.threads = [], fail, set()

    def warmup(self, *args, grid, **kwargs):
        time.sleep(0.2)
        self.threads.add(threading.current_thread().name)
        self.events.append(("compiled", args))
        if self.fail:
            raise RuntimeError("compile failed")

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.events.append(("launched", args))


@pytest.fixture
def plans_on(monkeypatch):
    monkeypatch.setattr(ahead, "enabled", lambda: True)
    ahead.reset()
    yield
    ahead.reset()


@pytest.mark.parametrize("fail", [False, True])
def test_launch_waits_for_its_background_compile_whose_failure_is_dropped(plans_on, fail):
    kernel = _FakeKernel(fail)
    ahead.plan("k", torch.device("cpu"), lambda: ahead.launch(kernel, (1,), 7, BLOCK=4))
    assert kernel.events == []  # submitted: the plan returns at once
    ahead.launch(kernel, (1,), 7, BLOCK=4)
    assert kernel.events == [("compiled", (7,)), ("launched", (7,))]
    assert all(name.startswith("triton-ahead") for name in kernel.threads)


def test_a_key_is_planned_once_and_plans_do_not_nest(plans_on):
    kernel, runs = _FakeKernel(), []

    def dry_run():
        runs.append(ahead.planning())
        ahead.plan("inner", torch.device("cpu"), lambda: runs.append("nested"))
        ahead.launch(kernel, (1,), 1)

    ahead.plan("k", torch.device("cpu"), dry_run)
    ahead.plan("k", torch.device("cpu"), dry_run)
    ahead.wait(kernel)
    assert runs == [True] and not ahead.planning()
    assert kernel.events == [("compiled", (1,))]  # compiled once, never launched by a plan


def test_a_failing_dry_run_only_ends_the_plan(plans_on):
    def dry_run():
        assert ahead.planning()
        raise ValueError("unforeseen")

    ahead.plan("k", torch.device("cpu"), dry_run)  # no exception
    assert not ahead.planning()
    assert ahead.real_device(torch.device("meta")) == torch.device("meta")
    assert ahead._modes == 0  # launches skip the thread's state again


def test_a_plan_on_another_thread_leaves_this_threads_launches_real(plans_on):
    """While one thread runs a plan's dry run, another thread's launches still launch (launch reads the
    thread's own state whenever any thread is in a plan)."""
    kernel, inside, release = _FakeKernel(), threading.Event(), threading.Event()

    def dry_run():
        inside.set()
        release.wait(10)

    planner = threading.Thread(target=ahead.plan, args=("k", torch.device("cpu"), dry_run))
    planner.start()
    assert inside.wait(10) and ahead._modes == 1
    ahead.launch(kernel, (1,), 3)
    release.set()
    planner.join(10)
    assert kernel.events == [("launched", (3,))] and ahead._modes == 0


def test_at_exit_running_compiles_finish_and_queued_ones_are_cancelled(tmp_path):
    """A daemon thread still compiling when the interpreter finalises is stopped by a forced unwind through
    Triton's C++ frames, which aborted finished GPU runs (SIGABRT). At exit the pool waits for what runs
    and cancels what is queued; the process exits cleanly."""
    code = (
        "import sys, time\n"
        "from src.kernels import ahead\n"
        "def slow(path):\n"
        "    time.sleep(1.0)\n"
        "    open(path, 'w').write('done')\n"
        "pool = ahead._DaemonPool(1)\n"
        "pool.submit(slow, sys.argv[1])\n"
        "queued = pool.submit(slow, sys.argv[2])\n"
        "time.sleep(0.2)  # the first call is running, the second queued; then the process ends\n"
    )
    running, queued = tmp_path / "running", tmp_path / "queued"
    done = subprocess.run([sys.executable, "-c", code, str(running), str(queued)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr
    assert running.read_text() == "done" and not queued.exists()


def test_switched_off_by_the_environment_and_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("SPATIAL_MAMBA_COMPILE_AHEAD", "0")
    assert not ahead.enabled()
    monkeypatch.setenv("SPATIAL_MAMBA_COMPILE_AHEAD", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not ahead.enabled()


_GPU_CHILD = r"""
import json, threading, sys, torch, torch.nn as nn
from triton.runtime.jit import JITFunction
sys.path.insert(0, sys.argv[1])
from src.kernels import dwconv, norms
from src.kernels.ops import structure_aware_ssm_fused
from tests.test_ahead import _fused_inputs

threads, do_compile = [], JITFunction._do_compile
def counted(self, *args, **kwargs):
    threads.append((threading.current_thread().name, self.fn.__name__))
    return do_compile(self, *args, **kwargs)
JITFunction._do_compile = counted
torch.manual_seed(0)
for dtype in (torch.bfloat16, torch.float32):
    leaves, args = _fused_inputs(dtype, Bsz=4, D=64, H=14, W=14)
    y = structure_aware_ssm_fused(*args, [1, 3, 5], 14, 14, "row")
    y = norms.layer_norm(y, nn.LayerNorm(64).cuda(), y).view(4, 14, 14, 64)
    y = dwconv.depthwise_conv(y, nn.Conv2d(64, 64, 3, padding=1, groups=64).cuda(), residual=True)
    y = dwconv.depthwise_conv(torch.cat([y, y], -1)[..., :64], nn.Conv2d(64, 64, 3, padding=1, groups=64).cuda(),
                              silu=True)
    y.float().square().sum().backward()
torch.cuda.synchronize()
in_step = [kernel for thread, kernel in threads if not thread.startswith("triton-ahead")]
print("RESULT " + json.dumps({"in_step": in_step, "ahead": len(threads) - len(in_step)}))
"""


@requires_cuda
@pytest.mark.gpu
@pytest.mark.minutes(0.75)
def test_gpu_every_kernel_of_a_step_compiles_ahead(tmp_path):
    """Fresh caches: the fused op's, the gated LayerNorm's and the depthwise convolutions' forward and backward
    in bf16 and fp32 compile nothing in the step (main thread, autograd's backward thread): every variant they
    launch was foreseen and compiled by the plan's threads."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), SPATIAL_MAMBA_CACHE=str(tmp_path / "tiles"),
               SPATIAL_MAMBA_TUNE="auto", SPATIAL_MAMBA_COMPILE_AHEAD="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", _GPU_CHILD, ROOT], env=env, capture_output=True, text=True,
                         timeout=600)
    lines = [line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    counts = json.loads(lines[-1])
    assert counts["in_step"] == [] and counts["ahead"] >= 10, counts


# ----------------------------------------------------------------------------------------------------
# direct launches: a variant launched once through Triton is launched again through its compiled launcher


class _Param:
    def __init__(self, name: str, default=inspect.Parameter.empty):
        self.name, self.default = name, default


class _FakeCompiled:
    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.runs = []

    def run(self, *args):
        self.runs.append(args)


class _FakeJit:
    """Stands for a @triton.jit kernel with parameters (x, n, BLOCK, FLAG, OPT=5): `kernel[grid](...)` is
    Triton's full path, recorded, and returns the variant's compiled kernel."""

    def __init__(self):
        self.params = [_Param(name) for name in ("x", "n", "BLOCK", "FLAG")] + [_Param("OPT", 5)]
        self.full, self.variants = [], []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.full.append((grid, args, kwargs))
            self.variants.append(_FakeCompiled())
            return self.variants[-1]

        return run


@pytest.fixture
def direct(monkeypatch):
    """Direct launches on (device 0, stream 1234), no launch hooks, an empty cache of variants."""
    runtime = type("Runtime", (), {"launch_enter_hook": None, "launch_exit_hook": None})()
    monkeypatch.setattr(ahead, "_fast", [lambda: 0, lambda device: 1234, runtime])
    monkeypatch.setattr(ahead, "_compiled", {})
    monkeypatch.setattr(ahead, "_direct", {})
    return runtime


def test_a_variant_is_launched_through_triton_once_then_directly(direct):
    kernel, x = _FakeJit(), torch.zeros(8)
    ahead._launch_now(kernel, (3,), (x, 7), dict(BLOCK=16, FLAG=True, num_warps=4))
    assert len(kernel.full) == 1
    ahead._launch_now(kernel, (5, 2), (x, 9), dict(BLOCK=16, FLAG=True, num_warps=4))
    assert len(kernel.full) == 1  # the second launch went to the compiled launcher, with every parameter
    assert kernel.variants[0].runs == [(5, 2, 1, 1234, "function", "metadata", None, None, None, x, 9, 16, True, 5)]


class CudaLauncher:
    """Stands for Triton 3.6's CUDA launcher object: its C function (`launch`) and the call that wraps it."""

    def __init__(self, scratch=0):
        self.global_scratch_size, self.profile_scratch_size = scratch, 0
        self.launch_cooperative_grid, self.launch_pdl = False, True
        self.calls, self.c_calls = [], []

    def __call__(self, *args):
        self.calls.append(args)

    def launch(self, *args):
        self.c_calls.append(args)


@pytest.mark.parametrize("known, scratch, c_function", [(True, 0, True), (True, 256, False), (False, 0, False)])
def test_triton_36s_c_launcher_is_called_itself_where_its_wrapper_would_only_pass_on(direct, monkeypatch, known,
                                                                                     scratch, c_function):
    """With Triton 3.6 (`_C_LAUNCH`) and a kernel without scratch memory a direct launch calls the launcher's C
    function with the arguments its wrapper would give it; a kernel with scratch memory, or another Triton, keeps
    the wrapper (which allocates it)."""
    monkeypatch.setattr(ahead, "_C_LAUNCH", known)
    kernel, x = _FakeJit(), torch.zeros(8)
    ahead._launch_now(kernel, (3,), (x, 7), dict(BLOCK=16, FLAG=True))  # through Triton; keeps the variant
    launcher = kernel.variants[0].run = CudaLauncher(scratch)
    ahead._direct.clear()  # filed again at the next launch, with the stand-in launcher
    ahead._launch_now(kernel, (3,), (x, 7), dict(BLOCK=16, FLAG=True))  # the general key's launch: the wrapper
    ahead._launch_now(kernel, (5, 2), (x, 9), dict(BLOCK=16, FLAG=True))
    tail = (x, 9, 16, True, 5)
    if c_function:
        assert launcher.calls == [(3, 1, 1, 1234, "function", "metadata", None, None, None, x, 7, 16, True, 5)]
        assert launcher.c_calls == [(5, 2, 1, 1234, "function", False, True, None, None, "metadata", None, None,
                                     None, *tail)]
    else:
        assert launcher.c_calls == [] and launcher.calls[-1] == (5, 2, 1, 1234, "function", "metadata", None, None,
                                                                  None, *tail)


@pytest.mark.parametrize("change", ["unaligned", "dtype", "one", "multiple_of_16", "wide", "keyword", "option"])
def test_whatever_can_select_another_variant_goes_through_triton(direct, change):
    kernel, x = _FakeJit(), torch.zeros(16)
    args, kwargs = (x, 7), dict(BLOCK=16, FLAG=True, num_warps=4)
    ahead._launch_now(kernel, (1,), args, kwargs)
    changed = {
        "unaligned": ((x[1:], 7), kwargs), "dtype": ((x.double(), 7), kwargs), "one": ((x, 1), kwargs),
        "multiple_of_16": ((x, 32), kwargs), "wide": ((x, 2**31 + 7), kwargs),
        "keyword": (args, dict(kwargs, BLOCK=32)), "option": (args, dict(kwargs, num_warps=8)),
    }[change]
    ahead._launch_now(kernel, (1,), *changed)
    assert len(kernel.full) == 2 and kernel.variants[0].runs == []


@pytest.mark.parametrize("other", ["bool", "float", "tensor", "none", "more", "fewer"])
def test_arguments_of_other_kinds_than_the_first_launch_never_reuse_its_variant(direct, other):
    """The kernel's own key function is made from the kinds of its first direct launch's arguments (a tensor,
    an int): a launch whose arguments are of other kinds (where Triton may pick another variant) must go through
    Triton, and is then launched directly under the general key."""
    kernel, x = _FakeJit(), torch.zeros(8)
    kwargs = dict(BLOCK=16, FLAG=True)
    ahead._launch_now(kernel, (1,), (x, 7), kwargs)
    args = {"bool": (x, True), "float": (x, 7.0), "tensor": (x, x), "none": (None, 7), "more": (x, 7, 16),
            "fewer": (x,)}[other]
    if other == "more":
        kwargs = dict(FLAG=True)
    ahead._launch_now(kernel, (1,), args, kwargs)
    assert len(kernel.full) == 2 and kernel.variants[0].runs == []
    ahead._launch_now(kernel, (1,), args, kwargs)  # the general key's direct launch, not the first variant's
    assert kernel.variants[0].runs == [] and len(kernel.full) + len(kernel.variants[1].runs) == 3


def test_a_tensor_where_the_first_launch_had_none_is_never_kept_in_a_key(direct):
    """A key function made for None at a position puts that argument itself in its key: launches with a tensor
    there go by the general key and leave nothing behind under the kernel's own (no tensor kept alive)."""
    kernel = _FakeJit()
    ahead._launch_now(kernel, (1,), (None, 7), dict(BLOCK=16, FLAG=True))
    for _ in range(3):
        ahead._launch_now(kernel, (1,), (torch.zeros(8), 7), dict(BLOCK=16, FLAG=True))
    assert len(kernel.full) == 2 and len(kernel.variants[1].runs) == 2  # the general key's direct launches
    assert len(ahead._direct[kernel][1]) == 1  # only the first launch's variant


def test_a_kernels_key_function_tells_apart_what_the_general_key_does():
    """For arguments of the kinds it was made for, two launches share a key under the kernel's key function
    exactly when they share one under `arg_key` (the facts Triton specialises on)."""
    x = torch.zeros(32)
    tensors = [x, x[1:], x[4:], x.half(), x.double()[2:]]
    ints = [1, 2, 3, 16, 32, 2**31, -(2**31) - 1, 2**63]
    others = [True, False, None]
    floats = [0.5, 2.0]
    combos = [(t, i, f, o) for t in tensors for i in ints for f in floats for o in others]
    key_of = ahead._key_function(combos[0])
    kwargs = dict(BLOCK=16)
    keys = [key_of(0, c, kwargs) for c in combos]
    general = [(0, *kwargs.items(), *map(ahead.arg_key, c)) for c in combos]
    for a in range(len(combos)):
        for b in range(a, len(combos)):
            assert (keys[a] == keys[b]) == (general[a] == general[b]), (combos[a], combos[b])
    assert key_of(0, combos[0], dict(BLOCK=32)) != keys[0] and key_of(1, combos[0], kwargs) != keys[0]


def test_direct_launches_key_each_kernel_on_its_own(direct):
    """Two kernels launched with arguments alike each keep their own variant."""
    first, second, x = _FakeJit(), _FakeJit(), torch.zeros(8)
    for kernel in (first, second, first, second):
        ahead._launch_now(kernel, (1,), (x, 7), dict(BLOCK=16, FLAG=True))
    assert len(first.full) == len(second.full) == 1
    assert len(first.variants[0].runs) == len(second.variants[0].runs) == 1


def test_a_constexpr_given_by_position_sends_every_launch_through_triton(direct):
    kernel, x = _FakeJit(), torch.zeros(8)
    kernel.params[2].is_constexpr = True  # BLOCK, given by position below: 16, then 32 (another variant)
    for block in (16, 32):
        ahead._launch_now(kernel, (1,), (x, 7, block), dict(FLAG=True))
    assert len(kernel.full) == 2 and not ahead._compiled


def test_an_installed_launch_hook_sends_every_launch_through_triton(direct):
    kernel, x = _FakeJit(), torch.zeros(8)
    direct.launch_enter_hook = type("Chain", (), {"calls": [print]})()  # what Triton's profilers add
    for _ in range(2):
        ahead._launch_now(kernel, (1,), (x, 7), dict(BLOCK=16, FLAG=True))
    assert len(kernel.full) == 2


def test_direct_launches_are_off_in_the_interpreter_and_by_the_environment(monkeypatch):
    for env in (dict(TRITON_INTERPRET="1"), dict(TRITON_INTERPRET="0", SPATIAL_MAMBA_FAST_LAUNCH="0")):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(ahead, "_fast", [])
        assert ahead._resolve_fast() == [None]


def test_argument_keys_tell_variants_apart():
    x = torch.zeros(16)
    keys = [ahead.arg_key(a) for a in (x, x[1:], x.half(), 1, 2, 16, 2**31, -(2**31) - 1, 2.0, True, False, None)]
    assert len(set(keys)) == len(keys)
    assert ahead.arg_key(3) == ahead.arg_key(5) and ahead.arg_key(x[4:]) == ahead.arg_key(x)  # 16 bytes in: aligned


@requires_cuda
@pytest.mark.gpu
def test_gpu_direct_launches_give_the_bits_of_triton_launches(monkeypatch):
    """The fused op (C aligned, then one element in) and the gated LayerNorm (gate a half of a projection),
    forward and backward, bf16 and fp32: launched directly, the same bits as launched through Triton."""
    def step(dtype, aligned):
        torch.manual_seed(0)
        leaves, args = _fused_inputs(dtype, Bsz=2, D=64, H=14, W=14)
        if aligned:
            args = (*args[:4], args[4].contiguous(), *args[5:])
        assert (args[4].data_ptr() % 16 == 0) == aligned
        y = structure_aware_ssm_fused(*args, [1, 3, 5], 14, 14, "row")
        zz = torch.randn(2, 196, 128, device="cuda", dtype=dtype, requires_grad=True)
        y = norms.layer_norm(y, nn.LayerNorm(64).cuda(), zz[..., 64:])
        y.float().square().sum().backward()
        return [y.detach()] + [t.grad for t in (*leaves, zz)]

    for dtype in (torch.bfloat16, torch.float32):
        for aligned in (True, False):
            monkeypatch.setattr(ahead, "_fast", [None])  # every launch through Triton
            expected = step(dtype, aligned)
            monkeypatch.setattr(ahead, "_fast", [])  # direct launches (resolved again)
            monkeypatch.setattr(ahead, "_compiled", {})
            step(dtype, aligned)  # first launches of each variant: through Triton
            got = step(dtype, aligned)
            assert ahead._compiled, "no launch was direct"
            for e, g in zip(expected, got):
                torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_cdiv_is_the_ceiling_of_the_quotient():
    """The launch grids' ceiling division (plain Python, not Triton's per-call-costly `triton.cdiv`)."""
    for a in (0, 1, 15, 16, 17, 3136, 2**40 + 3):
        for b in (1, 2, 16, 128, 1000):
            assert ahead.cdiv(a, b) == (a + b - 1) // b


# ----------------------------------------------------------------------------------------------------
# inductor's analysis of which tensors a launched kernel writes, kept once per variant of the package's kernels


@pytest.fixture
def analyses(monkeypatch):
    """torch's analysis functions replaced by counters (each call answers a fresh object), then memoised."""
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    calls = []

    def fake(kernel, kwargs, tma_descriptor_metadata):
        calls.append(kernel)
        return {"written": sorted(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))}

    names = [n for n in ahead._ANALYSES if hasattr(wrap, n)]
    assert names, "this torch has neither of the analysis functions the memo wraps"
    for name in names:
        monkeypatch.setattr(wrap, name, fake)
    ahead.memoize_write_analysis()
    ahead.memoize_write_analysis()  # idempotent: wrapped once
    return getattr(wrap, names[0]), calls


def test_write_analysis_runs_once_per_variant_of_the_packages_kernels(analyses):
    import triton
    from types import SimpleNamespace

    from src.kernels import fused

    analyse, calls = analyses
    kernel = fused._mix_weights_kernel
    x16, x32 = torch.empty(2, dtype=torch.bfloat16), torch.empty(2)
    first = analyse(kernel, {"w_ptr": x16, "D": 128, "BLOCK_D": 256}, {})
    again = analyse(kernel, {"w_ptr": torch.empty(8, dtype=torch.bfloat16), "D": 128, "BLOCK_D": 256}, {})
    assert len(calls) == 1 and again == first and again is not first  # callers get their own copy
    analyse(kernel, {"w_ptr": x32, "D": 128, "BLOCK_D": 256}, {})  # another dtype
    analyse(kernel, {"w_ptr": x16, "D": 64, "BLOCK_D": 256}, {})  # another integer argument
    assert len(calls) == 3
    # a launch with options reaches the analysis as a new one-config Autotuner each time: one key
    for _ in range(2):
        tuner = SimpleNamespace(fn=kernel, configs=[SimpleNamespace(kwargs={"BLOCK_D": 128})])
        analyse(tuner, {"w_ptr": x16, "D": 128, "num_warps": 4}, {})
    assert len(calls) == 4

    @triton.jit
    def foreign_kernel(p):
        pass

    analyse(foreign_kernel, {"p": x16}, {})
    analyse(foreign_kernel, {"p": x16}, {})
    sym = object()  # an argument the key does not cover (say a symbolic size): torch's analysis every time
    analyse(kernel, {"w_ptr": x16, "D": sym, "BLOCK_D": 256}, {})
    analyse(kernel, {"w_ptr": x16, "D": sym, "BLOCK_D": 256}, {})
    assert len(calls) == 8


def test_a_traced_op_is_analysed_once_per_variant_in_a_trace():
    """The real analysis (Triton IR of the kernels for sm_90, on the CPU, no interpreter) in AOT traces of the
    traced op's forward and backward, twice as a graph of two blocks would: the second trace analyses nothing,
    and each launch is still taken to write only its outputs (the graph clones nothing else)."""
    script = r'''
import collections, sys
import torch, triton
sys.path.insert(0, "benchmarks")
import registers
triton.runtime.driver.set_active(registers._TargetOnly(90))
from src.kernels import fused, ops, triton_scan
triton_scan._num_sms = fused._num_sms = lambda device: 132
from torch._functorch.aot_autograd import aot_export_joint_simple
from torch._higher_order_ops import triton_kernel_wrap as wrap
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
name = next(n for n in ("identify_accessed_tensors", "identify_mutated_tensors") if hasattr(wrap, n))
real, count = getattr(wrap, name), collections.Counter()
def counted(kernel, *args, **kwargs):
    count[0] += 1
    return real(kernel, *args, **kwargs)
setattr(wrap, name, counted)
B, D, H, W = 2, 32, 6, 7
bf = torch.bfloat16
x, dt, dy, h, hf = (torch.randn(B, H * W, D, dtype=bf) for _ in range(5))
A, Dv, bias = -torch.rand(D, 1), torch.randn(D), torch.randn(D)
Bm, C = (torch.randn(B, H * W, 1, dtype=bf) for _ in range(2))
w, al = torch.randn(3, D, 3, 3), torch.randn(3)
fwd = lambda *a: ops.structure_aware_ssm_fused_traced(*a, [1, 3, 5], H, W, "row")
bwd = lambda *a: ops.structure_aware_ssm_fused_traced_backward(*a, [1, 3, 5], H, W, "row")
for block in range(2):
    for fn, args in ((fwd, (x, dt, A, Bm, C, Dv, bias, w, al)), (bwd, (dy, x, dt, A, Bm, C, Dv, bias, w, al, h, hf))):
        g = aot_export_joint_simple(fn, args, trace_joint=False)
        for node in g.graph.nodes:
            if "triton_kernel_wrapper" in str(node.target):
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                kernel = getattr(kernel, "fn", kernel)
                print("clones", getattr(kernel, "__name__", None) or kernel.fn.__name__,
                      " ".join(node.kwargs.get("tensors_to_clone") or []))
    print("analyses", count[0])
'''
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("analyses")]
    assert len(counts) == 2 and counts[0] > 0 and counts[1] == counts[0], out.stdout
    from tests.test_registers import _OUTPUTS

    clones = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("clones")]
    assert {kernel for kernel, *_ in clones} >= {"_scan_fwd_kernel", "_fusion_fwd_kernel", "_scan_bwd_kernel",
                                                   "_fusion_bwd_state_kernel"}, out.stdout
    for kernel, *cloned in clones:
        assert set(cloned) <= _OUTPUTS[kernel], f"{kernel}: the graph clones {cloned}"
