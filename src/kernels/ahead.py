"""This project's Triton kernels compiled ahead of their first launch, in background threads.

A `@triton.jit` kernel compiles when it is first launched with a new specialisation (argument dtypes, constexpr
tiles, 16-byte alignment of pointers, divisibility of integer arguments): the Triton front end, its MLIR passes,
LLVM and ptxas, 0.5-3 s each. At a new shape the fused op's forward and backward launch about ten kernels, the
blocks' LayerNorms four more, and each compiled in turn as the step reached it: on a fresh H100 machine the
first compiled training step of Spatial-Mamba-T spent 14-17 s in these compiles, one after another.

`plan(key, dry_run)` is called by an op the first time it sees a new shape class (the key). It runs `dry_run` —
the op's own forward and backward launchers on meta tensors of the real shapes, strides and dtypes, so that no
memory is touched and nothing runs on the GPU — with `launch` turned into compiles of the very variants those
calls would launch, submitted to a small thread pool. Triton's passes and ptxas release the GIL, so they compile
in parallel with each other and with whatever the main thread does meanwhile: the forward launches wait only
for their own kernels, and the backward's kernels compile behind the rest of the forward pass (under
torch.compile, behind the next graphs' compiles too).

`launch` is how every kernel of this package is started. Outside a plan it first waits for any pending
background compile of that kernel (so no variant is ever compiled twice at once; the launch then finds it in
Triton's cache) and launches it. A variant the plan did not foresee (say a gradient with unusual strides)
simply compiles at its launch, as it would without this module; a background compile that fails is dropped,
and the launch compiles again and raises where it would have. Tile timing (`tuning.pick_config`) under a plan
submits every candidate it would time, which then compile in parallel too. A variant launched once is launched
again through its compiled launcher directly, without Triton's per-call bookkeeping (see "Launches" below).

Off in the Triton interpreter and without CUDA; `SPATIAL_MAMBA_COMPILE_AHEAD=0` turns it off
(`SPATIAL_MAMBA_FAST_LAUNCH=0` the direct launches). Inside `tracing_launches()` (the body of a `triton_op`) a
launch is `torch.library.wrap_triton(kernel)[grid](...)` instead and no plan runs: a compiled graph then
launches (and compiles) those kernels itself; torch's analysis of which tensors such a launch writes is then kept
once per kernel variant (`memoize_write_analysis`, below).
"""

from __future__ import annotations

import inspect
import os
import queue
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future

import torch

_local = threading.local()  # .device: the real device of the plan this thread is running (None: not planning)
_planned: set[Hashable] = set()
_pending: dict[object, list[Future]] = {}  # kernel -> its background compiles not yet waited for
# how many threads are now inside a plan's dry run or `tracing_launches` (each thread's `_local` says which):
# while none is, `launch` skips reading the thread-local state
_modes = 0
_modes_lock = threading.Lock()
_pool: _DaemonPool | None = None
_pool_lock = threading.Lock()


def enabled() -> bool:
    """Whether plans run: CUDA present, not the Triton interpreter, SPATIAL_MAMBA_COMPILE_AHEAD not 0."""
    return (os.environ.get("SPATIAL_MAMBA_COMPILE_AHEAD", "1") != "0" and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and torch.cuda.is_available())


def _add_mode(step: int) -> None:
    """A thread entering (+1) or leaving (-1) a plan's dry run or `tracing_launches`."""
    global _modes
    with _modes_lock:
        _modes += step


def planning() -> bool:
    """True inside a plan's dry run (on this thread)."""
    return getattr(_local, "device", None) is not None


def traced() -> bool:
    """True inside `tracing_launches()` (on this thread): the body of an op whose kernels a compiled graph
    launches itself (`torch.library.triton_op`)."""
    return getattr(_local, "traced", False)


