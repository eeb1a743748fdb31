"""trainer.prepare: the prepared directory trains a job exactly as the text does, and N processes prepare what one
does (the bad-input cases are in test_fuzz_inputs.py)."""
from __future__ import annotations

import os

import datasets
import pytest

from classify_helpers import classify_args
from clm_helpers import bpe_tokenizer_dir, clm_args  # noqa: F401 (fixture)
from conftest import (TINY_BERT, accelerate_launch, load_parameters, mlm_args, read_results, relative_difference,
                      run_job)
from prepare_helpers import (JOB_ENVIRONMENT, corpus, prepare_args, prepared_classify, prepared_mlm,  # noqa: F401
                             sentiment, tokenizer_dir)
from trainer.data.prepared import SPLITS, PreparedData

STEPS = ("--max_steps", "2", "--per_device_train_batch_size", "8", "--max_eval_samples", "16", "--peak_tflops", "1")


@pytest.fixture
def env(job_env, monkeypatch):
    for key in JOB_ENVIRONMENT:
        monkeypatch.setenv(key, job_env[key])


def from_prepared(argv: list[str], directory: str, *dropped: str) -> list[str]:
    """`argv` training from the prepared `directory` instead of the text files, without the `dropped` flags."""
    argv = list(argv)
    argv[argv.index("--train_file") + 1] = directory
    for flag in ("--validation_file", *dropped):
        del argv[argv.index(flag):argv.index(flag) + 2]
    return argv


def directory_files(directory: str) -> set[str]:
    return {os.path.join(root, name) for root, _, names in os.walk(directory) for name in names}


def assert_same_training(raw_dir, prepared_dir) -> None:
    assert relative_difference(load_parameters(raw_dir), load_parameters(prepared_dir)) < 1e-5
    assert read_results(prepared_dir)["eval_perplexity"] == pytest.approx(read_results(raw_dir)["eval_perplexity"],
                                                                           rel=1e-5)


def test_mlm_trains_from_the_prepared_directory_as_from_the_text(prepared_mlm, corpus, tokenizer_dir, tmp_path,
                                                                  env):  # noqa: F811
    from trainer.mlm import main

    replay = ("--replay_file", corpus["validation"], "--replay_ratio", "0.25")  # text beside the prepared data
    main(mlm_args(corpus, tokenizer_dir, tmp_path / "raw", *STEPS, *replay))
    files = directory_files(prepared_mlm)
    main(from_prepared(mlm_args(corpus, tokenizer_dir, tmp_path / "prepared", *STEPS, *replay), prepared_mlm))
    assert_same_training(tmp_path / "raw", tmp_path / "prepared")
    assert directory_files(prepared_mlm) == files  # the job's input: nothing written into it (e.g. cached masks)
    train = PreparedData.open(prepared_mlm).split("train")
    assert train.cache_files and all(f["filename"].startswith(prepared_mlm) for f in train.cache_files)  # mmapped


def test_clm_trains_from_the_prepared_directory_with_its_tokenizer_and_block_size(corpus, bpe_tokenizer_dir,
                                                                                    tmp_path, env):  # noqa: F811
    """No --tokenizer_name and no --block_size: the directory's own."""
    from trainer.clm import main
    from trainer.prepare import main as prepare

    prepare(prepare_args(corpus, bpe_tokenizer_dir, tmp_path / "data", "clm"))
    main(clm_args(corpus, bpe_tokenizer_dir, tmp_path / "raw", *STEPS))
    main(from_prepared(clm_args(corpus, bpe_tokenizer_dir, tmp_path / "prepared", *STEPS), str(tmp_path / "data"),
                       "--tokenizer_name", "--block_size"))
    assert_same_training(tmp_path / "raw", tmp_path / "prepared")


