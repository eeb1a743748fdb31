"""Weighted mixtures of training sources: how many samples of each source a global batch holds, and in which of
its positions ("slots").

The layout depends on the weights and the global batch size G alone (never on the world size, the per-device batch
or accumulation), and is the same for every step, so:
- every step holds exactly `counts[i]` samples of source i: the per-source figures are exact, not expected values;
- the global batch is sharded across ranks and micro-steps after it is composed, so the samples of a step are the
  same at any world size;
- a source's position is the samples taken from it (steps done x counts[i]): nothing drawn at random; the data
  source saves it with the figures (trainer.data.source).

Hand-written: `datasets.interleave_datasets` mixes by probability, so a source's share varies from batch to batch
and depends on how the stream is split across ranks.

Source 0 is the primary source: the one whose passes count as the job's epochs (in the `GlobalBatchSampler`'s
shuffled order). Sources 1.. are `CyclingSource`s (trainer.data.samplers): each in a fresh seeded order per pass,
cycling forever. They take spread-out slots (the centres of equal parts of the batch, then of the slots left),
source 0 the rest. The engine trains on the sources' prepared data one after another (`training_data`), source 0's
first. Experience replay (trainer/continual/replay.py) is the last source, with a fixed count; with two sources,
source 1's layout is replay's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from trainer.continual.replay import describe_replay
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


# --------------------------------------------------------------------------- the sources of a job, and their counts
@dataclass(frozen=True)
class MixtureSource:
    """One training source as the command line gives it: its name (what the log and all_results.json call it) and
    how its share of a global batch is set, by weight among the --train_files sources or, for experience replay,
    as a fixed fraction of the batch (--replay_ratio)."""

    name: str
    weight: float = 1.0
    replay_ratio: Optional[float] = None


def mixture_sources(config) -> list[MixtureSource]:
    """A job's training sources (from its JobConfig's data and continual sections), in mixture order:
    --train_files' (or the one of --train_file, --dataset_name or the embedded demo), then --replay_file's. Names
    are made distinct, for the per-source figures."""
    data, continual = config.data, config.continual
    sources = [MixtureSource(source.pattern, source.weight) for source in data.train_sources()] or [
        MixtureSource(data.train_file or data.dataset_name or "the embedded demo data")]
    if continual.replay_file is not None:
        sources.append(MixtureSource(continual.replay_file, replay_ratio=continual.replay_ratio))
    names = [source.name for source in sources]
    return [MixtureSource(name if names.index(name) == index else f"{name} (source {index})", source.weight,
                          source.replay_ratio) for index, (name, source) in enumerate(zip(names, sources))]


def mixture_counts(sources: list[MixtureSource], global_batch_size: int) -> list[int]:
    """Samples of each source per global batch: the replay source's round(R x G) first (as experience replay
    always had it), the rest shared by weight among the others (`source_counts`)."""
    replayed = [replay_count(source.replay_ratio, global_batch_size) for source in sources
                if source.replay_ratio is not None]
    weighted = [source for source in sources if source.replay_ratio is None]
    return source_counts([source.weight for source in weighted], global_batch_size - sum(replayed),
                         [source.name for source in weighted]) + replayed


def replay_count(ratio: float, global_batch_size: int) -> int:
    """Replay samples in a global batch of `global_batch_size`: round(ratio x G), halves up; at least 1, below G."""
    count = round_half_up(ratio * global_batch_size)
    require(0 < count < global_batch_size,
            f"--replay_ratio {ratio} of a global batch of {global_batch_size} sequences (per-device batch x processes "
            f"x accumulation) gives {count} replay samples per step; use a --replay_ratio from "
            f"{0.5 / global_batch_size:.4g} to below {1 - 0.5 / global_batch_size:.4g}, or a larger batch")
    return count


def describe_sources(sources: list[MixtureSource], counts: list[int], sizes: list[str]) -> list[str]:
    """For the start-up log, with several sources: each source's share of every global batch and its size (as the
    data source gives it, e.g. "50 sequences"); nothing for one source."""
    if len(sources) == 1:
        return []
    global_batch_size, lines = sum(counts), []
    for index, (source, count, size) in enumerate(zip(sources, counts, sizes)):
        if source.replay_ratio is not None:
            lines.append(describe_replay(source.replay_ratio, size, count, global_batch_size))
            continue
        role = "primary: its passes are the epochs" if index == 0 else "cycled, a fresh seeded order per pass"
        lines.append(f"source {source.name}: {count} of the {global_batch_size} sequences of every step "
                     f"(weight {source.weight:g}), {size}; {role}")
    return lines


def training_data(train_dataset, other_datasets: list, columns=None):
    """What the engine trains on: the primary source's samples, then each other source's (same columns and types)."""
    if not other_datasets:
        return train_dataset
    import datasets

    columns = columns or train_dataset.column_names  # the job prepared all the same way: the same columns
    train = train_dataset.select_columns(columns)
    others = [other.select_columns(columns) for other in other_datasets]
    # e.g. int32 against int64 token ids: one Arrow schema for all
    others = [other if other.features == train.features else other.cast(train.features) for other in others]
    return datasets.concatenate_datasets([train, *others])
