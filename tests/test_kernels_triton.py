"""Triton backends (`triton`: Triton scan + torch fusion; `fused`: one Triton op) against the float64 reference,
for outputs and every input gradient. On a machine without a GPU they run in Triton's CPU interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), so shapes stay small; tile sizes are lowered so that small maps
still span several tiles (carry between scan tiles, several fusion tiles, tails that fill no tile).

Tolerances, ‖got − ref‖ / ‖ref‖ against float64 on the same (rounded) inputs:
    float32  1e-5    (all arithmetic fp32)
    float16  5e-3    (outputs and dx, ddt rounded to fp16; everything else fp32)
    bfloat16 2e-2    (GPU only: the interpreter has no bf16)
One exception: d(alpha)_i = Σ w_i·G_i sums k·k·D terms of both signs, which can cancel to a result far
smaller than its terms (seen: 0.59 from terms of total size 42). Any fp32 summation — the torch fusion of
the `triton` backend too — then errs by eps·Σ|terms|, not eps·|result|, so that gradient's error is
measured against Σ|w_i·G_i| (from the float64 reference, G_i = dweight_i / alpha_i): the bound of a sum.
"""

from __future__ import annotations

import math

import pytest
import torch

from src.kernels import fused as fused_mod
from src.kernels import triton_scan
from src.kernels.ops import structure_aware_ssm_fused, structure_aware_ssm_triton
from src.kernels.reference import SCANS, structure_aware_ssm_ref
from tests.conftest import requires_cuda

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "weight", "alpha")
BACKENDS = {"triton": structure_aware_ssm_triton, "fused": structure_aware_ssm_fused}
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
_DEFAULTS = {"MAX_BLOCK_L": triton_scan.MAX_BLOCK_L, "ROWS_PER_PROGRAM": fused_mod.ROWS_PER_PROGRAM,
             "INTERPRETER_CONFIG": fused_mod.INTERPRETER_CONFIG}  # the modules' own tiles, read at import


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    """Scan tiles of 16 steps (L = 35 spans 3 with a ragged tail) and fusion programs of 2 rows; in the
    interpreter the fusion tiles are 4 columns × 2 channels (fused.INTERPRETER_CONFIG), so small maps
    still span several column tiles, channel blocks and row bands."""
    monkeypatch.setattr(triton_scan, "MAX_BLOCK_L", 16)
    monkeypatch.setattr(fused_mod, "ROWS_PER_PROGRAM", 2)
    monkeypatch.setattr(fused_mod, "INTERPRETER_CONFIG", (4, 2, 1))


def make_inputs(Bsz=2, D=3, H=5, W=7, K=3, k=3, dtype=torch.float32, device=DEVICE):
    """Activations in `dtype`, parameters fp32 (as in the model under autocast)."""
    L = H * W
    act = dict(x=torch.randn(Bsz, L, D), dt=torch.randn(Bsz, L, D), B=torch.randn(Bsz, L, 1),
               C=torch.randn(Bsz, L, 1))
    par = dict(A=-torch.rand(D, 1) * 2 - 0.1, D=torch.randn(D), dt_bias=torch.randn(D) * 0.5 - 2,
               weight=torch.randn(K, D, k, k), alpha=torch.randn(K))
    t = {n: v.to(device, dtype) for n, v in act.items()} | {n: v.to(device) for n, v in par.items()}
    return {n: t[n] for n in NAMES}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "non-finite values"
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check_against_reference(backend, t, dilations, H, W, scan, tol):
    """Output and all input gradients of `backend` against the float64 reference on the same inputs."""
    t64 = {n: v.detach().double().requires_grad_() for n, v in t.items()}
    tk = {n: v.detach().clone().requires_grad_() for n, v in t.items()}
    ref = structure_aware_ssm_ref(*(t64[n] for n in NAMES), dilations, H, W, scan)
    dy = torch.randn_like(ref)
    ref.backward(dy)
    y = BACKENDS[backend](*(tk[n] for n in NAMES), dilations, H, W, scan)
    assert y.dtype == t["x"].dtype and y.shape == ref.shape
    y.backward(dy.to(y.dtype))
    errors = {"y": rel_err(y, ref)}
    for n in NAMES:
        if t64[n].grad is None:  # weight and alpha of an empty dilation list: no gradient anywhere
            assert tk[n].grad is None or not tk[n].grad.any(), n
            continue
        assert tk[n].grad is not None and tk[n].grad.dtype == tk[n].dtype, n
        errors[n] = rel_err(tk[n].grad, t64[n].grad)
        if n == "alpha" and t64["alpha"].detach().abs().min() > 0:
            G = t64["weight"].grad / t64["alpha"].detach()[:, None, None, None]
            terms = (t64["weight"].detach() * G).abs().sum((1, 2, 3))  # Σ|w_i·G_i| per dilation
            errors[n] = ((tk[n].grad.double() - t64[n].grad).norm() / terms.norm()).item()
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"


