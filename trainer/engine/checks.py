"""The checks across sections of the command line, all in one place. A check within one section is that section's
`__post_init__` (e.g. --bf16 against --fp16); these need two sections, or the number of processes."""
from __future__ import annotations

from trainer.config.job_config import JobConfig
from trainer.data.samplers import replay_count
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
    """Once the processes are known, before any data is prepared: --replay_ratio leaves samples of both kinds in
    a global batch."""
    if config.continual.replay_ratio is not None:
        replay_count(config.continual.replay_ratio, config.optimization.global_batch_size(world_size))
