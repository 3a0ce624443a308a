"""The Triton depthwise convolution (with residual or SiLU) of `src/kernels/dwconv.py` against its float64
definition, output and every gradient; its fallbacks; determinism; and the model with its convolutions on the
kernels against nn.Conv2d. Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py).

Tolerances, ‖got − ref‖ / ‖ref‖ against float64 on the same (rounded) inputs: fp32 1e-5; fp16 4e-3 and bf16
2e-2 (output and dx rounded to the input's dtype; the parameters' gradients accumulated in fp32 / fp64).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from src.kernels import dwconv, fused
from src.kernels.dwconv import depthwise_conv, dwconv_ref
from tests.conftest import requires_cuda, tiny_backbone_both_ways

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "non-finite values"
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def make_conv(C: int, k: int = 3, bias: bool = True, device=DEVICE) -> nn.Conv2d:
    conv = nn.Conv2d(C, C, k, padding=k // 2, groups=C, bias=bias).to(device)
    with torch.no_grad():  # every tap and channel different, so that a misplaced tap shows
        conv.weight.normal_()
        if bias:
            conv.bias.normal_()
    return conv


def check_against_reference(shape, C: int, dtype: torch.dtype, k: int = 3, residual: bool = False,
                            silu: bool = False, bias: bool = True, strided: bool = False, device=DEVICE) -> None:
    """x (B, H, W, C) — with `strided`, one half of a (B, H, W, 2C) projection, read in place — through the
    kernels and through `dwconv_ref` in float64: output and the gradients of x, weight and bias."""
    conv = make_conv(C, k, bias, device)
    xx = torch.randn(*shape, 2 * C if strided else C, device=device).to(dtype).requires_grad_()
    x = xx[..., :C] if strided else xx
    y = depthwise_conv(x, conv, residual=residual, silu=silu)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    dy = torch.randn_like(y)
    params = [conv.weight] + ([conv.bias] if bias else [])
    grads = torch.autograd.grad(y, [xx] + params, dy)

    ref_in = [t.detach().double().requires_grad_() for t in [xx] + params]
    x64 = ref_in[0][..., :C] if strided else ref_in[0]
    y64 = dwconv_ref(x64, ref_in[1], ref_in[2] if bias else None, residual, silu)
    ref_grads = torch.autograd.grad(y64, ref_in, dy.double())

    tol = TOL[dtype]
    assert rel_err(y, y64) < tol, f"output: {rel_err(y, y64):.2e}"
    for name, g, r in zip(("x", "weight", "bias"), grads, ref_grads):
        assert g.dtype == (dtype if name == "x" else torch.float32), name
        assert rel_err(g, r) < tol, f"d{name}: {rel_err(g, r):.2e} >= {tol}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["plain", "residual", "silu"])
def test_matches_reference(mode, dtype):
    # 5 × 7 maps: ragged column tiles; C = 20: a ragged channel block
    check_against_reference((2, 5, 7), 20, dtype, residual=mode == "residual", silu=mode == "silu")


def test_strided_input_without_bias_and_residual_with_silu():
    """The SSM's convolution reads one half of the input projection in place; no bias; both epilogues at once."""
    check_against_reference((2, 4, 6), 8, torch.float32, silu=True, residual=True, bias=False, strided=True)


@pytest.mark.parametrize("k", [1, 5])
def test_other_kernel_sizes(k):
    check_against_reference((1, 6, 5), 4, torch.float32, k=k, residual=True)


def test_maps_smaller_than_the_kernel_and_several_row_bands(monkeypatch):
    """A 2 × 3 map under a 5 × 5 kernel (most taps outside); and a taller map walked in bands of 2 rows by
    several programs, whose partials are summed."""
    check_against_reference((2, 2, 3), 4, torch.float32, k=5, silu=True)
    monkeypatch.setattr(fused, "ROWS_PER_PROGRAM", 2)
    fused._grid_of.cache_clear()
    check_against_reference((2, 9, 4), 4, torch.float32, residual=True)
    fused._grid_of.cache_clear()


