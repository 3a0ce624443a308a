"""The backbone: exact sizes of the published variants, parity with the authors' model, fusion identical
in train and eval, every ablation knob, checkpoints, and clear errors on bad input."""

from pathlib import Path

import pytest
import torch

from src.flops import count_macs, count_params
from src.models.spatial_mamba import (
    Block,
    SpatialMamba,
    StructureAwareSSM,
    convert_official_state_dict,
    spatial_mamba_b,
    spatial_mamba_s,
    spatial_mamba_t,
)

DATA = Path(__file__).parent / "data"


def tiny(**kwargs):
    kw = dict(num_classes=10, dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), drop_path_rate=0.0)
    return SpatialMamba(**{**kw, **kwargs})


@pytest.mark.parametrize(
    "factory,params,gmacs",
    [(spatial_mamba_t, 26_748_862, 4.411), (spatial_mamba_s, 43_074_280, 7.038), (spatial_mamba_b, 95_745_592, 15.681)],
)
def test_published_sizes(factory, params, gmacs):
    model = factory()
    assert count_params(model) == params
    assert count_macs(model, 224) / 1e9 == pytest.approx(gmacs, rel=5e-3)


def test_official_key_names_are_all_mapped():
    names = [line.split()[0] for line in (DATA / "official_tiny_state_dict.txt").read_text().splitlines()]
    shapes = [tuple(int(s) for s in line.split("(")[1].rstrip(")").split(",") if s.strip())
              for line in (DATA / "official_tiny_state_dict.txt").read_text().splitlines()]
    official = {n: torch.zeros(s) for n, s in zip(names, shapes)}
    converted = convert_official_state_dict(official)
    own = spatial_mamba_t().state_dict()
    assert set(converted) == set(own)
    assert all(converted[k].shape == own[k].shape for k in own)


def test_parity_with_official_logits_float64():
    ref = torch.load(DATA / "official_parity_dims8.pt", weights_only=True)
    cfg = ref["config"]
    model = SpatialMamba(num_classes=cfg["num_classes"], dims=[cfg["dims"] * 2**i for i in range(4)],
                         depths=cfg["depths"]).double().eval()
    model.load_state_dict(convert_official_state_dict(ref["state_dict"]))
    with torch.no_grad():
        logits = model(ref["input"])
    assert (logits - ref["logits"]).abs().max().item() <= 1e-10


@pytest.mark.parametrize("wrapped", [False, True])
def test_pretrained_loads_official_checkpoint(tmp_path, wrapped):
    ref = torch.load(DATA / "official_parity_dims8.pt", weights_only=True)
    path = tmp_path / "official.pth"
    torch.save({"model": ref["state_dict"]} if wrapped else ref["state_dict"], path)
    torch.set_default_dtype(torch.float64)  # parameters created in float64 keep the file's precision
    try:
        model = SpatialMamba(num_classes=10, dims=[8, 16, 32, 64], depths=ref["config"]["depths"],
                             pretrained=str(path)).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        assert (model(ref["input"]) - ref["logits"]).abs().max().item() <= 1e-10


def test_fusion_is_the_same_in_train_and_eval():
    ssm = StructureAwareSSM(8, dilations=(1, 3, 5)).double()
    with torch.no_grad():
        ssm.state_fusion.weight.normal_()
    u = torch.randn(2, 6, 10, 8, dtype=torch.float64)
    ssm.train()
    y_train = ssm(u)
    ssm.eval()
    with torch.no_grad():
        y_eval = ssm(u)
        ssm.state_fusion.weight.mul_(2)  # parameters change (training goes on): eval must follow
        y_changed = ssm(u)
    torch.testing.assert_close(y_train.detach(), y_eval, rtol=0, atol=0)
    assert not torch.allclose(y_eval, y_changed)


@pytest.mark.parametrize("dilations", [[], [1], [1, 3], [1, 3, 5, 7], [1, 2, 3]])
@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_any_dilation_list_and_kernel_size(dilations, kernel_size):
    model = tiny(dilations=dilations, fusion_kernel_size=kernel_size)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()


@pytest.mark.parametrize("scan", ["row", "row_reversed", "column", "column_reversed", "bidirectional", "cross"])
def test_every_scan_direction(scan):
    out = tiny(scan=scan)(torch.randn(1, 3, 32, 64))
    assert out.shape == (1, 10)


def test_scan_direction_changes_the_function():
    torch.manual_seed(0)
    a = tiny(scan="row").eval()
    b = tiny(scan="column").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))


def test_d_state_above_one_on_reference_backend():
    out = tiny(d_state=4)(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_features_for_dense_heads():
    model = tiny(features_only=True)
    feats = model(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, 8, 16, 24), (2, 16, 8, 12), (2, 32, 4, 6), (2, 64, 2, 3)]


