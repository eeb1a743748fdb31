import os

import pytest

from transformers import pipeline

from conftest import load_parameters, mlm_args, read_history, read_results, run_job, write_yaml_config


def test_single_process_run_trains_saves_and_loads_with_pipeline(corpus, tokenizer_dir, job_env, tmp_path):
    out = tmp_path / "run"
    run_job("trainer.mlm", mlm_args(corpus, tokenizer_dir, out, "--max_steps", "30", "--per_device_train_batch_size",
                                    "16", "--eval_steps", "15"), job_env)
    results = read_results(out)
    assert results["eval_perplexity"] < results["init_eval_perplexity"] / 2
    assert results["train_steps"] == 30
    history = read_history(out)
    assert [r["step"] for r in history if "train_loss" in r] == list(range(1, 31))
    assert sum("eval_perplexity" in r for r in history) == 2  # step 15 and the end
    train_records = [r for r in history if "train_loss" in r]
    for record in train_records:
        assert 0 < record["train_mfu"] < 1 and record["train_samples_per_second"] > 0
        assert 0 <= record["train_data_wait_fraction"] < 1
        # batch 16 x 32 tokens per step: tokens/s and samples/s agree on the sequence length
        assert record["train_tokens_per_second"] / record["train_samples_per_second"] == pytest.approx(32)
    assert os.path.isfile(out / "model.safetensors") and os.path.isfile(out / "tokenizer.json")
    fill = pipeline("fill-mask", model=str(out))
    assert len(fill("the acting was [MASK] .")) == 5
    assert set(load_parameters(out)) >= {"bert.embeddings.word_embeddings.weight"}


def test_help_explains_every_run_mlm_flag(job_env):
    result = run_job("trainer.mlm", ["--help"], job_env)
    for flag in ("--model_name_or_path", "--config_overrides", "--train_file", "--line_by_line",
                 "--whole_word_masking", "--mlm_probability", "--gradient_accumulation_steps", "--warmup_ratio",
                 "--lr_scheduler_type", "--bf16", "--eval_steps", "--report_to", "--max_seq_length"):
        assert flag in result.stdout
    assert "Fraction of tokens (or words) masked" in result.stdout


def test_yaml_config_as_only_argument_with_line_by_line_and_whole_word_masking(corpus, tokenizer_dir, job_env,
                                                                               tmp_path):
    out = tmp_path / "from-yaml"
    args = mlm_args(corpus, tokenizer_dir, out, "--max_steps", "4", "--line_by_line", "--whole_word_masking")
    run_job("trainer.mlm", [write_yaml_config(args, tmp_path / "run.yaml", drop=("probe_sentences",))], job_env)
    results = read_results(out)
    assert results["train_steps"] == 4 and results["eval_perplexity"] > 0
