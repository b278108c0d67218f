"""Metrics shipped inside the package, loaded with ``evaluate.load(<path>)`` so they work offline."""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent


def load_metric(name: str):
    """``evaluate.load`` of a metric shipped here ("accuracy" or "f1")."""
    import evaluate

    path = METRICS_DIR / name / f"{name}.py"
    if not path.exists():
        raise ValueError(f"No shipped metric {name!r}; available: accuracy, f1.")
    return evaluate.load(str(path))