def test_no_weight_decay_names():
    names = tiny().no_weight_decay()
    assert "stages.0.0.ssm.A_log" in names and "stages.0.0.ssm.D" in names
    assert "stages.0.0.ssm.state_fusion.alpha" in names and "stages.0.0.norm1.weight" in names
    assert "stages.0.0.ssm.state_fusion.weight" not in names and "stages.0.0.ssm.in_proj.weight" not in names


def test_save_load_same_logits(tmp_path):
    model = tiny().eval()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    other = tiny(pretrained=str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), other(x), rtol=0, atol=0)


def test_pretrained_head_of_other_size_is_left_initialised(tmp_path):
    """Fine-tuning on other classes: every tensor but the head comes from the checkpoint, the head keeps the
    initialisation the model gets without a checkpoint (the shape alone is fixed by the constructor)."""
    path = tmp_path / "model.pt"
    torch.manual_seed(0)
    saved = tiny(num_classes=10).state_dict()
    torch.save(saved, path)
    torch.manual_seed(1)
    fresh = tiny(num_classes=3).state_dict()
    torch.manual_seed(1)
    model = tiny(num_classes=3, pretrained=str(path)).state_dict()
    assert model.keys() == saved.keys()
    for k, v in model.items():
        expected = fresh[k] if k.startswith("head.") else saved[k]
        assert torch.equal(v, expected), k
    assert not torch.equal(model["stages.0.0.ssm.in_proj.weight"], fresh["stages.0.0.ssm.in_proj.weight"])


# --- bad input: one clear error naming what was wrong ------------------------------------------------

