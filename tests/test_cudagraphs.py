"""src/cudagraphs.py: the eager step recorded as one CUDA graph gives the eager step's weights; the classifier's
`eager_cudagraphs` (the knob's wiring on the CPU; on a GPU the recorded training forward/backward and teacher
forward against the eager module, and a short `fit` with EMA, MESA, mixup and bf16)."""

import copy

import pytest
import torch

import main
from src.errors import UserError
from tests.conftest import requires_cuda


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("eager_kernels", [False, True])
def test_graph_step_trains_as_the_eager_step(monkeypatch, eager_kernels, optimizer):
    """A training step of a narrow Spatial-Mamba (fused backend, fp32) replayed from its recording moves the
    weights as the same number of eager steps does: the first call is warm-up (3) + 1 steps, each later call one
    more; new data written into the input tensor is seen by the replay. `eager_kernels`: with the Triton
    LayerNorms, depthwise convolutions and drop path (`fused_norms`, `fused_convs`, `fused_drop_path`).

    The recording and the eager module round differently (kernel choices), and some gradients are pure rounding
    noise: a depthwise conv bias whose channel always passes the ReLU before `reduce` + BatchNorm has a true
    gradient of zero. Adam's first steps are sign-like, so with its default eps such noise moves a weight by
    ±lr either way; the AdamW case therefore uses eps=1e-4, which leaves gradients of 1e-7 nearly still and
    real ones Adam-like, and SGD with momentum checks the step with no such amplification."""
    from src.cudagraphs import graph_step
    from src.models.spatial_mamba import SpatialMamba

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    device = torch.device("cuda")
    model = SpatialMamba(dims=[16, 32, 64, 128], depths=[1, 1, 2, 1], num_classes=10, backend="fused",
                         drop_path_rate=0.0, fused_norms=eager_kernels, fused_convs=eager_kernels,
                         fused_drop_path=eager_kernels).to(device).to(memory_format=torch.channels_last)
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4,), device=device)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-4, fused=True, capturable=True)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, eps=1e-4, fused=True)

    def step():
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def ref_step(inputs):
        torch.nn.functional.cross_entropy(ref(inputs), y).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    replay = graph_step(step, opt, device)
    replay()
    for _ in range(4):
        ref_step(x)
    new = torch.randn_like(x)
    x.copy_(new)
    replay()
    ref_step(new)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]
BACKBONE = "--model.init_args.backbone.init_args."


def test_eager_cudagraphs_with_compile_is_refused():
    from src.models.classifier import ImageClassifier

    with pytest.raises(UserError, match=r"eager_cudagraphs records the eager kernels .*compile to null or false"):
        ImageClassifier(torch.nn.Linear(4, 10), num_classes=10, eager_cudagraphs=True, compile=True)
    ImageClassifier(torch.nn.Linear(4, 10), num_classes=10, eager_cudagraphs=True, compile=False)


def test_eager_cudagraphs_with_gradient_accumulation_is_refused():
    cli = main.cli(["--model.init_args.eager_cudagraphs=true", "--model.init_args.compile=false",
                    "--trainer.accumulate_grad_batches=2", "--trainer.accelerator=cpu", *QUIET], run=False)
    cli.trainer.strategy.connect(cli.model)
    cli.model.trainer = cli.trainer
    with pytest.raises(UserError,
                       match=r"eager_cudagraphs with gradient accumulation .*=2\).*accumulate_grad_batches 1"):
        cli.model.setup("fit")


def test_eager_cudagraphs_turns_the_automatic_compile_off():
    """compile: null means "on for CUDA" unless eager_cudagraphs is on; an explicit false stays false."""
    for graphs, compile_, on_gpu in ((False, "null", True), (True, "null", False), (False, "false", False)):
        cli = main.cli([f"--model.init_args.eager_cudagraphs={graphs}", f"--model.init_args.compile={compile_}",
                        *QUIET], run=False)
        assert cli.model._use_compile(on_gpu=True) is on_gpu, (graphs, compile_)


def _tiny_backbone():
    from src.models.spatial_mamba import SpatialMamba

    return SpatialMamba(dims=[16, 32, 64, 128], depths=[1, 1, 2, 1], num_classes=10, backend="fused",
                        drop_path_rate=0.0).cuda().to(memory_format=torch.channels_last)


