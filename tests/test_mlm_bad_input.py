"""Bad input: one line naming the problem and the fix, exit code 2, no traceback, nothing written."""
import os
import time

import pytest

from conftest import TINY_BERT, mlm_args, run_job
from conftest import fails_cleanly as shared_fails_cleanly
from trainer.mlm import main


def fails_cleanly(argv, capsys) -> str:
    return shared_fails_cleanly(main, argv, capsys)


@pytest.fixture
def job(corpus, tokenizer_dir, tmp_path, monkeypatch, job_env):
    for key in ("TRAINER_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, job_env[key])
    out = tmp_path / "out"

    def argv(**overrides):
        args = mlm_args(corpus, tokenizer_dir, out, "--max_steps", "2")
        for flag, value in overrides.items():
            index = args.index(f"--{flag}") if f"--{flag}" in args else None
            if index is None:
                args += [f"--{flag}", value]
            else:
                args[index + 1] = value
        return args

    yield argv
    assert not out.exists(), "a failed run must not write its output directory"


def write(tmp_path, name, content, mode="w"):
    path = tmp_path / name
    with open(path, mode) as handle:
        handle.write(content)
    return str(path)


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such file"),
    ("empty", "is empty"),
    ("directory", "is a directory"),
    ("extension", "unsupported extension '.docx'"),
    ("malformed_json", "could not be read as json"),
    ("not_utf8", "could not be read as text"),
])
def test_bad_training_file(case, expected, job, tmp_path, capsys):
    path = {"missing": str(tmp_path / "nope.txt"), "empty": write(tmp_path, "e.txt", ""),
            "directory": str(tmp_path), "extension": write(tmp_path, "c.docx", "text"),
            "malformed_json": write(tmp_path, "m.json", '{"text": "a"\n{broken'),
            "not_utf8": write(tmp_path, "latin.txt", "caf\xe9 cr\xe8me\n".encode("latin-1"), "wb")}[case]
    assert expected in fails_cleanly(job(train_file=path), capsys)


def test_missing_text_column(job, tmp_path, capsys):
    path = write(tmp_path, "d.csv", "review,score\ngood film,1\nbad film,0\n")
    message = fails_cleanly(job(train_file=path, text_column="body"), capsys)
    assert "--text_column 'body'" in message and "review, score" in message


def test_corpus_too_short_for_one_block(job, tmp_path, capsys):
    path = write(tmp_path, "tiny.txt", "a short film .\n")
    assert "too short for one block of 32" in fails_cleanly(job(train_file=path, validation_file=path), capsys)


@pytest.mark.parametrize("flag, value, expected", [
    ("max_seq_length", "256", "exceeds the model's 128 positions"),
    ("mlm_probability", "1.5", "--mlm_probability must be in (0, 1)"),
    ("mlm_probability", "0", "--mlm_probability must be in (0, 1)"),
    ("per_device_train_batch_size", "0", "--per_device_train_batch_size must be positive"),
    ("per_device_eval_batch_size", "-1", "--per_device_eval_batch_size must be positive"),
    ("max_steps", "0", "--max_steps must be positive"),
    ("gradient_accumulation_steps", "0", "--gradient_accumulation_steps must be positive"),
])
def test_bad_values(flag, value, expected, job, capsys):
    assert expected in fails_cleanly(job(**{flag: value}), capsys)


def test_unknown_model_type(job, capsys):
    argv = [a if a != "bert" else "no-such-architecture" for a in job()]
    assert "--model_type no-such-architecture" in fails_cleanly(argv, capsys)


def test_non_empty_output_dir_is_refused_and_left_untouched(corpus, tokenizer_dir, job_env, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_job("trainer.mlm", mlm_args(corpus, tokenizer_dir, out, "--max_steps", "2"), job_env, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --output_dir {out} is not empty and holds no checkpoint to resume from; pass "
        f"--overwrite_output_dir or choose another directory"]
    assert "Traceback" not in result.stdout + result.stderr
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("offline_env", [{"HF_HUB_OFFLINE": "1"},
                                         {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_unreachable_hub_model_fails_fast(offline_env, corpus, job_env, tmp_path):
    out = tmp_path / "hub"
    env = {**job_env, **offline_env}
    started = time.monotonic()
    result = run_job("trainer.mlm", ["--model_name_or_path", "someone/some-bert", "--train_file", corpus["train"],
                                     "--output_dir", str(out)], env, check=False)
    assert time.monotonic() - started < 30  # import time included; the Hub retries alone take ~50 s
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "someone/some-bert" in lines[0] and "Hugging Face Hub cannot be reached" in lines[0]
    assert "Traceback" not in result.stdout + result.stderr and not out.exists()
