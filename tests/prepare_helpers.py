"""Fixtures for the trainer.prepare tests: the test corpus prepared once per session for mlm (blocks of 32), and the
sentiment data for classify (rows of up to 64 tokens).

Imported by test_prepare.py and test_fuzz_inputs.py (pytest picks up fixtures imported into a test module).
"""
from __future__ import annotations

import pytest

from classify_helpers import sentiment  # noqa: F401 (fixture)
from conftest import corpus, tokenizer_dir  # noqa: F401 (fixtures)

JOB_ENVIRONMENT = ("TRAINER_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")


def prepare_args(corpus, tokenizer_dir, output_dir, job: str = "mlm", *extra) -> list[str]:  # noqa: F811
    """trainer.prepare's command line for the test corpus, with the flags the tests' jobs use."""
    length = {"mlm": ["--max_seq_length", "32"], "clm": ["--block_size", "32"],
              "classify": ["--max_seq_length", "64"]}[job]  # classify: classify_args's
    return ["--job", job, "--train_file", corpus["train"], "--validation_file", corpus["validation"],
            "--tokenizer_name", tokenizer_dir, *length, "--output_dir", str(output_dir), *extra]


def prepared_in_process(data, tokenizer_dir, job_env, tmp_path_factory, job: str) -> str:  # noqa: F811
    """`data` (train and validation files) prepared for trainer.`job` in this process: its directory."""
    from trainer.prepare import main

    output_dir = tmp_path_factory.mktemp("prepared") / job
    with pytest.MonkeyPatch.context() as patch:
        for key in JOB_ENVIRONMENT:
            patch.setenv(key, job_env[key])
        main(prepare_args(data, tokenizer_dir, output_dir, job))
    return str(output_dir)


@pytest.fixture(scope="session")
def prepared_mlm(corpus, tokenizer_dir, job_env, tmp_path_factory) -> str:  # noqa: F811
    """The test corpus prepared for trainer.mlm in this process: its directory."""
    return prepared_in_process(corpus, tokenizer_dir, job_env, tmp_path_factory, "mlm")


@pytest.fixture(scope="session")
def prepared_classify(sentiment, tokenizer_dir, job_env, tmp_path_factory) -> str:  # noqa: F811
    """The sentiment data prepared for trainer.classify in this process: its directory."""
    return prepared_in_process(sentiment, tokenizer_dir, job_env, tmp_path_factory, "classify")


__all__ = ["JOB_ENVIRONMENT", "corpus", "prepare_args", "prepared_classify", "prepared_mlm", "sentiment",
           "tokenizer_dir"]