class tracing_launches:
    """Context: every `launch` in it is recorded as `torch.library.wrap_triton(kernel)[grid](...)`, which a
    compiled graph turns into a launch of its own (with real tensors outside a trace it simply launches), no plan
    runs (the graph compiles its kernels), and `tuning.pick_config` times nothing (a trace has no data to time).
    The body of a `triton_op` runs in it."""

    def __enter__(self):
        memoize_write_analysis()
        self._outer = traced()
        _local.traced = True
        _add_mode(1)
        return self

    def __exit__(self, *exc):
        _local.traced = self._outer
        _add_mode(-1)


def untraceable(*values) -> bool:
    """Whether a `triton_op` body met with these arguments cannot trace its launches and must compute otherwise:
    symbolic sizes or strides (dynamic shapes: launch grids are Python arithmetic on the sizes), or fake tensors
    under the Triton interpreter (which would launch the kernels on them for real)."""
    from torch._subclasses.fake_tensor import is_fake

    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and any(is_fake(t) for t in tensors):
        return True
    sizes = [s for t in tensors for s in (*t.shape, *t.stride())]
    sizes += [v for v in values if not isinstance(v, torch.Tensor)]
    return any(isinstance(s, torch.SymInt) for s in sizes)


# ----------------------------------------------------------------------------------------------------
# Which tensors a launched kernel writes: inductor's analysis, once per kernel variant
#
# A compiled graph that launches a kernel itself (`torch.library.wrap_triton`) must know which of its tensors the
# kernel writes: torch builds the kernel's Triton IR (the Triton front end, 0.01-0.6 s for this package's kernels
# on a 2-core CPU) and follows every store's address back to the arguments. It does so at every launch of the
# graph, and more than once per launch (functionalization, inductor's IR node, its graph lowering): the fused op's
# forward+backward launches analysed twice each in an AOT trace alone, 2.4 s on that CPU, for each of T's 18
# blocks, though the blocks of a stage launch the same variants. The answer depends only on the kernel, its
# constexprs and integer arguments, which arguments are tensors and their dtypes, so for this package's kernels
# it is kept per such key (names of arguments, no tensors, are what it holds). Other kernels, and any launch
# whose arguments are not plain tensors, IR tensors or scalars (symbolic sizes), go to torch's analysis as before.

_PACKAGE = __name__.rpartition(".")[0]
_ANALYSES = ("identify_accessed_tensors", "identify_mutated_tensors")  # torch >= 2.12, torch 2.11


def _ours(kernel) -> bool:
    module = getattr(getattr(kernel, "fn", None), "__module__", None) or ""
    return module == _PACKAGE or module.startswith(_PACKAGE + ".")


def _analysis_key(kernel, kwargs: dict, tma) -> tuple | None:
    """The memo's key for one analysis, or None where an argument is of a kind the key does not cover. torch hands
    a launch with options (num_warps, num_stages) over as a new one-config `Autotuner` each time, which it analyses
    as its jit function with the config's arguments: so is it keyed."""
    configs = getattr(kernel, "configs", None)
    if configs is not None and hasattr(kernel, "fn"):
        kwargs = {**kwargs, **(configs[0].kwargs if configs else {})}
        kernel = kernel.fn
    if not _ours(kernel):
        return None
    parts = []
    for name, v in sorted(kwargs.items()):
        if isinstance(v, torch.Tensor):
            parts.append((name, "tensor", v.dtype))
        elif type(v).__name__ == "TensorBox":  # inductor's IR tensors
            parts.append((name, "TensorBox", v.get_dtype()))
        elif v is None or isinstance(v, (bool, int, float, str, torch.dtype)):
            parts.append((name, type(v).__name__, v))
        else:
            return None
    return (kernel, tuple(parts), repr(sorted(dict(tma or {}).items(), key=repr)))


def memoize_write_analysis() -> None:
    """Keep torch's analysis of which tensors a launched kernel writes once per variant of this package's kernels
    (see above). Idempotent; where this torch has neither analysis function, it does nothing."""
    try:
        from torch._higher_order_ops import triton_kernel_wrap as wrap
    except ImportError:
        return
    for name in _ANALYSES:
        analyse = getattr(wrap, name, None)
        if analyse is None or getattr(analyse, "_spatial_mamba_memo", False):
            continue
        setattr(wrap, name, _memoized(analyse))


