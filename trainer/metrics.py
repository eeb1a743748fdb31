"""Where numbers go: the console log, `log_history.jsonl` and TensorBoard scalars. Rank 0 alone writes."""
from __future__ import annotations

import json
import logging
import math
import os
import sys

logger = logging.getLogger("trainer")


def setup_logging(is_main_process: bool) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout,
                        level=logging.INFO if is_main_process else logging.WARNING, force=True)
    for noisy in ("datasets", "transformers", "accelerate", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING if is_main_process else logging.ERROR)
    import datasets
    import transformers

    datasets.utils.logging.set_verbosity_warning()
    transformers.utils.logging.set_verbosity_warning()
    if not is_main_process:
        datasets.utils.logging.disable_progress_bar()


class MetricsLogger:
    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.history_path = os.path.join(output_dir, "log_history.jsonl")
        self.tensorboard_dir = os.path.join(output_dir, "runs") if tensorboard else None
        self.writer = None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
        self.open_tensorboard()

    def open_tensorboard(self, purge_step: int | None = None) -> None:
        if self.enabled and self.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.tensorboard_dir, purge_step=purge_step)

    def forget_after(self, step: int) -> None:
        """On resume from `step`: drop what the interrupted run logged after its checkpoint, which is redone."""
        if not self.enabled:
            return
        if os.path.isfile(self.history_path):
            with open(self.history_path) as history:
                kept = [line for line in history if json.loads(line)["step"] <= step]
            with open(self.history_path, "w") as history:
                history.writelines(kept)
        if self.writer is not None:
            self.writer.close()
            self.open_tensorboard(purge_step=step + 1)

    def log(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        named = {f"{prefix}{key}": value for key, value in metrics.items()}
        with open(self.history_path, "a") as history:
            history.write(json.dumps({"step": step, **named}) + "\n")
        if self.writer is not None:
            for key, value in named.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("_", "/", 1), value, step)
                else:  # e.g. a confusion matrix: shown in TensorBoard's text tab
                    self.writer.add_text(key.replace("_", "/", 1), f"    {json.dumps(value)}", step)
            self.writer.flush()
        logger.info("step %d: %s", step, "  ".join(f"{k}={format_number(v)}" for k, v in named.items()))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def perplexity_metrics(count_name: str):
    """compute_metrics for a language model: mean loss per predicted token, its perplexity, and how many tokens
    (`count_name`) the exact float64 sums of the engine's evaluation counted."""

    def compute(output) -> dict:
        return {"loss": output.mean_loss, "perplexity": math.exp(min(output.mean_loss, 700.0)),
                count_name: output.num_items}

    return compute


def format_number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)