def test_classify_trains_from_the_prepared_directory_to_the_same_parameters(prepared_classify, sentiment,
                                                                            tokenizer_dir, tmp_path,
                                                                            env):  # noqa: F811
    """One row per example, the labels from the manifest, the directory's tokenizer (none named): bit-identical
    parameters and the same metrics as from the text."""
    import torch

    from trainer.classify import main

    steps = ("--max_steps", "2", "--max_eval_samples", "16", "--metrics", "accuracy", "--peak_tflops", "1",
             *TINY_BERT)
    main(classify_args(sentiment, tmp_path / "raw", "--tokenizer_name", tokenizer_dir, *steps))
    main(from_prepared(classify_args(sentiment, tmp_path / "prepared", *steps), prepared_classify))
    raw, prepared = load_parameters(tmp_path / "raw"), load_parameters(tmp_path / "prepared")
    assert raw.keys() == prepared.keys() and all(torch.equal(raw[name], prepared[name]) for name in raw)
    timings = ("train_runtime", "train_tokens_per_second")
    metrics = [{key: list(value.values()) if key.endswith("_per_source") else value  # keyed by the source's name
                for key, value in read_results(directory).items() if key not in timings}
               for directory in (tmp_path / "raw", tmp_path / "prepared")]
    assert metrics[0] == metrics[1] and "eval_accuracy" in metrics[0]
    manifest = PreparedData.open(prepared_classify).manifest
    assert manifest["labels"] == ["negative", "positive"] and manifest["splits"]["train"]["sequences"] == 400
    assert PreparedData.open(prepared_classify).split("train").column_names == ["input_ids", "length", "labels"]


@pytest.mark.slow
def test_two_processes_prepare_exactly_what_one_does(prepared_mlm, corpus, tokenizer_dir, job_env,
                                                     tmp_path):  # noqa: F811
    """Each process tokenizes half the lines and cuts its run of whole 1000-row batches: the same blocks, in two
    shards (the corpus has about 1500 token rows, so the second process's run starts at row 1000). Launched by
    `accelerate launch` (which starts its processes through torchrun's launcher)."""
    run_job("trainer.prepare", prepare_args(corpus, tokenizer_dir, tmp_path / "two"), job_env, nproc=2,
            launcher=accelerate_launch("cpu_ddp.yaml"))
    one, two = PreparedData.open(prepared_mlm), PreparedData.open(str(tmp_path / "two"))
    assert len(one.shards("train")) == 1 and len(two.shards("train")) == 2
    for split in SPLITS:
        assert one.split(split).to_dict() == two.split(split).to_dict()
    same = ("tokenizer_sha256", "sequence_length", "token_options", "text_column", "source")
    assert {key: one.manifest[key] for key in same} == {key: two.manifest[key] for key in same}
    assert two.manifest["processes"] == 2


def test_classify_processes_write_the_rows_of_one_with_the_whole_splits_labels(sentiment, tokenizer_dir, tmp_path,
                                                                               env):  # noqa: F811
    """What each process of `torchrun --nproc_per_node 2 -m trainer.prepare --job classify` writes, both played here
    (classify's rows need no collective: write_shards saves each process's part as it is). The training rows are
    sorted by label, so the second process holds one class: its class id is still that of the whole split."""
    from trainer.config.job_config import parse_job_config
    from trainer.data.arguments import DataFiles
    from trainer.prepare import JOBS, prepare_sections, write_shards

    config = parse_job_config(prepare_sections("classify"),
                              prepare_args(sentiment, tokenizer_dir, tmp_path / "out", "classify"))
    tokenization = JOBS["classify"].tokenization
    raw, inputs = tokenization.read_text(config, DataFiles(sentiment["train"], sentiment["validation"]))
    raw["train"] = raw["train"].sort("label")
    tokenizer = tokenization.text_tokenizer(config, raw, inputs)
    shards = [write_shards(config, tokenization, raw, inputs, tokenizer, 64, str(tmp_path), rank, 2) for rank in (0, 1)]
    whole = tokenization.tokenize(config, raw, inputs, tokenizer)
    for split in SPLITS:
        parts = [datasets.load_from_disk(str(tmp_path / written[split]["path"])) for written in shards]
        assert datasets.concatenate_datasets(parts).to_dict() == whole[split].to_dict()
        if split == "train":
            assert set(parts[1]["labels"]) == {1}  # "positive", of ["negative", "positive"]


@pytest.mark.parametrize("world", [2, 3, 5])
def test_blocks_cut_in_processes_parts_are_the_blocks_cut_whole(world):
    from types import SimpleNamespace

    from trainer.data.loading import group_into_blocks
    from trainer.prepare import block_rows

    rows = datasets.Dataset.from_dict({"input_ids": [[i] * (1 + i % 7) for i in range(2345)]})
    options = SimpleNamespace(overwrite_cache=True)

    def blocks(dataset):
        return group_into_blocks(datasets.DatasetDict({"train": dataset}), 16, options)["train"]["input_ids"]

    parts = [block_rows(len(rows), rank, world) for rank in range(world)]
    assert parts[0][0] == 0 and parts[-1][1] == len(rows)
    assert all(end == start for (_, end), (start, _) in zip(parts, parts[1:]))
    assert [block for start, end in parts for block in blocks(rows.select(range(start, end)))] == blocks(rows)
