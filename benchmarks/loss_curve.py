"""Does the fast path train like the reference? A training-equivalence check of kernel backends in two parts.

1. Gradients along a reference trajectory. The reference backend trains `--steps` steps; at every checkpoint
   step its weights are loaded into each checked backend, which runs one forward + backward on the batch of
   that step, in fp32 and under bf16 autocast. Loss and every parameter gradient are compared with the
   reference's from the same weights and batch (rules below).
2. Seed spread. Reference and checked backends each train `--seeds` runs (the seed sets initialisation and
   batch order); the mean final loss of each backend must lie within the seed spread of the reference.

    python benchmarks/loss_curve.py --model t --size 64 --batch 32 --steps 200              # on a GPU
    TRITON_INTERPRET=1 python benchmarks/loss_curve.py --model digits --size 32 --batch 8 --steps 4 \\
        --checkpoints 0,2,4 --seeds 2 --backends fused                                     # CPU smoke test
    python benchmarks/loss_curve.py ... --save-failing ckpts/                      # keep what fails, then
    TRITON_INTERPRET=1 python benchmarks/loss_curve.py --replay ckpts/t-64px-step50.pt --precisions fp32
                                             # the same weights and batch again, here on the CPU's interpreter

Why not compare two loss curves side by side, as this script once did: AdamW's first updates are sign-like,
so every parameter whose gradient is rounding noise (a conv bias feeding a BatchNorm, say) moves by ±lr at
random, and two correct implementations part within a few steps; the curves then differ by whatever the
chaos of training makes of that, and a right kernel cannot be told from a wrong one. Comparing gradients
from identical weights removes the chaos; the seed spread then bounds what is left of training as a whole.

Rules, per parameter tensor g (its gradient; ‖·‖ the L2 norm in float64). The truth is a float64
forward + backward of the torch backend (the specification) from the same weights and batch.
  * fp32: ‖g − g_ref‖ / ‖g_ref‖ ≤ max(1e-4, k·e_ref), e_ref = ‖g_ref − g_truth‖ / ‖g_ref‖ being the
    reference's own fp32 error; the loss likewise. k·e_ref admits the ill-conditioned tensors that fp32
    itself cannot give to 1e-4 (up to a few 1e-3 on the T model at 64²); k is --k (4).
  * bf16 autocast, against the reference's fp32 gradient g32: ‖g − g32‖ / ‖g32‖ ≤ k·max(e16, median e16,
    1e-2), e16 being the reference's own bf16 error on that tensor and the median over all tensors; the
    loss: relative difference ≤ max(2e-2, k·the reference's own). k is --k-bf16 (8). The relative error
    sees direction and size; the lowest cosine is printed too. A fixed cosine bar (≥ 0.999) is no rule
    here: the reference's own bf16 gradients miss it on most tensors of the T model (cos 0.8-0.99 at
    initialisation), and one draw of its rounding error is too noisy to be a per-tensor yardstick on its
    own (3-element tensors, sums with heavy cancellation), hence the median floor.
  * A tensor whose truth norm is ≤ 1e-12 of the whole truth gradient's is zero in exact arithmetic (a bias
    before a train-mode BatchNorm; A_log on a 1×1 map): its value is rounding noise, so it only has to be
    finite and ≤ 1e-4 (fp32) or 1e-2 (bf16) of the reference's whole fp32 gradient norm.
  * Non-finite values fail.
  * Seeds: a run's final loss is its mean over its last min(20, steps) steps; over the seeds a backend has
    mean m and spread s = max − min; it passes when |m − m_ref| ≤ max(s_ref, s).

Data: the digits (real handwritten scans) upscaled to --size, no augmentation, a fixed batch order from a seeded
generator; AdamW (lr --lr, weight decay 0.05), gradient clipping at 5.0, drop-path 0; fp32 means fp32 (TF32 is
switched off), and cuDNN runs deterministic convolution algorithms. The checks run in train mode (BatchNorm uses
batch statistics) and reload the checkpoint's weights and buffers before every pass, so no pass sees running
statistics of another. On a CPU, Triton runs only in its interpreter (TRITON_INTERPRET=1), which has no bf16:
bf16 checks of the Triton backends are skipped there with a note, and --amp seed runs need a GPU. Exit code 1 on
FAIL.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.data.digits import DigitsDataModule  # noqa: E402
from src.errors import UserError, reports_user_errors  # noqa: E402
from src.kernels import BACKENDS  # noqa: E402
from src.models.spatial_mamba import spatial_mamba_digits, spatial_mamba_t  # noqa: E402

MODELS = {"t": spatial_mamba_t, "digits": spatial_mamba_digits}
TRITON_BACKENDS = ("triton", "fused")
FP32_RTOL = 1e-4  # gradient and loss, relative to the reference's
BF16_RTOL = 1e-2  # smallest allowance of the bf16 error, relative to the reference's fp32 gradient
BF16_LOSS_RTOL = 2e-2
ZERO_SHARE = 1e-12  # truth norm / whole truth norm at or below this: zero in exact arithmetic
NOISE_BOUND = {"fp32": 1e-4, "bf16": 1e-2}  # such a tensor's norm / the reference's whole fp32 gradient norm
TAIL = 20  # steps averaged into a run's final loss
WEIGHT_DECAY, CLIP = 0.05, 5.0

Grads = dict[str, torch.Tensor]


@dataclass
class Pass:
    """Loss and parameter gradients (float64, CPU) of one forward + backward."""

    loss: float
    grads: Grads


@dataclass
class Check:
    """Outcome of one comparison. `tensors` holds every tensor's numbers: err and limit (the rule),
    passed, and what the rule was built from (share of the whole truth norm, the reference's own error,
    cosines in bf16). `worst` is the tensor of largest err / limit, `lowest_cos` the one of lowest cosine."""

    passed: bool
    loss_diff: float
    loss_limit: float
    worst: str
    worst_err: float
    worst_limit: float
    lowest_cos: str | None = None
    failures: list[str] = field(default_factory=list)
    tensors: dict[str, dict] = field(default_factory=dict)


# ---------------------------------------------------------------- comparisons (pure, on float64 dicts)


def _norm(t: torch.Tensor) -> float:
    return t.double().norm().item()


def _ratio(num: float, den: float) -> float:
    """num / den with 0 / 0 = 0 and x / 0 = inf; NaN becomes inf so that it fails every `≤`."""
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    r = num / den
    return r if math.isfinite(r) else math.inf


def _whole_norm(grads: Grads) -> float:
    return math.sqrt(sum(_norm(g) ** 2 for g in grads.values()))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    dot = torch.dot(a.double().flatten(), b.double().flatten()).item()
    return dot / (_norm(a) * _norm(b)) if _norm(a) * _norm(b) > 0 and math.isfinite(dot) else 0.0


def _check_names(grads: Grads, ref: Grads) -> None:
    if grads.keys() != ref.keys():
        missing, extra = sorted(ref.keys() - grads.keys()), sorted(grads.keys() - ref.keys())
        raise ValueError(f"parameter names differ from the reference's: missing {missing}, extra {extra}")


def _noise_check(g: torch.Tensor, ref_whole: float, precision: str) -> dict:
    """A tensor whose gradient is zero in exact arithmetic: finite and small is all its rounding noise can be."""
    err = _ratio(_norm(g), ref_whole)
    return dict(err=err, limit=NOISE_BOUND[precision], zero_in_exact_arithmetic=True)


def _summarise(tensors: dict[str, dict], loss_diff: float, loss_limit: float) -> Check:
    for t in tensors.values():
        t["passed"] = t["err"] <= t["limit"]

    def badness(name: str) -> float:
        t = tensors[name]
        return _ratio(t["err"], t["limit"])

    worst = max(tensors, key=badness)
    failures = [f"{n}: {'|g|/|G_ref|' if t.get('zero_in_exact_arithmetic') else 'grad rel err'} "
                f"{t['err']:.3g} > {t['limit']:.3g}" for n, t in tensors.items() if not t["passed"]]
    if not loss_diff <= loss_limit:
        failures.insert(0, f"loss rel diff {loss_diff:.3g} > {loss_limit:.3g}")
    with_cos = [n for n, t in tensors.items() if "cos" in t]
    lowest = min(with_cos, key=lambda n: tensors[n]["cos"]) if with_cos else None
    return Check(not failures, loss_diff, loss_limit, worst, tensors[worst]["err"], tensors[worst]["limit"],
                 lowest, failures, tensors)


def compare_fp32(run: Pass, ref: Pass, truth: Pass, k: float = 4.0) -> Check:
    """fp32: ‖g − g_ref‖ / ‖g_ref‖ ≤ max(1e-4, k·‖g_ref − g_truth‖ / ‖g_ref‖) per tensor; the loss likewise."""
    _check_names(run.grads, ref.grads)
    truth_whole, ref_whole = _whole_norm(truth.grads), _whole_norm(ref.grads)
    tensors = {}
    for name, r in ref.grads.items():
        g, t = run.grads[name], truth.grads[name]
        share = _ratio(_norm(t), truth_whole)
        if share <= ZERO_SHARE:
            tensors[name] = dict(_noise_check(g, ref_whole, "fp32"), share=share)
            continue
        ref_err = _ratio(_norm(r - t), _norm(r))
        tensors[name] = dict(err=_ratio(_norm(g - r), _norm(r)), limit=max(FP32_RTOL, k * ref_err),
                             ref_err=ref_err, share=share)
    loss_diff = _ratio(abs(run.loss - ref.loss), abs(ref.loss))
    loss_limit = max(FP32_RTOL, k * _ratio(abs(ref.loss - truth.loss), abs(ref.loss)))
    return _summarise(tensors, loss_diff, loss_limit)


def compare_bf16(run: Pass, ref16: Pass, ref32: Pass, truth: Pass, k: float = 8.0) -> Check:
    """bf16 autocast against the reference's fp32 gradient g32: per tensor ‖g − g32‖ / ‖g32‖ ≤
    k · max(the reference's own bf16 error on that tensor, the median of those over all tensors, 1e-2);
    the loss: ≤ max(2e-2, k · the reference's own bf16 loss error)."""
    _check_names(run.grads, ref32.grads)
    truth_whole, ref_whole = _whole_norm(truth.grads), _whole_norm(ref32.grads)
    zero = {n for n, t in truth.grads.items() if _ratio(_norm(t), truth_whole) <= ZERO_SHARE}
    ref_errs = {n: _ratio(_norm(ref16.grads[n] - g32), _norm(g32)) for n, g32 in ref32.grads.items() if n not in zero}
    typical = statistics.median(ref_errs.values()) if ref_errs else 0.0
    tensors = {}
    for name, g32 in ref32.grads.items():
        g = run.grads[name]
        share = _ratio(_norm(truth.grads[name]), truth_whole)
        if name in zero:
            tensors[name] = dict(_noise_check(g, ref_whole, "bf16"), share=share)
            continue
        tensors[name] = dict(err=_ratio(_norm(g - g32), _norm(g32)),
                             limit=k * max(ref_errs[name], typical, BF16_RTOL), ref_err=ref_errs[name],
                             cos=_cos(g, g32), ref_cos=_cos(ref16.grads[name], g32), cos16=_cos(g, ref16.grads[name]),
                             share=share)
    loss_diff = _ratio(abs(run.loss - ref32.loss), abs(ref32.loss))
    loss_limit = max(BF16_LOSS_RTOL, k * _ratio(abs(ref16.loss - ref32.loss), abs(ref32.loss)))
    return _summarise(tensors, loss_diff, loss_limit)


def seed_overlap(finals: list[float], ref_finals: list[float]) -> tuple[float, float, bool]:
    """|mean − mean_ref| and its limit max(spread_ref, spread), spread = max − min over seeds."""
    mean, ref_mean = sum(finals) / len(finals), sum(ref_finals) / len(ref_finals)
    limit = max(max(ref_finals) - min(ref_finals), max(finals) - min(finals))
    diff = abs(mean - ref_mean)
    ok = all(map(math.isfinite, finals + ref_finals)) and diff <= limit
    return diff, limit, ok


# ---------------------------------------------------------------- training and probing


def build(args, backend: str, seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[args.model](num_classes=10, backend=backend, drop_path_rate=0.0).to(device)


def batch_order(n: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Indices of the batch of every step 0..steps (the last one is the batch after the final update)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, n, (batch,), generator=g) for _ in range(steps + 1)]


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def train(args, data: tuple[torch.Tensor, torch.Tensor], backend: str, seed: int, device: torch.device,
          amp: bool, keep: frozenset[int] = frozenset()) -> tuple[list[float], dict[int, dict]]:
    """`args.steps` AdamW steps; returns the per-step losses and the weights at the steps in `keep`."""
    images, labels = data
    model = build(args, backend, seed, device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    order = batch_order(len(labels), args.batch, args.steps, seed)
    losses, states = [], {}
    for step in range(args.steps + 1):
        if step in keep:
            states[step] = cpu_state(model)
        if step == args.steps:
            break
        x, y = images[order[step]].to(device), labels[order[step]].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, states


def probe(model: nn.Module, state: dict, x: torch.Tensor, y: torch.Tensor, bf16: bool = False) -> Pass:
    """One forward + backward in train mode from `state` (weights and BatchNorm buffers reloaded first)."""
    model.load_state_dict(state)
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().to("cpu", torch.float64)
             for n, p in model.named_parameters()}
    return Pass(loss.item(), grads)


def bf16_supported(backend: str, device: torch.device) -> bool:
    return device.type == "cuda" or backend not in TRITON_BACKENDS


def check_checkpoints(args, batches: dict[int, tuple[torch.Tensor, torch.Tensor]], states: dict[int, dict],
                      device: torch.device, precisions: list[str]) -> list[dict]:
    """Every checked backend × precision at every checkpoint (its weights `states[step]`, its batch
    `batches[step]`); one record per comparison. With --save-failing, a checkpoint any comparison fails is
    written there (weights, batch, what failed) for `--replay`."""
    model = build(args, args.reference, 0, device)
    spec = build(args, "torch", 0, device).double()  # the truth: the specification in float64
    with_bf16 = "bf16" in precisions and any(bf16_supported(b, device) for b in args.backends)
    records = []
    for step, state in sorted(states.items()):
        x, y = (t.to(device) for t in batches[step])
        truth = probe(spec, state, x.double(), y)
        model.set_backend(args.reference)
        ref32 = probe(model, state, x, y)
        ref16 = probe(model, state, x, y, bf16=True) if with_bf16 else None
        for backend in args.backends:
            model.set_backend(backend)
            for precision in precisions:
                if precision == "bf16" and not bf16_supported(backend, device):
                    continue
                run = probe(model, state, x, y, bf16=precision == "bf16")
                check = (compare_fp32(run, ref32, truth, args.k) if precision == "fp32"
                         else compare_bf16(run, ref16, ref32, truth, args.k_bf16))
                records.append(dict(step=step, backend=backend, precision=precision, **asdict(check)))
                print_check(records[-1])
        failed = [f"{r['backend']} {r['precision']}: {r['failures'][0]}" for r in records
                  if r["step"] == step and not r["passed"]]
        if failed and args.save_failing:
            save_checkpoint(args, step, state, x, y, failed)
    return records


def save_checkpoint(args, step: int, state: dict, x: torch.Tensor, y: torch.Tensor, failed: list[str]) -> None:
    """A failing checkpoint as a file `--replay` checks again (on this machine or another, e.g. the CPU with
    Triton's interpreter): the model's weights and buffers, the batch, and what failed."""
    os.makedirs(args.save_failing, exist_ok=True)
    path = os.path.join(args.save_failing, f"{args.model}-{args.size}px-step{step}.pt")
    torch.save(dict(model=args.model, size=args.size, step=step, state=state, x=x.cpu(), y=y.cpu(), failed=failed),
               path)
    print(f"{'':22}saved the checkpoint for --replay: {path}", flush=True)


def load_checkpoint(path: str) -> dict:
    """A file of --save-failing, checked for what --replay needs."""
    if not os.path.isfile(path):
        raise UserError(f"--replay: no such file {path!r} (write one with --save-failing DIR)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in ("model", "size", "step", "state", "x", "y") if k not in saved]
    if missing:
        raise UserError(f"--replay: {path!r} is not a checkpoint of --save-failing (it lacks {', '.join(missing)})")
    if saved["model"] not in MODELS:
        raise UserError(f"--replay: {path!r} holds model {saved['model']!r}; expected one of {sorted(MODELS)}")
    return saved


def seed_runs(args, data, device: torch.device, ref_seed0: list[float] | None) -> dict:
    """`args.seeds` training runs of the reference and of every checked backend; final losses and verdicts."""
    finals = {}
    for backend in [args.reference] + [b for b in args.backends if b != args.reference]:
        finals[backend] = []
        for seed in range(args.seeds):
            if backend == args.reference and seed == 0 and ref_seed0 is not None:
                losses = ref_seed0  # the checkpoint run is this run
            else:
                losses, _ = train(args, data, backend, seed, device, args.amp)
            tail = losses[-min(TAIL, len(losses)):]
            finals[backend].append(sum(tail) / len(tail))
    verdicts = {}
    for backend in args.backends:
        diff, limit, ok = seed_overlap(finals[backend], finals[args.reference])
        verdicts[backend] = dict(diff=diff, limit=limit, passed=ok)
    return dict(finals=finals, verdicts=verdicts)


# ---------------------------------------------------------------- report


def print_check_header() -> None:
    print(f"{'step':>5}  {'backend':8} {'prec':5} {'loss diff':>9} {'limit':>8}  {'worst tensor (err / limit)':44} "
          f"{'err':>9} {'limit':>8}  result")


def print_check(r: dict) -> None:
    print(f"{r['step']:5d}  {r['backend']:8} {r['precision']:5} {r['loss_diff']:9.2e} {r['loss_limit']:8.1e}  "
          f"{r['worst']:44} {r['worst_err']:9.2e} {r['worst_limit']:8.1e}  {'PASS' if r['passed'] else 'FAIL'}")
    if r["lowest_cos"]:
        t = r["tensors"][r["lowest_cos"]]
        print(f"{'':22}lowest cosine to the reference's fp32 gradient: {t['cos']:.5f} at {r['lowest_cos']} "
              f"(the reference's own bf16: {t['ref_cos']:.5f}; to the reference's bf16 gradient: "
              f"{t['cos16']:.5f}, lowest {min(v.get('cos16', 1.0) for v in r['tensors'].values()):.5f})", flush=True)


def print_seeds(args, seeds: dict) -> None:
    n = args.seeds
    print(f"\nseed runs: {'bf16 autocast' if args.amp else 'fp32'}, {n} seeds × {args.steps} steps, final loss = "
          f"mean of the last {min(TAIL, args.steps)} steps of a run; pass: |mean − mean_ref| ≤ max(spreads)")
    print(f"{'backend':8} " + " ".join(f"{'seed ' + str(s):>8}" for s in range(n))
          + f" {'mean':>8} {'spread':>8} {'|diff|':>8} {'limit':>8}  result")
    for backend, finals in seeds["finals"].items():
        mean, spread = sum(finals) / n, max(finals) - min(finals)
        row = f"{backend:8} " + " ".join(f"{f:8.4f}" for f in finals) + f" {mean:8.4f} {spread:8.4f}"
        v = seeds["verdicts"].get(backend)
        row += (f" {v['diff']:8.4f} {v['limit']:8.4f}  {'PASS' if v['passed'] else 'FAIL'}" if v
                else f" {'':8} {'':8}  (reference)")
        print(row)


def failure_reasons(records: list[dict], seeds: dict | None) -> list[str]:
    reasons = [f"{r['backend']} {r['precision']} step {r['step']}: {r['failures'][0]}"
               + (f" (+{len(r['failures']) - 1} more)" if len(r["failures"]) > 1 else "")
               for r in records if not r["passed"]]
    if seeds:
        reasons += [f"{b} seeds: |diff| {v['diff']:.4f} > {v['limit']:.4f}"
                    for b, v in seeds["verdicts"].items() if not v["passed"]]
    return reasons


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", default="torch", help="backend that trains the trajectory and sets the yardstick")
    p.add_argument("--backends", default="fused,triton", help="comma-separated backends to check")
    p.add_argument("--model", choices=sorted(MODELS), default="t", help="Spatial-Mamba-T or the small digits model")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--checkpoints", default="0,50,100,200", help="steps whose weights are checked (0: initial)")
    p.add_argument("--precisions", help="fp32,bf16 (default: both on a GPU, fp32 on a CPU)")
    p.add_argument("--seeds", type=int, default=3, help="training runs per backend (0: no seed runs)")
    p.add_argument("--seed-runs", action=argparse.BooleanOptionalAction, default=True,
                   help="train the seed runs (slow on a CPU); --no-seed-runs skips them like --seeds 0")
    p.add_argument("--amp", action="store_true", help="bf16 autocast in the seed runs")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--k", type=float, default=4.0, help="fp32: allowance factor over the reference's own error")
    p.add_argument("--k-bf16", type=float, default=8.0, help="bf16: allowance factor over the reference's own error")
    p.add_argument("--json", help="also write every number here")
    p.add_argument("--save-failing", metavar="DIR", help="write every checkpoint a comparison fails to DIR (its "
                   "weights, batch and failures), for --replay")
    p.add_argument("--replay", metavar="FILE", help="check only the checkpoint of FILE (from --save-failing): no "
                   "training, no seed runs; --model and --size come from the file")
    args = p.parse_args(argv)
    args.replayed = None
    if args.replay:
        args.replayed = saved = load_checkpoint(args.replay)
        args.model, args.size, args.seed_runs = saved["model"], saved["size"], False
        args.batch, args.steps, args.checkpoints = len(saved["y"]), max(1, saved["step"]), str(saved["step"])
    args.backends = [b for b in args.backends.split(",") if b]
    for b in [args.reference] + args.backends:
        if b not in BACKENDS:
            raise UserError(f"unknown backend {b!r}; expected one of {', '.join(BACKENDS)}")
    if not args.backends:
        raise UserError("--backends names no backend")
    if args.steps < 1:
        raise UserError(f"--steps must be ≥ 1, got {args.steps}")
    try:
        args.checkpoints = sorted({int(s) for s in args.checkpoints.split(",") if s})
    except ValueError:
        raise UserError(f"--checkpoints must be comma-separated integers, got {args.checkpoints!r}") from None
    if not args.checkpoints or not all(0 <= c <= args.steps for c in args.checkpoints):
        raise UserError(f"--checkpoints must lie in 0..{args.steps} (--steps), got {args.checkpoints}")
    if args.seeds < 0 or args.seeds == 1:
        raise UserError(f"--seeds must be 0 (no seed runs) or ≥ 2 (a spread needs 2 runs), got {args.seeds}")
    if args.k < 1 or args.k_bf16 < 1:
        raise UserError(f"--k and --k-bf16 must be ≥ 1, got {args.k} and {args.k_bf16}")
    return args


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precisions = (args.precisions or ("fp32,bf16" if device.type == "cuda" else "fp32")).split(",")
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        raise UserError(f"--precisions takes fp32 and/or bf16, got {args.precisions!r}")
    with_seeds = args.seed_runs and args.seeds > 0
    if with_seeds and args.amp and not all(bf16_supported(b, device) for b in [args.reference] + args.backends):
        raise UserError("--amp with a Triton backend needs a CUDA GPU (the Triton interpreter has no bf16)")
    for b in args.backends:
        if "bf16" in precisions and not bf16_supported(b, device):
            print(f"note: bf16 check of {b} skipped: on a CPU the Triton interpreter has no bf16 (run on a CUDA GPU)")

    data_module = DigitsDataModule(batch_size=args.batch, image_size=args.size, augment=False)
    data_module.setup()
    data = data_module.train_set.tensors
    print(f"device {device}, model {args.model}, {args.size}², batch {args.batch}, reference {args.reference}, "
          f"checked {', '.join(args.backends)}, k = {args.k} (fp32), {args.k_bf16} (bf16)")

    cudnn = torch.backends.cudnn
    saved = torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark
    torch.backends.cuda.matmul.allow_tf32 = cudnn.allow_tf32 = False  # fp32 means fp32 here
    # deterministic convolution algorithms, chosen by heuristics rather than by timing: two probes of one
    # checkpoint then round the model's convolutions alike, and the check compares the SSM backends only
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        return run_checks(args, data, device, precisions, with_seeds)
    finally:
        torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark = saved


def run_checks(args, data, device: torch.device, precisions: list[str], with_seeds: bool) -> int:
    if args.replayed:
        saved = args.replayed
        ref_losses, states, batches = [], {saved["step"]: saved["state"]}, {saved["step"]: (saved["x"], saved["y"])}
        print(f"\nreplay of {args.replay} (step {saved['step']}); it failed with: "
              + "; ".join(saved.get("failed", [])))
    else:
        ref_losses, states = train(args, data, args.reference, 0, device, amp=False,
                                   keep=frozenset(args.checkpoints))
        order = batch_order(len(data[1]), args.batch, args.steps, 0)
        images, labels = data
        batches = {step: (images[order[step]], labels[order[step]]) for step in states}
    print(f"\ngradient check: one forward + backward from the reference's weights after each checkpoint step, on "
          f"that step's batch; err = ‖g − g_ref‖ / ‖g_ref‖ against the reference's fp32 gradient")
    print_check_header()
    records = check_checkpoints(args, batches, states, device, precisions)

    seeds = seed_runs(args, data, device, None if args.amp else ref_losses) if with_seeds else None
    if seeds:
        print_seeds(args, seeds)
    else:
        print("\nseed runs: skipped")

    reasons = failure_reasons(records, seeds)
    if not records and not seeds:
        reasons.append("nothing was checked: see the notes above")
    print("\ntraining-equivalence: " + ("PASS" if not reasons else f"FAIL ({'; '.join(reasons)})"))
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("json", "replayed")}
        with open(args.json, "w") as f:
            json.dump(dict(config=config, device=str(device), precisions=precisions, reference_losses=ref_losses,
                           checks=records, seeds=seeds, passed=not reasons, reasons=reasons), f, indent=1)
    return 1 if reasons else 0


if __name__ == "__main__":
    sys.exit(main())
