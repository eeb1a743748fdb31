"""--streaming for real, of a weighted mixture of two sources: 1 process and 2 (under `accelerate launch`) make the
same updates; a run pre-empted (mid-accumulation, with loader workers masking) and resumed ends bit-identical to one
that never stopped; a resume on another world size continues the same global order; the per-source figures are
each source's lanes' blocks. All runs have a global batch of 16 sequences, 12 from a directory of two shards and 4
from a third shard, and train the tiny BERT."""
from __future__ import annotations

import pytest

from conftest import TINY_BERT, accelerate_launch, load_parameters, read_results, run_job
from resume_helpers import assert_same_parameters, samples_per_step, with_env

STEPS = 8


@pytest.fixture(scope="module")
def shards(corpus, tmp_path_factory) -> list[str]:
    """--train_files of the test corpus's training lines: two .txt shards in a directory (weight 3) and a third
    shard (weight 1)."""
    directory = tmp_path_factory.mktemp("shards")
    with open(corpus["train"]) as handle:
        lines = handle.readlines()
    (directory / "primary").mkdir()
    for shard in range(2):
        (directory / "primary" / f"part-{shard}.txt").write_text("".join(lines[shard::3]))
    (directory / "part-2.txt").write_text("".join(lines[2::3]))
    return [f"{directory / 'primary'}:3", f"{directory / 'part-2.txt'}:1"]


def streaming_args(shards, corpus, tokenizer_dir, output_dir, per_device: int, accumulation: int, *extra):
    return ["--streaming", "--train_files", *shards, "--validation_file", corpus["validation"],
            "--tokenizer_name", tokenizer_dir, *TINY_BERT, "--max_seq_length", "32", "--output_dir", str(output_dir),
            "--learning_rate", "5e-3", "--logging_steps", "2", "--report_to", "none", "--probe_sentences", "",
            "--max_eval_samples", "16", "--max_steps", str(STEPS), "--save_steps", "4", "--shuffle_buffer_size",
            "64", "--per_device_train_batch_size", str(per_device), "--gradient_accumulation_steps",
            str(accumulation), *extra]


def assert_close_parameters(directory_a, directory_b, tolerance: float = 1e-5) -> None:
    a, b = load_parameters(directory_a), load_parameters(directory_b)
    assert a.keys() == b.keys()
    worst = max((a[name] - b[name]).abs().max().item() for name in a)
    assert worst <= tolerance, f"parameters differ by up to {worst:.2e}"


@pytest.fixture(scope="module")
def single_process(shards, corpus, tokenizer_dir, job_env, tmp_path_factory):
    """1 process x batch 8 x accumulation 2, uninterrupted: (output dir, sample log)."""
    directory = tmp_path_factory.mktemp("stream-1")
    out, samples = directory / "run", directory / "samples"
    run_job("trainer.mlm", streaming_args(shards, corpus, tokenizer_dir, out, 8, 2),
            with_env(job_env, TRAINER_DEBUG_SAMPLE_LOG=samples))
    return out, samples


def test_two_processes_make_the_one_process_updates_and_a_resume_on_one_process_continues_their_order(
        single_process, shards, corpus, tokenizer_dir, job_env, tmp_path):
    """2 processes x batch 8 under `accelerate launch`, stopped after step 3, resumed on 1 process x 8 x
    accumulation 2: the same samples in every step as the 1-process run, and its parameters (to 1e-5: the sums are
    split differently); both report 12 and 4 blocks of 32 tokens a step from the two sources."""
    out, samples = tmp_path / "run", tmp_path / "samples"
    env = with_env(job_env, TRAINER_DEBUG_SAMPLE_LOG=samples)
    first = run_job("trainer.mlm", streaming_args(shards, corpus, tokenizer_dir, out, 8, 1), nproc=2, check=False,
                    env=with_env(env, TRAINER_FAULT_SIGNAL_AT_MICRO_BATCH=3),
                    launcher=accelerate_launch("cpu_ddp.yaml"))
    assert "stop signal received: saved checkpoint-3" in first.stderr, first.stderr[-3000:]
    assert sorted(samples_per_step(samples)) == [1, 2, 3]
    run_job("trainer.mlm", streaming_args(shards, corpus, tokenizer_dir, out, 8, 2), env)
    assert samples_per_step(samples) == samples_per_step(single_process[1])
    assert len(samples_per_step(samples)) == STEPS
    assert_close_parameters(single_process[0], out)
    names = [source.rsplit(":", 1)[0] for source in shards]
    for run in (single_process[0], out):
        assert read_results(run)["train_samples_per_source"] == {names[0]: 12 * STEPS, names[1]: 4 * STEPS}
        assert read_results(run)["train_tokens_per_source"] == {names[0]: 12 * STEPS * 32, names[1]: 4 * STEPS * 32}


def test_a_stream_stopped_mid_accumulation_resumes_bit_identical(single_process, shards, corpus, tokenizer_dir,
                                                                 job_env, tmp_path):
    """With 2 loader workers (each owning half of every micro-batch's lanes): micro-batch 7 is the first half of
    step 4; the run saves checkpoint-4 after it and the resumed run seeks every lane there."""
    out = tmp_path / "run"
    args = streaming_args(shards, corpus, tokenizer_dir, out, 8, 2, "--dataloader_num_workers", "2")
    first = run_job("trainer.mlm", args, with_env(job_env, TRAINER_FAULT_SIGNAL_AT_MICRO_BATCH=7), check=False)
    assert "stop signal received: saved checkpoint-4" in first.stderr, first.stderr[-3000:]
    second = run_job("trainer.mlm", args, job_env)
    assert "resumed from" in second.stdout + second.stderr
    assert_same_parameters(single_process[0], out)
