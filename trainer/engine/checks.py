"""The checks across sections of the command line, all in one place. A check within one section is that section's
`__post_init__` (e.g. --bf16 against --fp16); these need two sections, or the number of processes."""
from __future__ import annotations

from trainer.config.job_config import JobConfig
from trainer.data.arguments import url_needs_streaming
from trainer.data.mixture import mixture_counts, mixture_sources
from trainer.distributed.launch import deepspeed_requested
from trainer.errors import require


def check_sections(config: JobConfig) -> None:
    """Before the processes start."""
    check_streaming(config)
    finetune = config.get("finetune")
    require(finetune is None or not (finetune.finetune_strategy == "gradual_unfreeze"
                                     and deepspeed_requested(config.parallelism)),
            "--finetune_strategy gradual_unfreeze masks gradients between the backward pass and the update, which "
            "DeepSpeed performs inside its own step; run it without DeepSpeed (DDP) or choose another strategy")


def check_with_processes(config: JobConfig, world_size: int) -> None:
    """Once the processes are known, before any data is prepared: the --train_files weights and --replay_ratio
    leave at least one sample of every training source in a global batch."""
    mixture_counts(mixture_sources(config), config.optimization.global_batch_size(world_size))


def check_streaming(config: JobConfig) -> None:
    """--streaming: the run's length is --max_steps, and what needs the whole training set up front is refused.
    Without it, the replay data is a local file (the data section checks its own files)."""
    if not config.data.streaming:
        url_needs_streaming("replay_file", config.continual.replay_file)
        return
    require(config.optimization.max_steps > 0, "--streaming needs --max_steps: a stream's length is not known "
                                               "up front, so it cannot set the number of steps")
    require(config.get("classify") is None, "--streaming is for trainer.mlm and trainer.clm; trainer.classify reads "
                                            "its (labelled) data map-style: drop --streaming")
    continual = config.continual
    require(not continual.save_fisher, "--save_fisher reads the first training samples after training, which a "
                                       "stream does not keep; drop --streaming or --save_fisher")
    finetune = config.get("finetune")
    require(finetune is None or finetune.finetune_strategy != "gradual_unfreeze" or finetune.unfreeze_unit != "epochs",
            "--unfreeze_unit epochs: a stream's lanes are in different passes at any one time; use --unfreeze_unit "
            "steps with --streaming")
