"""The global sample order, sharded across ranks: the same samples per optimizer step at every world size
(`GlobalBatchSampler`, `group_by_length`), the replay stream mixed into it (what experience replay is and why it is
hand-written: trainer/continual/replay.py), and the evaluation shards.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from trainer.errors import require


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

    With `replay` (a `ReplayStream`), each global batch holds `replay_per_step` samples of the replay stream
    (indices after the dataset's) and `new_per_step` of the epoch's order, which then advances by `new_per_step` a step;
    the global batch is composed before it is sharded, so the properties above hold with replay too.
    """

    def __init__(self, dataset_size: int, per_device_batch_size: int, world_size: int, rank: int,
                 accumulation_steps: int, seed: int, shuffle: bool = True, lengths=None, replay=None):
        self.dataset_size = dataset_size
        self.per_device_batch_size = per_device_batch_size
        self.world_size = world_size
        self.rank = rank
        self.accumulation_steps = accumulation_steps
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = None if lengths is None else torch.as_tensor(lengths)  # replay samples' lengths after
        self.replay = replay
        self.replay_per_step = 0 if replay is None else replay_count(replay.ratio, self.global_batch_size)

    @property
    def global_batch_size(self) -> int:
        return self.per_device_batch_size * self.world_size * self.accumulation_steps

    @property
    def new_per_step(self) -> int:
        """Samples of the dataset (not of the replay stream) in each global batch."""
        return self.global_batch_size - self.replay_per_step

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_size // self.new_per_step

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        order = torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(self.seed + epoch))
        if self.lengths is not None:
            order = group_by_length(order, self.lengths, self.new_per_step, seed=self.seed + epoch)
        return order

    def remaining_steps(self, start_sample: int) -> int:
        """Optimizer steps left in an epoch from position `start_sample` of its order."""
        return (self.steps_per_epoch * self.new_per_step - start_sample) // self.new_per_step

    def __iter__(self):
        """The first epoch's micro-batches of this rank (the engine iterates over `batches` of every epoch)."""
        return self.batches(0)

    def batches(self, epoch: int, start_sample: int = 0, replay_position: int = 0):
        """This rank's micro-batches (index lists) of `epoch`, from position `start_sample` of its global order
        (and `replay_position` of the replay stream)."""
        order = self.epoch_order(epoch)
        micro, new = self.per_device_batch_size, self.new_per_step
        for step in range(self.remaining_steps(start_sample)):
            step_start = start_sample + step * new
            batch = order[step_start:step_start + new]
            if self.replay is not None:
                replayed = self.replay.indices(replay_position + step * self.replay_per_step, self.replay_per_step)
                batch = mixed_global_batch(batch, replayed, self.lengths)
            for micro_step in range(self.accumulation_steps):
                start = (micro_step * self.world_size + self.rank) * micro
                yield batch[start:start + micro].tolist()


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


# ------------------------------------------------------------- experience replay (see trainer/continual/replay.py)
REPLAY_SEED_KEY = 0x5E_7A_9  # keeps the replay permutations' random draws apart from every other seeded stream


def replay_count(ratio: float, global_batch_size: int) -> int:
    """Replay samples in a global batch of `global_batch_size`: round(ratio x G), halves up; at least 1, below G."""
    count = math.floor(ratio * global_batch_size + 0.5)
    require(0 < count < global_batch_size,
            f"--replay_ratio {ratio} of a global batch of {global_batch_size} sequences (per-device batch x processes "
            f"x accumulation) gives {count} replay samples per step; use a --replay_ratio from "
            f"{0.5 / global_batch_size:.4g} to below {1 - 0.5 / global_batch_size:.4g}, or a larger batch")
    return count


def replay_slots(global_batch_size: int, count: int) -> torch.Tensor:
    """The positions of the `count` replay samples in a global batch: the centres of `count` equal parts of it.

    Spread out, so that every rank and micro-batch gets its share; the gaps exceed one slot (count < G), so the
    positions are distinct."""
    return (torch.arange(count) * 2 + 1) * global_batch_size // (2 * count)


@functools.lru_cache(maxsize=2)
def replay_permutation(size: int, seed: int, replay_pass: int) -> torch.Tensor:
    """The replay set's order in pass `replay_pass` over it (cached: consecutive steps read the same pass)."""
    rng = np.random.default_rng([seed, REPLAY_SEED_KEY, replay_pass])
    return torch.from_numpy(rng.permutation(size))


@dataclass(frozen=True)
class ReplayStream:
    """The replay samples in their seeded, endlessly cycling order (see the module docstring)."""

    first_index: int  # the replay samples' first index in the engine's training data (= the new samples' count)
    size: int  # replay samples
    ratio: float  # --replay_ratio
    seed: int

    def indices(self, position: int, count: int) -> torch.Tensor:
        """Training-data indices of stream positions [position, position + count), across passes if need be."""
        parts = []
        while count > 0:
            replay_pass, offset = divmod(position, self.size)
            taken = min(count, self.size - offset)
            parts.append(replay_permutation(self.size, self.seed, replay_pass)[offset:offset + taken])
            position, count = position + taken, count - taken
        return torch.cat(parts) + self.first_index


def mixed_global_batch(new: torch.Tensor, replayed: torch.Tensor, lengths=None) -> torch.Tensor:
    """One global batch: `new` samples in order, `replayed` in the `replay_slots`. With `lengths` (length-grouped
    batches), sorted longest first (stable), so that each micro-batch, a contiguous slice, holds similar lengths."""
    size = len(new) + len(replayed)
    is_replay = torch.zeros(size, dtype=torch.bool)
    is_replay[replay_slots(size, len(replayed))] = True
    batch = torch.empty(size, dtype=new.dtype)
    batch[is_replay], batch[~is_replay] = replayed, new
    if lengths is not None:
        batch = batch[torch.argsort(lengths[batch], descending=True, stable=True)]
    return batch
