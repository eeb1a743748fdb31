"""What a job hands the engine (`Task`) and what an evaluation gives back (`EvalOutput`)."""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class Task:
    """What a job gives the engine."""

    model: torch.nn.Module  # forward(**batch) -> {"loss_sum": Tensor, optional "predictions": Tensor}
    train_dataset: object  # datasets.Dataset; None under --streaming
    eval_dataset: object
    train_collator: Callable  # columnar batch (with its "epoch") -> tensors + "num_loss_items"
    eval_collator: Callable
    compute_metrics: Callable[["EvalOutput"], dict]
    hf_model: torch.nn.Module  # the transformers model inside `model`, saved with save_pretrained
    tokenizer: object
    columns: Optional[list[str]] = None  # dataset columns the collators read (None: all)
    # Rank 0, after each evaluation, e.g. probes; what it returns (e.g. generated text) is logged with the step.
    after_evaluation: Optional[Callable[[torch.nn.Module], Optional[dict]]] = None
    main_metric: str = "eval_loss"  # the default --metric_for_best_model
    # Training FLOPs per token at a given sequence length, for MFU (default: every head position computed).
    flops_per_token: Optional[Callable[[float], float]] = None
    # Per training sample, then per sample of each other source; given: length-grouped batches.
    train_lengths: Optional[list[int]] = None
    # Called on every rank after the backward passes of a step, before clipping and the update (which skips
    # parameters whose .grad is None): e.g. gradual unfreezing masks the gradients of still-frozen layers.
    # Called as before_optimizer_step(step, epoch): the optimizer steps done and the data source's epoch.
    before_optimizer_step: Optional[Callable[[int, int], None]] = None
    # Modules whose tensor shapes follow the data (e.g. mlm's last layer on the masked rows): --torch_compile leaves
    # them eager, so that the compiled blocks never see a new shape.
    eager_modules: list = field(default_factory=list)
    # The training sources after the primary (trainer.data.mixture): --train_files' others, then experience replay's
    # --replay_file (trainer.continual.replay), each prepared exactly as `train_dataset` (same columns); under
    # --streaming, each a TrainStream as `train_stream`.
    other_sources: list = field(default_factory=list)
    # On every rank after training, given the engine: the job's own after-steps (e.g. predictions on a test set);
    # a dict it returns joins the final metrics.
    after_training: Optional[Callable[[object], Optional[dict]]] = None
    # --streaming: the training data as a trainer.data.streaming.TrainStream instead of `train_dataset`.
    train_stream: object = None


@dataclass
class EvalOutput:
    loss_sum: float  # summed over every evaluation item of every rank
    num_items: int
    predictions: Optional[dict] = None  # sample id -> prediction, gathered from all ranks

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.num_items, 1)


def perplexity_metrics(count_name: str):
    """compute_metrics for a language model: mean loss per predicted token, its perplexity, and how many tokens
    (`count_name`) the exact float64 sums of the engine's evaluation counted."""

    def compute(output: EvalOutput) -> dict:
        return {"loss": output.mean_loss, "perplexity": math.exp(min(output.mean_loss, 700.0)),
                count_name: output.num_items}

    return compute
