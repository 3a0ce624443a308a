"""The plain-torch reference kernels: the chunked scan equals the token-by-token recurrence, the fusion
equals its definition with clamped indices, and autograd gradients pass gradcheck."""

import pytest
import torch

from src.kernels.reference import (
    SCAN_DIRECTIONS,
    SCANS,
    observe,
    replicate_pad,
    scan_order,
    selective_scan_loop,
    selective_scan_ref,
    state_fusion_ref,
    structure_aware_ssm_ref,
)


def make_inputs(Bsz=2, D=3, N=1, H=5, W=7, K=3, k=3, dtype=torch.float64, requires_grad=False):
    L = H * W
    t = dict(
        x=torch.randn(Bsz, D, L),
        dt=torch.randn(Bsz, D, L),
        A=-torch.rand(D, N) * 2 - 0.1,
        B=torch.randn(Bsz, N, L),
        C=torch.randn(Bsz, N, L),
        D=torch.randn(D),
        dt_bias=torch.randn(D) * 0.5 - 2,
        weight=torch.randn(K, D, k, k),
        alpha=torch.randn(K),
    )
    return {n: v.to(dtype).requires_grad_(requires_grad) for n, v in t.items()}


@pytest.mark.parametrize("direction", SCAN_DIRECTIONS)
@pytest.mark.parametrize("H,W,N,chunk", [(5, 7, 1, 4), (6, 6, 2, 32), (1, 9, 1, 2), (7, 1, 1, 3), (1, 1, 1, 8)])
def test_chunked_scan_equals_loop(direction, H, W, N, chunk):
    t = make_inputs(N=N, H=H, W=W)
    args = (t["x"], t["dt"], t["A"], t["B"], t["dt_bias"], H, W, direction)
    expected = selective_scan_loop(*args)
    got = selective_scan_ref(*args, chunk=chunk)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_scan_order_visits_every_token_once():
    H, W = 3, 4
    assert scan_order("row", H, W).tolist() == list(range(12))
    assert scan_order("column", H, W).tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    assert scan_order("row_reversed", H, W).tolist() == list(range(11, -1, -1))
    assert scan_order("column_reversed", H, W).tolist() == [11, 7, 3, 10, 6, 2, 9, 5, 1, 8, 4, 0]


def test_multi_direction_scans_sum_their_directions():
    H, W = 4, 5
    t = make_inputs(H=H, W=W)
    args = (t["x"], t["dt"], t["A"], t["B"], t["dt_bias"], H, W)
    zero = dict(weight=t["weight"][:0], alpha=t["alpha"][:0])
    channels_last = {n: t[n].transpose(1, 2) for n in ("x", "dt", "B", "C")}  # the op's (B, L, ·) interface
    for scan, directions in SCANS.items():
        y = structure_aware_ssm_ref(channels_last["x"], channels_last["dt"], t["A"], channels_last["B"],
                                    channels_last["C"], t["D"], t["dt_bias"], zero["weight"], zero["alpha"], [],
                                    H, W, scan)
        h = sum(selective_scan_loop(*args, d) for d in directions)
        torch.testing.assert_close(y, observe(h, t["C"], t["D"], t["x"]).transpose(1, 2))


def fusion_by_definition(h, weight, alpha, dilations, H, W):
    """h'[i, j] = Σ_k α_k Σ_{a,b} w_k[a, b] · h[clamp(i + (a − r)·d_k), clamp(j + (b − r)·d_k)]."""
    Bsz, D, N, L = h.shape
    hm = h.reshape(Bsz, D, N, H, W)
    out = torch.zeros_like(hm)
    k = weight.shape[-1]
    r = k // 2
    for kk, d in enumerate(dilations):
        for a in range(k):
            for b in range(k):
                rows = (torch.arange(H) + (a - r) * d).clamp(0, H - 1)
                cols = (torch.arange(W) + (b - r) * d).clamp(0, W - 1)
                shifted = hm[:, :, :, rows][:, :, :, :, cols]
                out = out + alpha[kk] * weight[kk, :, a, b][None, :, None, None, None] * shifted
    return out.reshape(Bsz, D, N, L)


