"""trainer: train transformer language models on one CPU, one GPU, a node or a Slurm cluster, with the same answers."""
import logging

__version__ = "0.1.0"


def quiet_torchao_import() -> None:
    """torchao (--optim adamw_torch_8bit/4bit) is imported by transformers' quantizers and peft as soon as it is
    installed, so before any job has set up its logging. Its import says, on a CPU build of torch, that each CUDA
    kernel library it ships fails to load (the optimizers need none), and torch's pytree calls the way it registers
    two enums deprecated: warnings for torchao's developers, not for a user, printed in every job's first lines."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").addFilter(
        lambda record: "is an Enum subclass and is now natively supported" not in record.getMessage())


quiet_torchao_import()
