"""Every name inside an output directory and its checkpoint directories, defined once.

`python -m trainer.layout` prints them as shell assignments, for `slurm/common.sh` to `eval`.
"""
from __future__ import annotations

import re

# ------------------------------------------------------------------------------------------ checkpoint-<n>/
PREFIX = "checkpoint-"
CHECKPOINT_NAME = re.compile(rf"^{PREFIX}(\d+)$")
COMPLETE_MARKER = "checkpoint_complete"
STATE_FILE = "trainer_state.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"  # what peft's save_pretrained writes

# ------------------------------------------------------------------------------------------- output_dir/
FISHER_FILE = "ewc_fisher.safetensors"  # "fisher/<name>" and "anchor/<name>" tensors
ADAPTER_MANIFEST_FILE = "bottleneck_adapters.json"  # bottleneck adapters (trainer/finetune/adapters.py)
ADAPTER_WEIGHTS_FILE = "bottleneck_adapters.safetensors"
HISTORY_FILE = "log_history.jsonl"  # every logged number (trainer/tracking/history.py)
TENSORBOARD_DIR = "runs"  # TensorBoard's event files (trainer/tracking/tensorboard.py)
WANDB_DIR = "wandb"  # W&B's run files, unless $WANDB_DIR is set (trainer/tracking/wandb_tracker.py)
