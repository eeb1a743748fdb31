"""Every name inside an output directory and its checkpoint directories, defined once.

    output_dir/
        model.safetensors, config, tokenizer     the final model (save_pretrained)
        all_results.json                         the final metrics
        log_history.jsonl                        every logged number, one JSON object per log line
        runs/                                    TensorBoard event files
        predictions.jsonl                        classify --do_predict: the test set's predictions
        merged/                                  --merge_adapters: the LoRA adapters merged into the base model
        ewc_fisher.safetensors                   --save_fisher: Fisher information and anchor, for --ewc_from
        bottleneck_adapters.json, .safetensors   --finetune_strategy adapter: manifest and weights
        README.md                                --push_to_hub: the model card
        .hub_snapshot/                           --push_to_hub: hard-linked checkpoints while they upload
        checkpoint-<step>/                       (checkpoint-<step>.tmp/ while it is written)
            model.safetensors (adapter_model.safetensors for peft), config, tokenizer
            trainer_state.json                   step, data position, metrics, best checkpoint, arguments
            optimizer.pt, scheduler.pt, scaler.pt
            rank-<r>.pt                          each rank's RNG states and open logging window
            deepspeed/ or fsdp/                  sharded model + optimizer state (instead of optimizer.pt)
            checkpoint_complete                  written last

A prepared data directory (`python -m trainer.prepare --output_dir DIR`, see trainer/data/prepared.py):

    DIR/                                     (DIR.tmp/ while it is written; DIR.replaced/ as it replaces one)
        prepared_data.json                   the manifest, written last
        tokenizer files                      save_pretrained of the tokenizer
        train/shard-<i>/, validation/shard-<i>/    datasets save_to_disk of each process's shard
        .tokenized/                          while it is written: each process's token rows, before chunking

`python -m trainer.layout` prints the names as shell assignments (TRAINER_LAYOUT_<NAME>=value), which
slurm/common.sh evaluates.
"""
from __future__ import annotations

import re
import shlex

# ------------------------------------------------------------------------------------------------ output_dir/
RESULTS_FILE = "all_results.json"
LOG_HISTORY_FILE = "log_history.jsonl"
TENSORBOARD_DIR = "runs"
PREDICTIONS_FILE = "predictions.jsonl"
MERGED_DIR = "merged"
FISHER_FILE = "ewc_fisher.safetensors"  # "fisher/<name>" and "anchor/<name>" tensors
ADAPTER_MANIFEST_FILE = "bottleneck_adapters.json"  # bottleneck adapters (trainer/finetune/adapters.py)
ADAPTER_WEIGHTS_FILE = "bottleneck_adapters.safetensors"
MODEL_CARD_FILE = "README.md"
HUB_SNAPSHOT_DIR = ".hub_snapshot"

# ------------------------------------------------------------------------------------------ checkpoint-<step>/
PREFIX = "checkpoint-"
CHECKPOINT_NAME = re.compile(rf"^{PREFIX}(\d+)$")
TEMPORARY_SUFFIX = ".tmp"  # checkpoint-<step>.tmp: a checkpoint being written
COMPLETE_MARKER = "checkpoint_complete"
STATE_FILE = "trainer_state.json"
MODEL_WEIGHTS_FILE = "model.safetensors"  # what transformers' save_pretrained writes
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"  # what peft's save_pretrained writes
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
TORCH_STATE_FILES = "*.pt"  # the files above and rank-<r>.pt: resumption state, never pushed to the Hub
DEEPSPEED_STATE_DIR = "deepspeed"
FSDP_STATE_DIR = "fsdp"


# ------------------------------------------------------------------------------ prepared data (trainer.prepare)
PREPARED_MANIFEST_FILE = "prepared_data.json"
PREPARED_ROWS_DIR = ".tokenized"  # removed before the directory gets its final name
REPLACED_SUFFIX = ".replaced"  # DIR.replaced: the data --overwrite_output_dir replaces, removed once DIR is new


def prepared_shard_dir(split: str, index: int) -> str:
    return f"{split}/shard-{index:05d}"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step}"


def rank_state_file(rank: int) -> str:
    return f"rank-{rank}.pt"


def shell_assignments() -> str:
    """Every name above as `TRAINER_LAYOUT_<NAME>=value`, one a line, quoted for the shell."""
    names = {name: value for name, value in globals().items() if name.isupper() and isinstance(value, str)}
    return "".join(f"TRAINER_LAYOUT_{name}={shlex.quote(value)}\n" for name, value in names.items())


if __name__ == "__main__":
    print(shell_assignments(), end="")
