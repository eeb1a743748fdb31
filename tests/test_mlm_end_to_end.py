import os
import re

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from transformers import pipeline

from conftest import load_parameters, mlm_args, read_history, read_results, run_job, write_yaml_config


def test_single_process_run_trains_saves_and_loads_with_pipeline(corpus, tokenizer_dir, job_env, tmp_path):
    out = tmp_path / "run"
    result = run_job("trainer.mlm", mlm_args(corpus, tokenizer_dir, out, "--max_steps", "30",
                                             "--per_device_train_batch_size", "16", "--eval_steps", "15",
                                             "--report_to", "tensorboard"), job_env)
    results = read_results(out)
    assert results["eval_perplexity"] < results["init_eval_perplexity"] / 2
    assert results["train_steps"] == 30
    history = read_history(out)
    assert [r["step"] for r in history if "train_loss" in r] == list(range(1, 31))
    assert sum("eval_perplexity" in r for r in history) == 2  # step 15 and the end
    train_records = [r for r in history if "train_loss" in r]
    # train_loss in the results is the run's mean per masked token: every window's loss weighted by its count.
    masked = sum(r["train_loss_items"] for r in train_records)
    assert results["train_loss"] == pytest.approx(
        sum(r["train_loss"] * r["train_loss_items"] for r in train_records) / masked, rel=1e-12)
    assert results["train_loss"] != pytest.approx(train_records[-1]["train_loss"], rel=1e-6)
    # The evaluation before training starts the same TensorBoard curve as the later ones, at step 0.
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/perplexity")] == [0, 15, 30]
    assert events.Scalars("eval/perplexity")[0].value == pytest.approx(results["init_eval_perplexity"], rel=1e-6)
    # Redirected output: no progress-bar carriage returns or cursor escapes; every log line on its own line.
    assert "\r" not in result.stdout + result.stderr and "\x1b[" not in result.stdout + result.stderr
    assert all(re.match(r"\d\d:\d\d:\d\d (INFO|WARNING) ", line) for line in result.stdout.splitlines())
    # The closing summary (jobs.finish_job): the model's place, final metrics, a line of Python, the curves.
    summary = result.stdout[result.stdout.index("INFO done: perplexity"):]
    assert f"model:   {out} " in summary and f"eval_perplexity={results['eval_perplexity']:.4g}" in summary
    assert f"curves:  tensorboard --logdir {out / 'runs'}" in summary
    load_line = summary.split("load it: ")[1].splitlines()[0]
    namespace = {}
    exec(load_line, namespace)
    assert namespace["pipe"].task == "fill-mask"
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
    result = run_job("trainer.mlm", [write_yaml_config(args, tmp_path / "run.yaml", drop=("probe_sentences",))],
                     job_env)
    results = read_results(out)
    assert results["train_steps"] == 4 and results["eval_perplexity"] > 0
    # The fill-mask probes unwrap the model, which would import DeepSpeed and its CPU warning: neither comes.
    assert "probe the acting was [MASK] ." in result.stdout
    assert "Setting accelerator to CPU" not in result.stdout + result.stderr