def test_deterministic():
    conv = make_conv(16)
    x = torch.randn(3, 6, 9, 16, device=DEVICE, requires_grad=True)
    dy = torch.randn(3, 6, 9, 16, device=DEVICE)
    runs = []
    for _ in range(2):
        y = depthwise_conv(x, conv, silu=True)
        runs.append([y, *torch.autograd.grad(y, [x, conv.weight, conv.bias], dy)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_falls_back_where_the_kernel_does_not_apply():
    """Strided, dilated, grouped (not depthwise), even-sized or reflect-padded convolutions, fp64 and empty
    inputs give the plain module's result (no error, no kernel call)."""
    x = torch.randn(2, 5, 6, 4, device=DEVICE)
    convs = [nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4), nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4),
             nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 4, 2, padding=1, groups=4),
             nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect"), nn.Conv2d(4, 4, 3, groups=4)]
    for conv in convs:
        conv = conv.to(DEVICE)
        assert not dwconv.kernel_fits(x, conv)
        want = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        assert torch.equal(depthwise_conv(x, conv), want)
    conv64 = make_conv(4).double()
    x64 = x.double()
    assert torch.equal(depthwise_conv(x64, conv64, residual=True),
                       x64 + conv64(x64.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    assert depthwise_conv(x[:0], make_conv(4)).shape == (0, 5, 6, 4)
    conv = make_conv(4)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):  # x + conv(x) stays fp32 under autocast
        want = x + conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        assert torch.equal(depthwise_conv(x, conv, residual=True), want) and want.dtype == torch.float32
    assert torch.equal(depthwise_conv(x, conv, silu=True, kernel=False),
                       torch.nn.functional.silu(conv(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1))


def test_images_beyond_32_bit_offsets_take_the_plain_path(monkeypatch):
    conv = make_conv(4)
    x = torch.randn(2, 5, 6, 4, device=DEVICE)
    assert dwconv.kernel_fits(x, conv)
    monkeypatch.setattr(dwconv, "MAX_IMAGE_EXTENT", 5 * 6 * 4 - 1)
    assert not dwconv.kernel_fits(x, conv)
    assert torch.equal(depthwise_conv(x, conv, residual=True), x + conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


@pytest.mark.parametrize("traced_convs", [False, True], ids=["traced-off", "default"])
def test_traced_code_uses_the_plain_ops(monkeypatch, traced_convs):
    """Under torch.compile (dynamo, eager backend here) only CUDA tensors take the traced op (the default,
    `TRACED_CONVS`): on the CPU, and with it turned off, the graph holds the module's convolution, which inductor
    handles itself."""
    monkeypatch.setattr(dwconv, "TRACED_CONVS", traced_convs)
    conv = make_conv(8)
    x = torch.randn(2, 5, 5, 8, device=DEVICE)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fn = torch.compile(lambda x: depthwise_conv(x, conv, residual=True), backend=backend, fullgraph=True)
    got = fn(x)
    assert graphs and not any("DepthwiseConv" in str(n.target) for n in graphs[0].graph.nodes)
    torch.testing.assert_close(got, x + conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


def _traced_and_eager(x, conv, silu, residual, dy):
    """(output, dx, dweight, dbias) through the traced op (`depthwise_conv_traced`) and through `_DepthwiseConv`."""
    runs = []
    for traced in (True, False):
        xi = x.detach().clone().requires_grad_()
        params = [p for p in (conv.weight, conv.bias) if p is not None]
        if traced:
            y = dwconv.depthwise_conv_traced(xi, conv.weight, conv.bias, silu, residual)[0]
        else:
            y = dwconv._DepthwiseConv.apply(xi, conv.weight, conv.bias, silu, residual)
        runs.append([y, *torch.autograd.grad(y, [xi, *params], dy)])
    return runs


@pytest.mark.parametrize("silu,residual,bias", [(False, True, True), (True, False, True), (True, False, False),
                                                (False, False, False)])
def test_traced_op_outside_a_trace_is_the_eager_kernels(silu, residual, bias):
    """The convolution as a `triton_op` (what a compiled graph on a GPU launches itself): called outside a trace,
    output and every gradient bitwise those of the eager autograd Function (the same launchers)."""
    conv = make_conv(16, bias=bias)
    x = torch.randn(2, 5, 7, 16, device=DEVICE)
    dy = torch.randn(2, 5, 7, 16, device=DEVICE)
    traced, eager = _traced_and_eager(x, conv, silu, residual, dy)
    assert len(traced) == len(eager) == 3 + bias
    for a, b in zip(traced, eager):
        assert torch.equal(a, b)


@pytest.mark.parametrize("silu,residual,bias", [(False, True, True), (True, False, True), (True, False, False),
                                                (False, False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_traced_ops_plain_path_matches_the_kernels(silu, residual, bias, dtype):
    """What the traced op computes where its kernels cannot be traced (symbolic sizes, the interpreter's fake
    tensors): PyTorch's convolution and its backward, against the kernels' launchers, every output."""
    conv = make_conv(16, bias=bias)
    x = torch.randn(2, 5, 7, 16, device=DEVICE, dtype=dtype)
    dy = torch.randn(2, 5, 7, 16, device=DEVICE, dtype=dtype)
    y, pre = dwconv._forward(x, conv.weight, conv.bias, silu, residual)
    want = [y, *dwconv._backward(dy, x, pre, conv.weight, conv.bias, residual)]
    py, ppre = dwconv._plain_forward(x, conv.weight, conv.bias, silu, residual)
    got = [py, *dwconv._plain_backward(dy, x, ppre, conv.weight, conv.bias, silu, residual)]
    if silu:
        torch.testing.assert_close(ppre, pre, **({} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)))
    for name, g, w in zip(("y", "dx", "dweight", "dbias"), got, want):
        if w is None:
            assert g.numel() == 0, name
            continue
        assert g.shape == w.shape and g.dtype == w.dtype and g.is_contiguous(), name
        assert rel_err(g, w.double()) < (1e-6 if dtype == torch.float32 else TOL[dtype]), name


@pytest.mark.parametrize("silu,bias", [(True, True), (False, False)])
def test_traced_op_opcheck(silu, bias):
    """Schema, autograd registration, fake tensors and AOT dispatch (static and dynamic shapes) of the traced op;
    under the interpreter its fake tensors get empty outputs of the right shapes."""
    conv = make_conv(8, bias=bias)
    x = torch.randn(2, 4, 5, 8, device=DEVICE, requires_grad=True)
    args = (x, conv.weight.detach().clone().requires_grad_(),
            None if conv.bias is None else conv.bias.detach().clone().requires_grad_(), silu, not silu)
    torch.library.opcheck(torch.ops.spatial_mamba.depthwise_conv_traced.default, args)


def test_model_with_kernel_convs_matches_nn_conv2d(monkeypatch):
    """The whole backbone, fused backend, its blocks' depthwise convolutions on the kernels vs nn.Conv2d: same
    logits and parameter gradients (fp32) to rounding."""
    out, calls = tiny_backbone_both_ways(monkeypatch, "fused_convs", dwconv)
    calls = [a[3:] for a in calls]  # (silu, residual)
    # per block: cpe1 and cpe2 with the residual, the SSM's convolution with the SiLU; only with fused_convs
    assert calls == [(False, True), (True, False), (False, True)] * 4
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-4, atol=1e-5)
    for name, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], g, rtol=1e-3, atol=1e-5, msg=name)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("C", [64, 256])  # T's stage-1 width and its SSM's stage-2 width
def test_gpu_bf16(C):
    check_against_reference((8, 56, 56), C, torch.bfloat16, residual=True)
    check_against_reference((8, 28, 28), C, torch.bfloat16, silu=True, strided=True)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("config", range(max(len(dwconv.FWD_CONFIGS), len(dwconv.BWD_CONFIGS))))
def test_gpu_every_candidate_tile(config, monkeypatch):
    """Each candidate tile alone (the tuner picks any of them), compiled for the GPU: a map of several column
    tiles with ragged edges, both epilogues, against float64."""
    for name in ("FWD_CONFIGS", "BWD_CONFIGS"):
        configs = getattr(dwconv, name)
        monkeypatch.setattr(dwconv, name, (configs[config % len(configs)],))
    check_against_reference((2, 13, 37), 96, torch.float32, residual=True)
    check_against_reference((2, 13, 37), 96, torch.float32, silu=True, strided=True)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 5])
def test_gpu_other_kernel_sizes(k):
    """Compiled for the GPU, the rolling window of k = 1 (no rows carried) and k = 5 (four rows carried)."""
    check_against_reference((2, 9, 11), 32, torch.float32, k=k, residual=True)
    check_against_reference((2, 9, 11), 32, torch.float32, k=k, silu=True, strided=True)


@requires_cuda
@pytest.mark.gpu
def test_gpu_autocast_output_dtype_and_determinism():
    """Under autocast an fp32 input is convolved with bf16 I/O (the SSM's convolution: SiLU, no residual), and the
    parameters' fixed-order sums give the same bits twice at a stage-1 size."""
    conv = make_conv(128, device="cuda")
    x = torch.randn(16, 56, 56, 128, device="cuda", requires_grad=True)
    dy = torch.randn(16, 56, 56, 128, device="cuda", dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = depthwise_conv(x, conv, silu=True)
        assert y.dtype == torch.bfloat16
        runs.append([y, *torch.autograd.grad(y, [x, conv.weight, conv.bias], dy)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    ref = dwconv_ref(x.detach().bfloat16().double(), conv.weight.double(), conv.bias.double(), silu=True)
    assert rel_err(runs[0][0], ref) < TOL[torch.bfloat16]


@requires_cuda
@pytest.mark.gpu
def test_gpu_traced_op_in_a_compiled_graph(monkeypatch):
    """By default (`TRACED_CONVS`), a compiled graph launches the convolution's kernels itself: after the first call
    the launchers' Python is never entered again, and output and gradients are bitwise the eager kernels' (the
    same tiles: the suite runs with SPATIAL_MAMBA_TUNE=0), for the SiLU and the residual, under autocast."""
    monkeypatch.setattr(dwconv, "TRACED_CONVS", True)
    torch._dynamo.reset()
    convs = [make_conv(64, device="cuda") for _ in range(2)]
    x = torch.randn(4, 14, 14, 64, device="cuda")
    dy = torch.randn(4, 14, 14, 64, device="cuda", dtype=torch.bfloat16)

    def block(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return depthwise_conv(depthwise_conv(x, convs[0], silu=True), convs[1], residual=True)

    def step(fn):
        xi = x.detach().clone().requires_grad_()
        params = [p for c in convs for p in (c.weight, c.bias)]
        y = fn(xi)
        return [y, *torch.autograd.grad(y, [xi, *params], dy)]

    compiled = torch.compile(block, fullgraph=True)
    want = step(block)
    step(compiled)  # traced and compiled here

    def entered(*args, **kwargs):
        raise AssertionError("the compiled graph called back into the launchers' Python")

    monkeypatch.setattr(dwconv, "_forward", entered)
    monkeypatch.setattr(dwconv, "_backward", entered)
    got = step(compiled)
    for i, (a, b) in enumerate(zip(want, got)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"output {i} differs between the compiled and eager kernels"