def _memoized(analyse):
    import copy
    import functools

    known: dict = {}

    @functools.wraps(analyse)
    def memo(kernel, kwargs, tma_descriptor_metadata, *args, **kw):
        key = None if args or kw else _analysis_key(kernel, kwargs, tma_descriptor_metadata)
        if key is None:
            return analyse(kernel, kwargs, tma_descriptor_metadata, *args, **kw)
        if key not in known:
            known[key] = analyse(kernel, kwargs, tma_descriptor_metadata)
        return copy.deepcopy(known[key])  # callers get their own sets, as from the analysis itself

    memo._spatial_mamba_memo = True
    return memo


def real_device(device: torch.device) -> torch.device:
    """The device a dry run's meta tensors stand for (`device` itself outside a plan)."""
    return _local.device if device.type == "meta" and planning() else device


def meta_like(t: torch.Tensor | None) -> torch.Tensor | None:
    """A meta tensor of t's shape, strides and dtype (None for None): what a dry run launches with. Its address
    (a meta tensor's is its byte offset) is t's modulo 16, since Triton specialises on 16-byte alignment: a
    half of a projection that starts one element in (the model's C) must be planned as unaligned."""
    if t is None:
        return None
    base = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    offset = t.data_ptr() % 16 // t.element_size()
    if offset == 0:
        return base
    size = base.untyped_storage().nbytes() // t.element_size()
    return torch.empty(size + offset, dtype=t.dtype, device="meta").as_strided(t.shape, t.stride(), offset)


def plan(key: Hashable, device: torch.device, dry_run: Callable[[], object]) -> None:
    """Once per `key` in this process: run `dry_run` with every `launch` in it compiling its variant in the
    background instead (see the module docstring). `device` is the real device the dry run stands for. Does
    nothing when disabled, inside another plan, or for a key already planned. An exception in the dry run only
    ends the plan early (the real launches compile what is missing)."""
    if key in _planned or planning() or traced() or not enabled():
        return
    _planned.add(key)
    _local.device = device
    _add_mode(1)
    try:
        dry_run()
    except Exception:  # noqa: BLE001 - a head start, never a new failure: the real call reports real errors
        pass
    finally:
        _local.device = None
        _add_mode(-1)


class _DaemonPool:
    """A few daemon threads running submitted calls in order. Not `concurrent.futures.ThreadPoolExecutor`, whose
    threads the interpreter joins at exit after running everything still queued: a process that ran one
    inference forward and exits would wait for the backward's compiles it never needed. At exit (`close`, an
    `atexit` hook) the queued calls are cancelled and the ones running are waited for, up to `EXIT_WAIT_S`: a
    daemon thread still inside Triton's compiler when the interpreter finalises is stopped by a forced unwind
    through C++ frames, which aborted finished runs on an H100 ("terminate called after throwing an instance
    of ..., FATAL: exception not rethrown", then SIGABRT) — and a sweep would read that as a failed run."""

    EXIT_WAIT_S = 60.0

    def __init__(self, workers: int):
        import atexit

        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._running = 0
        self._closing = False
        for i in range(workers):
            threading.Thread(target=self._work, name=f"triton-ahead_{i}", daemon=True).start()
        atexit.register(self.close)

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def _work(self) -> None:
        while not self._closing:
            future, fn, args = self._queue.get()
            with self._idle:
                if self._closing:
                    future.cancel()
                if not future.set_running_or_notify_cancel():
                    continue
                self._running += 1
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits (`wait` drops it)
                future.set_exception(e)
            finally:
                with self._idle:
                    self._running -= 1
                    self._idle.notify_all()

    def close(self) -> None:
        """Cancel the queued calls, wait for the running ones (up to `EXIT_WAIT_S`); the threads then stop."""
        with self._idle:
            self._closing = True
        while True:
            try:
                future, _, _ = self._queue.get_nowait()
            except queue.Empty:
                break
            future.cancel()
        with self._idle:
            self._idle.wait_for(lambda: self._running == 0, timeout=self.EXIT_WAIT_S)


