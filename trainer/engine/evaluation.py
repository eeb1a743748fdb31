"""When and on what the engine evaluates, and which metric picks the best checkpoint."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainer.config.parsing import arg
from trainer.errors import require


@dataclass
class EvalArguments:
    _argument_group_name = "evaluation"

    per_device_eval_batch_size: int = arg(8, "Sequences per process per evaluation batch.")
    eval_steps: Optional[int] = arg(None, "Evaluate every N optimizer steps (always at the start and the end).")
    load_best_model_at_end: bool = arg(False, "Keep the checkpoint with the best --metric_for_best_model out of the "
                                              "rotation and make it the final model. Evaluates at every save.")
    metric_for_best_model: Optional[str] = arg(None, "Evaluation metric that picks the best checkpoint. Unset: the "
                                                     "job's main metric (eval_perplexity for mlm, eval_accuracy for "
                                                     "classify).")
    greater_is_better: Optional[bool] = arg(None, "Whether a larger --metric_for_best_model is better. Unset: "
                                                  "False for loss/perplexity metrics, True otherwise.")

    def __post_init__(self):
        require(self.per_device_eval_batch_size > 0,
                f"--per_device_eval_batch_size must be positive, got {self.per_device_eval_batch_size}")
        require(self.eval_steps is None or self.eval_steps > 0, f"--eval_steps must be positive, got {self.eval_steps}")


@dataclass(frozen=True)
class BestMetric:
    """The metric that picks the best checkpoint and its direction: derived from the evaluation arguments and the
    job's main metric, never written back into them."""

    name: str
    greater_is_better: bool

    @classmethod
    def of(cls, evaluation: EvalArguments, job_default: str) -> "BestMetric":
        name = evaluation.metric_for_best_model or job_default
        greater = evaluation.greater_is_better
        if greater is None:
            greater = not any(word in name for word in ("loss", "perplexity"))
        return cls(name, greater)

    def better(self, value: float, best: Optional[float]) -> bool:
        return best is None or (value > best if self.greater_is_better else value < best)
