"""One rule for "the repeated blocks" (trainer/models/blocks.py): compilation, FSDP wrapping and freezing find the
same transformer blocks, on BERT, GPT-2 and Llama."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

from trainer.distributed.launch import name_fsdp_blocks
from trainer.errors import UsageError
from trainer.models.blocks import encoder_layers, repeated_blocks
from trainer.models.compilation import compile_blocks

MODELS = {
    "bert": ("BertForMaskedLM", {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
                                 "intermediate_size": 64}, lambda m: m.bert.encoder.layer, "BertLayer"),
    "gpt2": ("GPT2LMHeadModel", {"n_embd": 32, "n_layer": 3, "n_head": 2}, lambda m: m.transformer.h, "GPT2Block"),
    "llama": ("LlamaForCausalLM", {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
                                   "num_key_value_heads": 1, "intermediate_size": 64}, lambda m: m.model.layers,
              "LlamaDecoderLayer"),
}


def tiny(name: str):
    model_class, config, _, _ = MODELS[name]
    cls = getattr(transformers, model_class)
    return cls(cls.config_class(vocab_size=100, **config))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compile_fsdp_and_freezing_find_the_same_blocks(name):
    model = tiny(name)
    _, _, layer_stack, block_class = MODELS[name]
    blocks = layer_stack(model)
    assert repeated_blocks(model) is blocks and len(blocks) == 3
    assert encoder_layers(model) is blocks  # freezing, gradual unfreezing, adapters' sites

    plugin = SimpleNamespace(auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=None)
    name_fsdp_blocks(plugin, model)
    assert plugin.transformer_cls_names_to_wrap == [block_class] == [type(blocks[0]).__name__]

    assert compile_blocks(model, "eager", "default", eager_modules=[blocks[-1]]) == 2
    compiled = [module for module in model.modules() if getattr(module, "_compiled_call_impl", None) is not None]
    assert compiled == list(blocks)[:2]


def test_the_blocks_are_the_longest_list_of_one_class():
    """A longer list of mixed modules is not a block stack; without any stack each user says so in its own way."""
    stack = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])
    mixed = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2)])
    model = torch.nn.Module()
    model.mixed, model.stack = mixed, stack
    assert repeated_blocks(model) is stack

    flat = torch.nn.Sequential(torch.nn.Linear(2, 2))
    flat.config = SimpleNamespace(model_type="flat")
    flat._no_split_modules = ["Linear"]
    assert repeated_blocks(flat) is None
    with pytest.raises(UsageError, match="cannot find the encoder layers of a flat model"):
        encoder_layers(flat)
    plugin = SimpleNamespace(auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=None)
    name_fsdp_blocks(plugin, flat)
    assert plugin.transformer_cls_names_to_wrap == ["Linear"]
    assert compile_blocks(flat, "eager", "default") == 0
