"""Shared by the checkpoint, resume and signal tests: one small run configuration and ways to compare runs.

The configuration exists for each language-model job (`module`: trainer.mlm, the default, or trainer.clm, with the
byte-level BPE tokenizer of clm_helpers.bpe_tokenizer_dir): the same data, batches, steps and checkpoints, the job's
own tiny model with dropout on."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from conftest import REPO_ROOT, accelerate_launch, free_port, load_parameters, read_history, read_results, run_job

# 48 sequences, 8 per optimizer step (4 x accumulation 2 on one process, 2 x 2 ranks x 2 on two): 6 steps per
# epoch, 12 steps in all; windows of 3 steps; checkpoints every 4. Dropout is ON (0.1, the BERT default):
# exactness then also needs every rank's RNG state back. Weight decay and a warmup step make the same runs the
# ZeRO/FSDP-against-DDP comparisons (the engine's parameter groups and schedule under every backend).
STEPS, STEPS_PER_EPOCH = 12, 6
DROPOUT_BERT = ["--model_type", "bert", "--config_overrides",
                "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,"
                "max_position_embeddings=128"]
DROPOUT_GPT2 = ["--model_type", "gpt2", "--config_overrides", "n_embd=32,n_layer=2,n_head=2,n_positions=64"]
# What each job's command line says for its model, its 32-token sequences and its (disabled) probes.
JOB_ARGS = {"trainer.mlm": [*DROPOUT_BERT, "--max_seq_length", "32", "--probe_sentences", ""],
            "trainer.clm": [*DROPOUT_GPT2, "--block_size", "32", "--probe_prompts", ""]}


def resume_args(corpus, tokenizer_dir, output_dir, nproc: int = 1, *extra, module: str = "trainer.mlm") -> list[str]:
    return ["--train_file", corpus["train"], "--validation_file", corpus["validation"],
            "--tokenizer_name", tokenizer_dir, *JOB_ARGS[module],
            "--output_dir", str(output_dir), "--learning_rate", "5e-3", "--logging_steps", "3",
            "--report_to", "none", "--max_train_samples", "48",
            "--max_eval_samples", "16", "--per_device_train_batch_size", str(4 // nproc),
            "--gradient_accumulation_steps", "2", "--num_train_epochs", "2", "--save_steps", "4",
            "--weight_decay", "0.01", "--warmup_steps", "1", *extra]


def uninterrupted_run(corpus, tokenizer_dir, job_env, directory, nproc: int, module: str = "trainer.mlm"):
    """The resume tests' job run to the end on `nproc` processes, logging its samples: (output dir, sample log)."""
    out, samples = directory / "run", directory / "samples"
    run_job(module, resume_args(corpus, tokenizer_dir, out, nproc, module=module),
            with_env(job_env, TRAINER_DEBUG_SAMPLE_LOG=samples), nproc=nproc)
    return out, samples


def with_env(env: dict, **variables) -> dict:
    return {**env, **{key: str(value) for key, value in variables.items()}}


def start_job(module: str, args: list[str], env: dict, nproc: int = 1, torchrun_options=()) -> subprocess.Popen:
    """Like conftest.run_job, but in the background, for tests that signal or kill the job."""
    if nproc == 1:
        command = [sys.executable, "-m", module, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(free_port()), *torchrun_options, "-m", module, *args]
    return subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for_path(path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, f"job ended ({process.returncode}) before {path} appeared:\n" \
                                       f"{process.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.05)


def assert_same_parameters(directory_a, directory_b) -> None:
    a, b = load_parameters(directory_a), load_parameters(directory_b)
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"parameters differ: {different[:5]}"


def assert_same_run(expected_dir, actual_dir, steps: int = STEPS) -> None:
    assert_same_parameters(expected_dir, actual_dir)
    assert logged_losses(actual_dir) == logged_losses(expected_dir)
    assert read_results(actual_dir)["train_steps"] == steps
    # The run's mean training loss: the checkpoint carries its sums, so a resumed run reports the same number.
    assert read_results(actual_dir)["train_loss"] == read_results(expected_dir)["train_loss"]


def run_two_process_resume_job(corpus, tokenizer_dir, job_env, output_dir, extra=(), yaml: str | None = None,
                               check: bool = True, module: str = "trainer.mlm", launcher: list[str] | None = None):
    """The resume tests' job on 2 processes: under torchrun, under `accelerate launch` with `yaml`, or under
    another `launcher` (conftest.deepspeed_launch())."""
    return run_job(module, resume_args(corpus, tokenizer_dir, output_dir, 2, *extra, module=module), job_env,
                   nproc=2, check=check, launcher=accelerate_launch(yaml) if yaml else launcher)


def assert_sharded_stop_and_resume_is_exact(corpus, tokenizer_dir, job_env, tmp_path, sharded_dir: str, extra=(),
                                            yaml: str | None = None, uninterrupted=None,
                                            module: str = "trainer.mlm") -> None:
    """A 2-process run stopped in step 6 and resumed from checkpoint-6 ends bit-identical to an uninterrupted one
    (`uninterrupted`: the output directory of one already run with the same `extra` and `yaml`).

    The checkpoint holds the sharded model + optimizer state that every rank wrote (`sharded_dir`: "deepspeed",
    "fsdp") instead of rank 0's optimizer.pt. `yaml`: run under `accelerate launch` with it instead of torchrun.
    """
    def run(output_dir, env, check=True):
        return run_two_process_resume_job(corpus, tokenizer_dir, env, output_dir, extra, yaml, check, module)

    if uninterrupted is None:
        uninterrupted = tmp_path / "uninterrupted"
        run(uninterrupted, job_env)
    resumed = tmp_path / "resumed"
    first = run(resumed, with_env(job_env, TRAINER_FAULT_SIGNAL_AT_MICRO_BATCH=11), check=False)
    assert "saved checkpoint-6" in first.stdout + first.stderr
    assert os.path.isdir(resumed / "checkpoint-6" / sharded_dir)
    assert not os.path.exists(resumed / "checkpoint-6" / "optimizer.pt")
    second = run(resumed, job_env)
    assert "resuming from the newest complete one" in second.stdout
    assert_same_run(uninterrupted, resumed)


def logged_losses(output_dir) -> list[tuple]:
    """(step, train_loss) and (step, eval_loss) records, in order: what a user sees of the run."""
    return [(r["step"], key, r[key]) for r in read_history(output_dir) for key in ("train_loss", "eval_loss")
            if key in r]


def samples_per_step(log_prefix) -> dict[int, list[int]]:
    """Sample ids trained on at each optimizer step, all ranks merged (TRAINER_DEBUG_SAMPLE_LOG files)."""
    directory, name = os.path.split(str(log_prefix))
    steps: dict[int, list[int]] = {}
    for file_name in os.listdir(directory):
        if file_name.startswith(name + ".rank"):
            with open(os.path.join(directory, file_name)) as handle:
                for record in map(json.loads, handle):
                    steps.setdefault(record["step"], []).extend(record["ids"])
    return {step: sorted(ids) for step, ids in sorted(steps.items())}
