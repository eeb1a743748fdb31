"""Experience replay: a fixed share of every global batch comes from an earlier task's data (`--replay_file`).

Any job can use it: the job prepares the replay file exactly as its training file (same tokenization, blocks,
masking columns, label mapping) and hands it to the engine as `Task.replay_dataset`. The engine trains on one
dataset, the training samples (indices 0..N-1) followed by the replay samples (N..N+M-1), and its
`GlobalBatchSampler` builds each global batch of G samples from G - r new samples (the epoch's shuffled order, as
without replay) and r replay samples from a `ReplayStream`:

- r = round(R x G), halves rounded up, for `--replay_ratio R` and G = per-device batch x processes x
  accumulation; it must leave at least one sample of each kind, so R must lie in [0.5 / G, 1 - 0.5 / G).
- The replay stream is the replay set in a seeded permutation, a fresh one per pass over it, cycling forever and
  independently of the new data's epochs: position p of the stream is sample `permutation(p // M)[p % M]`.
  Its position (replay samples drawn so far) is the data source's `replay_position` (trainer.data.source), saved in
  every checkpoint.
- The r replay samples take r evenly spaced slots of the global batch (`replay_slots`), a layout that depends on
  G and r alone; the global batch is then sharded across ranks and micro-steps exactly as without replay, so
  the samples of every optimizer step are the same at any world size and accumulation.
- Epochs and steps per epoch count the new data only: an epoch is N // (G - r) steps.

Hand-written: `datasets.interleave_datasets` mixes by probability (the share varies from batch to batch) and
torch has no mixing sampler; neither gives a fixed share per global batch, an order independent of ranks and
micro-steps, and a position that a checkpoint saves and restores exactly.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from trainer.errors import require

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


# ------------------------------------------------------------------------------------------------ the jobs' side
def load_replay_file(path: str | None, columns: list[str], keep_linebreaks: bool = False):
    """The raw `--replay_file` `path` as a Dataset (None without one), checked to have the training data's `columns`
    (text, text pair, label: what the job reads of a training row)."""
    from trainer.data.loading import load_file

    if not path:
        return None
    replay = load_file(path, "replay_file", keep_linebreaks=keep_linebreaks)
    missing = [column for column in columns if column not in replay.column_names]
    require(not missing, f"--replay_file {path} has no column {', '.join(repr(c) for c in missing)} (its columns: "
                         f"{', '.join(replay.column_names)}); the replay data needs the training data's columns "
                         f"({', '.join(columns)})")
    require(len(replay) > 0, f"--replay_file {path} has no rows")
    return replay


def replay_split(processed, path: str | None):
    """The prepared "replay" split of a job's DatasetDict (see trainer.data.loading.load_text_splits), None without
    replay; a replay file too short for one sequence is a usage error."""
    if "replay" not in processed:
        return None
    require(len(processed["replay"]) > 0, f"--replay_file {path} is too short for one training "
                                          f"sequence; use more replay text or shorter sequences")
    return processed["replay"]


def training_data(train_dataset, replay_dataset, columns=None):
    """What the engine trains on: the training samples, then the replay samples (same columns and types)."""
    if replay_dataset is None:
        return train_dataset
    import datasets

    columns = columns or train_dataset.column_names  # the job prepared both the same way: the same columns
    train, replay = train_dataset.select_columns(columns), replay_dataset.select_columns(columns)
    if replay.features != train.features:  # e.g. int32 against int64 token ids: one Arrow schema for both
        replay = replay.cast(train.features)
    return datasets.concatenate_datasets([train, replay])


def describe_replay(stream: ReplayStream, per_step: int, global_batch_size: int) -> str:
    """For the start-up log: how much of every step is replay, and of how big a replay set."""
    return (f"experience replay: {per_step} of the {global_batch_size} sequences of every step come from the replay "
            f"set ({stream.size} sequences; --replay_ratio {stream.ratio} -> {per_step / global_batch_size:.4g} "
            f"exactly), {global_batch_size - per_step} from the training data")
