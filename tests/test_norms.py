"""The Triton LayerNorm (optionally gated by SiLU) of `src/kernels/norms.py` against its float64 definition, for
the output and every gradient; its fallbacks; and the model with its norms on the kernels against nn.LayerNorm.
On a machine without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py), in fp32 and fp16.

Tolerances, ‖got − ref‖ / ‖ref‖ against float64 on the same (rounded) inputs: fp32 1e-5; fp16 4e-3 and
bf16 2e-2 (output, dx, dz rounded to the input's dtype; statistics and parameter gradients fp32).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from src.kernels import layer_norm
from src.kernels import norms
from src.kernels.norms import layer_norm_ref
from tests.conftest import requires_cuda, tiny_backbone_both_ways

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "non-finite values"
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def make_norm(N: int, device=DEVICE) -> nn.LayerNorm:
    norm = nn.LayerNorm(N).to(device)
    with torch.no_grad():  # away from the ones / zeros init, so that their gradients' paths are exercised
        norm.weight.normal_(1.0, 0.5)
        norm.bias.normal_(0.0, 0.5)
    return norm


def check_against_reference(shape, N: int, gated: bool, dtype: torch.dtype, strided_gate: bool = True,
                            device=DEVICE) -> None:
    norm = make_norm(N, device)
    x = (torch.randn(*shape, N, device=device) * 3 + 1).to(dtype).requires_grad_()
    # the gate as the model passes it: one half of a chunked projection (rows at stride 2N)
    zz = torch.randn(*shape, 2 * N if strided_gate else N, device=device).to(dtype).requires_grad_()
    z = (zz[..., N:] if strided_gate else zz) if gated else None
    y = norms.layer_norm(x, norm, z)
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn_like(y)
    wrt = [x, norm.weight, norm.bias] + ([zz] if gated else [])
    grads = torch.autograd.grad(y, wrt, dy)

    ref_in = [t.detach().double().requires_grad_() for t in wrt]
    x64, w64, b64 = ref_in[:3]
    z64 = ((ref_in[3][..., N:] if strided_gate else ref_in[3]) if gated else None)
    y64 = layer_norm_ref(x64, w64, b64, norm.eps, z64)
    ref_grads = torch.autograd.grad(y64, ref_in, dy.double())

    tol = TOL[dtype]
    assert rel_err(y, y64) < tol, "output"
    for name, g, r in zip(("x", "weight", "bias", "gate"), grads, ref_grads):
        assert g.dtype == (dtype if name in ("x", "gate") else torch.float32), name
        assert rel_err(g, r) < tol, f"d{name}: {rel_err(g, r):.2e} >= {tol}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("N", [8, 24, 64])
def test_matches_reference(N, gated, dtype):
    # 2·3·7 = 42 rows: ragged last row block; the backward's programs each take several blocks at N = 64
    check_against_reference((2, 3, 7), N, gated, dtype)


def test_many_rows_several_blocks_per_program(monkeypatch):
    """More row blocks than backward programs: each program accumulates its weight-gradient partials over
    several blocks; the partials are then summed."""
    monkeypatch.setattr(norms, "_num_sms", lambda device: 1)  # 4 programs
    check_against_reference((3, 50), 16, True, torch.float32)


def test_contiguous_gate():
    check_against_reference((2, 5), 12, True, torch.float32, strided_gate=False)


def test_deterministic():
    norm = make_norm(32)
    x = torch.randn(4, 9, 32, device=DEVICE, requires_grad=True)
    z = torch.randn(4, 9, 32, device=DEVICE, requires_grad=True)
    dy = torch.randn(4, 9, 32, device=DEVICE)
    runs = []
    for _ in range(2):
        y = norms.layer_norm(x, norm, z)
        runs.append([y, *torch.autograd.grad(y, [x, z, norm.weight, norm.bias], dy)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_falls_back_where_the_kernel_does_not_apply():
    """fp64, a gate of another dtype and norms without affine parameters give the plain modules' result (no
    error, no kernel); so does every backend but fused. Non-contiguous inputs and gates are copied for the
    kernel."""
    norm = make_norm(8)
    x = torch.randn(3, 5, 8, device=DEVICE)
    z = torch.randn(3, 5, 8, device=DEVICE)
    plain = lambda x, n=norm, z=None: n(x) if z is None else n(x) * torch.nn.functional.silu(z)  # noqa: E731
    xt = torch.randn(5, 3, 8, device=DEVICE).transpose(0, 1)  # not contiguous
    torch.testing.assert_close(norms.layer_norm(xt, norm), plain(xt))
    zb = z[:, :1].expand_as(x)  # rows at stride 0: no (M, N) view
    torch.testing.assert_close(norms.layer_norm(x, norm, zb), plain(x, z=zb))
    assert torch.equal(norms.layer_norm(x, norm, z.half()), plain(x, z=z.half()))
    x64, n64 = x.double(), make_norm(8).double()
    assert torch.equal(norms.layer_norm(x64, n64), plain(x64, n64))
    bare = nn.LayerNorm(8, elementwise_affine=False).to(DEVICE)
    assert torch.equal(norms.layer_norm(x, bare), bare(x))
    for backend in ("torch", "triton"):
        assert torch.equal(layer_norm(x, norm, z, backend=backend), plain(x, z=z))


def test_traced_code_uses_the_plain_ops():
    """Under torch.compile (dynamo, eager backend here) the kernels are not traced: the graph holds
    F.layer_norm, which inductor fuses itself."""
    norm = make_norm(16)
    x = torch.randn(2, 6, 16, device=DEVICE)
    z = torch.randn(2, 6, 16, device=DEVICE)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fn = torch.compile(lambda x, z: norms.layer_norm(x, norm, z), backend=backend, fullgraph=True)
    got = fn(x, z)
    assert graphs and any(n.target is torch.nn.functional.layer_norm for n in graphs[0].graph.nodes)
    torch.testing.assert_close(got, norm(x) * torch.nn.functional.silu(z))


def test_model_with_kernel_norms_matches_nn_layernorm(monkeypatch):
    """The whole backbone, fused backend, its norms on the kernels vs nn.LayerNorm: same logits and
    parameter gradients (fp32) to rounding."""
    out, calls = tiny_backbone_both_ways(monkeypatch, "fused_norms", norms)
    assert len(calls) == 12, "3 norms in each of the 4 blocks, and only with fused_norms"
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-4, atol=1e-5)
    for name, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], g, rtol=1e-3, atol=1e-5, msg=name)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("N", [96, 1536])  # B's stage-1 width and its widest gate; 64: the test below
def test_gpu_bf16(N):
    check_against_reference((4, 33, 17), N, True, torch.bfloat16)
    check_against_reference((4, 33, 17), N, False, torch.bfloat16)


@requires_cuda
@pytest.mark.gpu
def test_gpu_autocast_output_dtype_and_determinism():
    """Under autocast a fp32 input is normalised in bf16 I/O (the next linear would cast it anyway), and the
    weight gradients' fixed-order sum gives the same bits twice at a stage-1 size."""
    norm = make_norm(64, "cuda")
    x = torch.randn(16, 56, 56, 64, device="cuda", requires_grad=True)
    dy = torch.randn(16, 56, 56, 64, device="cuda", dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer_norm(x, norm, backend="fused")
        assert y.dtype == torch.bfloat16
        runs.append([y, *torch.autograd.grad(y, [x, norm.weight, norm.bias], dy)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    ref = layer_norm_ref(x.detach().double(), norm.weight.double(), norm.bias.double(), norm.eps)
    assert rel_err(runs[0][0], ref) < TOL[torch.bfloat16]
