"""`accelerate launch` with the shipped CPU YAMLs (and torchrun with --deepspeed) runs the jobs unchanged; bf16 (CPU
autocast under DDP, DeepSpeed's bf16 under ZeRO-2 and ZeRO-3, FSDP2's mixed-precision policy) trains and exports
a model that loads. trainer.mlm under DDP, FSDP2 and ZeRO-3; trainer.clm under ZeRO-2 (DeepSpeed's bf16 engine is
the same for both jobs; clm's fp32 ZeRO-3 and FSDP2 runs are in test_clm_launch.py)."""
import os

import pytest
import torch

from clm_helpers import bpe_tokenizer_dir, clm_args  # noqa: F401 (a fixture)
from conftest import REPO_ROOT, accelerate_launch, mlm_args, read_history, read_results, run_job

STEPS = ["--max_steps", "4", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
         "--bf16"]


@pytest.mark.slow
@pytest.mark.parametrize("job, yaml, extra, parallelism, saved_dtype", [
    ("mlm", "cpu_ddp.yaml", [], "DDP", torch.float32),  # autocast keeps fp32 weights
    ("clm", "cpu_deepspeed_zero2.yaml", [], "DeepSpeed ZeRO-2", torch.bfloat16),
    ("mlm", "cpu_fsdp2.yaml", [], "FSDP2", torch.float32),  # bf16 compute copies of fp32 shards
    ("mlm", None, ["--deepspeed", os.path.join(REPO_ROOT, "ds_configs", "zero3.json")], "DeepSpeed ZeRO-3",
     torch.bfloat16),  # torchrun
])
def test_bf16_trains_and_exports_under_every_backend(corpus, tokenizer_dir, bpe_tokenizer_dir, job_env, tmp_path, job,
                                                     yaml, extra, parallelism, saved_dtype):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    out = tmp_path / "run"
    args = (mlm_args(corpus, tokenizer_dir, out, *STEPS, *extra) if job == "mlm" else
            clm_args(corpus, bpe_tokenizer_dir, out, *STEPS, *extra))
    result = run_job(f"trainer.{job}", args, job_env, nproc=2, launcher=accelerate_launch(yaml) if yaml else None)
    # Really 2 ranks, sharing the model the way the YAML says.
    assert f"with {parallelism} (gloo): 16 sequences/step (4 per device x 2 processes x 2 accumulation)" in (
        result.stderr + result.stdout)
    losses = [r["train_loss"] for r in read_history(out) if "train_loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    results = read_results(out)
    assert results["eval_perplexity"] < results["init_eval_perplexity"]
    model = (AutoModelForMaskedLM if job == "mlm" else AutoModelForCausalLM).from_pretrained(str(out))
    assert model.get_input_embeddings().weight.dtype == saved_dtype
