"""The EMA of the weights (src/ema.py) against timm's ModelEmaV3, which it speeds up: the same weights, bit for
bit, step after step, also after the modules' tensors were replaced (a dtype or layout conversion)."""

from __future__ import annotations

import pytest
import torch
from timm.utils import ModelEmaV3

from src.ema import ModelEma
from src.models.spatial_mamba import SpatialMamba


def tiny() -> SpatialMamba:
    return SpatialMamba(num_classes=3, dims=[8, 16, 16, 16], depths=[1, 2, 1, 1])


def train_a_little(model: torch.nn.Module, generator: torch.Generator) -> None:
    """New weights and new BatchNorm statistics (and num_batches_tracked, an integer buffer that is copied)."""
    model.train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.01)
        model(torch.randn(2, 3, 32, 32, generator=generator, dtype=next(model.parameters()).dtype))


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_same_weights_as_timm_bit_for_bit():
    torch.manual_seed(0)
    model = tiny()
    ours, theirs = ModelEma(model, decay=0.9), ModelEmaV3(model, decay=0.9)
    generator = torch.Generator().manual_seed(1)
    for step in range(4):
        train_a_little(model, generator)
        ours.update(model, step)
        theirs.update(model, step)
        assert_same_state(ours.module, theirs.module)
    # converting the modules replaces their tensors; the cached slots read the new ones
    for m in (model, ours.module, theirs.module):
        m.double()
    for step in range(4, 6):
        train_a_little(model, generator)
        ours.update(model, step)
        theirs.update(model, step)
        assert_same_state(ours.module, theirs.module)


def test_mixed_dtypes_and_non_foreach_paths_match_timm():
    """A model in another dtype than its EMA (timm's mul + add path), and foreach off (timm's own update)."""
    torch.manual_seed(0)
    model = tiny()
    generator = torch.Generator().manual_seed(2)
    for foreach in (True, False):
        ours, theirs = ModelEma(model, decay=0.8, foreach=foreach), ModelEmaV3(model, decay=0.8, foreach=foreach)
        ours.module.double()
        theirs.module.double()
        for step in range(3):
            train_a_little(model, generator)
            ours.update(model, step)
            theirs.update(model, step)
            assert_same_state(ours.module, theirs.module)


def test_a_model_of_another_structure_is_refused():
    ema = ModelEma(tiny(), decay=0.9)
    with pytest.raises(ValueError, match="state-dict entries differ"):
        ema.update(SpatialMamba(num_classes=3, dims=[8, 16, 16, 16], depths=[1, 1, 1, 1]))


def test_the_fast_path_runs(monkeypatch):
    """For the classifier's configuration (fp32 EMA on the model's device, foreach) no state_dict() is taken
    per step."""
    model = tiny()
    ema = ModelEma(model, decay=0.9)
    ema.update(model)
    calls = []
    monkeypatch.setattr(torch.nn.Module, "state_dict", lambda self, *a, **k: calls.append(1) or {})
    ema.update(model)
    assert calls == []
