import os

from transformers import pipeline

from conftest import load_parameters, mlm_args, read_history, read_results, run_job


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
    assert os.path.isfile(out / "model.safetensors") and os.path.isfile(out / "tokenizer.json")
    fill = pipeline("fill-mask", model=str(out))
    assert len(fill("the acting was [MASK] .")) == 5
    assert set(load_parameters(out)) >= {"bert.embeddings.word_embeddings.weight"}
