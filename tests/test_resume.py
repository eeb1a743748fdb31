"""Exact resume: a run stopped anywhere and resumed ends bit-identical to one that never stopped."""
import json
import os
import shutil
import signal

import pytest
import torch

from clm_helpers import bpe_tokenizer_dir  # noqa: F401 (fixture)
from conftest import read_results, run_job, with_model
from resume_helpers import (STEPS, assert_same_run, resume_args, samples_per_step, start_job, uninterrupted_run,
                            wait_for_path, with_env)


@pytest.fixture(scope="module")
def single_process_baseline(corpus, tokenizer_dir, job_env, tmp_path_factory):
    return uninterrupted_run(corpus, tokenizer_dir, job_env, tmp_path_factory.mktemp("baseline1"), 1)


@pytest.fixture(scope="module")
def two_process_baseline(two_process_resume_run):
    return two_process_resume_run


def trainer_state(checkpoint) -> dict:
    with open(os.path.join(checkpoint, "trainer_state.json")) as handle:
        return json.load(handle)


def test_single_process_resume_mid_accumulation_and_at_epoch_boundary_is_bit_exact(
        single_process_baseline, corpus, tokenizer_dir, job_env, tmp_path):
    expected_dir, expected_samples = single_process_baseline
    out, samples = tmp_path / "run", tmp_path / "samples"
    args, env = resume_args(corpus, tokenizer_dir, out), with_env(job_env, TRAINER_DEBUG_SAMPLE_LOG=samples)
    # Micro-batch 9 is the first half of step 5: mid-epoch, mid-accumulation, mid-way through a logging window.
    first = run_job("trainer.mlm", args, with_env(env, TRAINER_FAULT_SIGNAL_AT_MICRO_BATCH=9))
    assert "stop signal received: saved checkpoint-5" in first.stderr
    assert set(os.listdir(out / "checkpoint-5")) >= {"checkpoint_complete", "model.safetensors", "optimizer.pt",
                                                    "rank-0.pt", "scheduler.pt", "tokenizer.json", "trainer_state.json"}
    assert not os.path.exists(out / "model.safetensors")  # stopped: no final model
    # Resumed, micro-batch 2 ends step 6, the last of epoch 0.
    second = run_job("trainer.mlm", args, with_env(env, TRAINER_FAULT_SIGNAL_AT_MICRO_BATCH=2))
    assert f"resuming from the newest complete one, {out / 'checkpoint-5'}" in second.stdout
    assert "saved checkpoint-6" in second.stderr
    state = trainer_state(out / "checkpoint-6")
    assert (state["step"], state["states"]["data"]["epoch"], state["states"]["data"]["samples_in_epoch"]) == (6, 1, 0)
    assert state["args"]["learning_rate"] == 5e-3
    run_job("trainer.mlm", args, env)
    assert_same_run(expected_dir, out)
    assert samples_per_step(samples) == samples_per_step(expected_samples)


def test_loader_workers_change_nothing_and_resume_exactly_across_the_epoch_boundary(
        single_process_baseline, corpus, tokenizer_dir, job_env, tmp_path):
    """2 loader workers (one loader over both epochs), stopped in step 5 and resumed: the run without workers."""
    expected_dir, expected_samples = single_process_baseline
    out, samples = tmp_path / "run", tmp_path / "samples"
    args = resume_args(corpus, tokenizer_dir, out, 1, "--dataloader_num_workers", "2")
    env = with_env(job_env, TRAINER_DEBUG_SAMPLE_LOG=samples)
    first = run_job("trainer.mlm", args, with_env(env, TRAINER_FAULT_SIGNAL_AT_MICRO_BATCH=9))
    assert "stop signal received: saved checkpoint-5" in first.stderr
    run_job("trainer.mlm", args, env)
    assert_same_run(expected_dir, out)
    assert samples_per_step(samples) == samples_per_step(expected_samples)


def test_kill_9_during_a_save_keeps_the_previous_checkpoint_and_resume_skips_the_torn_one(
        single_process_baseline, corpus, tokenizer_dir, job_env, tmp_path):
    out = tmp_path / "run"
    args = resume_args(corpus, tokenizer_dir, out)
    job = start_job("trainer.mlm", args, with_env(job_env, TRAINER_FAULT_SLEEP_IN_SAVE=5))
    # The save of step 8 has written all its files and sleeps before publishing them: kill it there.
    wait_for_path(out / "checkpoint-8.tmp" / "trainer_state.json", job)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not os.path.exists(out / "checkpoint-8") and os.path.isdir(out / "checkpoint-8.tmp")
    resumed = run_job("trainer.mlm", args, job_env)
    assert f"skipping checkpoint {out / 'checkpoint-8.tmp'}: incomplete" in resumed.stdout
    assert f"resuming from the newest complete one, {out / 'checkpoint-4'}" in resumed.stdout
    # What the killed run logged after step 4 was dropped and redone: the history is that of one clean run.
    assert_same_run(single_process_baseline[0], out)
    assert not os.path.exists(out / "checkpoint-8.tmp")


