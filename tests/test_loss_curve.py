"""benchmarks/loss_curve.py: the training-equivalence check runs end to end, and its comparisons can fail."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("loss_curve", ROOT / "benchmarks" / "loss_curve.py")
loss_curve = importlib.util.module_from_spec(_spec)
sys.modules["loss_curve"] = loss_curve  # dataclasses look their module up there
_spec.loader.exec_module(loss_curve)
Pass = loss_curve.Pass


def _grads(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g, dtype=torch.float64)
            for name, shape in [("stem.weight", (16, 3, 3, 3)), ("ssm.A_log", (16, 1)), ("ssm.alpha", (3,)),
                                ("head.weight", (10, 16))]}


def _with(grads: dict, name: str, value: torch.Tensor) -> dict:
    return {**grads, name: value}


def test_reference_against_itself_passes(tmp_path):
    out = tmp_path / "check.json"
    code = loss_curve.main(["--backends", "torch", "--model", "digits", "--size", "32", "--batch", "8", "--steps", "3",
                            "--checkpoints", "0,3", "--seeds", "2", "--precisions", "fp32", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["passed"] and result["reasons"] == []
    assert [(c["step"], c["backend"], c["precision"]) for c in result["checks"]] == [(0, "torch", "fp32"),
                                                                                   (3, "torch", "fp32")]
    assert all(c["loss_diff"] == 0.0 for c in result["checks"])
    assert len(result["reference_losses"]) == 3 and len(result["seeds"]["finals"]["torch"]) == 2


def test_fp32_comparison_fails_on_a_gradient_off_by_one_percent():
    ref = Pass(2.3, _grads())
    assert loss_curve.compare_fp32(Pass(2.3, dict(ref.grads)), ref, ref).passed
    check = loss_curve.compare_fp32(Pass(2.3, _with(ref.grads, "ssm.A_log", 1.01 * ref.grads["ssm.A_log"])), ref, ref)
    assert not check.passed and check.worst == "ssm.A_log"
    assert math.isclose(check.worst_err, 0.01, rel_tol=1e-9)
    assert len(check.failures) == 1 and check.failures[0].startswith("ssm.A_log")
    assert not loss_curve.compare_fp32(Pass(2.3 * (1 + 1e-3), dict(ref.grads)), ref, ref).passed  # the loss too


def test_fp32_allowance_follows_the_references_own_error():
    """A reference 1e-3 off the float64 truth admits a backend 2e-3 off it, not one 1e-2 off."""
    truth = Pass(2.3, _grads())
    noise = _grads(seed=1)["stem.weight"]
    ref = Pass(2.3, _with(truth.grads, "stem.weight", truth.grads["stem.weight"] + 1e-3 * noise * truth.grads[
        "stem.weight"].norm() / noise.norm()))
    near = _with(ref.grads, "stem.weight", ref.grads["stem.weight"] * (1 + 2e-3))
    far = _with(ref.grads, "stem.weight", ref.grads["stem.weight"] * (1 + 1e-2))
    assert loss_curve.compare_fp32(Pass(2.3, near), ref, truth).passed
    assert not loss_curve.compare_fp32(Pass(2.3, far), ref, truth).passed


def test_gradients_zero_in_exact_arithmetic_are_bounded_and_nan_fails():
    truth = Pass(2.3, _with(_grads(), "ssm.alpha", torch.zeros(3, dtype=torch.float64)))
    ref = Pass(2.3, _with(truth.grads, "ssm.alpha", torch.full((3,), 1e-9, dtype=torch.float64)))
    noisy = _with(ref.grads, "ssm.alpha", torch.full((3,), -3e-9, dtype=torch.float64))  # noise, other sign
    assert loss_curve.compare_fp32(Pass(2.3, noisy), ref, truth).passed
    assert not loss_curve.compare_fp32(Pass(2.3, _with(ref.grads, "ssm.alpha", torch.ones(3))), ref, truth).passed
    nan = _with(ref.grads, "head.weight", torch.full((10, 16), math.nan, dtype=torch.float64))
    assert not loss_curve.compare_fp32(Pass(2.3, nan), ref, truth).passed


def test_bf16_comparison_fails_on_a_gradient_worse_than_the_references_own():
    g32 = _grads()
    ref32 = Pass(2.3, g32)
    ref16 = Pass(2.301, {n: g * (1 + 2e-3 * torch.randn_like(g)) for n, g in g32.items()})  # its own bf16 error
    like_ref = Pass(2.302, {n: g * (1 + 2e-3 * torch.randn_like(g)) for n, g in g32.items()})
    assert loss_curve.compare_bf16(like_ref, ref16, ref32, ref32).passed
    scaled = Pass(2.302, _with(like_ref.grads, "stem.weight", 1.2 * g32["stem.weight"]))  # cosine 1, size 20 % off
    check = loss_curve.compare_bf16(scaled, ref16, ref32, ref32)
    assert not check.passed and check.worst == "stem.weight"
    turned = Pass(2.302, _with(like_ref.grads, "ssm.A_log", g32["ssm.A_log"] + 0.5 * _grads(3)["ssm.A_log"]))
    assert not loss_curve.compare_bf16(turned, ref16, ref32, ref32).passed


def test_seed_overlap():
    assert loss_curve.seed_overlap([0.10, 0.14, 0.12], [0.11, 0.13, 0.15])[2]
    diff, limit, ok = loss_curve.seed_overlap([0.30, 0.31, 0.32], [0.11, 0.13, 0.15])
    assert not ok and math.isclose(diff, 0.18) and math.isclose(limit, 0.04)
    assert not loss_curve.seed_overlap([0.1, math.nan], [0.1, 0.2])[2]


_PROBE = loss_curve.probe


def _off_probe(model, state, x, y, bf16=False):
    """The checker's probe, with the `auto` backend's head.bias gradient 0.1 % off (a wrong kernel's mark)."""
    result = _PROBE(model, state, x, y, bf16)
    if "auto" in {getattr(m, "backend", None) for m in model.modules()}:
        result.grads["head.bias"] = result.grads["head.bias"] * 1.001
    return result


def test_main_fails_and_names_the_tensor_when_a_backend_is_off(monkeypatch, tmp_path, capsys):
    """`auto` is the torch backend on a CPU; a probe that scales one of its gradients must make the run FAIL."""
    monkeypatch.setattr(loss_curve, "probe", _off_probe)
    out = tmp_path / "check.json"
    code = loss_curve.main(["--backends", "torch,auto", "--model", "digits", "--size", "32", "--batch", "8",
                            "--steps", "1", "--checkpoints", "1", "--seeds", "0", "--precisions", "fp32",
                            "--json", str(out)])
    assert code == 1
    result = json.loads(out.read_text())
    assert [c["passed"] for c in result["checks"]] == [True, False]
    assert result["checks"][1]["worst"] == "head.bias"
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("training-equivalence: FAIL (auto fp32 step 1: head.bias")


def test_bad_arguments_end_with_one_line_and_exit_code_2(capsys):
    """The script's argument errors take the project's one error path (`error: ...`, exit 2, as main.py's)."""
    assert loss_curve.main(["--model", "digits", "--steps", "0"]) == 2
    assert capsys.readouterr().err == "error: --steps must be ≥ 1, got 0\n"
    assert loss_curve.main(["--model", "digits", "--backends", "torch,nope"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown backend 'nope'; expected one of torch, ")


def test_a_failing_checkpoint_is_saved_and_replays(monkeypatch, tmp_path, capsys):
    """--save-failing writes the checkpoint a comparison failed at; --replay checks those weights and that batch
    again without training: FAIL again while the backend is off, PASS once it is right."""
    monkeypatch.setattr(loss_curve, "probe", _off_probe)
    saved = tmp_path / "ckpts"
    code = loss_curve.main(["--backends", "auto", "--model", "digits", "--size", "32", "--batch", "8", "--steps", "2",
                            "--checkpoints", "2", "--seeds", "0", "--precisions", "fp32", "--save-failing", str(saved)])
    assert code == 1
    path = saved / "digits-32px-step2.pt"
    assert path.is_file() and f"saved the checkpoint for --replay: {path}" in capsys.readouterr().out
    out = tmp_path / "replay.json"
    code = loss_curve.main(["--backends", "auto", "--replay", str(path), "--precisions", "fp32", "--json", str(out)])
    assert code == 1
    result = json.loads(out.read_text())
    assert [(c["step"], c["passed"], c["worst"]) for c in result["checks"]] == [(2, False, "head.bias")]
    assert "it failed with: auto fp32: head.bias" in capsys.readouterr().out
    monkeypatch.setattr(loss_curve, "probe", _PROBE)
    assert loss_curve.main(["--backends", "auto", "--replay", str(path), "--precisions", "fp32"]) == 0
    assert loss_curve.main(["--replay", str(tmp_path / "nope.pt")]) == 2
    assert capsys.readouterr().err.startswith("error: --replay: no such file")
