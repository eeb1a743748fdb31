"""Weighted mixtures of training sources: how many samples of each source a global batch holds, and in which of
its positions ("slots").

The layout depends on the weights and the global batch size G alone (never on the world size, the per-device batch
or accumulation), and is the same for every step, so:
- every step holds exactly `counts[i]` samples of source i: the per-source figures are exact, not expected values;
- the global batch is sharded across ranks and micro-steps after it is composed, so the samples of a step are the
  same at any world size;
- a source's position is (steps done) x counts[i]: nothing to draw at random, nothing extra to save.

Hand-written: `datasets.interleave_datasets` mixes by probability, so a source's share varies from batch to batch
and depends on how the stream is split across ranks.

Source 0 is the primary source: the one whose passes count as the job's epochs. Sources 1.. take spread-out slots
(the centres of equal parts of the batch, then of the slots left), source 0 the rest. With two sources, source 1 is
experience replay's layout (trainer/continual/replay.py).
"""
from __future__ import annotations

import math

import torch

from trainer.errors import require


def round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def source_counts(weights: list[float], global_batch_size: int, names: list[str] | None = None) -> list[int]:
    """Samples of each source per global batch: round(w_i / sum(w) x G), halves up, for sources 1.., at least one
    each, and the rest (at least one) for source 0."""
    total = sum(weights)
    names = names or [f"source {i}" for i in range(len(weights))]
    others = [round_half_up(weight / total * global_batch_size) for weight in weights[1:]]
    for name, weight, count in zip(names[1:], weights[1:], others):
        require(count >= 1, f"{name} has weight {weight:g} of {total:g}: less than half a sample of a global batch "
                            f"of {global_batch_size} sequences (per-device batch x processes x accumulation); give "
                            f"it a larger weight or use a larger batch")
    first = global_batch_size - sum(others)
    require(first >= 1, f"the weights leave no sample of {names[0]} in a global batch of {global_batch_size} "
                        f"sequences; give it a larger weight or use a larger batch")
    return [first, *others]


def spread_slots(size: int, count: int) -> torch.Tensor:
    """`count` of the positions 0..size-1, spread out: the centres of `count` equal parts (distinct for
    count <= size)."""
    return (torch.arange(count) * 2 + 1) * size // (2 * count)


def slot_sources(counts: list[int]) -> torch.Tensor:
    """The source of each slot of a global batch of sum(counts) samples (see the module docstring)."""
    size = sum(counts)
    owner = torch.zeros(size, dtype=torch.long)
    free = torch.arange(size)
    for source, count in enumerate(counts[1:], start=1):
        taken = free[spread_slots(len(free), count)]
        owner[taken] = source
        keep = torch.ones(len(free), dtype=torch.bool)
        keep[spread_slots(len(free), count)] = False
        free = free[keep]
    return owner
