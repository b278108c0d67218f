"""Metrics shipped inside the package, loaded with ``evaluate.load(<path>)`` so they work offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

METRICS_DIR = Path(__file__).resolve().parent


def load_metric(name: str):
    """``evaluate.load`` of a metric shipped here ("accuracy" or "f1")."""
    import evaluate

    path = METRICS_DIR / name / f"{name}.py"
    if not path.exists():
        raise ValueError(f"No shipped metric {name!r}; available: accuracy, f1.")
    return evaluate.load(str(path))


def build_compute_metrics(metric_names: tuple[str, ...]):
    """A Trainer ``compute_metrics`` that scores the argmax of the logits with the shipped metrics named."""
    metrics = [load_metric(name) for name in metric_names]

    def compute_metrics(prediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predicted = np.argmax(logits, axis=-1)
        out: dict[str, float] = {}
        if prediction.label_ids is None:
            return out
        for metric in metrics:
            out.update(metric.compute(predictions=predicted, references=prediction.label_ids))
        return out

    return compute_metrics