DILATIONS = ([], [1], [1, 3, 5], [1, 3, 5, 7])
MAPS = ((5, 7), (3, 9), (7, 5), (6, 4))  # odd, non-square, L = 35, 27, 35, 24: not multiples of 16


@pytest.mark.parametrize("scan", list(SCANS))
@pytest.mark.parametrize("dilations,HW", list(zip(DILATIONS, MAPS)), ids=[str(d) for d in DILATIONS])
def test_triton_equals_reference_fp32(scan, dilations, HW):
    H, W = HW
    t = make_inputs(H=H, W=W, K=len(dilations))
    check_against_reference("triton", t, dilations, H, W, scan, TOL[torch.float32])


@pytest.mark.parametrize("scan", list(SCANS))
@pytest.mark.parametrize("dilations,HW", list(zip(DILATIONS, MAPS)), ids=[str(d) for d in DILATIONS])
def test_fused_equals_reference_fp32(scan, dilations, HW):
    H, W = HW
    t = make_inputs(Bsz=1, H=H, W=W, K=len(dilations))
    check_against_reference("fused", t, dilations, H, W, scan, TOL[torch.float32])


@pytest.mark.parametrize("dilations,HW,k", [([1, 3, 5], (7, 5), 3), ([1, 3, 5, 7], (6, 4), 3), ([1, 2], (5, 6), 5),
                                             ([2], (5, 6), 3), ([], (5, 7), 3)],
                         ids=["1-3-5", "1-3-5-7", "1-2-k5", "2", "none"])
def test_fused_with_the_weight_loading_variants(dilations, HW, k, monkeypatch):
    """Tiles with a fourth entry 1: the forward loads every tap's weights once, before the row loop (`HOISTED`),
    the dh kernel loads them as tiles in g's layout (`W2D`), the border rows' code included."""
    monkeypatch.setattr(fused_mod, "INTERPRETER_CONFIG", (4, 2, 1, 1))
    monkeypatch.setattr(fused_mod, "FWD_CONFIGS", tuple(c for c in fused_mod.FWD_CONFIGS if len(c) > 3 and c[3]))
    H, W = HW
    t = make_inputs(Bsz=2, H=H, W=W, K=len(dilations), k=k)
    check_against_reference("fused", t, dilations, H, W, "row", TOL[torch.float32])


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("H,W,dilations,k", [(1, 9, [1, 2], 3), (7, 1, [2], 3), (1, 1, [1], 3), (2, 2, [1, 3], 3),
                                             (5, 6, [2], 5)])
def test_degenerate_maps_and_kernel_sizes(backend, H, W, dilations, k):
    """Single row/column/pixel maps (every position on the border) and a 5×5 fusion kernel."""
    t = make_inputs(Bsz=1, H=H, W=W, K=len(dilations), k=k)
    check_against_reference(backend, t, dilations, H, W, "cross" if H * W > 1 else "row", TOL[torch.float32])


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("scan", ["row", "column_reversed", "cross"])
def test_chunked_scan(backend, scan, monkeypatch):
    """Chunks of 16 steps run in parallel (L = 35: three chunks, the last ragged), each starting from the
    states (forward) or gradients (backward) of the chunks before it, combined from their summaries."""
    monkeypatch.setattr(triton_scan, "MAX_CHUNK_L", 16)
    monkeypatch.setattr(triton_scan, "MAX_BLOCK_L", 8)  # two tiles a chunk: the carry inside a chunk too
    t = make_inputs(Bsz=2, D=3, H=5, W=7, K=2)
    check_against_reference(backend, t, [1, 2], 5, 7, scan, TOL[torch.float32])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_batch_and_channels_over_one_tile(backend):
    t = make_inputs(Bsz=3, D=9, H=3, W=4, K=1)
    check_against_reference(backend, t, [2], 3, 4, "bidirectional", TOL[torch.float32])


