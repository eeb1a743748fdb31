"""Matthews correlation as an `evaluate` metric script, shipped so that `evaluate.load(<this file>)` works offline."""
import datasets
import evaluate
from sklearn.metrics import matthews_corrcoef


class MatthewsCorrelation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Matthews correlation coefficient (multi-class generalisation), in [-1, 1].",
            citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references, sample_weight=None):
        return {"matthews_correlation": float(matthews_corrcoef(references, predictions,
                                                                sample_weight=sample_weight))}
