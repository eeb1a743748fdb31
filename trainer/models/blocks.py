"""The repeated transformer blocks of a model: one rule for compilation, FSDP wrapping and freezing."""
from __future__ import annotations

import torch

from trainer.errors import UsageError


def encoder_layers(model) -> torch.nn.ModuleList:
    """The stack of transformer blocks: the ModuleList in the base model with one entry per hidden layer."""
    count = model.config.num_hidden_layers
    for module in model.base_model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise UsageError(f"cannot find the encoder layers of a {model.config.model_type} model; use "
                     f"--finetune_strategy full, bitfit or lora")
