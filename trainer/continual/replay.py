"""Experience replay: a fixed share of every global batch comes from an earlier task's data (`--replay_file`).

Replay is one source of the training mixture (trainer/data/mixture.py), the last: any job prepares the replay file
exactly as its training data (same tokenization, blocks, masking columns, label mapping) and hands it to the engine
among `Task.other_sources`. The engine trains on one dataset, the training samples (indices 0..N-1; with
--train_files, every source's in turn) followed by the replay samples (..N+M-1), and its `GlobalBatchSampler` builds
each global batch of G samples from r replay samples drawn from a `CyclingSource` and G - r of the training data (the
epoch's shuffled order, as without replay, or the --train_files mixture's share of it):

- r = round(R x G), halves rounded up, for `--replay_ratio R` and G = per-device batch x processes x
  accumulation (`trainer.data.mixture.replay_count`); it must leave at least one sample of each kind, so R must lie
  in [0.5 / G, 1 - 0.5 / G).
- The replay stream is the replay set in a seeded permutation, a fresh one per pass over it, cycling forever and
  independently of the new data's epochs: position p of the stream is sample `permutation(p // M)[p % M]`.
  Its position (replay samples drawn so far) is the data source's count of samples taken from it
  (trainer.data.source), saved in every checkpoint.
- The r replay samples take r evenly spaced slots of the global batch (`trainer.data.mixture.slot_sources`), a layout
  that depends on G and the counts alone; the global batch is then sharded across ranks and micro-steps exactly as
  without replay, so the samples of every optimizer step are the same at any world size and accumulation.
- Epochs and steps per epoch count the new data only: an epoch is N // (G - r) steps.

Hand-written: `datasets.interleave_datasets` mixes by probability (the share varies from batch to batch) and
torch has no mixing sampler; neither gives a fixed share per global batch, an order independent of ranks and
micro-steps, and a position that a checkpoint saves and restores exactly.
"""
from __future__ import annotations


def describe_replay(ratio: float, size: str, per_step: int, global_batch_size: int) -> str:
    """For the start-up log: how much of every step is replay, and of how big a replay set (`size`, e.g.
    "50 sequences")."""
    return (f"experience replay: {per_step} of the {global_batch_size} sequences of every step come from the replay "
            f"set ({size}; --replay_ratio {ratio} -> {per_step / global_batch_size:.4g} "
            f"exactly), {global_batch_size - per_step} from the training data")
