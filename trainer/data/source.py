"""The engine's training data: resumable micro-batches and their position, saved in every checkpoint, and what each
training source gave."""
from __future__ import annotations

import numpy as np

from trainer.data.batches import EpochBatches, make_loader
from trainer.data.mixture import MixtureSource, describe_sources
from trainer.errors import require


class TrainingBatches:
    """The training samples as an endless stream of micro-batches, in the global order of a `GlobalBatchSampler`
    (trainer.data.samplers), loaded by one DataLoader whose workers live across epochs. The data holds the
    `sources` (trainer.data.mixture) one after the other, the primary's first, with `token_counts` (the tokens of
    each sample, unpadded) beside it.

    Its position (epoch, samples consumed in the epoch's global order) and the samples and tokens taken from each
    source are its state; a source after the primary is read at its stream position, which is the samples taken from
    it. The engine calls `advance()` after each optimizer step, a checkpoint keeps `state_dict()`, and
    `micro_batches()` after `load_state_dict` continues exactly where the saved run was. Another data source (e.g.
    streaming) is another class with the same methods."""

    reads_during_training = False  # the data is prepared before training: nothing can fail mid-run (Engine)

    def __init__(self, dataset, columns, collator, sampler, workers: int, pin_memory: bool,
                 sources: list[MixtureSource], token_counts: np.ndarray):
        self.dataset, self.columns, self.collator = dataset, columns, collator
        self.sampler, self.workers, self.pin_memory = sampler, workers, pin_memory
        self.sources, self.token_counts = sources, token_counts
        self.epoch = self.samples_in_epoch = 0
        self.samples_per_source, self.tokens_per_source = [0] * len(sources), [0] * len(sources)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def positions(self) -> list[int]:
        """The stream positions of the sources after the primary."""
        return self.samples_per_source[1:]

    def describe(self) -> list[str]:
        """For the start-up log: the global batch and epoch, then (with several sources) each source's share."""
        sampler = self.sampler
        lines = [f"{sampler.global_batch_size} sequences/step ({sampler.per_device_batch_size} per device x "
                 f"{sampler.world_size} processes x {sampler.accumulation_steps} accumulation), "
                 f"{sampler.steps_per_epoch} steps/epoch"]
        sizes = [sampler.dataset_size, *(other.size for other in sampler.others)]
        return lines + describe_sources(self.sources, sampler.counts, [f"{size} sequences" for size in sizes])

    def describe_position(self) -> str:
        """For the log line of a resume."""
        return f"epoch {self.epoch}, {self.samples_in_epoch} samples into the epoch"

    def micro_batches(self):
        """Micro-batches forever, epoch after epoch, from the current position."""
        batches = EpochBatches(self.sampler, self.epoch, self.samples_in_epoch, self.positions)
        return iter(make_loader(self.dataset, self.columns, batches, self.collator, self.workers, self.pin_memory))

    def advance(self) -> None:
        """One optimizer step's samples consumed."""
        sampler = self.sampler
        step = sampler.step_samples(self.epoch, self.samples_in_epoch, self.positions)
        for source, indices in enumerate(step):
            self.samples_per_source[source] += len(indices)
            self.tokens_per_source[source] += int(self.token_counts[indices.numpy()].sum())
        self.samples_in_epoch += sampler.primary_per_step
        if self.samples_in_epoch >= sampler.steps_per_epoch * sampler.primary_per_step:
            self.epoch, self.samples_in_epoch = self.epoch + 1, 0

    def consumed(self) -> dict:
        """For the final metrics: the samples and tokens (unpadded, see `token_counts`) trained on, by source name."""
        names = [source.name for source in self.sources]
        return {"train_samples_per_source": dict(zip(names, self.samples_per_source)),
                "train_tokens_per_source": dict(zip(names, self.tokens_per_source))}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples_in_epoch": self.samples_in_epoch,
                "samples_per_source": list(self.samples_per_source), "tokens_per_source": list(self.tokens_per_source)}

    def load_state_dict(self, saved: dict) -> None:
        require("lanes" not in saved, "the checkpoint was written by a --streaming run; resume it with --streaming")
        require("samples_per_source" in saved, "the checkpoint's data position predates weighted mixtures (it has "
                                               "no samples_per_source); resume it with the trainer version that "
                                               "wrote it, or start a new run")
        self.epoch, self.samples_in_epoch = saved["epoch"], saved["samples_in_epoch"]
        self.samples_per_source = list(saved["samples_per_source"])
        self.tokens_per_source = list(saved["tokens_per_source"])


def describe_consumed(consumed: dict) -> str:
    """For the closing log: what `TrainingBatches.consumed()` says, one source after another."""
    samples, tokens = consumed["train_samples_per_source"], consumed["train_tokens_per_source"]
    return "; ".join(f"{name}: {samples[name]} samples, {tokens[name]} tokens" for name in samples)


def token_counts(dataset) -> np.ndarray:
    """Each sample's tokens before padding (special tokens included): the length of its `input_ids`. Every job
    stores its sequences unpadded (its collator pads batch by batch), so these are the non-pad tokens trained on."""
    import pyarrow.compute as pc

    column = dataset.select_columns(["input_ids"]).with_format("arrow")[:]["input_ids"]
    return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
