"""Experience replay (trainer.continual.replay): the same replay share in every global batch, the same samples at any
world size and accumulation, a seeded replay stream that cycles on its own, exact resume, and bad input refused."""
import json

import datasets
import pytest
import torch

from classify_helpers import classify_args, sentiment  # noqa: F401 (fixture)
from conftest import fails_cleanly, mlm_args, read_history, read_results
from resume_helpers import assert_same_parameters, samples_per_step
from trainer.data.batches import EpochBatches
from trainer.data.mixture import replay_count, slot_sources, spread_slots as replay_slots, training_data
from trainer.data.samplers import CyclingSource, GlobalBatchSampler, mixed_global_batch
from trainer.errors import UsageError

NEW, REPLAY = 40, 7  # training samples 0..39, replay samples 40..46: the stream wraps every few steps


def sampler(world_size=1, rank=0, batch=8, accumulation=1, seed=3, ratio=0.25, lengths=None):
    replay = CyclingSource(NEW, REPLAY, replay_count(ratio, batch * world_size * accumulation), seed)
    return GlobalBatchSampler(NEW, batch, world_size, rank, accumulation, seed, lengths=lengths, others=[replay])


def global_batches(world_size, batch, accumulation, steps, lengths=None, start=(0, 0, [0]), **options):
    """The run's first `steps` optimizer steps as lists of sample ids in global-batch order, all ranks merged."""
    ranks = [iter(EpochBatches(sampler(world_size, rank, batch, accumulation, lengths=lengths, **options), *start))
             for rank in range(world_size)]
    steps_out = []
    for _ in range(steps):
        step = []
        for _ in range(accumulation):
            for rank_batches in ranks:
                step += next(rank_batches)
        steps_out.append(step)
    return steps_out


def test_every_global_batch_is_the_same_at_any_world_size_and_accumulation():
    # Global batch 16: 1 x 16, 1 x 8 x accumulation 2, 2 ranks x 8, 2 ranks x 4 x accumulation 2; 4 of 16 replayed.
    reference = global_batches(1, 16, 1, steps=10)
    for world_size, batch, accumulation in [(1, 8, 2), (2, 8, 1), (2, 4, 2)]:
        assert global_batches(world_size, batch, accumulation, steps=10) == reference
    # 10 steps cross three epoch boundaries (40 // 12 = 3 steps an epoch) and five passes over the replay set.
    assert len({sample for step in reference for sample in step if sample >= NEW}) == REPLAY


def test_the_replay_share_is_exact_in_every_batch_and_the_new_data_makes_the_epochs():
    steps = global_batches(2, 4, 2, steps=9)  # 3 epochs of 3 steps (12 new samples each, 4 dropped per epoch)
    assert replay_count(0.25, 16) == 4 == sampler(2, 0, 4, 2).counts[1]
    for step in steps:
        assert len(step) == 16 and sum(sample >= NEW for sample in step) == 4
    for epoch in range(3):
        new = [sample for step in steps[3 * epoch:3 * epoch + 3] for sample in step if sample < NEW]
        assert len(new) == len(set(new)) == 36
    # Every micro-batch of 4 holds one replay sample: the replay slots are spread over the global batch.
    assert replay_slots(16, 4).tolist() == [2, 6, 10, 14]
    assert all(sum(sample >= NEW for sample in step[i:i + 4]) == 1 for step in steps for i in range(0, 16, 4))


def test_the_replay_stream_is_a_fresh_seeded_permutation_per_pass_independent_of_the_epochs():
    stream = [sample for step in global_batches(1, 16, 1, steps=7) for sample in step if sample >= NEW]  # 28
    passes = [stream[i:i + REPLAY] for i in range(0, 28, REPLAY)]
    assert all(sorted(p) == list(range(NEW, NEW + REPLAY)) for p in passes)
    assert len({tuple(p) for p in passes}) == 4
    # The stream is the same whatever the new data's epochs: 2 replayed of 8 gives 7 new a step, other epochs.
    fewer = [sample for step in global_batches(1, 8, 1, steps=14) for sample in step if sample >= NEW]
    assert fewer == stream


def test_deterministic_from_the_seed():
    assert global_batches(2, 4, 2, steps=6) == global_batches(2, 4, 2, steps=6)
    other_seed = global_batches(2, 4, 2, steps=6, seed=4)
    assert other_seed != global_batches(2, 4, 2, steps=6)


