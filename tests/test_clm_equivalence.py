"""trainer.clm: world size, batch split and accumulation do not change the mathematics (fp32, no dropout), and
perplexity is one number at any world size and evaluation batch size. Documents packed, so the token counts
include document starts. With experience replay (trainer.continual.replay): a quarter of every global batch is replayed,
the same samples at both layouts."""
import pytest
import torch

from clm_helpers import bpe_tokenizer_dir, clm_args, corpus  # noqa: F401 (fixtures)
from conftest import load_parameters, read_history, read_results, relative_difference, run_job
from resume_helpers import samples_per_step, with_env

STEPS = ["--max_steps", "4", "--warmup_steps", "1", "--weight_decay", "0.01", "--seed", "7", "--packing",
         "documents", "--max_eval_samples", "37"]
TRAIN_BLOCKS = 200


@pytest.fixture(scope="module")
def two_runs(corpus, bpe_tokenizer_dir, job_env, tmp_path_factory):  # noqa: F811
    """The same global batch of 16 blocks per step: 1 process x 16, and 2 processes x 4 x accumulation 2; the
    evaluation batch sizes (16, 5) leave remainders. 4 of the 16 blocks of every step come from the replay file
    (the validation text, as blocks of its own); each run logs its samples beside its output directory."""
    root = tmp_path_factory.mktemp("clm-equivalence")
    replay = ["--replay_file", corpus["validation"], "--replay_ratio", "0.25",
              "--max_train_samples", str(TRAIN_BLOCKS)]
    layouts = {"1x16x1": (1, ["--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16"]),
               "2x4x2": (2, ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                             "--per_device_eval_batch_size", "5"])}
    runs = {}
    for name, (nproc, layout) in layouts.items():
        runs[name] = root / name
        run_job("trainer.clm", clm_args(corpus, bpe_tokenizer_dir, runs[name], *STEPS, *replay, *layout),
                with_env(job_env, TRAINER_DEBUG_SAMPLE_LOG=root / f"{name}.samples"), nproc=nproc)
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
def test_replay_gives_both_layouts_the_same_samples_with_a_quarter_replayed(two_runs):
    one, two = (samples_per_step(two_runs[name].parent / f"{name}.samples") for name in ("1x16x1", "2x4x2"))
    assert one == two and len(one) == 4
    # Blocks 0..199 are the training data (--max_train_samples 200), the replay blocks come after them.
    assert all(len(ids) == 16 and sum(i >= TRAIN_BLOCKS for i in ids) == 4 for ids in one.values())


@pytest.mark.slow
def test_perplexity_identical_across_world_size_and_eval_batch_size(two_runs):
    one, two = (read_results(two_runs[name]) for name in ("1x16x1", "2x4x2"))
    assert one["init_eval_predicted_tokens"] == two["init_eval_predicted_tokens"] < 37 * 31  # document starts
    assert two["init_eval_perplexity"] == pytest.approx(one["init_eval_perplexity"], rel=1e-6)
    assert two["eval_perplexity"] == pytest.approx(one["eval_perplexity"], rel=1e-5)