@pytest.mark.parametrize("backend,scan", [("triton", "row"), ("triton", "cross"), ("fused", "row"),
                                          ("fused", "column_reversed")])
def test_fp16(backend, scan):
    t = make_inputs(Bsz=1, H=5, W=7, K=3, dtype=torch.float16)
    check_against_reference(backend, t, [1, 3, 5], 5, 7, scan, TOL[torch.float16])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_strided_activations_need_no_copy(backend):
    """Non-contiguous x, dt, B, C (the model passes B, C as slices of x_proj's output) give the contiguous
    result."""
    H, W = 3, 4
    t = make_inputs(H=H, W=W, K=2)
    strided = dict(t)
    strided["dt"] = t["dt"].transpose(1, 2).contiguous().transpose(1, 2)  # (B, D, L) memory, (B, L, D) view
    strided["B"] = torch.randn(2, H * W, 3, device=DEVICE)[..., 1:2]  # stride 3 along L, as x_proj's slices
    strided["B"].copy_(t["B"])
    strided["x"] = torch.randn(2, 2 * H * W, 3, device=DEVICE)[:, ::2]
    strided["x"].copy_(t["x"])
    assert not strided["dt"].is_contiguous() and not strided["B"].is_contiguous()
    check_against_reference(backend, strided, [1, 2], H, W, "cross", TOL[torch.float32])


def test_fused_forward_without_grad_and_backends_agree():
    t = make_inputs(H=5, W=7, K=3)
    with torch.no_grad():
        a = structure_aware_ssm_triton(*(t[n] for n in NAMES), [1, 3, 5], 5, 7, "row")
        b = structure_aware_ssm_fused(*(t[n] for n in NAMES), [1, 3, 5], 5, 7, "row")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_forward_keeps_the_fused_states_only_for_a_backward(monkeypatch):
    """The forward stores h' (which the backward's dC reads) only where a backward can follow: an eager call
    without gradients asks the launcher not to, and so does the registered op (what traced graphs call) with
    keep_fused=False, which returns an empty tensor for h'; y is the same every way."""
    from src.kernels import ops

    asked, forward = [], ops.fused_forward

    def recording_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        asked.append((kwargs.get("for_backward", True), out[2] is not None))
        return out

    monkeypatch.setattr(ops, "fused_forward", recording_forward)
    t = make_inputs(H=5, W=7, K=3)
    with torch.no_grad():
        y_inference = structure_aware_ssm_fused(*(t[n] for n in NAMES), [1, 3, 5], 5, 7, "row")
    y_training = structure_aware_ssm_fused(*(t[n].requires_grad_() for n in NAMES), [1, 3, 5], 5, 7, "row")
    assert asked == [(False, False), (True, True)]
    assert torch.equal(y_inference, y_training.detach())
    args = (*(t[n].detach() for n in NAMES), [1, 3, 5], 5, 7, "row")
    y_op, h, hf = torch.ops.spatial_mamba.structure_aware_ssm_fused(*args, False)
    assert asked[-1] == (False, False) and hf.numel() == 0 and h.shape == y_op.shape
    assert torch.equal(y_op, y_inference)
    assert torch.ops.spatial_mamba.structure_aware_ssm_fused(*args)[2].shape == y_op.shape  # keep_fused=True


