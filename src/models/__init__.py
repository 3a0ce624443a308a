"""The backbone and the LightningModules. Names load on first use (PEP 562): importing the backbone's module
alone, `src.models.spatial_mamba`, then does not import lightning, torchmetrics and the task heads (a compile
worker process, src/compile_worker.py, starts seconds sooner)."""

import importlib

_WHERE = {
    "Detector": "detector",
    "ImageClassifier": "classifier",
    "SemanticSegmenter": "segmenter",
    "SpatialMamba": "spatial_mamba",
    "convert_official_state_dict": "spatial_mamba",
    "load_pretrained": "spatial_mamba",
    "spatial_mamba_t": "spatial_mamba",
    "spatial_mamba_s": "spatial_mamba",
    "spatial_mamba_b": "spatial_mamba",
    "spatial_mamba_digits": "spatial_mamba",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
