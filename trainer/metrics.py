"""Where numbers go: the console log, `log_history.jsonl` and TensorBoard scalars. Rank 0 alone writes."""
from __future__ import annotations

import json
import logging
import math
import os
import sys

from trainer.layout import LOG_HISTORY_FILE, TENSORBOARD_DIR

logger = logging.getLogger("trainer")


def setup_logging(is_main_process: bool) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        handlers=[TqdmAwareHandler(sys.stdout)],
                        level=logging.INFO if is_main_process else logging.WARNING, force=True)
    for noisy in ("datasets", "transformers", "accelerate", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING if is_main_process else logging.ERROR)
    import datasets
    import transformers

    datasets.utils.logging.set_verbosity_warning()
    transformers.utils.logging.set_verbosity_warning()
    if not show_progress_bars(is_main_process):
        datasets.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()


def show_progress_bars(is_main_process: bool) -> bool:
    """Bars on rank 0 in a terminal only. Redirected to a file, a bar is a long line of carriage returns (and
    nested bars add cursor-up escapes, `\x1b[A`); there the periodic log lines show the progress instead."""
    return is_main_process and sys.stderr.isatty()


class TqdmAwareHandler(logging.StreamHandler):
    """Writes each record with `tqdm.write`, which lifts any open progress bar off the terminal and redraws it
    below the line, so log lines are never glued to a bar (tqdm's own `logging_redirect_tqdm` swaps handlers
    only inside a `with` block; this handler is installed once for the whole job)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # what logging.StreamHandler.emit does with a failing write
            self.handleError(record)


class MetricsLogger:
    """Writes nothing until the first number is logged: a run refused before that leaves no output directory."""

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.output_dir = output_dir
        self.history_path = os.path.join(output_dir, LOG_HISTORY_FILE)
        self.tensorboard_dir = os.path.join(output_dir, TENSORBOARD_DIR) if tensorboard else None
        self.writer = None
        self.purge_step: int | None = None  # on resume: TensorBoard drops the events after the checkpoint

    def open_outputs(self) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        if self.tensorboard_dir and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.tensorboard_dir, purge_step=self.purge_step)

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
            self.writer = None
        self.purge_step = step + 1

    def log(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        named = {f"{prefix}{key}": value for key, value in metrics.items()}
        self.open_outputs()
        with open(self.history_path, "a") as history:
            history.write(json.dumps({"step": step, **named}) + "\n")
        if self.writer is not None:
            for key, value in named.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(tensorboard_tag(key), value, step)
                else:  # e.g. a confusion matrix: shown in TensorBoard's text tab
                    self.writer.add_text(tensorboard_tag(key), f"    {json.dumps(value)}", step)
            self.writer.flush()
        logger.info("step %d: %s", step, "  ".join(f"{k}={format_number(v)}" for k, v in named.items()))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def tensorboard_tag(name: str) -> str:
    """"train_loss" -> "train/loss". The evaluation before training ("init_eval_perplexity") goes on the same
    curve as every later one ("eval/perplexity", at step 0), so each curve starts where training starts."""
    return name.removeprefix("init_").replace("_", "/", 1)


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