def test_triton_backend_fuses_states_in_the_references_layout(monkeypatch):
    """The `triton` backend is the Triton scan + the reference's fusion; its states must reach that fusion
    contiguous, as the reference's do. A transposed view of the scan's (B, L, D) output reaches the
    convolutions as a channels-last map, and on an H100 cuDNN's channels-last depthwise kernels gave the T
    model's fp32 gradients errors of up to 8e-4 at some training steps (the reference's: 1e-6)."""
    from src.kernels import ops

    seen, fusion = [], ops.state_fusion_ref

    def recording_fusion(h, *args, **kwargs):
        seen.append(h.is_contiguous())
        return fusion(h, *args, **kwargs)

    monkeypatch.setattr(ops, "state_fusion_ref", recording_fusion)
    t = make_inputs(H=6, W=7)
    structure_aware_ssm_triton(*(t[n] for n in NAMES), [1, 3, 5], 6, 7, "row")
    assert seen == [True]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_whole_model_same_loss_and_parameter_gradients(backend, monkeypatch):
    """One training step of a whole (narrow) Spatial-Mamba in fp32: the Triton backends give the loss and
    every parameter gradient of the torch backend, so any gap between backends' loss curves in bf16
    training (benchmarks/RESULTS.md) is rounding, not a different function."""
    from src.models.spatial_mamba import SpatialMamba

    for module, name in ((triton_scan, "MAX_BLOCK_L"), (fused_mod, "ROWS_PER_PROGRAM"), (fused_mod, "INTERPRETER_CONFIG")):
        monkeypatch.setattr(module, name, _DEFAULTS[name])  # the production tiles: fewer programs to interpret
    model = SpatialMamba(dims=[8, 8, 8, 8], depths=[1, 1, 1, 1], num_classes=10, drop_path_rate=0.0).to(DEVICE)
    images, labels = torch.randn(2, 3, 32, 32, device=DEVICE), torch.tensor([1, 7], device=DEVICE)
    results = {}
    for name in ("torch", backend):
        model.zero_grad()
        model.set_backend(name)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        results[name] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (ref_loss, ref_grads), (loss, grads) = results["torch"], results[backend]
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    errors = {n: rel_err(grads[n], ref_grads[n].double()) for n in ref_grads}
    bad = {n: e for n, e in errors.items() if not e <= 1e-4}
    assert not bad, f"parameter gradients differ from the torch backend: {bad}"


# ---------------------------------------------------------------------------------------------------
# torch.library registration


def _op_args(op, t, dilations, H, W, scan):
    if op == "scan":
        return (t["x"], t["dt"], t["A"], t["B"], t["dt_bias"], H, W, scan)
    return (*(t[n] for n in NAMES), list(dilations), H, W, scan)


@pytest.mark.parametrize("op", ["scan", "fused", "fused_traced"])
def test_opcheck(op):
    """Schema, autograd registration, fake tensors, AOT dispatch with static and dynamic shapes. The traced op
    (a `triton_op`) takes the custom op wherever a trace cannot launch its kernels: here, in the interpreter, every
    trace; on a GPU, dynamic shapes (`test_traced_op_opcheck_gpu` checks its own launches)."""
    H, W = 3, 5
    t = make_inputs(Bsz=1, D=2, H=H, W=W, K=2)
    t = {n: v.requires_grad_() for n, v in t.items()}
    ops = torch.ops.spatial_mamba
    target = {"scan": ops.selective_scan, "fused": ops.structure_aware_ssm_fused,
              "fused_traced": ops.structure_aware_ssm_fused_traced}[op]
    torch.library.opcheck(target.default, _op_args(op, t, [1, 2], H, W, "bidirectional"))


def _op_outputs_and_grads(op, t, dilations, H, W, scan):
    tk = {n: v.detach().clone().requires_grad_() for n, v in t.items()}
    y, h, hf = op(*(tk[n] for n in NAMES), list(dilations), H, W, scan)
    y.backward(torch.linspace(-1, 1, y.numel(), device=y.device, dtype=y.dtype).view_as(y))
    return [y.detach(), h, hf] + [tk[n].grad for n in NAMES]


