"""DeepSpeed configs in the Hugging Face style: read, check, and fill every "auto" from the command line.

The command line decides the batch, accumulation, clipping, optimizer, schedule and precision; a DeepSpeed
config may leave them "auto" or repeat them, but an explicit value that disagrees is a UsageError naming both
values, never a silent override. The "optimizer" and "scheduler" sections are checked the same way and then
taken out of the config handed to DeepSpeed: the engine gives DeepSpeed its own AdamW (decay off biases and
norm weights) and steps its own schedule, the same objects as under DDP, so ZeRO runs match DDP runs.
(With the optimizer offloaded to the CPU, accelerate swaps that AdamW for DeepSpeedCPUAdam: same update.)
"""
from __future__ import annotations

import copy
import json
import os

from trainer.engine.optim import is_fp32_adamw, warmup_steps
from trainer.errors import UsageError, require

ZERO_STAGES = (0, 1, 2, 3)
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
SCHEDULERS = {"linear": "WarmupDecayLR", "cosine": "WarmupCosineLR", "constant": "WarmupLR"}
HIDDEN_SIZE_KEYS = {  # DeepSpeed's usual sizes for these buffers, as a function of the model width
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def load_deepspeed_config(path: str) -> dict:
    require(os.path.isfile(path), f"--deepspeed {path}: no such file")
    try:
        with open(path) as handle:
            config = json.load(handle)
    except json.JSONDecodeError as error:
        raise UsageError(f"--deepspeed {path} is not valid JSON: {error}") from None
    require(isinstance(config, dict), f"--deepspeed {path} must hold a JSON object")
    return config


def resolve_deepspeed_config(config: dict, optimization, parallelism, world_size: int, source: str) -> dict:
    """A copy of `config` with every command-line value filled in and checked (from the optimization and the
    precision and parallelism sections); `source` names it in errors."""
    config = copy.deepcopy(config)
    fill = Filler(config, source)
    fill("train_micro_batch_size_per_gpu", optimization.per_device_train_batch_size, "--per_device_train_batch_size")
    fill("gradient_accumulation_steps", optimization.gradient_accumulation_steps, "--gradient_accumulation_steps")
    fill("train_batch_size", optimization.global_batch_size(world_size),
         "processes x --per_device_train_batch_size x --gradient_accumulation_steps")
    fill("gradient_clipping", optimization.max_grad_norm, "--max_grad_norm")
    fill("bf16.enabled", parallelism.bf16, "--bf16")
    fill("fp16.enabled", parallelism.fp16, "--fp16")
    check_zero_section(config.setdefault("zero_optimization", {}), source)
    # "auto": on with 2 or more processes. With one there is no communication to overlap, and DeepSpeed 0.19's
    # overlap_comm then only costs: a device-wide synchronize after every backward (stage_1_and_2
    # `independent_gradient_partition_epilogue`, and per bucket where it all-reduces) and side-stream copies.
    if config["zero_optimization"].get("overlap_comm") == "auto":
        config["zero_optimization"]["overlap_comm"] = world_size > 1
    check_optim(config, optimization.optim, source)
    check_optimizer_section(config.pop("optimizer", None), optimization, fill)
    check_scheduler_section(config.pop("scheduler", None), optimization, fill)
    # An explicit `false` would make a ZeRO-3 export impossible: the final save needs the gathered weights.
    if config["zero_optimization"].get("stage") == 3:
        fill("zero_optimization.stage3_gather_16bit_weights_on_model_save", True, "the final model export")
    return config


def fill_hidden_size_values(config: dict, hidden_size: int) -> None:
    """Buffer sizes left "auto" follow the model width (what accelerate does when a model has a `.config`)."""
    zero = config.get("zero_optimization", {})
    for key, size in HIDDEN_SIZE_KEYS.items():
        if zero.get(key) == "auto":
            zero[key] = size(hidden_size)


class Filler:
    """Sets dotted keys that are "auto" (or absent) and refuses explicit values that disagree."""

    def __init__(self, config: dict, source: str):
        self.config, self.source = config, source

    def __call__(self, dotted_key: str, value, flag: str, section: dict | None = None, prefix: str = "") -> None:
        node = self.config if section is None else section
        *parents, key = dotted_key.split(".")
        for parent in parents:
            if parent not in node:
                if section is None and parent in ("bf16", "fp16") and not value:
                    return  # a precision section the config leaves out stays off
                node[parent] = {}
            node = node[parent]
            require(isinstance(node, dict), f"{self.source}: '{prefix}{dotted_key}' must be inside a JSON object")
        current = node.get(key, "auto")
        if current == "auto":
            node[key] = value
        elif not same_value(current, value):
            raise UsageError(f"{self.source} sets {prefix}{dotted_key}={json.dumps(current)} but {flag} gives "
                             f"{json.dumps(value)}; set it to \"auto\" or change one of them")


def same_value(explicit, expected) -> bool:
    if isinstance(expected, bool) or isinstance(explicit, bool):
        return explicit is expected or (explicit in (0, 1) and bool(explicit) == expected)
    if isinstance(expected, (list, tuple)):
        return isinstance(explicit, list) and len(explicit) == len(expected) and all(
            same_value(a, b) for a, b in zip(explicit, expected))
    if isinstance(expected, (int, float)) and isinstance(explicit, (int, float)):
        return abs(explicit - expected) <= 1e-12 * max(abs(explicit), abs(expected), 1e-30)
    return explicit == expected


def check_zero_section(zero: dict, source: str) -> None:
    require(isinstance(zero, dict), f"{source}: zero_optimization must be a JSON object")
    stage = zero.setdefault("stage", 0)
    require(stage in ZERO_STAGES and not isinstance(stage, bool),
            f"{source}: unknown ZeRO stage {json.dumps(stage)}; use 0, 1, 2 or 3")
    for section in ("offload_optimizer", "offload_param"):
        offload = zero.get(section)
        if offload is None:
            continue
        device = offload.get("device", "none")
        require(device in OFFLOAD_DEVICES,
                f"{source}: zero_optimization.{section}.device {json.dumps(device)} is not one of "
                f"{', '.join(OFFLOAD_DEVICES)}")
        require(device == "none" or stage >= (3 if section == "offload_param" else 1),
                f"{source}: zero_optimization.{section} needs ZeRO stage {3 if section == 'offload_param' else '1 or more'}, "
                f"the config has stage {stage}")
        if device == "nvme":
            path = offload.get("nvme_path")
            require(bool(path) and os.path.isdir(path),
                    f"{source}: zero_optimization.{section} offloads to nvme but nvme_path {json.dumps(path)} is not "
                    f"an existing directory; create it or offload to cpu")


def check_optim(config: dict, optim: str, source: str) -> None:
    """Any --optim but torch's AdamW only where DeepSpeed keeps the engine's optimizer: a config naming an optimizer
    means AdamW (fp32 moments), and with the optimizer offloaded accelerate swaps any optimizer for DeepSpeedCPUAdam
    (the same)."""
    offloaded = config["zero_optimization"].get("offload_optimizer", {}).get("device", "none") != "none"
    what = "sets an optimizer" if "optimizer" in config else "offloads the optimizer" if offloaded else None
    require(is_fp32_adamw(optim) or what is None, f"--optim {optim} with {source}, which {what} (DeepSpeed then "
                                                  f"trains with AdamW): remove that from the config or use --optim "
                                                  f"adamw_torch_fused")


def check_optimizer_section(section: dict | None, optimization, fill: Filler) -> None:
    if section is None:
        return
    kind = section.get("type", "AdamW")
    require(kind in ("AdamW", "Adam"), f"{fill.source}: optimizer type {json.dumps(kind)} is not supported; the "
                                       f"engine trains with AdamW (set \"type\": \"AdamW\")")
    params = section.setdefault("params", {})
    for key, value, flag in (("lr", optimization.learning_rate, "--learning_rate"),
                             ("betas", [optimization.adam_beta1, optimization.adam_beta2], "--adam_beta1/--adam_beta2"),
                             ("eps", optimization.adam_epsilon, "--adam_epsilon"),
                             ("weight_decay", optimization.weight_decay, "--weight_decay")):
        fill(key, value, flag, section=params, prefix="optimizer.params.")


def check_scheduler_section(section: dict | None, optimization, fill: Filler) -> None:
    if section is None:
        return
    fill("type", SCHEDULERS[optimization.lr_scheduler_type], f"--lr_scheduler_type {optimization.lr_scheduler_type}",
         section=section, prefix="scheduler.")
    params = section.setdefault("params", {})
    fill("warmup_min_lr", 0, "the schedule (warmup starts at 0)", section=params, prefix="scheduler.params.")
    fill("warmup_max_lr", optimization.learning_rate, "--learning_rate", section=params, prefix="scheduler.params.")
    # Total steps are known here only when --max_steps is given (otherwise they follow from the data).
    if optimization.max_steps > 0:
        fill("total_num_steps", optimization.max_steps, "--max_steps", section=params, prefix="scheduler.params.")
        fill("warmup_num_steps", warmup_steps(optimization, optimization.max_steps), "--warmup_steps/--warmup_ratio",
             section=params, prefix="scheduler.params.")
    else:
        for key in ("total_num_steps", "warmup_num_steps"):
            require(params.get(key, "auto") == "auto",
                    f"{fill.source}: scheduler.params.{key} must be \"auto\" unless --max_steps is given")
