"""Weighted mixtures of training sources (trainer.data.mixture, --train_files): exactly each source's count in every
step, the same samples at any world size and accumulation, deterministic per seed, a resumable position with the
per-source figures, the jobs preparing every source as their training data, and 2 processes training as 1."""
import json

import datasets
import numpy as np
import pytest

from classify_helpers import classify_args, sentiment  # noqa: F401 (fixture)
from clm_helpers import bpe_tokenizer_dir, clm_args  # noqa: F401 (fixture)
from conftest import TINY_BERT, load_parameters, mlm_args, read_results, relative_difference, run_job
from resume_helpers import samples_per_step, with_env
from trainer.config.job_config import parse_job_config
from trainer.data.arguments import WeightedSource
from trainer.data.batches import EpochBatches
from trainer.data.mixture import MixtureSource, mixture_counts, mixture_sources, replay_count, source_counts
from trainer.data.samplers import CyclingSource, GlobalBatchSampler
from trainer.data.source import TrainingBatches, token_counts

SIZES = [50, 13, 7]  # the primary source (samples 0..49), then two cycling ones (50..62, 63..69)
WEIGHTS = [0.6, 0.3, 0.1]  # a global batch of 16: 9, 5 and 2 samples
FIRSTS = [0, 50, 63]


def sampler(world_size=1, rank=0, batch=16, accumulation=1, seed=3):
    counts = source_counts(WEIGHTS, batch * world_size * accumulation)
    others = [CyclingSource(FIRSTS[i], SIZES[i], counts[i], seed, source=i) for i in (1, 2)]
    return GlobalBatchSampler(SIZES[0], batch, world_size, rank, accumulation, seed, others=others)


def global_steps(world_size=1, batch=16, accumulation=1, steps=12, seed=3, start=(0, 0, None)):
    """The first `steps` optimizer steps as sample ids in global-batch order, every rank's micro-batches merged."""
    ranks = [iter(EpochBatches(sampler(world_size, rank, batch, accumulation, seed), *start))
             for rank in range(world_size)]
    return [[sample for _ in range(accumulation) for rank in ranks for sample in next(rank)] for _ in range(steps)]


def source_of(sample: int) -> int:
    return int(np.searchsorted(FIRSTS, sample, side="right")) - 1


def test_every_step_holds_exactly_each_sources_count_and_the_primary_makes_the_epochs():
    assert source_counts(WEIGHTS, 16) == sampler().counts == [9, 5, 2]
    steps = global_steps(steps=15)  # 3 epochs of 50 // 9 = 5 steps
    for step in steps:
        assert [sum(source_of(s) == i for s in step) for i in range(3)] == [9, 5, 2]
    for epoch in range(3):
        primary = [s for step in steps[5 * epoch:5 * epoch + 5] for s in step if source_of(s) == 0]
        assert len(primary) == len(set(primary)) == 45
    # The others cycle, each pass a fresh permutation of the source, on across the primary's epochs.
    for source in (1, 2):
        stream = [s for step in steps for s in step if source_of(s) == source]
        passes = [stream[i:i + SIZES[source]] for i in range(0, len(stream) - SIZES[source] + 1, SIZES[source])]
        assert len(passes) >= 4 and len({tuple(p) for p in passes}) == len(passes)
        assert all(sorted(p) == list(range(FIRSTS[source], FIRSTS[source] + SIZES[source])) for p in passes)


def test_every_step_holds_the_same_samples_at_any_world_size_and_accumulation():
    reference = global_steps(1, 16, 1)
    for world_size, batch, accumulation in [(1, 8, 2), (2, 8, 1), (2, 4, 2), (4, 4, 1), (4, 2, 2), (4, 1, 4)]:
        assert global_steps(world_size, batch, accumulation) == reference


def test_the_mixture_is_deterministic_per_seed():
    assert global_steps(2, 4, 2, seed=3) == global_steps(2, 4, 2, seed=3)
    assert global_steps(2, 4, 2, seed=4) != global_steps(2, 4, 2, seed=3)


def test_two_sources_are_replays_layout_and_replay_joins_a_mixture_as_its_last_source():
    # --train_files A:3 B:1 at G = 8 is --train_file A --replay_file B --replay_ratio 0.25: counts, slots, orders.
    assert mixture_counts([MixtureSource("A", 3), MixtureSource("B", 1)], 8) == [6, 2] == mixture_counts(
        [MixtureSource("A"), MixtureSource("B", replay_ratio=0.25)], 8) == [8 - replay_count(0.25, 8), 2]
    # Replay keeps round(R x G); the weights share the rest.
    assert mixture_counts([MixtureSource("A", 1), MixtureSource("B", 1), MixtureSource("R", replay_ratio=0.25)],
                          16) == [6, 6, 4]