def _executor() -> _DaemonPool:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = _DaemonPool(max(1, min(8, os.cpu_count() or 1)))
        return _pool


def _compile(kernel, device: torch.device, args: tuple, kwargs: dict) -> None:
    if device.type == "cuda":  # Triton compiles for (and caches under) the thread's current device
        with torch.cuda.device(device):
            kernel.warmup(*args, grid=(1,), **kwargs)
    else:
        kernel.warmup(*args, grid=(1,), **kwargs)


def _submit(kernel, args: tuple, kwargs: dict) -> None:
    future = _executor().submit(_compile, kernel, _local.device, args, kwargs)
    _pending.setdefault(kernel, []).append(future)


# ----------------------------------------------------------------------------------------------------
# Launches: without Triton's per-call bookkeeping. `kernel[grid](*args)` binds the arguments, works out their
# specialisation (dtype and 16-byte alignment of every pointer; value 1, divisibility by 16 and width of every
# integer), builds the cache key with its options, checks the kernel's globals, builds launch metadata and calls
# the (empty) launch hooks, and only then calls the compiled launcher: with about 250 launches per training step
# of T this bookkeeping is a measurable share of eager training, which is bound by the host. The first launch of
# each variant goes through Triton and its compiled kernel is kept under a key at least as fine as Triton's own
# (the kernel, the current device, the keyword arguments, and per positional argument its dtype and alignment or
# its integer class); later launches with that key call the compiled launcher directly. Whenever a launch hook
# is installed (Triton's profilers) or a key cannot be built, the launch goes through Triton.
# SPATIAL_MAMBA_FAST_LAUNCH=0 turns this off.
#
# Building that key was still a third of a direct launch's host time (an eager T step makes 594 launches; on an
# H200 machine's host all of them took 17.8 ms: 5.8 ms the keys, 7.9 ms the compiled launchers). So each kernel
# also gets a key function of its own (`_key_function`), generated from the kind of each positional argument at
# its first direct launch: one flat tuple of the same facts, built by straight-line code instead of a call per
# argument. Every non-tensor argument's type is part of that key, and a tensor's dtype is read from the argument
# itself, so arguments of other kinds than the first launch's never match a variant kept under it (their key
# fails to build or differs) and take the general path.

_compiled: dict[tuple, tuple] = {}  # key -> (compiled kernel, values of the later parameters, the kernel)
# kernel -> (its key function, {that function's key -> (launcher, its leading arguments, function, later
# parameters' values)}, the argument kinds it was made for)
_direct: dict[object, tuple[Callable, dict, tuple]] = {}
_fast: list = []  # [device getter, stream getter, launch-hook chains] once resolved, [None] where unavailable


def _resolve_fast() -> list:
    if not _fast:
        entry: list = [None]
        if os.environ.get("SPATIAL_MAMBA_FAST_LAUNCH", "1") != "0" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            try:
                from triton import knobs
                from triton.runtime import driver

                hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
                if all(hasattr(h, "calls") or h is None for h in hooks):
                    # the current device straight from torch's C++ (`torch.cuda.current_device()`, Triton's
                    # getter, checks its lazy initialisation first: 2.8 µs of host time per call on an H100 VM
                    # against a fraction of that); CUDA is initialised by then, a launch went through Triton
                    get_device = getattr(torch._C, "_cuda_getDevice", None) or driver.active.get_current_device
                    entry = [get_device, driver.active.get_current_stream, knobs.runtime]
            except Exception:  # noqa: BLE001 - an older or different Triton: every launch goes through it
                pass
        _fast[:] = entry
    return _fast


def _hooked(runtime) -> bool:
    """Whether a launch hook is installed (Triton's profilers add them): then the full path runs them."""
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    return bool((enter is not None and getattr(enter, "calls", True))
                or (leave is not None and getattr(leave, "calls", True)))


