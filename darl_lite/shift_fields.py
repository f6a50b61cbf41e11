"""The shift routing file's fields as JSON: each reader refuses a malformed value with a
:class:`~darl_lite.errors.BundleError` that names the file and says to re-export the bundle."""

from __future__ import annotations

import numpy as np

from darl_lite.errors import BundleError, InputError


def check_weight(weight: float | None, name: str) -> None:
    if weight is not None and not 0.0 < weight <= 1.0:
        raise InputError(f"{name} must lie in (0, 1], got {weight}")


def quantiles_from_json(raw: object, source: str) -> tuple[tuple[float, float], ...]:
    if not raw:
        return ()
    try:
        points = tuple((float(r), float(m)) for r, m in raw)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise BundleError(
            f"{source}: malformed pair_margin_quantiles ({exc!r}); re-export the bundle"
        ) from exc
    shares = [r for r, _ in points]
    if not all(np.isfinite(v) for p in points for v in p) or shares != sorted(shares):
        raise BundleError(
            f"{source}: pair_margin_quantiles must be finite (share, margin) points in share order; "
            "re-export the bundle"
        )
    return points


def optional_float(raw: object, name: str, source: str) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{source}: malformed {name} ({exc!r}); re-export the bundle") from exc
    if not np.isfinite(value):
        raise BundleError(f"{source}: {name} {value} is not finite; re-export the bundle")
    return value


def optional_weight(raw: object, source: str) -> float | None:
    return None if raw is None else weight_from_json(raw, source)


def weight_from_json(raw: object, source: str) -> float:
    try:
        weight = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{source}: malformed teacher_weight ({exc!r}); re-export the bundle") from exc
    if not 0.0 < weight <= 1.0:
        raise BundleError(f"{source}: teacher_weight {weight} outside (0, 1]; re-export the bundle")
    return weight


def bias_json(bias: tuple[float, ...] | None) -> list[float] | None:
    return list(bias) if bias is not None else None


def bias_from_json(raw: object, source: str) -> tuple[float, ...] | None:
    if raw is None:
        return None
    try:
        return tuple(float(b) for b in raw)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise BundleError(
            f"{source}: malformed grade-prior correction ({exc!r}); re-export the bundle"
        ) from exc


__all__ = [
    "bias_from_json",
    "bias_json",
    "check_weight",
    "optional_float",
    "optional_weight",
    "quantiles_from_json",
    "weight_from_json",
]
