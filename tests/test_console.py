"""What a user reads: TensorBoard tags, the thread count default, DeepSpeed's CPU warning (cheap, in-process)."""
import logging

import pytest
import torch

from trainer.distributed.launch import (available_cores, cpu_threads_per_process, quiet_deepspeed_accelerator_warning,
                                        share_cpu_cores)
from trainer.tracking.base import curve_name


def test_curve_names_put_the_first_evaluation_on_the_eval_curves():
    assert curve_name("init_eval_perplexity") == curve_name("eval_perplexity") == "eval/perplexity"
    assert curve_name("train_loss") == "train/loss"
    assert curve_name("train_grad_norm") == "train/grad_norm"


def test_cpu_threads_are_an_equal_share_of_the_cores_at_least_one():
    assert cpu_threads_per_process(16, 8) == 2
    assert cpu_threads_per_process(16, 3) == 5
    assert cpu_threads_per_process(2, 2) == 1
    assert cpu_threads_per_process(2, 8) == 1
    assert cpu_threads_per_process(4, 1) == 4


@pytest.fixture
def threads(monkeypatch):
    """Restores torch's thread count and OMP_NUM_THREADS after the test."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(before)


def test_several_local_processes_get_a_share_of_the_cores(threads):
    torch.set_num_threads(7)
    share_cpu_cores(local_processes=2)
    assert torch.get_num_threads() == max(1, available_cores() // 2)


def test_a_single_process_and_a_user_setting_keep_their_thread_count(threads, monkeypatch):
    torch.set_num_threads(3)
    share_cpu_cores(local_processes=1)
    assert torch.get_num_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    share_cpu_cores(local_processes=2)
    assert torch.get_num_threads() == 3


class Collected(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_deepspeed_cpu_warning_is_dropped_and_other_deepspeed_warnings_kept():
    # A handler of the test's own on DeepSpeed's logger: pytest's caplog sees that logger's records once or twice
    # depending on its version (9.1 also hooks loggers that do not propagate, as DeepSpeed's does not).
    quiet_deepspeed_accelerator_warning()
    quiet_deepspeed_accelerator_warning()  # every job calls it: the filter is installed once
    deepspeed_logger = logging.getLogger("DeepSpeed")
    collected, level = Collected(), deepspeed_logger.level
    deepspeed_logger.addHandler(collected)
    deepspeed_logger.setLevel(logging.WARNING)
    try:
        deepspeed_logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were "
                                 "unable to detect it.")
        deepspeed_logger.warning("some other DeepSpeed warning")
    finally:
        deepspeed_logger.removeHandler(collected)
        deepspeed_logger.setLevel(level)
    assert collected.messages == ["some other DeepSpeed warning"]
    assert len(deepspeed_logger.filters) == 1


def test_a_run_without_deepspeed_unwraps_its_model_without_importing_deepspeed():
    """accelerate's unwrap_model imports DeepSpeed wherever it is installed (seconds of start-up in every process);
    after `unwrapping_without_deepspeed` a process that never imported it unwraps models without it."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    code = ("import sys, torch; from accelerate.utils import extract_model_from_parallel; "
            "from trainer.distributed.launch import unwrapping_without_deepspeed; unwrapping_without_deepspeed(); "
            "model = torch.nn.Linear(2, 2); "
            "print(extract_model_from_parallel(torch.nn.DataParallel(model)) is model, 'deepspeed' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert result.stdout.split() == ["True", "False"]
