"""The `decoder: torchvision` augmentation of `src.data.imagefolder`: timm's train and test transforms (what
`timm.data.create_transform` builds for the PIL path) re-expressed step by step on (3, H, W) uint8 tensors, the
images `read_rgb_tensor` gives (decoded by torchvision.io: libjpeg-turbo, libpng, libwebp), which costs fewer CPU
seconds per image than PIL + timm.

The random draws stay timm's: the crop parameters and interpolation come from timm's own
RandomResizedCropAndInterpolation, the auto-augment policy is timm's object (its ops, probabilities, magnitudes
and draws) with the PIL ops swapped for tensor ones, random erasing is timm's tensor step. So the per-sample
seeding of the data set (Python's, NumPy's and torch's generators seeded by (seed, epoch, index)) holds here as on
the PIL path and exact resume works the same. The pixels are torchvision's: close to, not identical with, PIL's
(resize filters; rotate, shear and translate sample bilinearly where timm asks for bicubic). A step without a
tensor version is refused with a one-line error, AugMix policies among them.

The PIL path's transform passes through `pil_transform`, which only replaces timm's posterize op: with 0 bits to
keep (the published RandAugment reaches it) Pillow 13 raises instead of returning a black image.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from src.errors import UserError

POSTERIZE_OPS = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")  # timm's names


def _warp_args(fillcolor, resample) -> dict:
    """fill and interpolation of a timm geometric op on a tensor. timm names a PIL filter, or a tuple to draw one
    from (drawn here with Python's `random`, as timm does); torchvision warps tensors only with nearest or
    bilinear sampling, so bicubic becomes bilinear."""
    from torchvision.transforms import InterpolationMode

    if isinstance(resample, (tuple, list)):
        resample = random.choice(resample)
    nearest = resample in (Image.Resampling.NEAREST, InterpolationMode.NEAREST)
    return dict(fill=list(fillcolor), interpolation=InterpolationMode.NEAREST if nearest else InterpolationMode.BILINEAR)


def _shear(img: torch.Tensor, factor: float, axis: int, **kw) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    # PIL's shear maps output (x, y) to input (x + factor * y, y) about the top-left corner (axis 0); torchvision's
    # shear by atan(factor) about center (0, 0) is the same map
    shear = [0.0, 0.0]
    shear[axis] = float(np.degrees(np.arctan(factor)))
    return TF.affine(img, angle=0.0, translate=[0.0, 0.0], scale=1.0, shear=shear, center=[0.0, 0.0], **_warp_args(**kw))


def _translate(img: torch.Tensor, pixels: float, axis: int, **kw) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    shift = [0.0, 0.0]
    shift[axis] = -pixels  # PIL samples input x + pixels: the content moves by -pixels
    return TF.affine(img, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], **_warp_args(**kw))


def _tensor_ops() -> dict[str, Callable]:
    """timm's auto-augment ops by name, on (3, H, W) uint8 tensors, with timm's arguments (after its level
    functions): `op(img, *level_args, fillcolor=..., resample=...)`."""
    from torchvision.transforms.v2 import functional as TF

    def posterize(img, bits, **_):
        return img if bits >= 8 else TF.posterize(img, bits)

    def solarize(img, thresh, **_):
        return img if thresh > 255 else TF.solarize(img, thresh)

    def solarize_add(img, add, thresh=128, **_):
        return torch.where(img < thresh, (img.to(torch.int16) + add).clamp(max=255).to(torch.uint8), img)

    ops = {
        "AutoContrast": lambda img, **_: TF.autocontrast(img),
        "Equalize": lambda img, **_: TF.equalize(img),
        "Invert": lambda img, **_: TF.invert(img),
        "Rotate": lambda img, degrees, **kw: TF.rotate(img, degrees, **_warp_args(**kw)),  # counter-clockwise in both
        "ShearX": lambda img, factor, **kw: _shear(img, factor, 0, **kw),
        "ShearY": lambda img, factor, **kw: _shear(img, factor, 1, **kw),
        "TranslateX": lambda img, pixels, **kw: _translate(img, pixels, 0, **kw),
        "TranslateY": lambda img, pixels, **kw: _translate(img, pixels, 1, **kw),
        "TranslateXRel": lambda img, pct, **kw: _translate(img, pct * img.shape[-1], 0, **kw),
        "TranslateYRel": lambda img, pct, **kw: _translate(img, pct * img.shape[-2], 1, **kw),
        "SolarizeAdd": solarize_add,
    }
    for name in POSTERIZE_OPS:
        ops[name] = posterize
    for name in ("Solarize", "SolarizeIncreasing"):
        ops[name] = solarize
    for name, enhance in (("Color", TF.adjust_saturation), ("Contrast", TF.adjust_contrast),
                          ("Brightness", TF.adjust_brightness), ("Sharpness", TF.adjust_sharpness)):
        ops[name] = ops[name + "Increasing"] = lambda img, factor, _enhance=enhance, **_: _enhance(img, factor)
    return ops


class _CropOnTensor:
    """timm's RandomResizedCropAndInterpolation on a (C, H, W) tensor: timm's own crop draws (Python's `random`,
    as on the PIL path), the crop and resize by torchvision (antialiased, as PIL's)."""

    def __init__(self, crop):
        self.crop = crop

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        c = self.crop
        top, left, height, width = c.get_params(img, c.scale, c.ratio)
        interpolation = random.choice(c.interpolation) if isinstance(c.interpolation, (tuple, list)) else c.interpolation
        return TF.resized_crop(img, top, left, height, width, list(c.size), interpolation=interpolation, antialias=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.crop!r})"


def tensor_transform(timm_transform):
    """The transform that `timm.data.create_transform` built (a Compose of PIL steps), step by step on (3, H, W)
    uint8 tensors: torchvision.transforms.v2 for resize, crop, flip, colour jitter, scaling and normalisation;
    timm's own random-erasing (a tensor step already); timm's auto-augment policy object with its PIL ops swapped
    for tensor ones (so the policy, its probabilities, magnitudes and random draws stay timm's; the pixels are
    torchvision's: close to, not identical with, PIL's, and rotate/shear/translate sample bilinearly). A step
    without a tensor version is refused."""
    from timm.data.auto_augment import AugMixAugment, AutoAugment, RandAugment
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
    from torchvision import transforms as v1
    from torchvision.transforms import v2

    ops = _tensor_ops()
    steps = []
    for step in timm_transform.transforms:
        if isinstance(step, RandomResizedCropAndInterpolation):
            steps.append(_CropOnTensor(step))
        elif isinstance(step, v1.Resize):
            steps.append(v2.Resize(step.size, interpolation=step.interpolation, max_size=step.max_size, antialias=True))
        elif isinstance(step, v1.CenterCrop):
            steps.append(v2.CenterCrop(step.size))
        elif isinstance(step, v1.RandomHorizontalFlip):
            steps.append(v2.RandomHorizontalFlip(step.p))
        elif isinstance(step, v1.ColorJitter):
            steps.append(v2.ColorJitter(step.brightness, step.contrast, step.saturation, step.hue))
        elif isinstance(step, (RandAugment, AutoAugment)):
            policy = _policy_ops(step)
            missing = sorted({op.name for op in policy} - set(ops))
            if missing:
                raise UserError(f"data.init_args.auto_augment: ops {missing} have no tensor version for decoder "
                                "'torchvision'; use decoder 'pil'")
            for op in policy:
                op.aug_fn = ops[op.name]
            steps.append(step)
        elif isinstance(step, AugMixAugment):
            raise UserError("data.init_args.auto_augment: AugMix policies ('augmix-...') have no tensor version for "
                            "decoder 'torchvision'; use a 'rand-...' or AutoAugment policy, or decoder 'pil'")
        elif isinstance(step, MaybeToTensor):
            steps.append(v2.ToDtype(torch.float32, scale=True))  # uint8 0..255 -> float32 0..1, as ToTensor
        elif isinstance(step, v1.Normalize):
            steps.append(v2.Normalize(step.mean.tolist() if torch.is_tensor(step.mean) else list(step.mean),
                                      step.std.tolist() if torch.is_tensor(step.std) else list(step.std)))
        elif isinstance(step, RandomErasing):
            steps.append(step)
        else:
            raise UserError(f"the data transform step {type(step).__name__} has no tensor version for data.init_args."
                            "decoder 'torchvision'; use decoder 'pil'")
    return v2.Compose(steps)


def _posterize_pil(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize op on a PIL image, also when it keeps no bit: "PosterizeIncreasing" keeps 4 - int(0.4 m)
    bits, none at magnitude 10, where RandAugment's clamp puts its draws above 10 ("rand-m9-mstd0.5": ~2 % of
    them). Older Pillow returned a black image for 0 bits (its mask keeps no bit), as torchvision's posterize
    does; Pillow 13.0 (what a fresh install resolves) raises "bits must be between or equal to 1 and 8", which
    stopped a data-loader worker and the run (about one training image in 750 with the published recipe)."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)  # every bit dropped, per band
    return ImageOps.posterize(img, bits_to_keep)


def pil_transform(timm_transform):
    """The transform that `timm.data.create_transform` built, its auto-augment posterize ops made safe for
    any Pillow (`_posterize_pil`); everything else is timm's, unchanged. In place; returns it."""
    for step in getattr(timm_transform, "transforms", []):
        for op in _policy_ops(step):
            if op.name in POSTERIZE_OPS:
                op.aug_fn = _posterize_pil
    return timm_transform


def _policy_ops(step) -> list:
    """The ops (timm `AugmentOp`s) of an auto-augment step: RandAugment's and AugMix's list, AutoAugment's
    sub-policies flattened; none for any other step."""
    from timm.data.auto_augment import AugMixAugment, AutoAugment, RandAugment

    if isinstance(step, (RandAugment, AugMixAugment)):
        return list(step.ops)
    if isinstance(step, AutoAugment):
        return [op for sub in step.policy for op in sub]
    return []