@requires_cuda
@pytest.mark.gpu
def test_graphed_training_forward_matches_eager(monkeypatch):
    """Training mode uses batch statistics, so the three warm-up passes' BatchNorm updates do not change the
    outputs: the replayed forward and backward give the eager module's logits and gradients."""
    from src.cudagraphs import graph_training_forward

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = _tiny_backbone()
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    graph_training_forward(model, x, None)
    for _ in range(2):  # each replay takes the new input
        xi = torch.randn_like(x)
        got, want = model(xi), ref(xi)
        got.square().mean().backward()
        want.square().mean().backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")
            p.grad, q.grad = None, None
    other = torch.randn(2, 3, 64, 64, device="cuda")  # another shape: the module's own forward
    torch.testing.assert_close(model(other), ref(other), rtol=1e-5, atol=1e-5)
    # eval mode runs the module itself, with BatchNorm's running statistics: the recording's warm-up passes left
    # them as they were, so both modules have seen the same three batches
    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


@requires_cuda
@pytest.mark.gpu
def test_recording_leaves_no_trace_and_replays_draw_drop_path_masks_as_eager(monkeypatch):
    """Recording restores BatchNorm's statistics and the CUDA generator, so that from the same seed the replayed
    steps of a backbone with stochastic depth draw the eager module's drop-path masks: same logits, gradients and
    running statistics step by step (what makes a resumed `eager_cudagraphs` run the uninterrupted one)."""
    from src.cudagraphs import graph_training_forward
    from src.models.spatial_mamba import SpatialMamba

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = SpatialMamba(dims=[16, 32, 64, 128], depths=[1, 1, 2, 1], num_classes=10, backend="fused",
                         drop_path_rate=0.5).cuda().to(memory_format=torch.channels_last)
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    inputs = [torch.randn_like(x) for _ in range(3)]
    torch.manual_seed(1234)
    state = torch.cuda.get_rng_state()
    graph_training_forward(model, x, None)
    assert torch.equal(torch.cuda.get_rng_state(), state), "recording left the CUDA generator advanced"
    for (name, mine), theirs in zip(model.named_buffers(), ref.buffers()):
        assert torch.equal(mine, theirs), f"recording changed buffer {name}"

    def run(module):
        torch.cuda.set_rng_state(state)
        outs = []
        for xi in inputs:
            logits = module(xi)
            logits.square().mean().backward()
            outs.append((logits.detach().clone(), [p.grad.clone() for p in module.parameters()]))
            module.zero_grad(set_to_none=True)
        return outs

    got, want = run(model), run(ref)
    names = [n for n, _ in model.named_parameters()]
    for step, ((logits, grads), (ref_logits, ref_grads)) in enumerate(zip(got, want)):
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {step}: {m}")
        for name, g, h in zip(names, grads, ref_grads):
            torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    for (name, mine), theirs in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@requires_cuda
@pytest.mark.gpu
def test_inference_graph_matches_the_module_and_returns_copies():
    from src.cudagraphs import InferenceGraph

    model = _tiny_backbone().eval()
    x = torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    graph = InferenceGraph(model, x, torch.bfloat16)
    first = graph(x)
    y = torch.randn_like(x)
    second = graph(y)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(first, model(x))
        torch.testing.assert_close(second, model(y))
        assert not torch.equal(first, second)  # the first output was not overwritten by the second replay
        torch.testing.assert_close(graph(x[:2]), model(x[:2]))  # another shape: the module itself


@requires_cuda
@pytest.mark.gpu
@pytest.mark.minutes(0.5)
def test_fit_with_eager_cudagraphs(tmp_path, monkeypatch):
    """A short fit with the recipe's pieces (EMA, MESA from the start, mixup, bf16) records the graphs once and
    trains to finite losses; validation (eval mode) runs the modules themselves."""
    monkeypatch.chdir(tmp_path)
    cli = main.cli([*QUIET, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=6",
                    "--trainer.limit_val_batches=2", "--trainer.val_check_interval=3", "--trainer.accelerator=gpu",
                    "--trainer.devices=1", "--trainer.precision=bf16-mixed", "--model.init_args.eager_cudagraphs=true",
                    "--model.init_args.ema_decay=0.99", "--model.init_args.mesa=1.0", "--model.init_args.mesa_start=0",
                    "--model.init_args.mixup=0.8", "--model.init_args.cutmix=1.0",
                    f"{BACKBONE}dims=[8, 16, 32, 64]", f"{BACKBONE}depths=[1, 1, 1, 1]", f"{BACKBONE}backend=fused",
                    f"{BACKBONE}fused_norms=true", f"{BACKBONE}fused_convs=true", f"{BACKBONE}fused_drop_path=true",
                    "--data.init_args.batch_size=16"], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 6
    assert cli.model._graphed and cli.model._teacher_graph is not None
    assert torch.isfinite(torch.as_tensor(cli.trainer.callback_metrics["train/loss"])).all()
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())
