"""The repeated blocks of a model: ONE rule for what "the transformer blocks" are.

Compilation compiles each block (models/compilation.py), FSDP wraps each in its own unit (distributed/launch.py,
`name_fsdp_blocks`), freezing and gradual unfreezing count them and bottleneck adapters sit in them
(finetune/), and --gradient_checkpointing recomputes each (models/checkpointing.py). They are the model's
longest ModuleList of modules of one class: BertLayer, GPT2Block, LlamaDecoderLayer.
"""
from __future__ import annotations

import torch

from trainer.errors import UsageError


def repeated_blocks(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's stack of transformer blocks: its longest ModuleList of modules of one class; None if it has none
    (the first of several equally long ones)."""
    stacks = [module for module in model.modules() if isinstance(module, torch.nn.ModuleList) and len(module)
              and len({type(block) for block in module}) == 1]
    return max(stacks, key=len, default=None)


def encoder_layers(model) -> torch.nn.ModuleList:
    """The repeated blocks of a model that fine-tuning must find (freezing layers, adapters' sites)."""
    blocks = repeated_blocks(model)
    if blocks is None:
        raise UsageError(f"cannot find the encoder layers of a {model.config.model_type} model; use "
                         f"--finetune_strategy full, bitfit or lora")
    return blocks