def test_resuming_at_the_saved_positions_continues_the_same_batches():
    full = global_batches(2, 4, 2, steps=12)
    # After 4 steps: epoch 1, 12 samples into it (3 steps of 12 new per epoch), 16 replay samples drawn.
    assert global_batches(2, 4, 2, steps=8, start=(1, 12, [16])) == full[4:]
    # The engine's train-state arithmetic gives those positions.
    run = sampler(2, 0, 4, 2)
    position = [0, 0, 0]
    for _ in range(4):
        position[1] += run.primary_per_step
        position[2] += run.counts[1]
        if position[1] >= run.steps_per_epoch * run.primary_per_step:
            position[:2] = [position[0] + 1, 0]
    assert position == [1, 12, 16]


def test_length_grouped_batches_with_replay_are_sorted_and_the_same_at_any_world_size():
    lengths = torch.arange(NEW + REPLAY) * 7 % 23 + 1
    reference = global_batches(1, 16, 1, steps=5, lengths=lengths)
    assert global_batches(2, 4, 2, steps=5, lengths=lengths) == reference
    for step in reference:
        assert lengths[step].tolist() == sorted(lengths[step].tolist(), reverse=True)
        assert sum(sample >= NEW for sample in step) == 4


def test_replay_count_rounds_halves_up_and_refuses_a_share_that_leaves_no_sample_of_either_kind():
    assert [replay_count(ratio, 8) for ratio in (0.0625, 0.1, 0.5, 0.9375 - 1e-9)] == [1, 1, 4, 7]
    for ratio in (0.06, 0.94):
        with pytest.raises(UsageError, match=r"use a --replay_ratio from 0.0625 to below 0.9375, or a larger batch"):
            replay_count(ratio, 8)


def test_mixed_batch_places_replay_in_its_slots():
    assert replay_slots(8, 2).tolist() == [2, 6]
    assert mixed_global_batch([torch.arange(6), torch.tensor([100, 101])], slot_sources([6, 2])).tolist() == [
        0, 1, 100, 2, 3, 4, 101, 5]


def test_training_data_is_the_training_samples_then_the_replay_samples_in_one_schema():
    train = datasets.Dataset.from_dict({"input_ids": [[1, 2], [3, 4]], "extra": ["a", "b"]})
    replay = datasets.Dataset.from_dict({"input_ids": [[5, 6]]}).cast(
        datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))}))
    combined = training_data(train, [replay], ["input_ids"])
    assert combined["input_ids"] == [[1, 2], [3, 4], [5, 6]]
    assert training_data(train, []) is train


# ------------------------------------------------------------------------------------------ jobs, in-process
@pytest.mark.parametrize("spelling", ["replay", "train_files"])
def test_mlm_with_replay_resumes_bit_exactly_and_every_step_holds_its_replay_share(
        spelling, corpus, tokenizer_dir, in_process_job, tmp_path):
    """resume_helpers' run (dropout on; 4 x accumulation 2) on 24 sequences with a quarter of every step replayed:
    2 replay + 6 new sequences a step, 4 steps an epoch, 6 steps. Stopped in step 3 and resumed across the epoch
    boundary, it ends bit-identical to the run that never stopped, having trained on the same samples in every
    step. Spelt as a mixture of two weighted sources (--train_files TRAIN:3 REPLAY:1), replay's second source, the
    same holds."""
    from resume_helpers import logged_losses, resume_args
    from trainer.mlm import main

    def args(out):
        argv = resume_args(corpus, tokenizer_dir, out, 1, "--replay_file", corpus["validation"], "--replay_ratio",
                           "0.25", "--max_train_samples", "24", "--max_steps", "6", "--peak_tflops", "1")
        if spelling == "train_files":
            argv = argv[2:argv.index("--replay_file")] + argv[argv.index("--replay_ratio") + 2:] + [
                "--train_files", f"{corpus['train']}:3", f"{corpus['validation']}:1"]
        return argv

    expected, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    in_process_job(main, args(expected), TRAINER_DEBUG_SAMPLE_LOG=tmp_path / "expected")
    in_process_job(main, args(resumed), TRAINER_DEBUG_SAMPLE_LOG=tmp_path / "resumed",
                   TRAINER_FAULT_SIGNAL_AT_MICRO_BATCH=5)
    with open(resumed / "checkpoint-3" / "trainer_state.json") as handle:
        state = json.load(handle)
    data = state["states"]["data"]
    assert (state["step"], data["epoch"], data["samples_in_epoch"], data["samples_per_source"][1]) == (3, 0, 18, 6)
    in_process_job(main, args(resumed), TRAINER_DEBUG_SAMPLE_LOG=tmp_path / "resumed")
    assert_same_parameters(expected, resumed)
    assert logged_losses(resumed) == logged_losses(expected)
    assert read_results(resumed)["train_loss"] == read_results(expected)["train_loss"]
    steps = samples_per_step(tmp_path / "expected")
    assert samples_per_step(tmp_path / "resumed") == steps and len(steps) == 6 == read_results(expected)["train_steps"]
    assert all(len(ids) == 8 and sum(i >= 24 for i in ids) == 2 for ids in steps.values())
    assert [r["train_epoch"] for r in read_history(expected) if "train_loss" in r] == [0, 1]
    # What each source gave (blocks of 32 tokens), kept across the resume.
    samples = {corpus["train"]: 36, corpus["validation"]: 12}
    for run in (expected, resumed):
        assert read_results(run)["train_samples_per_source"] == samples
        assert read_results(run)["train_tokens_per_source"] == {name: 32 * n for name, n in samples.items()}


