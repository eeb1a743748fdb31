"""trainer.clm under the launchers, for real on 2 CPU processes: the resume tests' job (resume_helpers: 12 steps,
accumulation 2, dropout on) on a tiny GPT-2, whose output layer is tied to its token embeddings.

DDP under `accelerate launch` (cpu_ddp.yaml) is the reference; ZeRO-3 under DeepSpeed's own launcher and FSDP2
under `accelerate launch` match it (global relative parameter difference <= 1e-5, as test_deepspeed.py and
test_fsdp.py) and export a model that loads with the weights tied, as DDP's does; an FSDP2 run stopped by a
signal and resumed ends bit-identical. bf16 under `accelerate launch` with ZeRO-2 is in test_launch.py, torchrun
with ZeRO-2 in test_slurm.py.
"""
import os

import pytest
import torch

from clm_helpers import bpe_tokenizer_dir  # noqa: F401 (a fixture)
from conftest import REPO_ROOT, deepspeed_launch, load_parameters, read_history, relative_difference
from resume_helpers import assert_sharded_stop_and_resume_is_exact, run_two_process_resume_job

pytestmark = pytest.mark.slow

CLM = "trainer.clm"
TOLERANCE = 1e-5
FSDP_YAML = "cpu_fsdp2.yaml"
ZERO3 = ["--deepspeed", os.path.join(REPO_ROOT, "ds_configs", "zero3.json")]
PARALLELISM = {"ddp": "DDP", "zero3": "DeepSpeed ZeRO-3", "fsdp": "FSDP2"}


@pytest.fixture(scope="module")
def runs(corpus, bpe_tokenizer_dir, job_env, tmp_path_factory) -> dict:
    """{name: (output directory, the job's output)} for DDP, ZeRO-3 (deepspeed launcher) and FSDP2."""
    root = tmp_path_factory.mktemp("clm-launch")
    launches = {"ddp": {"yaml": "cpu_ddp.yaml"}, "zero3": {"extra": ZERO3, "launcher": deepspeed_launch()},
                "fsdp": {"yaml": FSDP_YAML}}
    outputs = {}
    for name, launch in launches.items():
        result = run_two_process_resume_job(corpus, bpe_tokenizer_dir, job_env, root / name, module=CLM, **launch)
        outputs[name] = root / name, result.stdout + result.stderr
    return outputs


@pytest.mark.parametrize("name", ["zero3", "fsdp"])
def test_clm_parameters_and_losses_match_ddp_and_the_export_keeps_the_tied_head(runs, name):
    from transformers import AutoModelForCausalLM

    (ddp, _), (sharded, log) = runs["ddp"], runs[name]
    for run, text in ((name, log), ("ddp", runs["ddp"][1])):
        assert f"with {PARALLELISM[run]} (gloo): 8 sequences/step (2 per device x 2 processes x 2 accumulation)" in text
    reference, exported = load_parameters(ddp), load_parameters(sharded)
    assert exported.keys() == reference.keys()  # the tied head is stored once, as under DDP
    difference = relative_difference(reference, exported)
    assert difference <= TOLERANCE, f"{name} differs from DDP by {difference:.2e}"
    losses = {run: [r["train_loss"] for r in read_history(runs[run][0]) if "train_loss" in r] for run in ("ddp", name)}
    assert losses[name] == pytest.approx(losses["ddp"], rel=1e-5)
    assert losses["ddp"][-1] < losses["ddp"][0]  # training moved: the comparison is not vacuous
    model = AutoModelForCausalLM.from_pretrained(str(sharded))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert torch.equal(model.transformer.wte.weight, exported["transformer.wte.weight"])


def test_clm_fsdp_run_stopped_and_resumed_ends_where_an_uninterrupted_one_does(runs, corpus, bpe_tokenizer_dir,
                                                                                job_env, tmp_path):
    assert_sharded_stop_and_resume_is_exact(corpus, bpe_tokenizer_dir, job_env, tmp_path, "fsdp", yaml=FSDP_YAML,
                                            uninterrupted=runs["fsdp"][0], module=CLM)
