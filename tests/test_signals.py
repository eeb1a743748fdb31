"""Pre-emption: a stop signal checkpoints at the next optimizer step and exits 0; the next run resumes."""
import os
import signal

import pytest

from conftest import read_results
from resume_helpers import STEPS, resume_args, start_job, wait_for_path, with_env


def stopped_checkpoint(out) -> str:
    names = [name for name in os.listdir(out) if name.startswith("checkpoint-") and name != "checkpoint-4"]
    assert len(names) == 1, names
    return names[0]


def test_sigterm_checkpoints_and_exits_0_and_the_next_run_finishes(corpus, tokenizer_dir, job_env, tmp_path):
    out = tmp_path / "run"
    args = resume_args(corpus, tokenizer_dir, out)
    env = with_env(job_env, TRAINER_FAULT_SLEEP_IN_SAVE=1)  # keeps the run going long enough to be signalled
    job = start_job("trainer.mlm", args, env)
    wait_for_path(out / "checkpoint-4.tmp", job)
    job.send_signal(signal.SIGTERM)
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output[-3000:]
    name = stopped_checkpoint(out)
    assert f"stop signal received: saved {name}" in output
    assert 4 <= int(name.split("-")[1]) < STEPS
    resumed = start_job("trainer.mlm", args, job_env)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and f"resuming from the newest complete one, {out / name}" in output
    assert read_results(out)["train_steps"] == STEPS


@pytest.mark.slow
def test_torchrun_forwards_sigusr1_when_told_and_all_ranks_save_the_same_step(
        corpus, tokenizer_dir, job_env, tmp_path):
    out = tmp_path / "run"
    job = start_job("trainer.mlm", resume_args(corpus, tokenizer_dir, out, 2),
                    with_env(job_env, TRAINER_FAULT_SLEEP_IN_SAVE=1), nproc=2,
                    torchrun_options=["--signals-to-handle", "SIGTERM,SIGINT,SIGUSR1"])
    wait_for_path(out / "checkpoint-4.tmp", job)
    job.send_signal(signal.SIGUSR1)  # to torchrun, which forwards it to both workers
    output, _ = job.communicate(timeout=300)
    name = stopped_checkpoint(out)
    assert output.count(f"stop signal received: saved {name}") == 2, output[-4000:]  # both ranks, same step
    assert {"rank-0.pt", "rank-1.pt", "checkpoint_complete"} <= set(os.listdir(out / name))