@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(backend="cudnn"), "unknown backend 'cudnn'"),
        (dict(scan="diagonal"), "unknown scan 'diagonal'"),
        (dict(fusion_kernel_size=4), "odd"),
        (dict(fusion_kernel_size=-3), "odd"),
        (dict(dilations=[1, 0]), "dilations must be positive"),
        (dict(d_state=0), "d_state"),
        (dict(dims=[8, 16, 32]), "4 entries"),
        (dict(depths=[1, -1, 1, 1]), r"depths must be integers >= 0 .*depths=\[1, -1, 1, 1\]"),
        (dict(dims=[8, 0, 8, 8]), r"dims integers >= 1"),
        (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\).*got 1.0"),
        (dict(drop_path_rate=-0.1), r"drop_path_rate must be in \[0, 1\)"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_bad_images():
    model = tiny()
    with pytest.raises(ValueError, match="not a multiple of 32"):
        model(torch.randn(1, 3, 225, 224))
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="expected images of shape"):
        model(torch.randn(3, 64, 64))


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        tiny(pretrained=str(tmp_path / "missing.pth"))
    sd = tiny().state_dict()
    sd["stages.0.0.extra.weight"] = torch.zeros(1)
    del sd["stages.1.0.ssm.D"]
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(KeyError, match=r"missing keys \['stages.1.0.ssm.D'\].*unexpected keys \['stages.0.0.extra.weight'\]"):
        tiny(pretrained=str(path))
    torch.save(tiny(dims=(8, 16, 32, 48)).state_dict(), path)
    with pytest.raises(ValueError, match="wrong shape"):
        tiny(pretrained=str(path))


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = tiny(drop_path_rate=0.0)
    b = tiny(drop_path_rate=0.0, grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_stochastic_depth_draws_the_same_random_numbers_at_every_rate():
    """A training forward at rate 0 draws its (all-keep) masks like any other rate: a run's later random draws
    (augmentation, shuffling) do not depend on whether stochastic depth is on, and a rate-0 run keeps the
    trajectory it always had (skipping the draws at rate 0 took the digits quickstart from 99.7 to 98.9 %)."""
    after = []
    for rate in (0.0, 0.3):
        model = tiny(drop_path_rate=rate).train()
        torch.manual_seed(0)
        model(torch.randn(2, 3, 32, 32))
        after.append(torch.rand(4))
    torch.testing.assert_close(after[0], after[1], rtol=0, atol=0)
    block, x = Block(8, drop_path=0.0), torch.randn(2, 5, 5, 8)
    assert torch.equal(block.train()(x), block.eval()(x))  # rate 0 keeps every branch, unscaled


# ---------- the authors' checkpoints: float64 end to end, their evaluation path ----------

def test_float64_model_keeps_a_in_float64():
    """A = -exp(A_log) was computed from A_log.float(): a float64 run lost A's precision (gradcheck then fails)."""
    torch.manual_seed(0)
    ssm = StructureAwareSSM(4, dilations=(1, 2)).double()
    with torch.no_grad():
        ssm.A_log.normal_()
    u = torch.randn(1, 3, 4, 4, dtype=torch.float64)

    def output(a_log):
        return torch.func.functional_call(ssm, {"A_log": a_log}, (u,))

    assert torch.autograd.gradcheck(output, (ssm.A_log.detach().clone().requires_grad_(),))


def test_float64_default_dtype_builds_and_loads_every_parameter_in_float64(tmp_path):
    """A_log was created float32 whatever the default dtype: the authors' float64 weights lost their precision."""
    torch.set_default_dtype(torch.float64)
    try:
        model = tiny()
        assert {p.dtype for p in model.parameters()} == {torch.float64}
        state = {k: v + 1e-12 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        torch.save(state, tmp_path / "weights.pth")
        loaded = tiny(pretrained=str(tmp_path / "weights.pth"))
    finally:
        torch.set_default_dtype(torch.float32)
    for name, value in loaded.state_dict().items():
        assert value.dtype == state[name].dtype and torch.equal(value, state[name]), name


@pytest.mark.parametrize("dilations,kernel_size", [((1, 3, 5), 3), ((1, 2), 3), ((2, 3), 5)])
def test_merged_kernel_with_zero_padding_equals_the_dilated_convolutions(dilations, kernel_size):
    """The authors' evaluation: one (k-1)·max(d)+1 kernel with zero padding = Σ alpha_i · dilated conv_i with zero
    padding (and not the replicate-padded fusion of training, which differs near the border only)."""
    from src.kernels.reference import merge_fusion_kernels, state_fusion_ref

    torch.manual_seed(0)
    D, H, W, k = 4, 13, 17, kernel_size
    weight = torch.randn(len(dilations), D, k, k, dtype=torch.float64)
    alpha = torch.randn(len(dilations), dtype=torch.float64)
    h = torch.randn(2, D, H, W, dtype=torch.float64)
    merged = merge_fusion_kernels(weight, alpha, dilations)
    side = (k - 1) * max(dilations) + 1
    assert merged.shape == (D, side, side)
    separate = sum(a * torch.nn.functional.conv2d(h, w[:, None], dilation=d, padding=d * (k // 2), groups=D)
                   for a, w, d in zip(alpha, weight, dilations))
    one = torch.nn.functional.conv2d(h, merged[:, None], padding=side // 2, groups=D)
    torch.testing.assert_close(one, separate, rtol=0, atol=1e-12)
    zeros = state_fusion_ref(h[:, :, None].flatten(-2), weight, alpha, dilations, H, W, padding="zeros")
    torch.testing.assert_close(zeros.view(2, D, H, W), separate, rtol=0, atol=1e-12)
    replicate = state_fusion_ref(h[:, :, None].flatten(-2), weight, alpha, dilations, H, W).view(2, D, H, W)
    r = max(dilations) * (k // 2)
    torch.testing.assert_close(replicate[..., r:-r, r:-r], separate[..., r:-r, r:-r], rtol=0, atol=1e-12)
    assert not torch.allclose(replicate, separate)


def test_merged_kernel_has_the_authors_layout():
    """Their 11×11 kernel for 3×3 kernels at dilations 1, 3, 5: rows/columns 4:7, 2:9:3 and 0:11:5."""
    from src.kernels.reference import merge_fusion_kernels

    weight, alpha = torch.randn(3, 2, 3, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    expected = torch.zeros(2, 11, 11, dtype=torch.float64)
    expected[:, 4:7, 4:7] += alpha[0] * weight[0]
    expected[:, 2:9:3, 2:9:3] += alpha[1] * weight[1]
    expected[:, 0:11:5, 0:11:5] += alpha[2] * weight[2]
    torch.testing.assert_close(merge_fusion_kernels(weight, alpha, (1, 3, 5)), expected, rtol=0, atol=0)


def test_authors_evaluation_option_changes_only_eval():
    torch.manual_seed(0)
    ours = tiny().double()
    theirs = tiny(fusion_eval_padding="zeros").double()
    with torch.no_grad():
        for m in ours.modules():
            if hasattr(m, "state_fusion"):
                m.state_fusion.weight.normal_()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(theirs.train()(x), ours.train()(x), rtol=0, atol=0)  # training: replicate in both
    with torch.no_grad():
        ours_eval, theirs_eval = ours.eval()(x), theirs.eval()(x)
    assert (ours_eval - theirs_eval).abs().max() > 1e-6
    # one SSM: the outputs differ only within max(d)·(k // 2) = 5 pixels of the border
    ssm_ours, ssm_theirs = ours.stages[0][0].ssm, theirs.stages[0][0].ssm
    u = torch.randn(1, 16, 16, 8, dtype=torch.float64)
    with torch.no_grad():
        a, b = ssm_ours(u), ssm_theirs(u)
    torch.testing.assert_close(a[:, 5:-5, 5:-5], b[:, 5:-5, 5:-5], rtol=0, atol=1e-12)
    assert (a - b).abs().max() > 1e-6
    with pytest.raises(ValueError, match="fusion_eval_padding must be one of"):
        tiny(fusion_eval_padding="reflect")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_runs_on_the_cpu(dtype):
    """A model cast with .half() / .to(bfloat16) failed inside the reference fusion (fp32 A met fp16 kernels)."""
    torch.manual_seed(0)
    model = tiny(backend="torch").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        got = model.to(dtype)(x.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=0, atol={torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype])
