"""The checks across sections of the command line, all in one place. A check within one section is that section's
`__post_init__` (e.g. --bf16 against --fp16); these need two sections, or the number of processes."""
from __future__ import annotations

from trainer.config.job_config import JobConfig
from trainer.data.mixture import mixture_counts, mixture_sources
from trainer.distributed.launch import deepspeed_requested
from trainer.errors import require


def check_sections(config: JobConfig) -> None:
    """Before the processes start."""
    finetune = config.get("finetune")
    require(finetune is None or not (finetune.finetune_strategy == "gradual_unfreeze"
                                     and deepspeed_requested(config.parallelism)),
            "--finetune_strategy gradual_unfreeze masks gradients between the backward pass and the update, which "
            "DeepSpeed performs inside its own step; run it without DeepSpeed (DDP) or choose another strategy")


def check_with_processes(config: JobConfig, world_size: int) -> None:
    """Once the processes are known, before any data is prepared: the --train_files weights and --replay_ratio
    leave at least one sample of every training source in a global batch."""
    mixture_counts(mixture_sources(config), config.optimization.global_batch_size(world_size))
