"""Everything that knows about processes: start-up, collectives, gradient sync, data shards.

accelerate's Accelerator does device placement, DDP wrapping and autocast. Two things are done here by hand:
- Under `torchrun` on a machine without CUDA, Accelerator stays single-process unless told `cpu=True`,
  so N ranks would each train alone on the same data. We pass `cpu=True` whenever CUDA is absent.
- The process-group timeout is raised (`--ddp_timeout`), because ranks wait in a barrier while the local
  main process tokenizes; on a big corpus that outlasts the default 30 minutes.
- Under torchrun we create the process group ourselves on a store prefixed by the restart count. torchrun
  (`--max-restarts`) reuses one store across restarts, and gloo's mesh set-up then reads the dead generation's
  addresses and fails with "connectFullMesh ... Connection refused"; a fresh prefix per restart avoids that.
  accelerate (and DeepSpeed) use a process group that already exists.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def make_accelerator(training_args, **plugins):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    use_cpu = training_args.use_cpu or not torch.cuda.is_available()
    timeout = datetime.timedelta(seconds=training_args.ddp_timeout)
    if "TORCHELASTIC_RESTART_COUNT" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_process_group_per_restart("gloo" if use_cpu else "nccl", timeout)
    if torch.cuda.is_available() and not use_cpu:
        # TF32 tensor cores for fp32 matrix products: ~8x the fp32 rate on Ampere+ at 10-bit mantissa inputs,
        # the precision every mixed-precision recipe already accepts.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Accelerator(
        cpu=use_cpu,
        dynamo_backend="inductor" if training_args.torch_compile else "no",
        mixed_precision=training_args.mixed_precision,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)],
        **plugins,
    )


def init_process_group_per_restart(backend: str, timeout: datetime.timedelta) -> None:
    if dist.is_initialized():
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    prefixed = dist.PrefixStore(f"trainer/restart-{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world_size, timeout=timeout)


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

    With `lengths` (one per sample), batches are length-grouped: see `group_by_length`. The grouping works on
    the global order alone, so it keeps every property above.
    """

    def __init__(self, dataset_size: int, per_device_batch_size: int, world_size: int, rank: int,
                 accumulation_steps: int, seed: int, shuffle: bool = True, lengths=None):
        self.dataset_size = dataset_size
        self.per_device_batch_size = per_device_batch_size
        self.world_size = world_size
        self.rank = rank
        self.accumulation_steps = accumulation_steps
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = None if lengths is None else torch.as_tensor(lengths)
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
        order = torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(self.seed + epoch))
        if self.lengths is not None:
            order = group_by_length(order, self.lengths, self.global_batch_size, seed=self.seed + epoch)
        return order

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
