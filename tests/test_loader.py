"""The training loader: one iterator over all epochs, the sampler's exact order, workers that live across epochs."""
import itertools
import os

import datasets
import pytest
import torch

from trainer.data.batches import EpochBatches, loader_workers, make_loader
from trainer.data.samplers import GlobalBatchSampler


def describe_batch(batch: dict) -> tuple:
    """What a training collator sees of a batch: its epoch, its samples, and which process collated it."""
    return batch["epoch"], batch["sample_id"].tolist(), batch["value"].tolist(), os.getpid()


@pytest.fixture(scope="module")
def dataset():
    return datasets.Dataset.from_dict({"value": [10 * i for i in range(20)]})


def batches(dataset, sampler, epoch, start_sample, workers, count):
    loader = make_loader(dataset, ["value"], EpochBatches(sampler, epoch, start_sample), describe_batch, workers,
                         pin_memory=False)
    return list(itertools.islice(iter(loader), count))


def test_one_iterator_follows_the_per_epoch_order_and_resumes_mid_epoch(dataset):
    # 20 samples, global batch 2 x 2 ranks x accumulation 2 = 8: 2 steps (4 micro-batches per rank) per epoch.
    sampler = GlobalBatchSampler(20, 2, world_size=2, rank=1, accumulation_steps=2, seed=7)
    expected = [(epoch, ids) for epoch in range(3) for ids in sampler.batches(epoch)]
    run = [(epoch, ids) for epoch, ids, _, _ in batches(dataset, sampler, 0, 0, 0, 12)]
    assert run == expected
    assert [values for _, ids, values, _ in batches(dataset, sampler, 0, 0, 0, 4)] == [
        [10 * i for i in ids] for _, ids in expected[:4]]
    # Resumed at step 1 of epoch 1 (8 samples into it): the rest of the same sequence.
    resumed = [(epoch, ids) for epoch, ids, _, _ in batches(dataset, sampler, 1, 8, 0, 6)]
    assert resumed == expected[6:12]


def test_workers_live_across_epoch_boundaries_and_give_the_same_batches(dataset):
    sampler = GlobalBatchSampler(20, 2, world_size=1, rank=0, accumulation_steps=2, seed=7)  # 10 micro-batches/epoch
    in_process = batches(dataset, sampler, 0, 16, 0, 14)  # resumed in the last step of epoch 0
    with_workers = batches(dataset, sampler, 0, 16, 2, 14)
    assert [b[:3] for b in with_workers] == [b[:3] for b in in_process]
    assert [b[0] for b in with_workers] == [0] * 2 + [1] * 10 + [2] * 2
    worker_pids = [b[3] for b in with_workers]
    assert os.getpid() not in worker_pids
    # The same two workers before and after both epoch boundaries: nothing was re-spawned.
    assert set(worker_pids[:2]) == set(worker_pids[2:12]) == set(worker_pids[12:]) and len(set(worker_pids)) == 2


def test_default_workers_none_on_cpu_some_on_gpu_and_an_explicit_number_wins():
    assert loader_workers(None, torch.device("cpu")) == 0
    assert loader_workers(3, torch.device("cpu")) == 3
    assert loader_workers(0, torch.device("cuda")) == 0
    assert 1 <= loader_workers(None, torch.device("cuda")) <= 4
