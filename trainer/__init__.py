"""trainer: train transformer language models on one CPU, one GPU, a node or a Slurm cluster, with the same answers."""

__version__ = "0.1.0"
