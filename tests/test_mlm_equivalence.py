"""World size, batch split and accumulation must not change the mathematics (fp32, no dropout), nor does
--gradient_checkpointing under DDP: the 2-process run recomputes its blocks, the 1-process runs do not."""
import pytest
import torch

from conftest import load_parameters, mlm_args, read_history, read_results, run_job

STEPS = ["--max_steps", "6", "--warmup_steps", "2", "--weight_decay", "0.01", "--seed", "7"]


def relative_difference(a: dict, b: dict) -> float:
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a) ** 0.5
    den = sum(float(a[k].double().norm() ** 2) for k in a) ** 0.5
    return num / den


@pytest.fixture(scope="module")
def three_runs(corpus, tokenizer_dir, job_env, tmp_path_factory):
    """Same global batch of 16 per step, split three ways; eval batch sizes that leave remainders. The 2-process
    (DDP) run checkpoints every block."""
    root = tmp_path_factory.mktemp("equivalence")
    layouts = {
        "1x8x2": (1, ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
                      "--per_device_eval_batch_size", "7"]),
        "1x16x1": (1, ["--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1",
                       "--per_device_eval_batch_size", "16"]),
        "2x4x2": (2, ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                      "--per_device_eval_batch_size", "5", "--gradient_checkpointing"]),
    }
    runs = {}
    for name, (nproc, layout) in layouts.items():
        out = root / name
        result = run_job("trainer.mlm", mlm_args(corpus, tokenizer_dir, out, *STEPS, *layout), job_env, nproc=nproc)
        assert ("gradient checkpointing (" in result.stdout + result.stderr) == (nproc == 2)
        runs[name] = out
    return runs


@pytest.mark.slow
def test_parameters_match_across_world_size_batch_split_and_accumulation(three_runs):
    reference = load_parameters(three_runs["1x16x1"])
    for name in ("1x8x2", "2x4x2"):
        difference = relative_difference(reference, load_parameters(three_runs[name]))
        assert difference <= 1e-5, f"{name} differs from 1x16x1 by {difference:.2e}"
    # And training did move the parameters: the comparison is not vacuous.
    losses = [r["train_loss"] for r in read_history(three_runs["1x16x1"]) if "train_loss" in r]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_logged_losses_match_across_layouts(three_runs):
    per_run = {name: [r["train_loss"] for r in read_history(out) if "train_loss" in r]
               for name, out in three_runs.items()}
    reference = torch.tensor(per_run["1x16x1"])
    for name, losses in per_run.items():
        assert torch.allclose(torch.tensor(losses), reference, rtol=1e-5), name


@pytest.mark.slow
def test_eval_perplexity_identical_across_world_size_and_eval_batch_size(three_runs):
    results = {name: read_results(out) for name, out in three_runs.items()}
    reference = results["1x16x1"]
    for name, result in results.items():
        assert result["init_eval_masked_tokens"] == reference["init_eval_masked_tokens"]
        assert result["init_eval_perplexity"] == pytest.approx(reference["init_eval_perplexity"], rel=1e-6), name
        assert result["eval_perplexity"] == pytest.approx(reference["eval_perplexity"], rel=1e-5), name
