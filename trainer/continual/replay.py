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

The stream and the mixing live beside the sampler they feed (trainer/data/samplers.py: `ReplayStream`,
`replay_slots`, `mixed_global_batch`), the reading of the file with the other loaders (`load_replay_file` in
trainer/data/loading.py); this module holds what the jobs and the engine call.
"""
from __future__ import annotations

from trainer.data.samplers import ReplayStream
from trainer.errors import require


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
