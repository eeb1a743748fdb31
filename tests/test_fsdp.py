"""FSDP2 under the shared engine, for real on the CPU: 2 processes on gloo under `accelerate launch` with
launch/accelerate/cpu_fsdp2.yaml (one FSDP unit per BertLayer, the block class the job names for accelerate, plus
the root, which holds the embeddings and the tied MLM head). Same mathematics as DDP, an export that loads, exact
resume from sharded checkpoints; bf16 under FSDP2 is tested in test_launch.py. FSDP that cannot run on the CPU
is refused, not run as DDP.

The runs are the resume tests' job (resume_helpers: 12 steps, accumulation 2, dropout on): one uninterrupted
FSDP run serves as the DDP comparison (against the session's two-process DDP run, conftest.two_process_resume_run),
the export and the resume reference. Tolerance against DDP as in
test_deepspeed.py: global relative difference <= 1e-5 in fp32 (only the order of reductions differs).
"""
import os

import pytest

from conftest import (assert_export_reproduces_eval_perplexity, fails_cleanly, load_parameters, mlm_args,
                      read_history, relative_difference)
from resume_helpers import assert_sharded_stop_and_resume_is_exact, run_two_process_resume_job

TOLERANCE = 1e-5
YAML = "cpu_fsdp2.yaml"


@pytest.fixture(scope="module")
def runs(corpus, tokenizer_dir, job_env, tmp_path_factory, two_process_resume_run) -> dict:
    """{name: (output directory, the job's output)}: the 2-process DDP reference and the same job under FSDP2."""
    out = tmp_path_factory.mktemp("fsdp") / "fsdp"
    result = run_two_process_resume_job(corpus, tokenizer_dir, job_env, out, yaml=YAML)
    return {"ddp": (two_process_resume_run[0], None), "fsdp": (out, result.stdout + result.stderr)}


@pytest.mark.slow
def test_fsdp_parameters_and_losses_match_ddp(runs):
    (ddp, _), (fsdp, log) = runs["ddp"], runs["fsdp"]
    assert "with FSDP2 (gloo): 8 sequences/step (2 per device x 2 processes x 2 accumulation)" in log
    reference = load_parameters(ddp)
    exported = load_parameters(fsdp)
    assert exported.keys() == reference.keys()  # the tied decoder weight is stored once, as under DDP
    difference = relative_difference(reference, exported)
    assert difference <= TOLERANCE, f"FSDP2 differs from DDP by {difference:.2e}"
    losses = {name: [r["train_loss"] for r in read_history(runs[name][0]) if "train_loss" in r] for name in runs}
    assert losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-5)
    assert losses["ddp"][-1] < losses["ddp"][0]  # training moved: the comparison is not vacuous


@pytest.mark.slow
def test_fsdp_export_reloads_and_reproduces_eval_perplexity(runs, corpus, tokenizer_dir, job_env, tmp_path):
    assert_export_reproduces_eval_perplexity(runs["fsdp"][0], corpus, tokenizer_dir, job_env, tmp_path,
                                             "--max_eval_samples", "16")


@pytest.mark.slow
def test_fsdp_run_stopped_and_resumed_ends_where_an_uninterrupted_one_does(runs, corpus, tokenizer_dir, job_env,
                                                                            tmp_path):
    """Every rank writes its model and optimizer shards (torch.distributed.checkpoint) and reads them back."""
    assert_sharded_stop_and_resume_is_exact(corpus, tokenizer_dir, job_env, tmp_path, "fsdp", yaml=YAML,
                                            uninterrupted=runs["fsdp"][0])
    shards = os.listdir(tmp_path / "resumed" / "checkpoint-6" / "fsdp")
    assert ".metadata" in shards and sum(name.endswith(".distcp") for name in shards) == 2


