"""The optimization section of the command line, the optimizer (--optim; AdamW by default) with weight decay off
biases and norm weights, and the learning-rate schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trainer.config.parsing import arg
from trainer.errors import require


def adamw(groups: list[dict], optimization, fused: bool) -> torch.optim.Optimizer:
    # The fused kernel (CUDA and CPU in torch >= 2.4) updates all parameters in a few kernels instead of
    # a loop of small ops per tensor; same mathematics. It takes FSDP2's DTensor shards too (on the CPU as well).
    return torch.optim.AdamW(groups, lr=optimization.learning_rate, betas=(optimization.adam_beta1,
                             optimization.adam_beta2), eps=optimization.adam_epsilon, fused=fused)


def adafactor(groups: list[dict], optimization) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=optimization.learning_rate, scale_parameter=False, relative_step=False,
                     warmup_init=False)


def quantized_adamw(groups: list[dict], optimization, bits: int) -> torch.optim.Optimizer:
    """torchao's AdamW with its two moments kept in `bits` bits per value (block-wise quantized, dynamic-tree
    code book), the moments of tensors under 4096 values in fp32; the update itself is computed in fp32. Each
    parameter's update is a torch.compile'd function (inductor): the first step compiles one per parameter shape."""
    import torchao.optim as torchao_optim  # its import-time warnings: trainer.quiet_torchao_import

    optimizer, state = {8: (torchao_optim.AdamW8bit, torchao_optim.subclass_8bit.OptimState8bit),
                        4: (torchao_optim.AdamW4bit, torchao_optim.subclass_4bit.OptimState4bit)}[bits]
    # The checkpointer reads optimizer.pt with torch.load(weights_only=True), which takes only allow-listed classes.
    torch.serialization.add_safe_globals([state])
    return optimizer(groups, lr=optimization.learning_rate, betas=(optimization.adam_beta1, optimization.adam_beta2),
                     eps=optimization.adam_epsilon)


# --optim: name -> (parameter groups, the optimization section) -> optimizer.
OPTIMIZERS = {
    "adamw_torch_fused": lambda groups, optimization: adamw(groups, optimization, fused=True),
    "adamw_torch": lambda groups, optimization: adamw(groups, optimization, fused=False),
    "adamw_torch_8bit": lambda groups, optimization: quantized_adamw(groups, optimization, bits=8),
    "adamw_torch_4bit": lambda groups, optimization: quantized_adamw(groups, optimization, bits=4),
    "adafactor": adafactor,
    "sgd": lambda groups, optimization: torch.optim.SGD(groups, lr=optimization.learning_rate),
}


def is_fp32_adamw(optim: str) -> bool:
    """torch's AdamW: the update DeepSpeed's own AdamW (and DeepSpeedCPUAdam) computes, with fp32 moments."""
    return optim in ("adamw_torch_fused", "adamw_torch")


@dataclass
class OptimizationArguments:
    """How the model is optimized: batch, accumulation, optimizer, schedule, length of the run, clipping, seed."""

    _argument_group_name = "optimization"

    per_device_train_batch_size: int = arg(8, "Sequences per process per micro-step.")
    gradient_accumulation_steps: int = arg(1, "Micro-steps per optimizer step.")
    optim: str = arg("adamw_torch_fused", "Optimizer: adamw_torch_fused (AdamW, fused kernel), adamw_torch (AdamW, "
                     "per-tensor loop), adafactor (transformers' Adafactor with the Trainer's settings: fixed "
                     "--learning_rate, no parameter scaling, no relative step), sgd (torch.optim.SGD, no momentum), "
                     "adamw_torch_8bit / adamw_torch_4bit (torchao's AdamW with both moments block-quantized to 8 or "
                     "4 bits; the first step compiles the update). Its state is checkpointed and resumed exactly.", choices=list(OPTIMIZERS))
    learning_rate: float = arg(5e-5, "Peak learning rate.")
    weight_decay: float = arg(0.0, "Weight decay (never applied to biases and norm weights): decoupled for AdamW "
                                   "and Adafactor, L2 for sgd.")
    adam_beta1: float = arg(0.9, "AdamW beta1.")
    adam_beta2: float = arg(0.999, "AdamW beta2.")
    adam_epsilon: float = arg(1e-8, "AdamW epsilon.")
    lr_scheduler_type: str = arg("linear", "Learning-rate schedule after warmup: linear, cosine or constant.",
                                 choices=["linear", "cosine", "constant"])
    warmup_steps: int = arg(0, "Linear warmup steps (wins over --warmup_ratio).")
    warmup_ratio: float = arg(0.0, "Warmup as a fraction of all optimizer steps.")
    num_train_epochs: float = arg(3.0, "Epochs to train (ignored when --max_steps is set).")
    max_steps: int = arg(-1, "Optimizer steps to train; -1 means use --num_train_epochs.")
    max_grad_norm: float = arg(1.0, "Gradient clipping norm; 0 disables clipping.")
    seed: int = arg(42, "Seed for initialisation, shuffling and masking.")

    def __post_init__(self):
        for flag in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            require(getattr(self, flag) > 0, f"--{flag} must be positive, got {getattr(self, flag)}")
        require(self.max_steps > 0 or self.max_steps == -1, f"--max_steps must be positive (or -1), got "
                                                            f"{self.max_steps}")
        require(self.max_steps > 0 or self.num_train_epochs > 0,
                f"--num_train_epochs must be positive, got {self.num_train_epochs}")
        require(math.isfinite(self.learning_rate) and self.learning_rate > 0,
                f"--learning_rate must be a positive number, got {self.learning_rate}")
        for flag in ("adam_beta1", "adam_beta2"):
            require(0 <= getattr(self, flag) < 1, f"--{flag} must be in [0, 1), got {getattr(self, flag)}")
        for flag in ("adam_epsilon", "weight_decay"):
            require(getattr(self, flag) >= 0, f"--{flag} must be >= 0, got {getattr(self, flag)}")
        require(0 <= self.seed < 2 ** 32, f"--seed must be in 0..{2 ** 32 - 1} (numpy's range), got {self.seed}")
        require(0 <= self.warmup_ratio < 1 and self.warmup_steps >= 0, "warmup must be non-negative and below 1")
        require(self.max_grad_norm >= 0, "--max_grad_norm must be >= 0")

    def global_batch_size(self, world_size: int) -> int:
        return self.per_device_train_batch_size * world_size * self.gradient_accumulation_steps

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the whole run: --max_steps, or --num_train_epochs of `steps_per_epoch`."""
        return self.max_steps if self.max_steps > 0 else math.ceil(self.num_train_epochs * steps_per_epoch)


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


def build_optimizer(model: torch.nn.Module, optimization: OptimizationArguments) -> torch.optim.Optimizer:
    return OPTIMIZERS[optimization.optim](parameter_groups(model, optimization.weight_decay), optimization)


def warmup_steps(optimization: OptimizationArguments, total_steps: int) -> int:
    return optimization.warmup_steps or math.ceil(optimization.warmup_ratio * total_steps)


def build_scheduler(optimizer, optimization: OptimizationArguments, total_steps: int):
    from transformers import get_scheduler

    schedule = optimization.lr_scheduler_type
    name = "constant_with_warmup" if schedule == "constant" else schedule
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(optimization, total_steps),
                         num_training_steps=total_steps)
