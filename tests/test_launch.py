"""`accelerate launch` with the shipped CPU YAMLs runs the job unchanged; bf16 (CPU autocast under DDP,
DeepSpeed's bf16 under ZeRO-2) trains and exports a model that loads."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, free_port, mlm_args, read_history, read_results

STEPS = ["--max_steps", "4", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
         "--bf16"]


@pytest.mark.slow
@pytest.mark.parametrize("yaml, saved_dtype", [("cpu_ddp.yaml", torch.float32),  # autocast keeps fp32 weights
                                                ("cpu_deepspeed_zero2.yaml", torch.bfloat16)])
def test_accelerate_launch_bf16_trains_and_exports(corpus, tokenizer_dir, job_env, tmp_path, yaml, saved_dtype):
    from transformers import AutoModelForMaskedLM

    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(REPO_ROOT, "launch", "accelerate", yaml), "--main_process_port", str(free_port()),
               "-m", "trainer.mlm", *mlm_args(corpus, tokenizer_dir, out, *STEPS)]
    result = subprocess.run(command, env=job_env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "(4 per device x 2 processes x 2 accumulation)" in result.stderr + result.stdout  # really 2 ranks
    losses = [r["train_loss"] for r in read_history(out) if "train_loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    results = read_results(out)
    assert results["eval_perplexity"] < results["init_eval_perplexity"]
    model = AutoModelForMaskedLM.from_pretrained(str(out))
    assert model.bert.embeddings.word_embeddings.weight.dtype == saved_dtype
