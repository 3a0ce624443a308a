from .classifier import ImageClassifier
from .detector import Detector
from .segmenter import SemanticSegmenter
from .spatial_mamba import (
    SpatialMamba,
    convert_official_state_dict,
    load_pretrained,
    spatial_mamba_b,
    spatial_mamba_digits,
    spatial_mamba_s,
    spatial_mamba_t,
)

__all__ = [
    "Detector",
    "ImageClassifier",
    "SemanticSegmenter",
    "SpatialMamba",
    "convert_official_state_dict",
    "load_pretrained",
    "spatial_mamba_t",
    "spatial_mamba_s",
    "spatial_mamba_b",
    "spatial_mamba_digits",
]
