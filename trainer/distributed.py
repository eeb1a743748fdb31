"""Everything that knows about processes: start-up, collectives, gradient sync, data shards.

accelerate's Accelerator does device placement, DDP wrapping and autocast. Two things are done here by hand:
- Under `torchrun` on a machine without CUDA, Accelerator stays single-process unless told `cpu=True`,
  so N ranks would each train alone on the same data. We pass `cpu=True` whenever CUDA is absent.
- The process-group timeout is raised (`--ddp_timeout`), because ranks wait in a barrier while the local
  main process tokenizes; on a big corpus that outlasts the default 30 minutes.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


def make_accelerator(training_args, **plugins):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=training_args.ddp_timeout))
    return Accelerator(
        cpu=training_args.use_cpu or not torch.cuda.is_available(),
        mixed_precision=training_args.mixed_precision,
        kwargs_handlers=[timeout],
        **plugins,
    )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place, returned for chaining. A no-op in a single process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj) -> list:
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def set_gradient_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Skip DDP's all-reduce on non-final micro-steps of gradient accumulation.

    We flip the flag that `DDP.no_sync()` flips rather than use the context manager, so that the loop need not
    wrap the final micro-step differently from the others (the same trick as nanoGPT).
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = enabled


class GlobalBatchSampler:
    """Shards one global sample order across ranks: the same samples per optimizer step at every world size.

    Epoch `e` visits `randperm(len(dataset))` seeded by `seed + e`. Optimizer step `s` of the epoch takes the
    `global_batch_size = per_device_batch * world_size * accumulation` samples at positions
    `[s * global_batch_size, (s + 1) * global_batch_size)`; micro-step `m` gives rank `r` the
    `per_device_batch` samples at offset `(m * world_size + r) * per_device_batch` inside it. The samples of
    an incomplete final global batch are dropped, so 1 process x batch 16 and 2 processes x batch 4 x
    accumulation 2 see exactly the same samples in every step. Positions are counted in samples, so a
    resumed run may change world size and still continue the same order.
    """

    def __init__(self, dataset_size: int, per_device_batch_size: int, world_size: int, rank: int,
                 accumulation_steps: int, seed: int, shuffle: bool = True):
        self.dataset_size = dataset_size
        self.per_device_batch_size = per_device_batch_size
        self.world_size = world_size
        self.rank = rank
        self.accumulation_steps = accumulation_steps
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_sample = 0  # position in the epoch's global order where iteration starts

    @property
    def global_batch_size(self) -> int:
        return self.per_device_batch_size * self.world_size * self.accumulation_steps

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_size // self.global_batch_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        return torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __len__(self) -> int:
        """Micro-batches this rank yields in the current epoch."""
        remaining_steps = (self.steps_per_epoch * self.global_batch_size - self.start_sample) // self.global_batch_size
        return remaining_steps * self.accumulation_steps

    def __iter__(self):
        order = self.epoch_order(self.epoch)
        micro = self.per_device_batch_size
        for step_start in range(self.start_sample, self.steps_per_epoch * self.global_batch_size,
                                self.global_batch_size):
            for micro_step in range(self.accumulation_steps):
                start = step_start + (micro_step * self.world_size + self.rank) * micro
                yield order[start:start + micro].tolist()


def shard_for_evaluation(dataset_size: int, world_size: int, rank: int) -> range:
    """A contiguous, disjoint slice of the evaluation set per rank: every sample counted exactly once."""
    per_rank, extra = divmod(dataset_size, world_size)
    start = rank * per_rank + min(rank, extra)
    return range(start, start + per_rank + (1 if rank < extra else 0))


_host_group = None


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank: how all ranks agree to stop at the same step.

    The reduction runs over a gloo group on CPU tensors, so under NCCL it adds a tiny host-side collective per
    call but no GPU synchronisation. The group is created on first use, which every rank reaches at the same step.
    """
    global _host_group
    if not is_distributed():
        return flag
    if _host_group is None:
        _host_group = dist.new_group(backend="gloo")
    tensor = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_host_group)
    return bool(tensor.item())
