"""The activation memory budget of compiled training graphs (src/compiling.py): set from the LightningModules'
`compile_memory_budget` (a bad value is a one-line error: tests/test_cli.py), and it does cut what the compiled graph saves."""

import pytest
import torch
from torch._functorch import config as functorch_config

import main
from src.compiling import DEFAULT_MEMORY_BUDGET, compile_for_training, set_memory_budget
from src.errors import UserError


@pytest.fixture(autouse=True)
def _restore_budget():
    before = functorch_config.activation_memory_budget
    yield
    functorch_config.activation_memory_budget = before


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, True, "0.8", None])
def test_a_budget_outside_0_1_is_refused_naming_the_key(bad):
    with pytest.raises(UserError, match=r"my\.key must be a number in \(0, 1\]"):
        set_memory_budget(bad, key="my.key")


def test_the_classifier_sets_the_budget_when_it_compiles(monkeypatch):
    monkeypatch.setattr(functorch_config, "activation_memory_budget", 1.0)
    cli = main.cli(["--model.init_args.compile=true", "--model.init_args.compile_memory_budget=0.6",
                    "--trainer.accelerator=cpu", "--trainer.logger=false"], run=False)
    assert functorch_config.activation_memory_budget == 1.0  # nothing is set before the module is set up
    cli.model.setup("fit")
    assert cli.model._compiled and functorch_config.activation_memory_budget == 0.6
    assert cli.model.hparams.compile_memory_budget == 0.6


def test_the_default_budget_is_the_documented_one():
    cli = main.cli(["--trainer.accelerator=cpu", "--trainer.logger=false"], run=False)
    assert cli.model.hparams.compile_memory_budget == DEFAULT_MEMORY_BUDGET == 0.8


def _saved_bytes(budget: float) -> int:
    """Bytes of the activations a compiled training graph of a small MLP-and-norm stack keeps for its backward
    (outputs of the partitioned forward graph that are not its inputs), with the given budget."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    saved = []

    def forward_compiler(gm, inputs):
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        saved.append(sum(n.meta["val"].numel() * n.meta["val"].element_size() for n in out
                         if n is not None and n.op != "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)))
        return gm.forward

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, inputs: gm.forward,
                           partition_fn=min_cut_rematerialization_partition)
    torch.manual_seed(0)
    layers = []
    for _ in range(3):
        layers += [torch.nn.LayerNorm(64), torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)]
    model = torch.nn.Sequential(*layers)
    set_memory_budget(budget)
    torch._dynamo.reset()
    torch.compile(model, backend=backend)(torch.randn(512, 64, requires_grad=True)).sum().backward()
    torch._dynamo.reset()
    return saved[0]


def test_a_smaller_budget_saves_less():
    full, default = _saved_bytes(1.0), _saved_bytes(DEFAULT_MEMORY_BUDGET)
    assert default < 0.85 * full, (default, full)


def test_compile_for_training_skips_none_and_compiles_in_place():
    model = torch.nn.Linear(2, 2)
    names = [n for n, _ in model.named_parameters()]
    compile_for_training(model, None, memory_budget=0.9)
    assert model._compiled_call_impl is not None and [n for n, _ in model.named_parameters()] == names
    assert functorch_config.activation_memory_budget == 0.9


def test_regional_compile_is_reached_from_the_config(monkeypatch):
    calls = []
    from src.models.spatial_mamba import SpatialMamba

    monkeypatch.setattr(SpatialMamba, "compile", lambda self, *a, regional=False, **k: calls.append(regional))
    cli = main.cli(["--model.init_args.compile=true", "--model.init_args.compile_regional=true",
                    "--trainer.accelerator=cpu", "--trainer.logger=false"], run=False)
    cli.model.setup("fit")
    assert calls == [True]


def test_regional_compile_of_a_module_without_it_is_refused():
    with pytest.raises(UserError, match="compile_regional: Linear has no regional compilation"):
        compile_for_training(torch.nn.Linear(2, 2), regional=True)


@pytest.mark.parametrize("regional", [False, True])
def test_cuda_graphs_are_reached_from_the_config(monkeypatch, regional):
    """compile_cudagraphs compiles with torch.compile's mode "reduce-overhead" (graphs replayed as CUDA graphs),
    whole or regionally; off, no mode is passed (torch's default)."""
    from src.models.spatial_mamba import SpatialMamba

    for cudagraphs in (True, False):
        calls = []
        monkeypatch.setattr(SpatialMamba, "compile",
                            lambda self, *a, regional=False, **k: calls.append(k | ({"regional": True} if regional else {})))
        cli = main.cli(["--model.init_args.compile=true", f"--model.init_args.compile_regional={regional}",
                        f"--model.init_args.compile_cudagraphs={cudagraphs}", "--model.init_args.ema_decay=null",
                        "--trainer.accelerator=cpu", "--trainer.logger=false"], run=False)
        cli.model.setup("fit")
        expected = ({"mode": "reduce-overhead"} if cudagraphs else {}) | ({"regional": True} if regional else {})
        assert calls == [expected]


def test_cuda_graphs_with_gradient_accumulation_are_refused():
    """CUDA graph trees overwrite the first micro-batch's gradients at the next replay: the recipe refuses the
    combination by name instead of training on wrong gradients."""
    cli = main.cli(["--model.init_args.compile=true", "--model.init_args.compile_cudagraphs=true",
                    "--model.init_args.ema_decay=null", "--trainer.accumulate_grad_batches=2",
                    "--trainer.accelerator=cpu", "--trainer.logger=false"], run=False)
    cli.trainer.strategy.connect(cli.model)
    cli.model.trainer = cli.trainer
    with pytest.raises(UserError, match=r"compile_cudagraphs: .*accumulate_grad_batches=2\).*compile_cudagraphs false"):
        cli.model.setup("fit")
    compile_for_training(torch.nn.Linear(2, 2), cudagraphs=False, accumulate_grad_batches=2)  # plain compile: fine