def test_traced_op_runs_the_same_kernels():
    """The fused op as a `triton_op` (what compiled graphs on a GPU launch themselves by default): called
    outside a trace, its forward and every gradient are bitwise those of the custom op, the same kernels being
    launched in the same order (the launches go through `torch.library.wrap_triton`)."""
    from src.kernels.ops import structure_aware_ssm_fused_op, structure_aware_ssm_fused_traced

    H, W = 4, 5
    t = make_inputs(Bsz=2, D=4, H=H, W=W, K=2)
    want = _op_outputs_and_grads(structure_aware_ssm_fused_op, t, [1, 2], H, W, "row")
    got = _op_outputs_and_grads(structure_aware_ssm_fused_traced, t, [1, 2], H, W, "row")
    for name, a, b in zip(("y", "h", "h'") + NAMES, want, got):
        assert torch.equal(a, b), f"{name} differs between the traced op and the custom op"


def test_flop_formulas_are_counted():
    from torch.utils.flop_counter import FlopCounterMode

    H, W = 3, 5
    t = make_inputs(Bsz=1, D=2, H=H, W=W, K=2)
    with FlopCounterMode(display=False) as counter:
        torch.ops.spatial_mamba.structure_aware_ssm_fused(*_op_args("fused", t, [1, 2], H, W, "row"))
        torch.ops.spatial_mamba.selective_scan(*_op_args("scan", t, [], H, W, "cross"))
    per_element = 1 * 2 * H * W
    assert counter.get_total_flops() == (7 + 2 * 2 * 9 + 3) * per_element + 4 * 7 * per_element


def test_eager_path_equals_registered_op():
    """Eager calls run the op's forward/backward functions under a plain autograd.Function (less host time);
    they must give the registered op's outputs and gradients bit for bit, and a dispatch mode (here
    FlopCounterMode) must still see the registered op."""
    from torch.utils.flop_counter import FlopCounterMode

    H, W = 4, 5
    t = make_inputs(Bsz=2, D=3, H=H, W=W, K=2)
    results = []
    for via_op in (False, True):
        tk = {n: v.detach().clone().requires_grad_() for n, v in t.items()}
        if via_op:
            y = torch.ops.spatial_mamba.structure_aware_ssm_fused(*_op_args("fused", tk, [1, 2], H, W, "row"))[0]
        else:
            y = structure_aware_ssm_fused(*(tk[n] for n in NAMES), [1, 2], H, W, "row")
        y.backward(torch.ones_like(y))
        results.append([y.detach()] + [tk[n].grad for n in NAMES])
    for name, a, b in zip(("y",) + NAMES, *results):
        assert torch.equal(a, b), name
    with FlopCounterMode(display=False) as counter:
        structure_aware_ssm_fused(*(t[n] for n in NAMES), [1, 2], H, W, "row")
    assert counter.get_total_flops() > 0


# ---------------------------------------------------------------------------------------------------
# clear errors from the Python wrappers


def _call(backend, t, dilations=(1, 3), H=4, W=5, scan="row"):
    return BACKENDS[backend](*(t[n] for n in NAMES), list(dilations), H, W, scan)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(
    "change,error,message",
    [
        (lambda t: t.update(x=t["x"][0]), ValueError, r"x must be 3-D \(B, L, D\), got shape \(20, 3\)"),
        (lambda t: t.update(dt=t["dt"][:, :-1]), ValueError, r"dt must have shape \(2, 20, 3\).*got \(2, 19, 3\)"),
        (lambda t: t.update(A=t["A"].repeat(1, 4)), ValueError, r"d_state=1 only: A has shape \(3, 4\)"),
        (lambda t: t.update(B=t["B"].repeat(1, 1, 2)), ValueError, r"d_state=1 only: B has shape \(2, 20, 2\)"),
        (lambda t: t.update(C=t["C"][:1]), ValueError, r"C must have shape \(2, 20, 1\).*got \(1, 20, 1\)"),
        (lambda t: t.update(D=t["D"][:2]), ValueError, r"D must have shape \(3,\).*got \(2\)"),
        (lambda t: t.update(weight=t["weight"][:, :, :2, :2]), ValueError, r"kernel size must be odd, got 2"),
        (lambda t: t.update(weight=t["weight"][:1]), ValueError, r"weight must have shape \(K=2 dilations, D=3"),
        (lambda t: t.update(alpha=t["alpha"][:1]), ValueError, r"alpha must have shape \(2,\).*got \(1\)"),
        (lambda t: t.update(dt=t["dt"].half()), TypeError, r"share one dtype: x is torch.float32, dt is torch.float16"),
        (lambda t: t.update(x=t["x"].double(), dt=t["dt"].double(), B=t["B"].double(), C=t["C"].double()),
         TypeError, r"x must be float32, float16 or bfloat16, got torch.float64"),
        (lambda t: t.update(D=t["D"].to("meta")), RuntimeError, r"one device: x is on .*, D is on meta"),
    ],
)
def test_wrong_inputs_raise_clear_errors(backend, change, error, message):
    t = make_inputs(H=4, W=5, K=2)
    change(t)
    with pytest.raises(error, match=message):
        _call(backend, t)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_wrong_map_scan_and_dilations_raise(backend):
    t = make_inputs(H=4, W=5, K=2)
    with pytest.raises(ValueError, match=r"H·W must equal L=20 with H, W >= 1, got H=5, W=5"):
        _call(backend, t, H=5, W=5)
    with pytest.raises(ValueError, match=r"unknown scan 'diagonal'"):
        _call(backend, t, scan="diagonal")
    with pytest.raises(ValueError, match=r"dilations must be positive integers, got \[1, 0\]"):
        _call(backend, t, dilations=(1, 0))