def arg_key(a) -> object:
    """What of one positional argument can select a different compiled variant: a tensor's dtype and whether its
    address is 16-byte aligned; an integer's being 1, divisible by 16 and 32-bit or wider; a float's type; any
    other value (bool, None) itself."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    kind = type(a)
    if kind is int:
        return a == 1, a % 16 == 0, -2147483648 <= a <= 2147483647, a >= 9223372036854775808  # 2**63
    if kind is float:
        return float
    return kind, a


def _tail(kernel, n_args: int, kwargs: dict) -> tuple | None:
    """The values of the kernel's parameters after the first `n_args` (keywords or defaults), or None where the
    launch must not be cached: no parameter list, or a constexpr among the positional arguments (`arg_key` keys
    an integer by its class, and a constexpr's every value is a variant of its own)."""
    params = getattr(kernel, "params", None)
    if params is None or any(getattr(param, "is_constexpr", False) for param in params[:n_args]):
        return None
    tail = []
    for param in params[n_args:]:
        if param.name in kwargs:
            tail.append(kwargs[param.name])
        elif getattr(param, "default", inspect.Parameter.empty) is not inspect.Parameter.empty:
            tail.append(param.default)
        else:
            return None
    return tuple(tail)


def _key_function(args: tuple) -> Callable:
    """A function (device, args, kwargs) -> key for launches whose positional arguments are of the kinds of
    `args`: per argument what `arg_key` keys, flattened, plus the type of every argument that is not a tensor.
    Arguments of other kinds make it raise or give a key no variant was kept under."""
    parts = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            parts.append(f"a{i}.dtype, a{i}.data_ptr() % 16 == 0")
        elif type(a) is int:
            parts.append(f"type(a{i}), a{i} == 1, a{i} % 16 == 0, -2147483648 <= a{i} <= 2147483647, "
                         f"a{i} >= 9223372036854775808")
        elif type(a) is float:
            parts.append(f"type(a{i})")
        else:
            parts.append(f"type(a{i}), a{i}")
    names = "".join(f"a{i}, " for i in range(len(args)))
    src = (f"def key(device, args, kwargs):\n    ({names}) = args\n"
           f"    return (device, *kwargs.items(), {', '.join(parts)})\n")
    scope: dict = {}
    exec(src, scope)  # noqa: S102 - generated from argument kinds only, never from argument values
    return scope["key"]


def _kinds(args: tuple) -> tuple:
    """Each argument's kind as `_key_function` tells them apart: a tensor, or its type."""
    return tuple(torch.Tensor if isinstance(a, torch.Tensor) else type(a) for a in args)


def _keep_direct(kernel, device, args: tuple, kwargs: dict, compiled, tail: tuple) -> None:
    """File a variant launched directly under the kernel's own key function too (made at its first variant),
    if its arguments are of that function's kinds (else the key could hold, and keep alive, a tensor)."""
    if kernel not in _direct:
        _direct[kernel] = (_key_function(args), {}, _kinds(args))
    key_of, variants, kinds = _direct[kernel]
    if _kinds(args) != kinds:
        return
    try:
        variants[key_of(device, args, kwargs)] = (*_launcher(compiled), compiled.function, tail)
    except Exception:  # noqa: BLE001 - a key that cannot be built: the general path
        pass


def _launcher(compiled) -> tuple[Callable, tuple]:
    """(launcher, its arguments between (grid, stream, function) and the kernel's) for a direct launch of
    `compiled`. Its launcher object (`compiled.run`) takes (metadata, launch metadata, enter hook, exit hook);
    Triton 3.6's CUDA launcher object only allocates scratch memory where a kernel asks for some and passes them on
    to its C function with the kernel's cooperative-grid and PDL flags. Where that is all it would do (3.6, no
    scratch memory) the C function is called itself: one Python frame less per launch (an eager T step launches
    594 times). Any other Triton, launcher or kernel gets the launcher object."""
    run, metadata = compiled.run, compiled.packed_metadata
    if (_C_LAUNCH and type(run).__name__ == "CudaLauncher" and getattr(run, "global_scratch_size", 1) == 0
            and getattr(run, "profile_scratch_size", 1) == 0 and callable(getattr(run, "launch", None))):
        return run.launch, (run.launch_cooperative_grid, run.launch_pdl, None, None, metadata, None, None, None)
    return run, (metadata, None, None, None)


def _c_launch_known() -> bool:
    """Whether the installed Triton's CUDA launcher object is 3.6's (whose call `_launcher` may skip)."""
    try:
        import triton
    except ImportError:
        return False
    return triton.__version__.startswith("3.6.")


_C_LAUNCH = os.environ.get("SPATIAL_MAMBA_C_LAUNCH", "1") != "0" and _c_launch_known()


def _launch_now(kernel, grid, args: tuple, kwargs: dict) -> None:
    fast = _fast or _resolve_fast()
    if fast[0] is None:
        kernel[grid](*args, **kwargs)
        return
    get_device, get_stream, runtime = fast
    device = get_device()
    hooked = _hooked(runtime)
    direct = _direct.get(kernel)
    if direct is not None and not hooked and type(grid) is tuple:
        try:
            entry = direct[1].get(direct[0](device, args, kwargs))
        except Exception:  # noqa: BLE001 - arguments of other kinds than the key function's: the general path
            entry = None
        if entry is not None:
            run, head, function, tail = entry
            n = len(grid)
            run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, get_stream(device), function, *head, *args,
                *tail)
            return
    try:  # id(kernel): the entry keeps the kernel alive, so its id is never reused
        key = (id(kernel), device, *kwargs.items(), *map(arg_key, args))
        entry = _compiled.get(key)
    except TypeError:  # an unhashable argument: Triton decides
        key = entry = None
    if entry is not None and type(grid) is tuple and not hooked:
        compiled, tail, _ = entry
        _keep_direct(kernel, device, args, kwargs, compiled, tail)
        n = len(grid)
        compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, get_stream(device),
                     compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)
        return
    compiled = kernel[grid](*args, **kwargs)
    if key is not None and all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
        tail = _tail(kernel, len(args), kwargs)
        if tail is not None:
            _compiled[key] = (compiled, tail, kernel)
            _keep_direct(kernel, device, args, kwargs, compiled, tail)


