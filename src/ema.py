"""The EMA of the weights: timm's `ModelEmaV3` with a per-step update that costs the host ~0.3 ms instead of ~18.

timm's update collects the tensors to average with `state_dict()` of both models at every step. For T that is
517 entries gathered by walking ~700 modules and running their state-dict hooks: 8.9 ms per call on a 2-core
CPU, twice per step — host time that a step replayed as CUDA graphs (or a fast GPU) no longer hides. Here the
walk is done once per model: the (module, parameter or persistent buffer name) slots of the state dict, after
which each step reads the current tensors from the modules' own dicts (a moved or converted module, e.g.
`.to(device)` or channels-last, replaces its tensors but not the slots) and calls the same foreach lerp. Same
entries, same arithmetic, same order as timm's: `tests/test_ema.py` checks the weights bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3

__all__ = ["ModelEma"]


def _state_slots(model: nn.Module) -> list[tuple[str, nn.Module, str, str]]:
    """(state-dict key, owning module, "_parameters" or "_buffers", name) for every entry `state_dict()` holds
    (parameters and persistent buffers that are not None), in state-dict order; a module reached by two paths
    is listed under both, as `state_dict()` does."""
    slots = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        prefix = prefix + "." if prefix else ""
        for name, value in module._parameters.items():
            if value is not None:
                slots.append((prefix + name, module, "_parameters", name))
        for name, value in module._buffers.items():
            if value is not None and name not in module._non_persistent_buffers_set:
                slots.append((prefix + name, module, "_buffers", name))
    return slots


class ModelEma(ModelEmaV3):
    """`ModelEmaV3` (same arguments, attributes and checkpoint keys) whose update reuses the slots of both
    models' state dicts (module docstring). Configurations this path does not cover (no foreach, parameters
    only, an EMA on another device or dtype, stochastic rounding) take timm's own update."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._slots: tuple[int, list] | None = None  # (id of the model, [(ema slot, model slot)])

    def _pairs(self, model: nn.Module) -> list:
        if self._slots is None or self._slots[0] != id(model):
            ema_slots, model_slots = _state_slots(self.module), _state_slots(model)
            keys = [s[0] for s in ema_slots]
            if keys != [s[0] for s in model_slots]:
                raise ValueError("EMA update: the model's state-dict entries differ from the EMA copy's "
                                 f"({len(model_slots)} vs {len(ema_slots)} entries)")
            self._slots = (id(model), [(e[1:], m[1:]) for e, m in zip(ema_slots, model_slots)])
        return self._slots[1]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        if (not self.foreach or getattr(self, "exclude_buffers", False) or self.device is not None
                or getattr(self, "dtype", None) is not None):
            return super().update(model, step)
        decay = self.get_decay(step)
        ema_values, model_values = [], []
        for (e_mod, e_store, e_name), (m_mod, m_store, m_name) in self._pairs(model):
            ema_v = getattr(e_mod, e_store)[e_name]
            model_v = getattr(m_mod, m_store)[m_name]
            if ema_v.is_floating_point():
                ema_values.append(ema_v)
                model_values.append(model_v)
            else:
                ema_v.copy_(model_v)
        if not ema_values:
            return
        if getattr(self, "stochastic_rounding", False) and any(e.dtype == torch.bfloat16 for e in ema_values):
            return super().update(model, step)  # timm rounds bf16 EMA tensors stochastically (fp32 ones: plain lerp)
        weight = 1.0 - decay
        if all(e.dtype == m.dtype for e, m in zip(ema_values, model_values)):
            torch._foreach_lerp_(ema_values, model_values, weight=weight)
        else:  # as timm: add_ promotes in-kernel, no cast copies of the model
            torch._foreach_mul_(ema_values, scalar=1.0 - weight)
            torch._foreach_add_(ema_values, model_values, alpha=weight)
