"""Small helpers for what a run reports."""

from __future__ import annotations


def optimized_metric(metrics: dict, name: str | None) -> float | None:
    """The value a sweep optimises; fails loudly, naming what was logged, when it is missing."""
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} was not logged; available: {sorted(metrics)}")
    return float(metrics[name])