# ----------------------------------------------------------------------------------------------------- bad input
def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("flags, expected", [
    (["--replay_file", "nowhere.txt", "--replay_ratio", "0.2"], "--replay_file nowhere.txt: no such file"),
    (["--replay_ratio", "0.2"], "--replay_file and --replay_ratio go together"),
    (["--replay_file", "CORPUS"], "--replay_file and --replay_ratio go together"),
    (["--replay_file", "CORPUS", "--replay_ratio", "0"], "--replay_ratio must be between 0 and 1 (exclusive), got 0"),
    (["--replay_file", "CORPUS", "--replay_ratio", "1"], "--replay_ratio must be between 0 and 1"),
    (["--replay_file", "CORPUS", "--replay_ratio", "nan"], "--replay_ratio must be between 0 and 1"),
    # A global batch of 4 holds round(0.1 x 4) = 0 replay samples: refused at start-up, before data preparation.
    (["--replay_file", "CORPUS", "--replay_ratio", "0.1", "--per_device_train_batch_size", "4"],
     "--replay_ratio 0.1 of a global batch of 4 sequences (per-device batch x processes x accumulation) gives 0 "
     "replay samples per step; use a --replay_ratio from 0.125 to below 0.875, or a larger batch"),
    (["--replay_file", "ROWS", "--replay_ratio", "0.25"], "--replay_file ROWS has no column 'text' (its columns: "
                                                          "sentence, label); the replay data needs the training "
                                                          "data's columns (text)"),
])
def test_bad_replay_input_to_mlm_is_one_line_exit_2_and_writes_nothing(flags, expected, corpus, tokenizer_dir,
                                                                        in_process_job, tmp_path, capsys):
    from trainer.mlm import main

    rows = write_rows(tmp_path / "rows.jsonl", [{"sentence": "a film .", "label": "positive"}])
    flags = [{"CORPUS": corpus["validation"], "ROWS": rows}.get(flag, flag) for flag in flags]
    out = tmp_path / "out"
    message = in_process_job(lambda argv: fails_cleanly(main, argv, capsys),
                             mlm_args(corpus, tokenizer_dir, out, "--max_steps", "2", *flags))
    assert expected.replace("ROWS", rows) in message
    assert not out.exists()


@pytest.mark.parametrize("replay_rows, expected", [
    ([{"sentence": "a film ."}], "has no column 'label' (its columns: sentence); the replay data needs the training "
                                 "data's columns (sentence, label)"),
    ([{"sentence": "a film .", "label": "neutral"}], "the replay data has labels never seen in training: neutral"),
])
def test_bad_replay_input_to_classify_is_one_line_exit_2_and_writes_nothing(replay_rows, expected, sentiment,
                                                                             in_process_job, tmp_path, capsys):
    from trainer.classify import main

    out = tmp_path / "out"
    argv = classify_args(sentiment, out, "--max_steps", "2", "--replay_file",
                         write_rows(tmp_path / "old.jsonl", replay_rows), "--replay_ratio", "0.25")
    assert expected in in_process_job(lambda args: fails_cleanly(main, args, capsys), argv)
    assert not out.exists()
