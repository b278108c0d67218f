"""Binary F1 of the positive class, shipped with hf-sam so that ``evaluate.load`` works without the hub."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "F1 = 2 * precision * recall / (precision + recall) for the positive label."
_CITATION = ""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    pos_label (int): the positive class, default 1.
Returns:
    f1 (float): in [0, 1]; 0 when there is no true or predicted positive.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, pos_label=1):
        predictions = np.asarray(predictions) == pos_label
        references = np.asarray(references) == pos_label
        tp = float(np.sum(predictions & references))
        denominator = float(np.sum(predictions) + np.sum(references))
        return {"f1": 2.0 * tp / denominator if denominator else 0.0}