def test_fused_dilation_limits():
    t = make_inputs(H=4, W=5, K=8)
    with pytest.raises(ValueError, match=r"at most 7 dilations"):
        _call("fused", t, dilations=range(1, 9))


def test_dispatch_reaches_triton_backends():
    from src.kernels import structure_aware_ssm

    t = make_inputs(H=4, W=5, K=2)
    ref = structure_aware_ssm(*(t[n] for n in NAMES), [1, 2], 4, 5, "row", backend="torch")
    for backend in BACKENDS:
        got = structure_aware_ssm(*(t[n] for n in NAMES), [1, 2], 4, 5, "row", backend=backend)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# GPU only: bf16, long sequences, torch.compile of the backbone


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("scan", ["row", "column_reversed", "cross"])
def test_bf16_gpu(backend, scan):
    t = make_inputs(Bsz=2, D=16, H=9, W=13, K=3, dtype=torch.bfloat16)
    check_against_reference(backend, t, [1, 3, 5], 9, 13, scan, TOL[torch.bfloat16])


_N_CANDIDATES = max(len(fused_mod.FWD_CONFIGS), len(fused_mod.BWD_CONFIGS), len(fused_mod.STATE_CONFIGS),
                    len(triton_scan.SCAN_FWD_CONFIGS), len(triton_scan.SCAN_BWD_CONFIGS))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend,config", [("triton", 0)] + [("fused", i) for i in range(_N_CANDIDATES)])
def test_fp32_gpu_large_tiles(backend, config, monkeypatch):
    """Production tile sizes on a stage-1-like map (56×56) and a tail (17×23), each candidate tile of the
    fusion and scan kernels (the tuner may pick any)."""
    monkeypatch.setattr(triton_scan, "MAX_BLOCK_L", _DEFAULTS["MAX_BLOCK_L"])
    monkeypatch.setattr(fused_mod, "ROWS_PER_PROGRAM", None)
    for module, name in ((fused_mod, "FWD_CONFIGS"), (fused_mod, "BWD_CONFIGS"), (fused_mod, "STATE_CONFIGS"),
                         (triton_scan, "SCAN_FWD_CONFIGS"), (triton_scan, "SCAN_BWD_CONFIGS")):
        configs = getattr(module, name)
        monkeypatch.setattr(module, name, (configs[config % len(configs)],))
    for H, W, scan in ((56, 56, "row"), (17, 23, "cross")):
        t = make_inputs(Bsz=2, D=24, H=H, W=W, K=3)
        check_against_reference(backend, t, [1, 3, 5], H, W, scan, TOL[torch.float32])


