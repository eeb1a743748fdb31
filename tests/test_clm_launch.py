"""trainer.clm under the launchers, for real on 2 CPU processes: the resume tests' job (resume_helpers: 12 steps,
accumulation 2, dropout on) on a tiny GPT-2, whose output layer is tied to its token embeddings.

DDP under `accelerate launch` (cpu_ddp.yaml) is the reference; ZeRO-3 under DeepSpeed's own launcher and FSDP2
under `accelerate launch` match it (global relative parameter difference <= 1e-5, as test_deepspeed.py and
test_fsdp.py) and export a model that loads with the weights tied, as DDP's does; an FSDP2 run stopped by a
signal and resumed ends bit-identical. bf16 under `accelerate launch` with ZeRO-2 is in test_launch.py, torchrun
with ZeRO-2 in test_slurm.py.

Every run trains with EWC (a made-up file, ewc_helpers) and ends with --save_fisher, so the same comparisons show
the penalty on ZeRO-3 partitions and FSDP2 shards matching DDP, the resume exact with it, and the Fisher summed
exactly over ranks (2 processes against 1, by value).

Every model family clm's tests use trains under ZeRO-3 and FSDP2 as plain training does, so the fused loss meets the
head's weight as each backend holds it: GPT-2, whose output layer is tied, in the runs above (against DDP); Llama,
whose head is a weight of its own (as Qwen's and Mistral's), on 2 processes against 1 (tiny, no dropout, one step:
the same loss and gradient norm).

That Llama, from scratch, starts under ZeRO-3 and FSDP2 (both under `accelerate launch`) on 2 processes with exactly
the parameters of 1 process (there the second process builds it on the meta device and receives its shards from the
first).
"""
import os

import pytest
import torch
from safetensors.torch import load_file

from clm_helpers import TINY_GPT2_FLAGS, bpe_tokenizer_dir, clm_args  # noqa: F401 (a fixture)
from conftest import REPO_ROOT, accelerate_launch, deepspeed_launch, load_parameters, read_history, \
    relative_difference, run_job
from ewc_helpers import clm_engine, ewc_flags, job_environment, write_made_up_fisher
from resume_helpers import DROPOUT_GPT2, assert_sharded_stop_and_resume_is_exact, resume_args, \
    run_two_process_resume_job
from trainer.continual.ewc import ANCHOR, FISHER
from trainer.layout import FISHER_FILE

pytestmark = pytest.mark.slow

CLM = "trainer.clm"
TOLERANCE = 1e-5
FSDP_YAML = "cpu_fsdp2.yaml"
ZERO3_YAML = "cpu_deepspeed_zero3.yaml"
ZERO3 = ["--deepspeed", os.path.join(REPO_ROOT, "ds_configs", "zero3.json")]
PARALLELISM = {"ddp": "DDP", "zero3": "DeepSpeed ZeRO-3", "fsdp": "FSDP2"}
FISHER_RUN = ["--save_fisher", "--fisher_samples", "12"]
# A Llama from scratch, tiny and without dropout: its output layer (tie_word_embeddings False, as Qwen's and
# Mistral's) is a weight of its own, unlike GPT-2's, which the runs above train.
UNTIED_LLAMA = ["--model_type", "llama", "--config_overrides",
                "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,"
                "num_key_value_heads=1,max_position_embeddings=64"]


@pytest.fixture(scope="module")
def ewc(corpus, bpe_tokenizer_dir, job_env, tmp_path_factory) -> list[str]:
    """The EWC flags every run here trains with: a made-up file for the job's tiny GPT-2, and --save_fisher."""
    directory = tmp_path_factory.mktemp("clm-ewc")
    with pytest.MonkeyPatch.context() as patch:
        job_environment(patch, job_env)
        engine = clm_engine(resume_args(corpus, bpe_tokenizer_dir, directory / "unused", 1, "--peak_tflops", "1",
                                        module=CLM))
    return [*ewc_flags(write_made_up_fisher(engine, directory)), *FISHER_RUN]


@pytest.fixture(scope="module")
def runs(corpus, bpe_tokenizer_dir, job_env, tmp_path_factory, ewc) -> dict:
    """{name: (output directory, the job's output)} for DDP, ZeRO-3 (deepspeed launcher) and FSDP2."""
    root = tmp_path_factory.mktemp("clm-launch")
    launches = {"ddp": {"yaml": "cpu_ddp.yaml"}, "zero3": {"extra": ZERO3 + ewc, "launcher": deepspeed_launch()},
                "fsdp": {"yaml": FSDP_YAML}}
    outputs = {}
    for name, launch in launches.items():
        launch = {"extra": ewc, **launch}
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
    penalties = {run: [r["train_ewc_penalty"] for r in read_history(runs[run][0]) if "train_ewc_penalty" in r]
                 for run in ("ddp", name)}
    assert penalties[name] == pytest.approx(penalties["ddp"], rel=1e-5) and min(penalties["ddp"]) > 0
    model = AutoModelForCausalLM.from_pretrained(str(sharded))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert torch.equal(model.transformer.wte.weight, exported["transformer.wte.weight"])


