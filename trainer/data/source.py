"""The engine's training data: resumable micro-batches and their position, saved in every checkpoint."""
from __future__ import annotations

from trainer.continual.replay import describe_replay
from trainer.data.batches import EpochBatches, make_loader
from trainer.errors import require


class TrainingBatches:
    """The training samples as an endless stream of micro-batches, in the global order of a `GlobalBatchSampler`
    (trainer.data.samplers), loaded by one DataLoader whose workers live across epochs.

    Its position (epoch, samples consumed in the epoch's global order, replay samples drawn) is its state: the
    engine calls `advance()` after each optimizer step, a checkpoint keeps `state_dict()`, and `micro_batches()`
    after `load_state_dict` continues exactly where the saved run was. Another data source (e.g. streaming) is
    another class with the same methods."""

    def __init__(self, dataset, columns, collator, sampler, workers: int, pin_memory: bool):
        self.dataset, self.columns, self.collator = dataset, columns, collator
        self.sampler, self.workers, self.pin_memory = sampler, workers, pin_memory
        self.epoch = self.samples_in_epoch = self.replay_position = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def describe(self) -> list[str]:
        """For the start-up log: the global batch and epoch, then (with replay) how much of it is replayed."""
        sampler = self.sampler
        lines = [f"{sampler.global_batch_size} sequences/step ({sampler.per_device_batch_size} per device x "
                 f"{sampler.world_size} processes x {sampler.accumulation_steps} accumulation), "
                 f"{sampler.steps_per_epoch} steps/epoch"]
        if sampler.replay is not None:
            lines.append(describe_replay(sampler.replay, sampler.replay_per_step, sampler.global_batch_size))
        return lines

    def describe_position(self) -> str:
        """For the log line of a resume."""
        return f"epoch {self.epoch}, {self.samples_in_epoch} samples into the epoch"

    def micro_batches(self):
        """Micro-batches forever, epoch after epoch, from the current position."""
        batches = EpochBatches(self.sampler, self.epoch, self.samples_in_epoch, self.replay_position)
        return iter(make_loader(self.dataset, self.columns, batches, self.collator, self.workers, self.pin_memory))

    def advance(self) -> None:
        """One optimizer step's samples consumed."""
        sampler = self.sampler
        self.samples_in_epoch += sampler.new_per_step
        self.replay_position += sampler.replay_per_step
        if self.samples_in_epoch >= sampler.steps_per_epoch * sampler.new_per_step:
            self.epoch, self.samples_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples_in_epoch": self.samples_in_epoch,
                "replay_position": self.replay_position}

    def load_state_dict(self, saved: dict) -> None:
        require("lanes" not in saved, "the checkpoint was written by a --streaming run; resume it with --streaming")
        self.epoch, self.samples_in_epoch = saved["epoch"], saved["samples_in_epoch"]
        self.replay_position = saved["replay_position"]