@pytest.mark.parametrize("dilations", [[], [1], [1, 3, 5], [1, 3, 5, 7], [2]])
@pytest.mark.parametrize("H,W,k,N", [(5, 7, 3, 1), (8, 8, 3, 2), (3, 11, 5, 1), (2, 2, 3, 1)])
def test_fusion_equals_definition(dilations, H, W, k, N):
    t = make_inputs(N=N, H=H, W=W, K=len(dilations), k=k)
    h = torch.randn(2, 3, N, H * W, dtype=torch.float64)
    got = state_fusion_ref(h, t["weight"], t["alpha"], dilations, H, W)
    expected = fusion_by_definition(h, t["weight"], t["alpha"], dilations, H, W) if dilations else h
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scan", ["row", "column_reversed", "bidirectional"])
@pytest.mark.parametrize("dilations", [[], [1, 3]])
def test_gradcheck(scan, dilations):
    H, W = 3, 4
    t = make_inputs(Bsz=1, D=2, H=H, W=W, K=len(dilations), requires_grad=True)
    names = ["x", "dt", "A", "B", "C", "D", "dt_bias", "weight", "alpha"]

    def f(x, dt, A, B, C, *params):  # channels-first test tensors, the op's channels-last interface
        return structure_aware_ssm_ref(x.mT, dt.mT, A, B.mT, C.mT, *params, dilations, H, W, scan)

    assert torch.autograd.gradcheck(f, tuple(t[n] for n in names), eps=1e-6, atol=1e-7)


def test_reference_runs_in_float32_and_has_no_nan_for_long_sequences():
    H, W = 64, 64
    t = make_inputs(Bsz=1, D=2, H=H, W=W, dtype=torch.float32)
    t.update({n: t[n].transpose(1, 2) for n in ("x", "dt", "B", "C")})  # (B, L, ·), the op's interface
    y = structure_aware_ssm_ref(*(t[n] for n in ["x", "dt", "A", "B", "C", "D", "dt_bias", "weight", "alpha"]),
                                [1, 3, 5], H, W)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


@pytest.mark.parametrize("padding", ["replicate", "zeros"])
def test_reference_ignores_autocast_and_computes_in_float32(padding):
    """Under bf16 autocast (which would run the fusion's convolutions in bf16) the op gives the bits it gives
    outside autocast, forward and backward: it computes in fp32 on every backend, so mixed precision rounds only
    its inputs and output."""
    H, W = 6, 7
    t = make_inputs(Bsz=2, D=4, H=H, W=W, dtype=torch.float32)
    t.update({n: t[n].transpose(1, 2).to(torch.bfloat16) for n in ("x", "dt", "B", "C")})  # activations in bf16
    names = ["x", "dt", "A", "B", "C", "D", "dt_bias", "weight", "alpha"]

    def run(autocast: bool):
        inputs = [t[n].clone().requires_grad_(True) for n in names]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = structure_aware_ssm_ref(*inputs, [1, 3, 5], H, W, padding=padding)
        y.float().square().sum().backward()
        return [y] + [i.grad for i in inputs]

    plain, under_autocast = run(False), run(True)
    assert plain[0].dtype == torch.bfloat16
    for name, a, b in zip(["y"] + names, plain, under_autocast):
        assert torch.equal(a, b), f"{name} differs under autocast"


@pytest.mark.parametrize("r", [0, 1, 3, 5])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 2, 1, 1), (2, 2, 3, 1)])
def test_replicate_pad_is_pytorchs_replicate_padding(shape, r):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    got, expected = replicate_pad(x, r), torch.nn.functional.pad(x, (r, r, r, r), mode="replicate")
    assert torch.equal(got, expected)
    dy = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, x, dy)[0], torch.autograd.grad(expected, x, dy)[0],
                               rtol=1e-12, atol=1e-12)


def test_compiled_fusion_trains_on_the_cpu():
    """The fusion compiled (as regional compilation of T compiles it with the torch backend): forward and
    backward equal eager's. With F.pad's replicate mode, torch 2.14's CPU backward stopped on a stride assertion
    (its kernel returned contiguous gradients where its meta kernel promised channels-last ones)."""
    H, W = 4, 4
    h = torch.randn(2, 8, 1, H * W, requires_grad=True)
    weight, alpha = torch.randn(3, 8, 3, 3, requires_grad=True), torch.randn(3, requires_grad=True)

    def fusion(h, weight, alpha):
        return state_fusion_ref(h, weight, alpha, [1, 3, 5], H, W)

    dy = torch.randn(2, 8, 1, H * W)
    compiled = torch.compile(fusion, fullgraph=True)(h, weight, alpha)
    got = torch.autograd.grad(compiled, (h, weight, alpha), dy)
    eager = fusion(h, weight, alpha)
    expected = torch.autograd.grad(eager, (h, weight, alpha), dy)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
