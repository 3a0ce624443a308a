"""`torch.compile` of a backbone for training, with the activation memory budget of its training graph.

When a module is compiled for training, AOTAutograd's partitioner decides which forward activations the backward
keeps and which it recomputes. By default it keeps nearly every activation a hand-written backward would, so a
compiled Spatial-Mamba-T saves about as much as eager does. Its memory-budget mode
(`torch._functorch.config.activation_memory_budget`, a fraction in (0, 1]: 1 = that default, smaller = save
less) chooses instead, by a knapsack over the graph's estimated costs, the cheapest set of ops to recompute in
the backward so that the saved activations shrink towards the budget: the pointwise ops between the matmuls
(norms, SiLU/GELU, the gate, the bf16 weight copies) and, for Spatial-Mamba, the fused SSM op's forward.

Measured for T (bf16, batch 128, 224², whole-graph compile, `benchmarks/throughput.py --memory-budget`, one
H200, fresh processes): budget 1.0 peaked at 12.9 GB and trained at 1545 img/s, 0.8 at 9.0 GB and 1607 img/s,
0.5 at 6.8 GB and 1448 img/s. 0.8 is the default of the LightningModules' `compile_memory_budget`.

The setting is process-wide and read when a graph is compiled (at the first call of a compiled module), so it
is set here, before that call; every module compiled afterwards in the process gets the same budget.

Regional compilation (`compile_regional`) compiles each block on its own; the blocks of a stage share one graph
(their drop-path rates are graph inputs), so T needs 4 block graphs instead of one graph of 18 blocks. On an
H100 (fresh caches, `benchmarks/cold_start.py`) its first step took 81.7 s against 119.0 s for the whole graph.
It used to train slower (1027-1151 img/s against 1351-1483), until its block graphs were compiled without
inductor's layout optimisation (`SpatialMamba.block_compile_kwargs` says why): replayed as CUDA graphs, regional
T then trained at 1724-1748 img/s against 1643 for the whole graph so replayed (H100, batch 128, bf16). Without
CUDA graphs its ~36 graph calls per step leave it bound by the host. The whole graph stays the default of
`compile`; the three knobs together (regional, parallel, cudagraphs) are the fastest. Its graphs compile one
after another, as the forward and then the backward reach each stage; with `parallel=True`
(`ParallelRegionalCompile`) worker processes compile the stages' graphs at once before the first step, and the
parent finds them in the on-disk caches: the first step ended 45-53 s after the compile call instead of 83.4 s
(H100s, fresh caches; 29.7-37.8 s where torch's bytecode was compiled, so that the workers import it fast).

Under DistributedDataParallel, dynamo by default splits a compiled graph at the boundaries of DDP's gradient
buckets (`torch._dynamo.config.optimize_ddp`, its "DDPOptimizer"), so that each bucket's all-reduce can start
while the backward of the earlier layers still runs. For T that is 5 graphs instead of one (shown on the CPU:
graphs of 1053, 573, 211, 208 and 6 nodes under a 1-process DDP), each partitioned and fused on its own. The
gradients of T are 28 M numbers, whose all-reduce over NVLink takes about a millisecond of a ~90 ms step, so
`ddp_split=False` (the LightningModules' default, `compile_ddp_split`) keeps one graph and lets DDP reduce after
the backward; True restores torch's split, for slow interconnects where the overlap matters.

Compiled, T is still bound by the host on a GPU machine with a slow CPU: on an H100 VM whose host took
85 ms to issue one compiled training step (batch 128; `benchmarks/profile_step.py`: the compiled graphs' Python
wrappers, ~1,500 kernel launches, and the fused SSM op's custom-op dispatch and Triton launches, ~16 ms), the
kernels of that step took 70 ms. `cudagraphs=True` (`compile_cudagraphs` in the LightningModules;
`torch.compile(mode="reduce-overhead")`, CUDA graph trees) records each compiled graph once and replays it
with one launch: the same process trained at 1647 img/s against 1403 without (`benchmarks/throughput.py
--modes cudagraphs,compiled`). Its costs: a recording per new input shape (the last, smaller batch of an
epoch; each validation size), memory held in the graphs' private pool, and a graph's outputs are overwritten
by its next replay (fine for a training step, which consumes them before the next).

Compile artifacts in a file (`CompileCache`, the LightningModules' `compile_cache`): torch's portable cache
(`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`) holds what inductor produced — the compiled
graphs, AOTAutograd's forward/backward split, the Triton binaries of its kernels, its autotuning results — as one
blob. The first run writes it next to the experiment; a later process that loads it before its first compile
(another machine of the same GPU type, torch and Triton versions, a restart, the next ablation) finds its
graphs in the cache and skips partitioning, inductor's scheduling and code generation and the kernels' compiles.
Dynamo still traces the model. Entries are keyed by the graph, the versions and the device, so a file from
another setup is harmless: it misses and is extended.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import time
import warnings
from pathlib import Path

import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

DEFAULT_MEMORY_BUDGET = 0.8


def set_memory_budget(budget: float, key: str = "compile_memory_budget") -> None:
    """Set the activation memory budget of graphs compiled from now on in this process; `key` names the
    setting in the error for a value outside (0, 1]."""
    from torch._functorch import config as functorch_config

    from src.checks import require

    require(not isinstance(budget, bool) and isinstance(budget, (int, float)) and 0 < budget <= 1, key,
            "a number in (0, 1] (1: save what the partitioner saves by default; smaller: recompute more)", budget)
    functorch_config.activation_memory_budget = float(budget)


def compile_for_training(*modules: nn.Module | None, memory_budget: float = DEFAULT_MEMORY_BUDGET,
                         regional: bool = False, ddp_split: bool = False, cudagraphs: bool = False,
                         accumulate_grad_batches: int = 1, key: str = "compile_memory_budget",
                         parallel: bool = False) -> None:
    """`module.compile()` (in place: parameter names and checkpoint keys unchanged) of each module given (None
    entries are skipped), with `memory_budget` set first (see the module docstring). `regional`: the module's
    own regional compilation (`SpatialMamba.compile(regional=True)`: one graph per stage shape, shared by the
    blocks of the stage) instead of one whole graph; a module without it is refused. `ddp_split`: under DDP,
    split the graphs at DDP's bucket boundaries (torch's default) instead of keeping them whole (see the module
    docstring; process-wide, like the budget). `cudagraphs`: replay the compiled graphs as CUDA graphs
    (`torch.compile(mode="reduce-overhead")`, see the module docstring); refused with gradient accumulation
    (`accumulate_grad_batches` > 1: the trainer's setting), which CUDA graph trees do not support: the first
    micro-batch's gradients become the parameters' `.grad` while still living in the graph's output buffers,
    and the next replay overwrites them (wrong gradients or an error, depending on the version:
    https://github.com/pytorch/pytorch/issues/169545). `parallel` (with `regional`): the stages' block graphs
    compile in worker processes at once before the module first runs at a new input shape
    (`ParallelRegionalCompile`)."""
    import torch._dynamo

    if cudagraphs and accumulate_grad_batches > 1:
        from src.errors import UserError

        raise UserError(f"compile_cudagraphs: CUDA graphs do not support gradient accumulation (trainer."
                        f"accumulate_grad_batches={accumulate_grad_batches}): each replay of the backward graph "
                        "overwrites the gradients the previous micro-batch left in .grad. Set "
                        "model.init_args.compile_cudagraphs false (plain compile) or trainer.accumulate_grad_batches 1")

    if parallel and not regional:
        from src.errors import UserError

        raise UserError("compile_parallel compiles the stages' graphs of regional compilation in parallel processes; "
                        "set model.init_args.compile_regional true as well, or compile_parallel false")
    set_memory_budget(memory_budget, key)
    torch._dynamo.config.optimize_ddp = bool(ddp_split)
    kwargs = {"mode": "reduce-overhead"} if cudagraphs else {}
    for module in modules:
        if module is None:
            continue
        if not regional:
            module.compile(**kwargs)
            continue
        if "regional" not in inspect.signature(module.compile).parameters:
            from src.errors import UserError

            raise UserError(f"compile_regional: {type(module).__name__} has no regional compilation (a Spatial-Mamba "
                            "backbone has); set compile_regional to false")
        module.compile(regional=True, **kwargs)
        if parallel and getattr(module, "grad_checkpointing", False):
            warnings.warn("compile_parallel: the blocks run under gradient checkpointing, whose graphs differ from "
                          "those a worker would compile; they compile in this process", stacklevel=2)
        elif parallel and hasattr(module, "stage_blocks"):
            # one worker per stage, started now: they warm up while the caller prepares its first step
            workers = len(module.stage_blocks((1, module.in_chans, 32, 32)))
            module.register_forward_pre_hook(ParallelRegionalCompile(module.block_compile_kwargs(**kwargs),
                                                                     workers=workers))


def _artifact_count(info) -> int:
    return sum(len(v) for v in getattr(info, "artifacts", {}).values()) if info is not None else 0


class CompileCache:
    """torch.compile's cache artifacts in one file (module docstring): `load()` before the first compile,
    `save()` after new graphs were compiled (the first training step, each validation). A save writes only when
    the process holds more artifacts than the file had (they include what was loaded), atomically (as checkpoints
    are, `src.checkpoints.write_atomically`), so a crash mid-save keeps the previous file."""

    def __init__(self, path: str | os.PathLike, key: str = "compile_cache"):
        from src.errors import NotWritableError

        self.path, self.known = Path(path).expanduser(), 0
        existing = self.path.parent.absolute()
        while not existing.exists():  # the nearest part that exists must be a folder we can write in
            existing = existing.parent
        if self.path.is_dir() or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise NotWritableError(f"{key}: cannot write compile artifacts to {os.fspath(path)!r} (expected a file "
                                   f"path in a writable folder; {str(existing)!r} is not one)")

    def load(self) -> int:
        """Load the file's artifacts into this process's caches; returns their number (0: no file, or one that
        could not be read, which is then rewritten at the next save: a warning says so)."""
        import torch

        if not self.path.is_file():
            return 0
        try:
            # torch returns None (and logs why) for bytes it cannot read, e.g. a file cut short or of another format
            info, why = torch.compiler.load_cache_artifacts(self.path.read_bytes()), "torch could not read it"
        except Exception as e:  # a cache is never worth a crash: compile from scratch instead
            info, why = None, f"{type(e).__name__}: {e}"
        if info is None:
            warnings.warn(f"compile cache {str(self.path)!r} could not be loaded ({why}); compiling from scratch, "
                          "the file will be rewritten", stacklevel=2)
            return 0
        self.known = _artifact_count(info)
        return self.known

    def save(self) -> int | None:
        """Write the process's artifacts if there are more than the file holds; returns their number, or None
        when nothing was written."""
        import torch

        saved = torch.compiler.save_cache_artifacts()
        count = _artifact_count(saved[1]) if saved is not None else 0
        if count <= self.known:
            return None
        from src.checkpoints import write_atomically  # the checkpoints' own atomic write (makes the folder too)

        write_atomically(self.path, lambda f: f.write(saved[0]))
        self.known = count
        return count


def open_compile_cache(path: str | os.PathLike, key: str = "model.init_args.compile_cache") -> CompileCache:
    """A LightningModule's `compile_cache` at setup: the file checked, its artifacts loaded (before the compile),
    one line printed by rank 0."""
    cache = CompileCache(path, key=key)
    loaded = cache.load()
    rank_zero_info(f"compile cache {os.fspath(path)}: " + (f"{loaded} artifacts loaded" if loaded else
                   "no artifacts yet (written after the first training step)"))
    return cache


class CompileCacheWriter(Callback):
    """Writes the module's `_compile_cache` (a `CompileCache`, set in its setup when compiling; None: nothing to
    do), from rank 0, after the first training step (the training graphs exist) and at the end of every
    validation (the evaluation graphs, at the first; later ones add nothing and write nothing)."""

    def __init__(self):
        self._after_first_step = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._after_first_step:
            self._after_first_step = True
            self._save(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module)

    @staticmethod
    def _save(trainer, pl_module) -> None:
        cache = getattr(pl_module, "_compile_cache", None)
        if cache is None or not trainer.is_global_zero:
            return
        count = cache.save()
        if count:
            rank_zero_info(f"compile cache {cache.path}: {count} artifacts written")


# ----------------------------------------------------------------------------------------------------
# regional compilation, its graphs compiled in parallel processes


WORKER_TIMEOUT_S = 1800.0  # a worker that has not finished by then is stopped (the parent compiles its graphs)


class ParallelRegionalCompile:
    """Forward pre-hook of a regionally compiled backbone (one that has `stage_blocks`) that compiles its
    stages' block graphs in parallel, one worker process per stage, before the backbone first runs at a new
    input signature (image batch shape, device, training and grad mode, autocast dtype).

    Regional compilation compiles a graph per stage shape, and the parent compiles them one after another as
    the forward and then the backward reach each stage (on an H100 T's 8 graphs, 4 stages × forward and
    backward, took most of an 83-90 s first step; with this hook the step ended 45-53 s after the compile call,
    the workers' part 35-39 s). Here each worker gets a copy of its stage's first block, the
    parent's compiler configuration and compile arguments, and compiles and runs it on an input of the stage's
    shape, dtype and mode; its graphs land in the on-disk caches the parent shares (inductor's FX graph and
    AOTAutograd caches, Triton's kernels, autotuning results). The parent then traces its blocks and finds every
    graph in the caches. A worker that fails costs nothing but its time: the parent compiles what is missing,
    as without this hook (a warning says so). Workers take an equal share of the CPU cores for inductor's kernel
    compiles; they need a GPU context and the memory of one block's step each.

    `workers` > 0 makes sure that many worker processes (`src.compile_worker`) are started: they import torch, the
    compiler and the model's code, open a CUDA context on the current device (when the parent has one) and start
    inductor's compile pool while the parent goes on (data loaders, optimizer), which took them 10-17 s on 16-core
    H100 machines whose image ships torch without its bytecode (every fresh interpreter compiles torch's sources;
    the same imports took 2.7 s on a 2-core CPU machine where `pip install` wrote it). The workers belong to the
    process, not the hook: one that finished a job waits for the next (a fit's sanity check, training, teacher and
    validation shapes; the EMA copy's hook uses the same workers) and ends after `src.compile_worker.IDLE_S` without
    one, at `release_compile_workers()` or when the parent exits. While the workers compile, the parent runs the
    backbone once eagerly without gradients (`_eager_pass`): its share of the first step's work (this project's
    Triton kernels, cuDNN's first calls) then overlaps theirs; the parent's part after the workers fell from 14 s to
    7 s."""

    def __init__(self, compile_kwargs: dict, workers: int = 0):
        self.compile_kwargs = compile_kwargs
        self.seen: set = set()
        self.seconds: list[float] = []  # wall time of each parallel compile (printed, and read by benchmarks)
        self.reports: list[list[dict]] = []  # each parallel compile's workers' timelines (src/compile_worker.py)
        self.meanwhile_s: list[float] = []  # the parent's own eager pass while the workers compile (`_eager_pass`)
        if workers > 0:
            _POOL.top_up(workers, _current_cuda_device())

    def __call__(self, module: nn.Module, args) -> None:
        import torch

        if not args or not isinstance(args[0], torch.Tensor) or args[0].ndim != 4 or torch.compiler.is_compiling():
            return
        x = args[0]
        device = x.device
        autocast_dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None)
        signature = (tuple(x.shape), x.dtype, str(device), module.training, torch.is_grad_enabled(), autocast_dtype)
        if signature in self.seen or x.shape[-1] % 32 or x.shape[-2] % 32:
            return
        self.seen.add(signature)
        jobs = [(self._block_copy(block), shape) for block, shape in module.stage_blocks(tuple(x.shape))]
        if jobs:
            self._run(jobs, autocast_dtype or x.dtype, str(device), module.training, torch.is_grad_enabled(),
                      autocast_dtype, lambda: _eager_pass(module, x))

    @staticmethod
    def _block_copy(block: nn.Module) -> nn.Module:
        """A copy of the block without its compiled wrapper, on the CPU (what a worker's job file holds)."""
        with _uncompiled(block):
            return copy.deepcopy(block).cpu()

    def _run(self, jobs, dtype, device: str, training: bool, grad: bool, autocast_dtype, meanwhile=None) -> None:
        import select

        import torch

        configs = {name: getattr(torch, name).config.save_config() for name in ("_inductor", "_functorch", "_dynamo")}
        index = torch.device(device).index if device.startswith("cuda") else None
        if device.startswith("cuda") and index is None:
            index = torch.cuda.current_device()
        procs = _POOL.take(len(jobs), index)
        mode = ("training" if training else "evaluation") + ("" if grad else ", no gradients")
        graphs = f"{len(jobs)} block graph" + ("s" if len(jobs) != 1 else "")
        rank_zero_info(f"compiling {graphs} ({mode}; stage inputs "
                       f"{', '.join(str(tuple(shape)) for _, shape in jobs)}) in parallel worker processes ...")
        start, origin = time.perf_counter(), time.time()
        failed, reports, sent = [], [], []
        for (block, shape), proc in zip(jobs, procs):
            job = _POOL.job_path()
            torch.save(dict(block=block, shape=shape, dtype=dtype, device=device, training=training, grad=grad,
                            autocast_dtype=autocast_dtype, compile_kwargs=self.compile_kwargs, configs=configs,
                            report=f"{job}.json"), job)
            try:
                proc.stdin.write(f"{job}\n")
                proc.stdin.flush()
                sent.append((proc, job))
            except OSError:  # it died while warming up: its log tells why
                failed.append(_last_line(proc.log) or f"exit code {proc.poll()}")
        if meanwhile is not None:
            meanwhile_start = time.perf_counter()
            meanwhile()
            self.meanwhile_s.append(time.perf_counter() - meanwhile_start)
        for proc, job in sent:
            left = max(0.0, WORKER_TIMEOUT_S - (time.perf_counter() - start))
            answer = proc.stdout.readline().strip() if select.select([proc.stdout], [], [], left)[0] else None
            if answer == "ok":
                _POOL.give_back(proc)  # serves the next input signature, of this hook or another
            else:
                proc.kill()
                proc.wait()
                failed.append(f"no result after {WORKER_TIMEOUT_S:.0f} s" if answer is None else
                              answer.removeprefix("failed: ") or _last_line(proc.log) or f"exit code {proc.poll()}")
            with contextlib.suppress(OSError, ValueError):
                report = json.loads(Path(f"{job}.json").read_text())
                times = dict(spawned=proc.spawned, **report.pop("times"))
                reports.append(dict(report, **{k: round(v - origin, 2) for k, v in times.items()}))
            for path in (job, Path(f"{job}.json")):
                path.unlink(missing_ok=True)
        if failed:  # a head start only: the parent compiles whatever is missing itself
            warnings.warn(f"compiling block graphs in parallel processes failed ({failed[0]}); they compile in this "
                          "process instead", stacklevel=2)
        self.seconds.append(time.perf_counter() - start)
        self.reports.append(reports)
        rank_zero_info(f"compiled {graphs} in parallel processes in {self.seconds[-1]:.1f} s")


def _eager_pass(module: nn.Module, x) -> None:
    """One forward of the module without its compiled regions and without gradients, leaving no trace (buffers
    restored, random state forked), run while the workers compile. It does the parent's first-call work that
    the compiled step would otherwise wait for: this project's Triton kernels compile, forward and backward
    variants (src/kernels/ahead.py plans both at an op's first call), the eager layers (stem, downsamples, head)
    make their first cuDNN and cuBLAS calls, CUDA loads its lazily loaded kernels. Without gradients its memory
    stays below a training step's; should it run out anyway, or fail otherwise (a warning then), it is left."""
    import torch

    if any(isinstance(m, nn.SyncBatchNorm) for m in module.modules()):
        return  # its training forward talks to the other ranks: not a pass to add on one rank's initiative
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        with _uncompiled(*module.modules()), torch.no_grad(), \
                torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            module.forward(x)
    except Exception as e:  # a head start only: the compiled step does this work itself
        if not isinstance(e, torch.OutOfMemoryError):
            warnings.warn(f"compile_parallel: the eager pass run while the workers compile failed ({type(e).__name__}: "
                          f"{e}); the first step does its work instead", stacklevel=2)
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.empty_cache()  # the pass's memory back: the CUDA graphs' pool cannot use it


@contextlib.contextmanager
def _uncompiled(*modules: nn.Module):
    """The modules' compiled wrappers (`nn.Module.compile`) set aside inside the block: calls run their eager
    code, and a deep copy holds none."""
    compiled = [(m, m.__dict__["_compiled_call_impl"]) for m in modules
                if m.__dict__.get("_compiled_call_impl") is not None]
    for m, _ in compiled:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, impl in compiled:
            m._compiled_call_impl = impl


def _last_line(path: Path) -> str:
    """The last non-empty line of a worker's log ('' when none)."""
    with contextlib.suppress(OSError):
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1].strip() if lines else ""
    return ""


def _current_cuda_device() -> int | None:
    """The parent's CUDA device when it has opened a context (a worker then opens its own there ahead of
    need), else None."""
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


class _WorkerPool:
    """The process's compile workers (src/compile_worker.py) that wait for a job, shared by its hooks (a model
    and its EMA copy compile the same blocks: one set of workers serves both), their logs and job files in one
    temporary folder."""

    def __init__(self):
        self.idle: list = []
        self._folder = None
        self._count = 0

    def _path(self, name: str) -> Path:
        import tempfile

        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="spatial-mamba-compile-")
        self._count += 1
        return Path(self._folder.name, f"{name}{self._count}")

    def job_path(self) -> Path:
        return self._path("job").with_suffix(".pt")

    def _alive(self, device: int | None) -> list:
        """The idle workers that can serve `device`: those with its context, then those without any yet."""
        self.idle[:] = [proc for proc in self.idle if proc.poll() is None]  # idle ones end after a while
        return ([proc for proc in self.idle if proc.device == device] +
                [proc for proc in self.idle if proc.device is None and device is not None])

    def top_up(self, n: int, device: int | None) -> None:
        """Start workers until `n` are idle for `device` (a CUDA index, None: CPU or no context yet)."""
        for _ in range(n - len([proc for proc in self._alive(device) if proc.device == device])):
            self.idle.append(self._spawn(_threads(n), device))

    def take(self, n: int, device: int | None) -> list:
        """`n` workers for `device`: idle ones first, then new ones (the caller gives back those that
        succeed, `give_back`)."""
        procs = self._alive(device)[:n]
        for proc in procs:
            self.idle.remove(proc)
            proc.device = device  # its job opens its context there
        return procs + [self._spawn(_threads(n), device) for _ in range(n - len(procs))]

    def give_back(self, proc) -> None:
        """A worker that finished its job, idle again (it ends by itself after `src.compile_worker.IDLE_S`)."""
        self.idle.append(proc)

    def _spawn(self, threads: int, device: int | None):
        """A worker process, warming up; `.spawned` its start time, `.log` its stderr's file (read when it
        fails), `.device` its CUDA device. A fresh interpreter, not one of multiprocessing's spawned workers: the
        compiled graphs' cache keys hash pickled tensor metadata, and in multiprocessing's workers those bytes
        differed from the parent's (no cache hits)."""
        import subprocess
        import sys

        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        code = "from src.compile_worker import main; raise SystemExit(main())"
        log = self._path("worker").with_suffix(".log")
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(dict(threads=threads, device=device))],
                                    env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                    bufsize=1)
        proc.spawned, proc.log, proc.device = time.time(), log, device
        return proc

    def release(self) -> None:
        """End the idle workers (an empty stdin tells them there is no job)."""
        for proc in self.idle:
            with contextlib.suppress(OSError):
                proc.stdin.close()
                proc.stdout.close()
        self.idle.clear()


def _threads(workers: int) -> int:
    """Inductor's kernel-compile processes per worker: an equal share of the cores."""
    return max(1, (os.cpu_count() or 1) // workers)


_POOL = _WorkerPool()


def release_compile_workers() -> None:
    """End this process's idle compile workers now (they end by themselves after `src.compile_worker.IDLE_S`
    without a job, and when the process exits): their CUDA contexts' memory comes back."""
    _POOL.release()
