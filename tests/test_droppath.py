"""The residual add with stochastic depth in Triton (`src/kernels/droppath.py`) against the plain ops: the same
random draws, the output and both gradients against a float64 pass with the same mask (CPU interpreter), the same
bits as the plain ops on a GPU, the fallbacks, and the model with and without it."""

from __future__ import annotations

import pytest
import torch

from src.kernels import droppath, residual_drop_path
from src.kernels.droppath import residual_drop_path as kernel_residual_drop_path
from tests.conftest import requires_cuda, tiny_backbone_both_ways

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def plain(x, branch, keep_prob, training=True):
    return residual_drop_path(x, branch, keep_prob, training, backend="torch")


def inputs(dtype, shape=(6, 5, 7, 16), device=DEVICE):
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    branch = torch.randn(shape, device=device).to(dtype).requires_grad_()
    return x, branch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_float64_with_the_same_mask_and_random_stream(dtype):
    x, branch = inputs(dtype, (16, 5, 7, 16))
    keep_prob = torch.tensor(0.55, device=DEVICE)
    dy = torch.randn_like(x)
    torch.manual_seed(3)
    out = kernel_residual_drop_path(x, branch, keep_prob, True)
    after_kernel = torch.rand(4, device=DEVICE)
    torch.manual_seed(3)
    mask = branch.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep_prob)
    after_plain = torch.rand(4, device=DEVICE)
    assert torch.equal(after_kernel, after_plain), "the kernel path must draw the same random numbers"
    assert 0 < mask.sum() < x.shape[0], "some samples kept and some dropped (16 draws at 0.55)"
    assert out.dtype == dtype
    dx, dbranch = torch.autograd.grad(out, [x, branch], dy)

    kp = keep_prob.to(dtype).double()  # the division reads keep_prob in the activations' dtype
    ref = x.detach().double() + branch.detach().double() * mask.double() / kp
    tol = TOL[dtype]
    assert ((out.double() - ref).norm() / ref.norm()).item() < tol
    assert torch.equal(dx, dy)
    ref_db = dy.double() * mask.double() / kp
    assert ((dbranch.double() - ref_db).norm() / ref_db.norm()).item() < tol
    assert torch.equal(dbranch[mask.flatten() == 0], torch.zeros_like(dbranch[mask.flatten() == 0]))


def test_eval_keep_everything_and_rate_zero():
    x, branch = inputs(torch.float32)
    assert torch.equal(kernel_residual_drop_path(x, branch, torch.tensor(0.8, device=DEVICE), False), x + branch)
    out = kernel_residual_drop_path(x, branch, torch.tensor(1.0, device=DEVICE), True)
    assert torch.equal(out, x + branch)


def test_falls_back_to_the_plain_ops():
    """Strided branch, mixed dtypes, a keep probability on another device or not 0-d: the plain expression, same
    bits and same draws."""
    x, branch = inputs(torch.float32)
    kp = torch.tensor(0.75, device=DEVICE)
    cases = [(x, branch.transpose(1, 2).contiguous().transpose(1, 2), kp), (x, branch.half(), kp),
             (x, branch, kp.reshape(1))]
    for a, b, p in cases:
        torch.manual_seed(1)
        got = kernel_residual_drop_path(a, b, p, True)
        torch.manual_seed(1)
        assert torch.equal(got, plain(a, b, p))


def test_model_with_the_kernel_matches_the_plain_ops(monkeypatch):
    """The whole backbone (fused backend), stochastic depth 0.5, with and without the kernels: the same draws,
    the same logits and gradients to rounding, and the kernels ran (2 per block)."""
    out, calls = tiny_backbone_both_ways(monkeypatch, "fused_drop_path", droppath, batch=4, drop_path_rate=0.5)
    assert len(calls) == 8, "two residual branches in each of the 4 blocks, and only with the kernels"
    assert torch.equal(out[True][2], out[False][2])
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    for name, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], g, rtol=1e-4, atol=1e-6, msg=name)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_same_bits_as_the_plain_ops(dtype):
    """Stage-1 size, a keep probability not representable in bf16: output and gradients bitwise the plain ops'."""
    x, branch = inputs(dtype, (64, 56, 56, 64), "cuda")
    keep_prob = 1.0 - torch.tensor(0.2 * 7 / 17, device="cuda")
    dy = torch.randn_like(x)
    runs = []
    for fn in (kernel_residual_drop_path, lambda *a: plain(*a)):
        torch.manual_seed(5)
        out = fn(x, branch, keep_prob, True)
        runs.append([out, *torch.autograd.grad(out, [x, branch], dy)])
    for name, a, b in zip(("out", "dx", "dbranch"), *runs):
        assert torch.equal(a, b), name