@requires_cuda
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("H,W", [(256, 256), (200, 330)])  # L = (4096/16)² = 65536 and L = 66,000
def test_long_sequence_bf16_stress(backend, H, W, monkeypatch):
    """Realistic Δ = softplus(N(0,1) + the model's init bias) and A = −1 over ~66k tokens in bf16."""
    monkeypatch.setattr(triton_scan, "MAX_BLOCK_L", _DEFAULTS["MAX_BLOCK_L"])
    monkeypatch.setattr(fused_mod, "ROWS_PER_PROGRAM", None)
    D = 8
    t = make_inputs(Bsz=1, D=D, H=H, W=W, K=3, dtype=torch.bfloat16)
    dt0 = torch.exp(torch.rand(D) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
    t["dt_bias"] = (dt0 + torch.log(-torch.expm1(-dt0))).to(DEVICE)
    t["A"] = -torch.ones(D, 1, device=DEVICE)
    t["weight"] = torch.ones_like(t["weight"])
    t["alpha"] = torch.ones_like(t["alpha"])
    check_against_reference(backend, t, [1, 3, 5], H, W, "row", TOL[torch.bfloat16])


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunked", [False, True])
def test_fused_is_deterministic(dtype, chunked, monkeypatch):
    """Same inputs -> bitwise the same output and every gradient, run after run: the weight, C, dB, dA, bias
    and D gradients are per-program partials summed in a fixed order, nothing uses atomics."""
    monkeypatch.setattr(triton_scan, "MAX_BLOCK_L", _DEFAULTS["MAX_BLOCK_L"])
    monkeypatch.setattr(fused_mod, "ROWS_PER_PROGRAM", None)
    if chunked:
        monkeypatch.setattr(triton_scan, "MAX_CHUNK_L", 256)
    Bsz, D, H, W = 4, 64, 28, 28
    t = make_inputs(Bsz=Bsz, D=D, H=H, W=W, K=3, dtype=dtype)
    dy = torch.randn(Bsz, H * W, D, device=DEVICE, dtype=dtype)
    runs = []
    for _ in range(3):
        tk = {n: v.detach().clone().requires_grad_() for n, v in t.items()}
        y = structure_aware_ssm_fused(*(tk[n] for n in NAMES), [1, 3, 5], H, W, "row")
        y.backward(dy)
        runs.append([y.detach()] + [tk[n].grad for n in NAMES])
    for name, first, *others in zip(("y",) + NAMES, *runs):
        assert all(torch.equal(first, other) for other in others), f"{name} differs between runs"


@requires_cuda
@pytest.mark.gpu
def test_traced_op_opcheck_gpu():
    """The traced op's own launches (`torch.library.wrap_triton`) under fake tensors and AOT dispatch; its dynamic
    shapes take the custom op."""
    H, W = 6, 7
    t = {n: v.requires_grad_() for n, v in make_inputs(Bsz=2, D=16, H=H, W=W, K=3, dtype=torch.bfloat16).items()}
    torch.library.opcheck(torch.ops.spatial_mamba.structure_aware_ssm_fused_traced.default,
                          _op_args("fused", t, [1, 3, 5], H, W, "row"))


def _step_and_op(t: dict, dy: torch.Tensor, H: int, W: int):
    """(step, op) for the compiled-graph tests: `op` is the fused op (dilations 1, 3, 5, row scan) on the inputs
    NAMES; `step(fn)` runs fn on fresh leaf copies of t's inputs, backward with dy, and returns [output, each
    input's gradient]."""
    def step(fn):
        tk = {n: v.detach().clone().requires_grad_() for n, v in t.items()}
        y = fn(*(tk[n] for n in NAMES))
        y.backward(dy)
        return [y.detach()] + [tk[n].grad for n in NAMES]

    def op(*args):
        return structure_aware_ssm_fused(*args, [1, 3, 5], H, W, "row")

    return step, op


@requires_cuda
@pytest.mark.gpu
def test_traced_op_times_its_tiles_before_the_trace(monkeypatch, tmp_path, recwarn):
    """fp32, where no tile is a measured pick: compiling the traced op first times every tile on scratch tensors
    (`tuning.tune_for_trace`, inside the trace), so the graph launches the tiles an eager call then finds — and the
    compiled op gives the eager op's bits."""
    from src.kernels import ops, tuning

    monkeypatch.setenv("SPATIAL_MAMBA_TUNE", "auto")
    monkeypatch.setenv("SPATIAL_MAMBA_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "_TUNED", {})
    monkeypatch.setattr(tuning, "_TRACE_TUNED", set())
    monkeypatch.setattr(ops, "TRACED_OP", True)
    torch._dynamo.reset()
    Bsz, D, H, W = 2, 64, 20, 24
    t = make_inputs(Bsz=Bsz, D=D, H=H, W=W, K=3, dtype=torch.float32)
    dy = torch.randn(Bsz, H * W, D, device=DEVICE)
    step, op = _step_and_op(t, dy, H, W)

    got = step(torch.compile(op, fullgraph=True))  # traced first: the tiles are timed there
    timed = {name for name, key, device in tuning._TUNED}
    assert len(tuning._TRACE_TUNED) == 2, "the forward's and the backward's launchers ran once each"
    assert timed, "no tile was timed"
    assert not [w for w in recwarn if "not timed for a compiled graph" in str(w.message)]
    want = step(op)
    for name, a, b in zip(("y",) + NAMES, want, got):
        assert torch.equal(a, b), f"{name} differs between the compiled traced op and the eager op"


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("traced", [True, False], ids=["traced", "custom"])
def test_traced_op_in_a_compiled_graph(monkeypatch, traced):
    """A compiled graph launches the fused op's kernels itself (the default; SPATIAL_MAMBA_TRACED_OP=0 keeps the
    custom op): after the first call the op's Python (`fused_forward`, `fused_backward`) is never entered again,
    and output and gradients are bitwise the eager op's (the same tiles: the suite runs with SPATIAL_MAMBA_TUNE=0),
    as they are through the custom op."""
    from src.kernels import ops

    monkeypatch.setattr(ops, "TRACED_OP", traced)
    torch._dynamo.reset()
    Bsz, D, H, W = 2, 64, 28, 28
    t = make_inputs(Bsz=Bsz, D=D, H=H, W=W, K=3, dtype=torch.bfloat16)
    dy = torch.randn(Bsz, H * W, D, device=DEVICE, dtype=torch.bfloat16)
    step, op = _step_and_op(t, dy, H, W)

    compiled = torch.compile(op, fullgraph=True)
    want = step(op)
    step(compiled)  # traced and compiled here

    def entered(*args, **kwargs):
        raise AssertionError("the compiled graph called back into the op's Python")

    if traced:
        monkeypatch.setattr(ops, "fused_forward", entered)
        monkeypatch.setattr(ops, "fused_backward", entered)
    got = step(compiled)
    for name, a, b in zip(("y",) + NAMES, want, got):
        assert torch.equal(a, b), f"{name} differs between the compiled op and the eager op"


@requires_cuda
@pytest.mark.gpu
@pytest.mark.minutes(1.25)
def test_compiled_backbone_fused_fullgraph_forward_backward(monkeypatch):
    """The fused op inside a fullgraph-compiled backbone (a narrow one: compile time is not what is tested):
    bf16 training step finite; in fp32 eval mode the compiled model gives the torch backend's logits.

    cuDNN's TF32 (on by default) is turned off: with it, the compiled and the eager model's convolutions round
    their inputs to 10-bit mantissas in different algorithms, and the logits part by ~1.4e-4 relative whatever
    the scan backend (measured on an H100; 1.5e-7 without TF32).

    Dynamo's state is reset first: a backbone compiled earlier in the process at other shapes (a GPU `fit` of
    another test) would make this compile dynamic in batch and image size (automatic dynamic shapes), a
    different test, which torch 2.11's inductor fails with an internal assertion in its tiling analysis."""
    from src.models.spatial_mamba import SpatialMamba

    torch._dynamo.reset()
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = SpatialMamba(dims=[32, 64, 128, 256], depths=[1, 1, 2, 1], num_classes=10, backend="fused",
                         drop_path_rate=0.0).cuda()
    compiled = torch.compile(model, fullgraph=True)
    images = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = compiled(images)
    out.float().sum().backward()
    assert torch.isfinite(out).all()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()  # BatchNorm from running statistics: both passes see the same function
    with torch.no_grad():
        got = compiled(images)
        model.set_backend("torch")
        ref = model(images)
    assert rel_err(got, ref.double()) < 1e-4
