"""`src.kernels.autocast_weights`: a block's projection weights cast for autocast at once. The backbone gives the
same bits with it as with autocast's own per-linear casts; it stands aside wherever it does not apply; gradients
come back in the weights' dtype, an unused weight's undefined."""

from __future__ import annotations

import pytest
import torch

from src import kernels
from src.kernels import autocast_weights
from src.models import spatial_mamba
from tests.conftest import HAS_CUDA, requires_cuda

DEVICE = "cuda" if HAS_CUDA else "cpu"


def backbone_step(monkeypatch, cast: bool, dtype=torch.bfloat16, device=DEVICE):
    """Logits and parameter gradients of the 4-block backbone (fused backend; its SSM op as the torch reference,
    whose own tests are elsewhere) under autocast, with or without `autocast_weights`, and how often it cast."""
    op = spatial_mamba.structure_aware_ssm
    monkeypatch.setattr(spatial_mamba, "structure_aware_ssm", lambda *a, **k: op(*a, **{**k, "backend": "torch"}))
    casts = []
    monkeypatch.setattr(spatial_mamba, "autocast_weights",
                        lambda x, w, backend: casts.append(1) or autocast_weights(x, w, backend) if cast else tuple(w))
    torch.manual_seed(0)
    model = spatial_mamba.SpatialMamba(num_classes=5, dims=[8, 16, 16, 16], depths=[1, 1, 1, 1], backend="fused",
                                       drop_path_rate=0.1).to(device)
    with torch.autocast(torch.device(device).type, dtype=dtype):
        logits = model(torch.randn(2, 3, 64, 64, device=device))
    logits.float().square().sum().backward()
    return logits, {n: p.grad for n, p in model.named_parameters()}, len(casts)


def test_backbone_gives_the_same_bits_as_autocasts_own_casts(monkeypatch):
    """A cast rounds alike either way, and a weight's gradient is its bf16 gradient cast to fp32 either way."""
    logits, grads, casts = backbone_step(monkeypatch, cast=True)
    ref_logits, ref_grads, _ = backbone_step(monkeypatch, cast=False)
    assert casts == 4, "one cast per block"
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, ref_logits)
    for name, g in ref_grads.items():
        assert g is not None and grads[name].dtype == torch.float32 and torch.equal(grads[name], g), name


def test_the_blocks_linears_cast_nothing_themselves(monkeypatch):
    """Under autocast the cast weights reach the projections in autocast's dtype: no cast of an fp32 weight is
    left in the blocks' forward (the stem's, downsamples' and head's layers keep autocast's own)."""
    op = spatial_mamba.structure_aware_ssm
    monkeypatch.setattr(spatial_mamba, "structure_aware_ssm", lambda *a, **k: op(*a, **{**k, "backend": "torch"}))
    model = spatial_mamba.SpatialMamba(num_classes=5, dims=[8, 16, 16, 16], depths=[1, 1, 1, 1], backend="fused")
    block = model.stages[0][0].to(DEVICE)
    seen = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: seen.append((w.dtype, b)) or
                        linear(x, w, b))
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        block(torch.randn(2, 8, 8, 8, device=DEVICE, requires_grad=True)).float().sum().backward()
    assert len(seen) == 6 and all(d == torch.bfloat16 and (b is None or b.dtype == torch.bfloat16) for d, b in seen)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in block.parameters())


def weights(device=DEVICE, dtype=torch.float32):
    return [torch.randn(6, 4, device=device, dtype=dtype, requires_grad=True),
            torch.randn(6, device=device, dtype=dtype, requires_grad=True)]


@pytest.mark.parametrize("case", ["no_autocast", "torch_backend", "fp64_weight", "compiling"])
def test_stands_aside_where_it_does_not_apply(monkeypatch, case):
    x = torch.randn(3, 4, device=DEVICE)
    w = weights(dtype=torch.float64 if case == "fp64_weight" else torch.float32)
    backend = "torch" if case == "torch_backend" else "fused"
    if case == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16, enabled=case != "no_autocast"):
        out = autocast_weights(x, w, backend)
    assert all(a is b for a, b in zip(out, w)) and len(out) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_casts_and_gradients_match_autocasts(dtype):
    x = torch.randn(3, 4, device=DEVICE)
    w = weights()
    with torch.autocast(torch.device(DEVICE).type, dtype=dtype):
        cast = autocast_weights(x, w, "fused")
    assert [c.dtype for c in cast] == [dtype, dtype]
    assert all(torch.equal(c, p.to(dtype)) for c, p in zip(cast, w))
    g = torch.randn(6, 4, device=DEVICE).to(dtype)
    (cast[0] * g).sum().backward()  # the bias unused: its gradient stays undefined
    assert w[0].grad.dtype == torch.float32 and torch.equal(w[0].grad, g.float())
    assert w[1].grad is None


def test_no_grad_inference_casts_without_a_graph():
    x = torch.randn(3, 4, device=DEVICE)
    with torch.no_grad(), torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        cast = autocast_weights(x, weights(), "fused")
    assert all(c.dtype == torch.bfloat16 and c.grad_fn is None for c in cast)


def test_the_kernels_run_where_this_casts():
    """It applies with the backends whose Triton kernels run (`fused`, `auto` on CUDA) and on x's device."""
    x = torch.randn(3, 4, device=DEVICE)
    assert kernels._kernels_run("fused", x)
    assert not kernels._kernels_run("torch", x)


@requires_cuda
@pytest.mark.gpu
def test_gpu_backbone_same_bits(monkeypatch):
    logits, grads, casts = backbone_step(monkeypatch, cast=True, device="cuda")
    ref_logits, ref_grads, _ = backbone_step(monkeypatch, cast=False, device="cuda")
    assert casts == 4 and torch.equal(logits, ref_logits)
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name