@pytest.mark.parametrize("version, message", [
    ("1", "error: FSDP on the CPU needs fsdp_version: 2 (got 1); see launch/accelerate/cpu_fsdp2.yaml"),
    ("2", "error: FSDP on the CPU needs 2 or more processes (got 1); launch with accelerate launch "
          "--num_processes 2 or more, or drop the FSDP config"),
], ids=["fsdp_version_1", "one_process"])
def test_fsdp_on_cpu_that_cannot_run_is_refused_not_run_as_something_else(corpus, tokenizer_dir, in_process_job,
                                                                         monkeypatch, capsys, tmp_path, version,
                                                                         message):
    """The environment `accelerate launch` sets for an FSDP YAML, on one process (this one): exit 2, one line."""
    from trainer.mlm import main

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", version)
    assert fails_cleanly(main, mlm_args(corpus, tokenizer_dir, tmp_path / "out"), capsys) == message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_class, config, expected", [
    ("BertForMaskedLM", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "intermediate_size": 64}, ["BertLayer"]),  # not BertEmbeddings (tied to the decoder)
    ("GPT2LMHeadModel", {"n_embd": 32, "n_layer": 2, "n_head": 2}, ["GPT2Block"]),
])
def test_fsdp_wraps_the_model_own_blocks_when_the_yaml_names_none(model_class, config, expected):
    """The shipped FSDP YAMLs name no fsdp_transformer_layer_cls_to_wrap: one YAML serves every model."""
    from types import SimpleNamespace

    import transformers
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from trainer.distributed.launch import name_fsdp_blocks

    cls = getattr(transformers, model_class)
    model = cls(cls.config_class(vocab_size=100, **config))
    plugin = SimpleNamespace(auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=None)
    name_fsdp_blocks(plugin, model)
    assert plugin.transformer_cls_names_to_wrap == expected
    named = SimpleNamespace(auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=["X"])
    name_fsdp_blocks(named, model)  # a class the YAML names wins
    assert named.transformer_cls_names_to_wrap == ["X"]


def shapes(model) -> dict:
    return {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in [*model.named_parameters(),
                                                                            *model.named_buffers()]}


@pytest.mark.parametrize("auto_class, source", [
    ("AutoModelForCausalLM", "scratch"),
    ("AutoModelForCausalLM", "bf16 checkpoint"),  # --torch_dtype auto: the checkpoint's dtype
    ("AutoModelForSequenceClassification", "checkpoint"),  # a new head, its size from the labels
    ("AutoModelForSequenceClassification", "checkpoint lora"),  # peft's adapters, added on the meta device too
    ("AutoModelForSequenceClassification", "checkpoint adapter"),  # bottleneck adapters (trainer/finetune)
])
def test_processes_that_receive_their_fsdp2_shards_build_the_model_on_the_meta_device(tokenizer_dir, tmp_path,
                                                                                       auto_class, source):
    """Under FSDP2 every process but the first builds the model inside `shapes_only`: the first process's modules,
    shapes and dtypes, with no weights."""
    import torch
    import transformers
    from transformers import AutoTokenizer, BertConfig, GPT2Config

    from trainer.finetune.strategies import FinetuneArguments, apply_strategy
    from trainer.models.arguments import ModelArguments
    from trainer.models.loading import load_model, shapes_only

    tiny = {"n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 32}
    if source == "scratch":
        model_args = ModelArguments(model_type="gpt2", config_overrides=",".join(f"{k}={v}" for k, v in tiny.items()))
    else:
        dtype = torch.bfloat16 if source.startswith("bf16") else torch.float32
        if source.endswith("adapter"):  # bottleneck adapters know BERT-style layouts
            pretrained = transformers.AutoModelForMaskedLM.from_config(BertConfig(
                vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
        else:
            pretrained = transformers.AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, **tiny))
        pretrained.to(dtype).save_pretrained(tmp_path)
        model_args = ModelArguments(model_name_or_path=str(tmp_path), torch_dtype="auto",
                                    allow_low_precision_weights=True)
    labels = {"num_labels": 3} if auto_class.endswith("Classification") else {}
    build = getattr(transformers, auto_class)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    strategy = FinetuneArguments(finetune_strategy=source.split()[-1]) if source.endswith(("lora", "adapter")) else None

    def built():  # as classify's build_task: the model, then its fine-tuning strategy (which adds parameters)
        model = load_model(model_args, build, tokenizer, **labels)
        return model if strategy is None else apply_strategy(model, strategy)[0]

    whole = built()
    with shapes_only():
        empty = built()
    assert shapes(empty) == shapes(whole)
    trainable = {name for name, parameter in whole.named_parameters() if parameter.requires_grad}
    assert {name for name, parameter in empty.named_parameters() if parameter.requires_grad} == trainable
    assert strategy is None or any(strategy.finetune_strategy.replace("adapter", "adapters") in name
                                   for name in trainable)
    assert {tensor.device.type for tensor in [*empty.parameters(), *empty.buffers()]} == {"meta"}
    assert {tensor.device.type for tensor in [*whole.parameters(), *whole.buffers()]} == {"cpu"}
    assert load_model(model_args, build, tokenizer, **labels).device.type == "cpu"  # only inside the context
