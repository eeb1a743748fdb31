"""The global sample order, sharded across ranks: the same samples per optimizer step at every world size
(`GlobalBatchSampler`, `group_by_length`), the other sources of a mixture (`CyclingSource`: what a mixture is and why
it is hand-written: trainer/data/mixture.py; experience replay is one: trainer/continual/replay.py), and the evaluation
shards.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from trainer.data.mixture import slot_sources


class GlobalBatchSampler:
    """Shards one global sample order across ranks: the same samples per optimizer step at every world size.

    Epoch `e` visits `randperm(len(dataset))` seeded by `seed + e`. Optimizer step `s` of the epoch takes the
    `global_batch_size = per_device_batch * world_size * accumulation` samples at positions
    `[s * global_batch_size, (s + 1) * global_batch_size)`; micro-step `m` gives rank `r` the
    `per_device_batch` samples at offset `(m * world_size + r) * per_device_batch` inside it. The samples of
    an incomplete final global batch are dropped, so 1 process x batch 16 and 2 processes x batch 4 x
    accumulation 2 see exactly the same samples in every step. Positions are counted in samples, so a
    resumed run may change world size and still continue the same order.

    With `lengths` (one per sample), batches are length-grouped: see `group_by_length`. The grouping works on
    the global order alone, so it keeps every property above.

    With `others` (`CyclingSource`s: a weighted mixture, trainer.data.mixture, or experience replay), each global
    batch holds `per_step` samples of each of them (indices after the dataset's) in the slots of `slot_sources`, and
    the rest (`counts[0]`) of the epoch's order, which then advances by `counts[0]` a step; the global batch is
    composed before it is sharded, so the properties above hold for mixtures too.
    """

    def __init__(self, dataset_size: int, per_device_batch_size: int, world_size: int, rank: int,
                 accumulation_steps: int, seed: int, shuffle: bool = True, lengths=None, others=()):
        self.dataset_size = dataset_size
        self.per_device_batch_size = per_device_batch_size
        self.world_size = world_size
        self.rank = rank
        self.accumulation_steps = accumulation_steps
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = None if lengths is None else torch.as_tensor(lengths)  # the other sources' lengths after
        self.others = list(others)
        self.counts = [self.global_batch_size - sum(other.per_step for other in self.others),
                       *(other.per_step for other in self.others)]
        self.slots = slot_sources(self.counts)
        self.recent_orders: dict[int, torch.Tensor] = {}  # the last epochs' orders: the loader and advance() read them

    @property
    def global_batch_size(self) -> int:
        return self.per_device_batch_size * self.world_size * self.accumulation_steps

    @property
    def primary_per_step(self) -> int:
        """Samples of the dataset (the primary source) in each global batch."""
        return self.counts[0]

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_size // self.primary_per_step

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch not in self.recent_orders:
            self.recent_orders = {e: order for e, order in self.recent_orders.items() if e == epoch - 1}
            self.recent_orders[epoch] = self.shuffled_order(epoch)
        return self.recent_orders[epoch]

    def shuffled_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        order = torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(self.seed + epoch))
        if self.lengths is not None:
            order = group_by_length(order, self.lengths, self.primary_per_step, seed=self.seed + epoch)
        return order

    def remaining_steps(self, start_sample: int) -> int:
        """Optimizer steps left in an epoch from position `start_sample` of its order."""
        return (self.steps_per_epoch * self.primary_per_step - start_sample) // self.primary_per_step

    def __iter__(self):
        """The first epoch's micro-batches of this rank (the engine iterates over `batches` of every epoch)."""
        return self.batches(0)

    def step_samples(self, epoch: int, start_sample: int, positions=()) -> list[torch.Tensor]:
        """The samples of one optimizer step, by source: the primary's at `start_sample` of `epoch`'s order, each
        other source's at its stream position (`positions`, in `others`' order)."""
        primary = self.epoch_order(epoch)[start_sample:start_sample + self.primary_per_step]
        return [primary, *(other.indices(position, other.per_step)
                           for other, position in zip(self.others, positions, strict=True))]

    def batches(self, epoch: int, start_sample: int = 0, positions=None):
        """This rank's micro-batches (index lists) of `epoch`, from position `start_sample` of its global order
        (and `positions` of the other sources' streams: none drawn yet when unset)."""
        positions = [0] * len(self.others) if positions is None else list(positions)
        micro = self.per_device_batch_size
        for step in range(self.remaining_steps(start_sample)):
            at = [position + step * count for position, count in zip(positions, self.counts[1:])]
            batch = self.mixed(self.step_samples(epoch, start_sample + step * self.primary_per_step, at))
            for micro_step in range(self.accumulation_steps):
                start = (micro_step * self.world_size + self.rank) * micro
                yield batch[start:start + micro].tolist()

    def mixed(self, samples: list[torch.Tensor]) -> torch.Tensor:
        """One global batch of the sources' `samples` (see `mixed_global_batch`). A single source's batches are
        already length-grouped by its epoch order: they are kept as they are."""
        return mixed_global_batch(samples, self.slots, self.lengths if self.others else None)


def mixed_global_batch(samples: list[torch.Tensor], slots: torch.Tensor, lengths=None) -> torch.Tensor:
    """One global batch: source i's `samples[i]` in order in its `slots` (trainer.data.mixture.slot_sources). With
    `lengths` (length-grouped batches), sorted longest first (stable), so that each micro-batch, a contiguous slice,
    holds similar lengths."""
    batch = torch.empty(len(slots), dtype=torch.long)
    for source, indices in enumerate(samples):
        batch[slots == source] = indices
    if lengths is not None:
        batch = batch[torch.argsort(lengths[batch], descending=True, stable=True)]
    return batch


def group_by_length(order: torch.Tensor, lengths: torch.Tensor, global_batch_size: int, seed: int,
                    batches_per_group: int = 50) -> torch.Tensor:
    """Reorder a shuffled epoch so that each batch holds samples of similar length (less padding).

    The shuffled order is cut into mega-chunks of `batches_per_group` global batches; each chunk is sorted by
    length (longest first, stable), then its global batches are shuffled among themselves so that steps do not
    run long-to-short in a saw-tooth. Every micro-batch is a contiguous slice of a sorted global batch, so it is
    length-homogeneous too. Only the global batch size enters (never the per-device batch or world size), so
    step `s` gets the same samples on 1 or N processes; a fresh permutation per epoch keeps epochs different.
    """
    generator = torch.Generator().manual_seed(seed)
    chunk = global_batch_size * batches_per_group
    grouped = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[torch.argsort(lengths[part], descending=True, stable=True)]
        whole = (len(part) // global_batch_size) * global_batch_size  # the ragged tail stays last (dropped)
        batches = part[:whole].view(-1, global_batch_size)
        batches = batches[torch.randperm(len(batches), generator=generator)]
        grouped.extend([batches.reshape(-1), part[whole:]])
    return torch.cat(grouped)


def shard_for_evaluation(dataset_size: int, world_size: int, rank: int) -> range:
    """A contiguous, disjoint slice of the evaluation set per rank: every sample counted exactly once."""
    per_rank, extra = divmod(dataset_size, world_size)
    start = rank * per_rank + min(rank, extra)
    return range(start, start + per_rank + (1 if rank < extra else 0))


# ---------------------------------------------------------- the other sources of a mixture (trainer.data.mixture)
MIXTURE_SEED_KEY = 0x5E_7A_9  # keeps the sources' permutations apart from every other seeded stream; source s
# draws with MIXTURE_SEED_KEY + s - 1, so source 1 draws as experience replay (then the only other source) always did


@functools.lru_cache(maxsize=8)
def source_permutation(size: int, seed: int, source: int, source_pass: int) -> torch.Tensor:
    """A source's order in pass `source_pass` over it (cached: consecutive steps read the same pass of each)."""
    rng = np.random.default_rng([seed, MIXTURE_SEED_KEY + source - 1, source_pass])
    return torch.from_numpy(rng.permutation(size))


@dataclass(frozen=True)
class CyclingSource:
    """A training source after the primary: `per_step` samples of every global batch, in a seeded order that is a
    fresh permutation per pass over the source and cycles forever, independently of the primary's epochs: position
    p of its stream is sample `permutation(p // size)[p % size]`."""

    first_index: int  # the source's first index in the engine's training data (the sources before it come first)
    size: int  # its samples
    per_step: int  # its samples in every global batch (trainer.data.mixture.mixture_counts)
    seed: int
    source: int = 1  # its place in the mixture (1..): each source has its own permutations

    def indices(self, position: int, count: int) -> torch.Tensor:
        """Training-data indices of stream positions [position, position + count), across passes if need be."""
        parts = []
        while count > 0:
            source_pass, offset = divmod(position, self.size)
            taken = min(count, self.size - offset)
            parts.append(source_permutation(self.size, self.seed, self.source, source_pass)[offset:offset + taken])
            position, count = position + taken, count - taken
        return torch.cat(parts) + self.first_index