def test_clm_fsdp_run_stopped_and_resumed_ends_where_an_uninterrupted_one_does(runs, corpus, bpe_tokenizer_dir,
                                                                                job_env, tmp_path, ewc):
    assert_sharded_stop_and_resume_is_exact(corpus, bpe_tokenizer_dir, job_env, tmp_path, "fsdp", extra=ewc,
                                            yaml=FSDP_YAML, uninterrupted=runs["fsdp"][0], module=CLM)


def test_fisher_of_two_processes_equals_one_process_by_value_under_every_launcher(runs, corpus, bpe_tokenizer_dir,
                                                                                  job_env, tmp_path, monkeypatch):
    """DDP's Fisher (each rank 6 of the 12 samples, float64 sums all-reduced) against the Fisher of its saved
    weights in this process; ZeRO-3's and FSDP2's (the whole model gathered on each rank) against DDP's, whose
    weights they match to 1e-5. The anchors are the saved weights."""
    job_environment(monkeypatch, job_env)
    written = {name: load_file(os.path.join(runs[name][0], FISHER_FILE)) for name in runs}
    args = [a for a in resume_args(corpus, bpe_tokenizer_dir, tmp_path / "alone", 1, *FISHER_RUN, module=CLM)
            if a not in DROPOUT_GPT2]
    engine = clm_engine([*args, "--model_name_or_path", str(runs["ddp"][0]), "--peak_tflops", "1"])
    os.makedirs(tmp_path / "alone")
    engine.save_fisher(str(tmp_path / "alone"))
    alone = load_file(os.path.join(tmp_path / "alone", FISHER_FILE))
    assert alone.keys() == written["ddp"].keys()
    for key in alone:
        torch.testing.assert_close(written["ddp"][key], alone[key], rtol=1e-5, atol=1e-12)
    fisher = [value for key, value in alone.items() if key.startswith(FISHER)]
    assert all((value >= 0).all() for value in fisher) and sum(float(value.sum()) for value in fisher) > 0
    for name in ("zero3", "fsdp"):
        assert written[name].keys() == alone.keys()
        difference = relative_difference(written["ddp"], written[name])
        assert difference <= 1e-4, f"{name}'s Fisher differs from DDP's by {difference:.2e}"
    for name, (directory, _) in runs.items():
        weights = load_parameters(directory)
        assert torch.equal(written[name][ANCHOR + "hf_model.transformer.wte.weight"], weights["transformer.wte.weight"])


@pytest.fixture(scope="module")
def initial_runs(corpus, bpe_tokenizer_dir, job_env, tmp_path_factory) -> dict:
    """{"one": 1 process, "zero3": ZeRO-3, "fsdp": FSDP2 (both accelerate launch) on 2: output directory} of one step
    at learning rate 1e-30 of the tiny Llama from scratch. Adam's first step moves a weight by at most the learning
    rate, far below half a unit in the last place of any weight the initialisation draws (Llama has no biases; its
    norms start at 1), so each export holds the model's initial weights bit for bit."""
    root = tmp_path_factory.mktemp("clm-initial")
    launches = {"one": (1, None), "zero3": (2, accelerate_launch(ZERO3_YAML)),
                "fsdp": (2, accelerate_launch(FSDP_YAML))}
    for name, (nproc, launcher) in launches.items():
        args = [a for a in clm_args(corpus, bpe_tokenizer_dir, root / name, "--max_steps", "1", "--max_eval_samples",
                                    "2", "--per_device_train_batch_size", str(2 // nproc))
                if a not in TINY_GPT2_FLAGS]
        result = run_job(CLM, [*args, *UNTIED_LLAMA, "--learning_rate", "1e-30"], job_env, nproc=nproc,
                         launcher=launcher)
        assert name == "one" or f"with {PARALLELISM[name]} (gloo)" in result.stdout + result.stderr
    return {name: root / name for name in launches}


@pytest.mark.parametrize("name", ["zero3", "fsdp"])
def test_a_model_from_scratch_starts_on_two_processes_with_the_parameters_and_gradients_of_one(initial_runs, name):
    """The untied Llama (its output layer a weight of its own, partitioned or sharded like any other): the same
    initial weights bit for bit, and the same first loss and gradient norm, the untied head's gradient included (the
    fused loss once met a partitioned head weight with a traceback in the backward)."""
    reference, exported = load_parameters(initial_runs["one"]), load_parameters(initial_runs[name])
    assert exported.keys() == reference.keys()
    assert "lm_head.weight" in reference  # untied: saved beside the embeddings
    assert [key for key in reference if not torch.equal(exported[key], reference[key])] == []
    first_step = [next(r for r in read_history(initial_runs[run]) if "train_loss" in r) for run in ("one", name)]
    for key in ("train_loss", "train_grad_norm"):
        assert first_step[1][key] == pytest.approx(first_step[0][key], rel=TOLERANCE), key