def wait(kernel) -> None:
    """Block until the background compiles of `kernel` submitted so far have finished (their errors dropped)."""
    for future in _pending.pop(kernel, ()):
        try:
            future.result()
        except Exception:  # noqa: BLE001 - the launch that follows compiles again and raises the real error
            pass


def launch(kernel, grid, *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`; inside a plan, that variant's compile submitted instead (nothing runs)."""
    if _modes:
        if getattr(_local, "device", None) is not None:
            _submit(kernel, args, kwargs)
            return
        if getattr(_local, "traced", False):
            from torch.library import wrap_triton

            wrap_triton(kernel)[grid](*args, **kwargs)
            return
    if _pending and kernel in _pending:
        wait(kernel)
    _launch_now(kernel, grid, args, kwargs)


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉, for launch grids on the host. Not `triton.cdiv`: newer Triton makes that a `constexpr_function`
    (usable inside kernels too), whose every call costs the host ~1.4 µs (Triton 3.8, a 2-core CPU) against a few
    nanoseconds here — and the fused op's forward + backward computed about ten grids per call."""
    return -(-a // b)


def wait_all() -> None:
    """Block until every background compile submitted so far has finished (benchmarks: nothing timed while
    compiles share the host)."""
    for kernel in list(_pending):
        wait(kernel)


def reset() -> None:
    """Forget the planned keys and wait for every pending compile (tests)."""
    wait_all()
    _planned.clear()


__all__ = ["arg_key", "cdiv", "enabled", "launch", "meta_like", "plan", "planning", "real_device", "reset", "traced",
           "tracing_launches", "wait", "wait_all"]