@pytest.mark.slow
def test_two_process_resume_is_bit_exact_and_world_size_may_change(
        two_process_baseline, single_process_baseline, corpus, tokenizer_dir, job_env, tmp_path):
    expected_dir, expected_samples = two_process_baseline
    out, samples = tmp_path / "run", tmp_path / "samples"
    env = with_env(job_env, TRAINER_DEBUG_SAMPLE_LOG=samples)
    # Rank 0 alone gets the signal, in the first half of step 5; the ranks agree to stop after that step.
    first = run_job("trainer.mlm", resume_args(corpus, tokenizer_dir, out, 2),
                    with_env(env, TRAINER_FAULT_SIGNAL_AT_MICRO_BATCH=9), nproc=2)
    assert "stop signal received: saved checkpoint-5" in first.stderr
    assert {"rank-0.pt", "rank-1.pt"} <= set(os.listdir(out / "checkpoint-5"))
    changing = tmp_path / "changing"
    shutil.copytree(out, changing)
    run_job("trainer.mlm", resume_args(corpus, tokenizer_dir, out, 2), env, nproc=2)
    assert_same_run(expected_dir, out)

    # The same checkpoint resumed on 1 process for 2 steps (2 -> 1), then on 2 processes again (1 -> 2): the
    # global sample order goes on where it stopped, nothing repeated or skipped.
    changing_samples = tmp_path / "changing_samples"
    env = with_env(job_env, TRAINER_DEBUG_SAMPLE_LOG=changing_samples)
    run_job("trainer.mlm", resume_args(corpus, tokenizer_dir, changing, 1),
            with_env(env, TRAINER_FAULT_SIGNAL_AT_MICRO_BATCH=4))
    assert trainer_state(changing / "checkpoint-7")["world_size"] == 1
    run_job("trainer.mlm", resume_args(corpus, tokenizer_dir, changing, 2), env, nproc=2)
    stitched = {**{step: ids for step, ids in samples_per_step(samples).items() if step <= 5},
                **samples_per_step(changing_samples)}
    assert stitched == samples_per_step(expected_samples) == samples_per_step(single_process_baseline[1])
    assert read_results(changing)["train_steps"] == STEPS


@pytest.mark.slow
def test_torchrun_restarts_killed_worker_and_resumes_to_the_same_parameters(
        two_process_baseline, corpus, tokenizer_dir, job_env, tmp_path):
    import psutil

    out = tmp_path / "run"
    job = start_job("trainer.mlm", resume_args(corpus, tokenizer_dir, out, 2),
                    with_env(job_env, TRAINER_FAULT_SLEEP_IN_SAVE=1), nproc=2, torchrun_options=["--max-restarts=1"])
    wait_for_path(out / "checkpoint-4" / "checkpoint_complete", job)
    worker = psutil.Process(job.pid).children()[-1]
    worker.kill()
    output, _ = job.communicate(timeout=600)
    assert job.returncode == 0, output[-4000:]
    assert "resuming from the newest complete one" in output
    assert_same_run(two_process_baseline[0], out)


# SGD without momentum keeps no state: nothing more to prove.
def test_resume_with_adafactor_is_bit_exact(corpus, tokenizer_dir, in_process_job, tmp_path):
    """Adafactor's factored moments go into the checkpoint and come back."""
    from trainer.mlm import main

    expected, out = tmp_path / "expected", tmp_path / "run"
    in_process_job(main, resume_args(corpus, tokenizer_dir, expected, 1, "--optim", "adafactor"))
    args = resume_args(corpus, tokenizer_dir, out, 1, "--optim", "adafactor")
    in_process_job(main, args, TRAINER_FAULT_SIGNAL_AT_MICRO_BATCH=9)
    assert trainer_state(out / "checkpoint-5")["step"] == 5 and not os.path.exists(out / "model.safetensors")
    in_process_job(main, args)
    assert_same_run(expected, out)


# torchao's AdamW compiles its update (inductor, slow on 2 cores) once per parameter shape and kind of moment: a
# Llama with 3 shapes (vocabulary 512 x 32: 16384 values, quantized; 32 x 32 and 32: under torchao's 4096, fp32
# moments), 3 steps, and both bit widths in one process, so that the fp32 moments' updates compile once.
QUANTIZED_ADAMW_LLAMA = ["--model_type", "llama", "--config_overrides",
                         "hidden_size=32,intermediate_size=32,num_hidden_layers=1,num_attention_heads=2,head_dim=16,"
                         "num_key_value_heads=2,max_position_embeddings=32"]


def quantized_adamw_args(corpus, tokenizer_dir, output_dir, bits: int) -> list[str]:
    return with_model(resume_args(corpus, tokenizer_dir, output_dir, 1, "--optim", f"adamw_torch_{bits}bit",
                                  "--max_steps", "3", "--logging_steps", "1", module="trainer.clm"),
                      QUANTIZED_ADAMW_LLAMA)


@pytest.mark.slow  # ~80 s on 2 loaded cores with an empty inductor cache, mostly compilation
def test_resume_with_quantized_adamw_is_bit_exact(corpus, bpe_tokenizer_dir, in_process_job, tmp_path):
    """torchao's 8-bit and 4-bit moments go into the checkpoint and come back: stopped in step 2 and resumed, the
    run ends bit-identical to one that never stopped."""
    from trainer.clm import main

    for bits in (8, 4):
        expected, out = tmp_path / f"expected{bits}", tmp_path / f"run{bits}"
        args = quantized_adamw_args(corpus, bpe_tokenizer_dir, out, bits)
        in_process_job(main, quantized_adamw_args(corpus, bpe_tokenizer_dir, expected, bits))
        in_process_job(main, args, TRAINER_FAULT_SIGNAL_AT_MICRO_BATCH=3)
        assert trainer_state(out / "checkpoint-2")["step"] == 2 and not os.path.exists(out / "model.safetensors")
        moments = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)["state"].values()
        # Quantized: the embeddings' and the output layer's moments, the only tensors of >= 4096 values.
        kinds = [type(state[name]).__name__ for state in moments for name in ("exp_avg", "exp_avg_sq")]
        assert kinds.count(f"OptimState{bits}bit") == 4 and kinds.count("Tensor") == len(kinds) - 4
        in_process_job(main, args)
        assert_same_run(expected, out, steps=3)
