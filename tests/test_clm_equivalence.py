"""trainer.clm: world size, batch split and accumulation do not change the mathematics (fp32, no dropout), and
perplexity is one number at any world size and evaluation batch size. Documents packed, so the token counts
include document starts."""
import pytest
import torch

from clm_helpers import bpe_tokenizer_dir, clm_args, corpus  # noqa: F401 (fixtures)
from conftest import load_parameters, read_history, read_results, relative_difference, run_job

STEPS = ["--max_steps", "4", "--warmup_steps", "1", "--weight_decay", "0.01", "--seed", "7", "--packing",
         "documents", "--max_eval_samples", "37"]


@pytest.fixture(scope="module")
def two_runs(corpus, bpe_tokenizer_dir, job_env, tmp_path_factory):  # noqa: F811
    """The same global batch of 16 blocks per step: 1 process x 16, and 2 processes x 4 x accumulation 2; the
    evaluation batch sizes (16, 5) leave remainders."""
    root = tmp_path_factory.mktemp("clm-equivalence")
    layouts = {"1x16x1": (1, ["--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16"]),
               "2x4x2": (2, ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                             "--per_device_eval_batch_size", "5"])}
    runs = {}
    for name, (nproc, layout) in layouts.items():
        runs[name] = root / name
        run_job("trainer.clm", clm_args(corpus, bpe_tokenizer_dir, runs[name], *STEPS, *layout), job_env, nproc=nproc)
    return runs


@pytest.mark.slow
def test_parameters_and_logged_losses_match_across_world_size_and_accumulation(two_runs):
    reference, other = (load_parameters(two_runs[name]) for name in ("1x16x1", "2x4x2"))
    assert relative_difference(reference, other) <= 1e-5
    losses = {name: torch.tensor([r["train_loss"] for r in read_history(out) if "train_loss" in r])
              for name, out in two_runs.items()}
    assert len(losses["1x16x1"]) == 4 and losses["1x16x1"][-1] < losses["1x16x1"][0]  # it did train
    torch.testing.assert_close(losses["2x4x2"], losses["1x16x1"], rtol=1e-5, atol=0)


@pytest.mark.slow
def test_perplexity_identical_across_world_size_and_eval_batch_size(two_runs):
    one, two = (read_results(two_runs[name]) for name in ("1x16x1", "2x4x2"))
    assert one["init_eval_predicted_tokens"] == two["init_eval_predicted_tokens"] < 37 * 31  # document starts
    assert two["init_eval_perplexity"] == pytest.approx(one["init_eval_perplexity"], rel=1e-6)
    assert two["eval_perplexity"] == pytest.approx(one["eval_perplexity"], rel=1e-5)
