"""Fine-tuning strategies on a causal LM (trainer.finetune.strategies, shared with classify): exactly the intended
parameters change. In-process runs from a tiny GPT-2 checkpoint; weight decay on, so a frozen parameter that only got a
zero gradient would still move."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from clm_helpers import bpe_tokenizer_dir, clm_args, corpus, gpt2_checkpoint  # noqa: F401 (fixtures)
from conftest import changed_tensors, saved_tensor_names
from trainer.clm import main

STEPS = ["--max_steps", "2", "--weight_decay", "0.1", "--per_device_train_batch_size", "4", "--max_eval_samples", "4"]


def run(corpus, gpt2_checkpoint, out, *extra):  # noqa: F811
    args = [a for a in clm_args(corpus, gpt2_checkpoint, out, *STEPS, *extra) if a not in ("--model_type", "gpt2")]
    overrides = args.index("--config_overrides")
    del args[overrides:overrides + 2]  # the model comes from the checkpoint
    main([*args, "--model_name_or_path", gpt2_checkpoint])
    return out


def body(checkpoint) -> set[str]:
    return saved_tensor_names(checkpoint, "transformer.")


@pytest.mark.parametrize("strategy, trained", [
    ("full", lambda name: True),
    ("freeze", lambda name: name.startswith(("transformer.h.1.", "transformer.ln_f."))),  # --freeze_layers 1
    ("bitfit", lambda name: name.endswith(".bias")),
])
def test_only_the_intended_tensors_change(strategy, trained, corpus, gpt2_checkpoint, tmp_path):  # noqa: F811
    out = run(corpus, gpt2_checkpoint, tmp_path / strategy, "--strategy", strategy, "--freeze_layers", "1")
    assert changed_tensors(gpt2_checkpoint, out, "transformer.") == {n for n in body(gpt2_checkpoint) if trained(n)}


def test_lora_trains_adapters_only_and_merges_into_the_attention_weights(corpus, gpt2_checkpoint,  # noqa: F811
                                                                         tmp_path):
    out = run(corpus, gpt2_checkpoint, tmp_path / "lora", "--finetune_strategy", "lora", "--merge_adapters")
    adapters = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert adapters and all("lora_" in name for name in adapters)
    assert all(torch.count_nonzero(t) > 0 for name, t in adapters.items() if "lora_B" in name)  # B starts at zero
    merged = os.path.join(out, "merged")
    assert changed_tensors(gpt2_checkpoint, merged, "transformer.") == {
        n for n in body(gpt2_checkpoint) if n.endswith("attn.c_attn.weight")}  # peft's GPT-2 target


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_prefix_and_prompt_tuning_train_virtual_tokens_only_and_generate(kind, corpus, gpt2_checkpoint,  # noqa: F811
                                                                         tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = run(corpus, gpt2_checkpoint, tmp_path / kind, "--finetune_strategy", kind, "--num_virtual_tokens", "3")
    adapters = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert list(adapters) == ["prompt_embeddings"] and torch.count_nonzero(adapters["prompt_embeddings"]) > 0
    base = AutoModelForCausalLM.from_pretrained(gpt2_checkpoint)
    before = {n: p.clone() for n, p in base.named_parameters()}
    tuned = PeftModel.from_pretrained(base, out).eval()
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(out)
    encoded = tokenizer("the acting was", return_tensors="pt")
    generated = tuned.generate(**encoded, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated.shape[1] == encoded["input_ids"].shape[1] + 3
