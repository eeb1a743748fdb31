"""The console: logging set-up (log lines through tqdm, so they never run into a progress bar), when progress
bars show, and how numbers are printed."""
from __future__ import annotations

import logging
import sys

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


def format_number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)
