"""AdamW with decoupled weight decay off biases and norm weights, plus the learning-rate schedule."""
from __future__ import annotations

import math

import torch


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and biases + normalisation weights (LayerNorm, RMSNorm, ...) undecayed."""
    no_decay = set()
    for module in model.modules():
        is_norm = isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "Norm" in type(module).__name__
        for name, parameter in module.named_parameters(recurse=False):
            if is_norm or name == "bias":
                no_decay.add(parameter)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p not in no_decay], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p in no_decay], "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    # The fused kernel (CUDA and CPU in torch >= 2.4) updates all parameters in a few kernels instead of
    # a loop of small ops per tensor; same mathematics. It takes FSDP2's DTensor shards too (on the CPU as well).
    return torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.learning_rate,
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, fused=True)


def warmup_steps(args, total_steps: int) -> int:
    return args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)


def build_scheduler(optimizer, args, total_steps: int):
    from transformers import get_scheduler

    name = "constant_with_warmup" if args.lr_scheduler_type == "constant" else args.lr_scheduler_type
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(args, total_steps),
                         num_training_steps=total_steps)
