"""From datasets to batches: columnar access, the epochs' batches tagged with their epoch, the data loader."""
from __future__ import annotations

import os

import numpy as np
import torch


class ColumnarBatches(torch.utils.data.Dataset):
    """A datasets.Dataset that hands the collator whole columns for a list of indices, plus the sample ids.

    torch's DataLoader passes a batch sampler's index list to `__getitems__` in one call, so a batch costs one
    Arrow read instead of one per sample. The sample ids let the collator draw each sample's masking from its
    own seeded generator, which keeps the masks independent of world size, batch split and worker count.
    Index lists of an `EpochBatches` sampler also hand over their epoch (the batch's "epoch").
    """

    def __init__(self, dataset, columns: list[str]):
        self.dataset = dataset.with_format("numpy", columns=columns)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]) -> dict:
        batch = dict(self.dataset[list(indices)])
        batch["sample_id"] = np.asarray(indices, dtype=np.int64)
        if isinstance(indices, EpochIndices):
            batch["epoch"] = indices.epoch
        return batch

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])


class EpochIndices(list):
    """One micro-batch's sample indices and the epoch they belong to (what the training collator masks with)."""

    def __init__(self, indices, epoch: int):
        super().__init__(indices)
        self.epoch = epoch

    def __reduce__(self):  # to the loader's workers
        return EpochIndices, (list(self), self.epoch)


class EpochBatches:
    """A batch sampler over the whole run: `sampler`'s micro-batches of epoch `epoch` from `start_sample` (and of
    the other sources' streams from `positions`, see trainer.data.mixture), then of every following epoch, each
    tagged with its epoch.

    One DataLoader iterator then serves every epoch: its workers (and their prefetched batches) live across epoch
    boundaries instead of being re-spawned for each epoch, and the order is exactly the per-epoch order the sampler
    defines, so a resumed run continues where the train state says. The other sources' streams run on across epochs.
    """

    def __init__(self, sampler, epoch: int, start_sample: int, positions=None):
        self.sampler, self.epoch, self.start_sample = sampler, epoch, start_sample
        self.positions = [0] * len(sampler.others) if positions is None else list(positions)

    def __iter__(self):
        epoch, start, positions = self.epoch, self.start_sample, self.positions
        while True:
            for indices in self.sampler.batches(epoch, start, positions):
                yield EpochIndices(indices, epoch)
            steps = self.sampler.remaining_steps(start)
            positions = [position + steps * count for position, count in zip(positions, self.sampler.counts[1:])]
            epoch, start = epoch + 1, 0


class SampleWiseCollator:
    """A training collator in two stages: `rows`, each sample's own work (e.g. its masks), the same for a sample
    whatever other samples share its batch, and `assemble`, the batch's tensors from the rows of all its samples.
    Under --streaming, `rows` runs in the loader workers, each on its part of a micro-batch, and `assemble` in the
    main process on the whole micro-batch (trainer.data.streaming), so the per-sample work spreads over the workers
    as the map-style loader spreads whole batches; elsewhere a call runs both."""

    def rows(self, batch: dict) -> dict:
        raise NotImplementedError

    def assemble(self, rows: dict) -> dict:
        raise NotImplementedError

    def __call__(self, batch: dict) -> dict:
        return self.assemble(self.rows(batch))


def loader_workers(requested: int | None, device: torch.device) -> int:
    """--dataloader_num_workers, or unset: none on the CPU (its cores do the training), and on a GPU enough
    processes (up to 4, one core per process left to the training process) to keep masking and collation off the
    training process, which otherwise spends host time per step that the GPU waits for."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 0
    processes_on_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores // processes_on_node - 1))


def make_loader(dataset, columns, batch_sampler, collate_fn, num_workers: int, pin_memory: bool):
    # A private generator: otherwise every new iterator draws its worker base seed from the global torch RNG,
    # and a run resumed mid-epoch (one extra iterator) would continue with other dropout draws than an
    # uninterrupted one. Worker seeds do not matter here: the collators draw from per-sample generators.
    return torch.utils.data.DataLoader(
        ColumnarBatches(dataset, columns), batch_sampler=batch_sampler, collate_fn=collate_fn,
        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False,
        prefetch_factor=4 if num_workers else None, generator=torch.Generator(),
    )