def test_the_sources_of_a_job_and_their_names(tmp_path):
    from trainer.mlm import MLM_JOB

    a, b = tmp_path / "a.txt", tmp_path / "b"
    a.write_text("a film .\n")
    (b / "deeper").mkdir(parents=True)
    for path in (b / "2.txt", b / "deeper" / "1.txt"):
        path.write_text("another film .\n")
    assert WeightedSource.parse(f"{a}:0.7", "train_files") == WeightedSource(str(a), 0.7)
    assert WeightedSource.parse(f"{b}/", "train_files") == WeightedSource(f"{b}/", 1.0)
    assert WeightedSource(f"{b}/").files("train_files") == [f"{b}/2.txt", f"{b}/deeper/1.txt"]
    assert WeightedSource(f"{b}/**/*.txt").files("train_files") == [f"{b}/2.txt", f"{b}/deeper/1.txt"]
    config = parse_job_config(MLM_JOB.all_sections, ["--train_files", f"{a}:3", f"{b}/", "--replay_file", str(a),
                                                     "--replay_ratio", "0.25"])
    assert mixture_sources(config) == [MixtureSource(str(a), 3.0), MixtureSource(f"{b}/", 1.0),
                                       MixtureSource(f"{a} (source 2)", replay_ratio=0.25)]


@pytest.mark.parametrize("extension", [".yaml", ".json"])
def test_a_config_file_lists_the_sources_and_names_the_data(extension, tmp_path):
    from trainer.mlm import MLM_JOB

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    for path in (a, b):
        path.write_text("a film .\n")
    sources = [f"{a}:0.7", f"{b}:0.3"]
    config_file = tmp_path / f"config{extension}"
    config_file.write_text(json.dumps({"train_files": sources}) if extension == ".json"
                           else "train_files:\n" + "".join(f"  - {source}\n" for source in sources))
    config = parse_job_config(MLM_JOB.all_sections, [str(config_file)], default_config=MLM_JOB.demo_config)
    assert config.data.train_files == sources
    # Named data: the demo config (its output directory, its model) is not applied.
    assert parse_job_config(MLM_JOB.all_sections, ["--train_files", *sources],
                            default_config=MLM_JOB.demo_config).checkpointing.output_dir == "output"


# ------------------------------------------------------------------------------------------------ the data source
def training_batches(world_size, rank, batch, accumulation, dataset) -> TrainingBatches:
    names = [MixtureSource(name, weight) for name, weight in zip("abc", WEIGHTS)]
    return TrainingBatches(dataset, ["input_ids"], lambda rows: rows["sample_id"].tolist(),
                           sampler(world_size, rank, batch, accumulation), workers=0, pin_memory=False,
                           sources=names, token_counts=token_counts(dataset))


def run_steps(batches: list[TrainingBatches], accumulation: int, steps: int) -> list[list[int]]:
    """`steps` optimizer steps of every rank's data source (advanced after each), merged as in `global_steps`."""
    streams = [data.micro_batches() for data in batches]
    done = []
    for _ in range(steps):
        done.append([s for _ in range(accumulation) for stream in streams for s in next(stream)])
        for data in batches:
            data.advance()
    return done


def test_the_data_source_resumes_its_position_and_figures_at_another_world_size():
    lengths = [(i * 7) % 11 + 1 for i in range(sum(SIZES))]
    dataset = datasets.Dataset.from_dict({"input_ids": [[5] * n for n in lengths]})
    uninterrupted = training_batches(1, 0, 16, 1, dataset)
    steps = run_steps([uninterrupted], 1, 12)
    stopped = training_batches(1, 0, 8, 2, dataset)
    assert run_steps([stopped], 2, 7) == steps[:7]  # 1 epoch and 2 steps
    saved = json.loads(json.dumps(stopped.state_dict()))  # as trainer_state.json keeps it
    assert saved["epoch"] == 1 and saved["samples_in_epoch"] == 18 and saved["samples_per_source"] == [63, 35, 14]
    resumed = [training_batches(2, rank, 4, 2, dataset) for rank in range(2)]
    for data in resumed:
        data.load_state_dict(saved)
    assert run_steps(resumed, 2, 5) == steps[7:]
    # Samples and unpadded tokens of each source, counted from the steps themselves.
    expected = {name: [sample for step in steps for sample in step if source_of(sample) == index]
                for index, name in enumerate("abc")}
    for data in (uninterrupted, *resumed):
        assert data.consumed() == {
            "train_samples_per_source": {name: len(ids) for name, ids in expected.items()},
            "train_tokens_per_source": {name: sum(lengths[i] for i in ids) for name, ids in expected.items()}}


