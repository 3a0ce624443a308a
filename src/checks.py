"""Range checks of config values where the knobs are declared, so a bad value stops with one line naming the
key (`ValueError: model.init_args.label_smoothing must be in [0, 1), got 1.5`) instead of failing deep inside
PyTorch later, or silently doing something else (a probability of 2 is "always")."""

from __future__ import annotations

from collections.abc import Sequence

from src.errors import UserError


def require(ok: bool, key: str, expected: str, value) -> None:
    """Raise `ValueError("<key> must be <expected>, got <value>")` unless `ok`."""
    if not ok:
        raise UserError(f"{key} must be {expected}, got {value!r}")


def probability(key: str, value: float) -> None:
    require(0 <= value <= 1, key, "a probability in [0, 1]", value)


def non_negative(key: str, value: float) -> None:
    require(value >= 0, key, ">= 0", value)


def positive(key: str, value: float) -> None:
    require(value > 0, key, "> 0", value)


def increasing_pair(key: str, pair: Sequence[float], low: float = 0.0, high: float | None = None) -> None:
    """(min, max) with low < min <= max (<= high)."""
    ok = len(pair) == 2 and low < pair[0] <= pair[1] and (high is None or pair[1] <= high)
    require(ok, key, f"(min, max) with {low} < min <= max" + (f" <= {high}" if high is not None else ""), list(pair))


# The backbone's total stride (stem /4, then three /2 downsamplings): image sides must be multiples of it. The one
# definition: the model checks its input against it, the data modules their image and crop sizes.
BACKBONE_STRIDE = 32


def stride_multiple(key: str, size: int | Sequence[int]) -> None:
    """An image side (or sides) that is a positive multiple of the backbone's stride."""
    sides = [size] if isinstance(size, int) else list(size)
    require(all(int(s) == s and s >= BACKBONE_STRIDE and s % BACKBONE_STRIDE == 0 for s in sides), key,
            f"a multiple of {BACKBONE_STRIDE} (the backbone's stride)" + ("" if isinstance(size, int) else " per side"),
            size if isinstance(size, int) else sides)