# -------------------------------------------------------------------------------------------------------- the jobs
@pytest.fixture
def two_sources(corpus, tmp_path) -> list[str]:
    """--train_files of the test corpus (primary, weight 3) and a directory of two files (weight 1): 6 + 2 of a
    global batch of 8."""
    lines = open(corpus["validation"]).readlines()
    directory = tmp_path / "second"
    directory.mkdir()
    (directory / "a.txt").write_text("".join(lines[:60]))
    (directory / "b.txt").write_text("".join(lines[60:]))
    return [f"{corpus['train']}:3", f"{directory}/:1"]


def test_two_processes_train_a_mixture_as_one_and_report_each_sources_figures(
        corpus, tokenizer_dir, two_sources, job_env, in_process_job, tmp_path):
    """A global batch of 8, 1 process x 8 against 2 x 2 x accumulation 2: the same samples in every step, the same
    parameters, and the per-source figures that the steps hold: 6 and 2 samples of 32 tokens each."""
    from trainer.mlm import main

    def args(out, nproc, per_device):
        argv = mlm_args(corpus, tokenizer_dir, out, "--max_steps", "4", "--seed", "5",
                        "--per_device_train_batch_size", str(per_device), "--gradient_accumulation_steps",
                        str(8 // (nproc * per_device)), "--max_eval_samples", "8", "--peak_tflops", "1",
                        "--train_files", *two_sources)
        return argv[2:]  # without --train_file

    one, two = tmp_path / "one", tmp_path / "two"
    in_process_job(main, args(one, 1, 8), TRAINER_DEBUG_SAMPLE_LOG=tmp_path / "one-samples")
    run_job("trainer.mlm", args(two, 2, 2), with_env(job_env, TRAINER_DEBUG_SAMPLE_LOG=tmp_path / "two-samples"),
            nproc=2)
    steps = samples_per_step(tmp_path / "one-samples")
    assert samples_per_step(tmp_path / "two-samples") == steps and len(steps) == 4
    assert relative_difference(load_parameters(one), load_parameters(two)) < 1e-5
    names = [source.rsplit(":", 1)[0] for source in two_sources]
    for run in (one, two):
        assert read_results(run)["train_samples_per_source"] == {names[0]: 24, names[1]: 8}
        assert read_results(run)["train_tokens_per_source"] == {names[0]: 24 * 32, names[1]: 8 * 32}


@pytest.mark.parametrize("job", ["trainer.clm", "trainer.classify"])
def test_every_job_prepares_each_source_as_its_training_data(job, corpus, bpe_tokenizer_dir, tokenizer_dir,  # noqa: F811
                                                             sentiment, two_sources, in_process_job, tmp_path):  # noqa: F811
    """clm cuts every source into its blocks of 32 tokens; classify tokenizes and labels every source as its
    training data (labels among the primary's classes), one sequence per row, the tokens counted unpadded."""
    import importlib

    from transformers import AutoTokenizer

    out, sample_log = tmp_path / "out", tmp_path / "samples"
    if job == "trainer.clm":
        sources = two_sources
        argv = clm_args(corpus, bpe_tokenizer_dir, out, "--per_device_train_batch_size", "8")[2:]
    else:
        rows = open(sentiment["validation"]).readlines()[:30]
        (tmp_path / "old.jsonl").write_text("".join(rows))
        sources = [f"{sentiment['train']}:3", f"{tmp_path / 'old.jsonl'}:1"]
        argv = classify_args(sentiment, out, "--tokenizer_name", tokenizer_dir, *TINY_BERT)[2:]
    in_process_job(importlib.import_module(job).main, [*argv, "--max_steps", "2", "--max_eval_samples", "8",
                                                   "--peak_tflops", "1", "--train_files", *sources],
               TRAINER_DEBUG_SAMPLE_LOG=sample_log)
    results = read_results(out)
    names = [source.rsplit(":", 1)[0] for source in sources]
    assert results["train_samples_per_source"] == {names[0]: 12, names[1]: 4}
    if job == "trainer.clm":
        assert results["train_tokens_per_source"] == {names[0]: 12 * 32, names[1]: 4 * 32}
        return
    sentences = [json.loads(row)["sentence"] for path in (sentiment["train"], tmp_path / "old.jsonl")
                 for row in open(path)]
    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(tokenizer_dir)(sentences, truncation=True,
                                                                                max_length=64)["input_ids"]]
    trained = [i for ids in samples_per_step(sample_log).values() for i in ids]
    assert sum(i >= 400 for i in trained) == 4  # 400 primary rows, then the second source's
    assert results["train_tokens_per_source"] == {names[0]: sum(lengths[i] for i in trained if i < 400),
                                                  names[1]: sum(lengths[i] for i in trained if i >= 400)}
