"""Collectives over all ranks (sums, gathers, agreement on stopping) and failures shared by every rank
(`main_process_first`); each is a no-op in a single process.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from trainer.errors import UsageError


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


@contextlib.contextmanager
def main_process_first(accelerator):
    """accelerate's `local_main_process_first` (each node's local main process runs the block first, e.g.
    tokenizing into the datasets cache; the other ranks then load from it), where a failure on one rank ends
    the block on every rank instead of leaving the others waiting in a barrier forever.

    Two rounds, each closed by an all-gather of the failures (the barrier accelerate has): the local main
    processes run the block, then the others. A UsageError anywhere becomes the same UsageError on every
    rank (each prints one line and exits 2); any other exception stays as it is on its rank (a traceback)
    and fails the others with a RuntimeError naming that rank.
    """
    main = accelerator.is_local_main_process
    if not main:
        end_round(None)  # round 1: the local main processes run the block
    failure = None
    try:
        yield
    except BaseException as error:
        failure = shared_failure(error, accelerator.process_index)
        raise
    finally:
        if main:
            end_round(failure)
        if not main or failure is None:  # round 2 (only after a clean round 1): the other ranks run the block
            end_round(None if main else failure)


@contextlib.contextmanager
def all_ranks_together(rank: int):
    """Every rank runs the block at once; it ends with a barrier (the all-gather of the failures), where a failure on
    any rank ends the block on every rank, as in `main_process_first`."""
    failure = None
    try:
        yield
    except BaseException as error:
        failure = shared_failure(error, rank)
        raise
    finally:
        end_round(failure)


def shared_failure(error: BaseException, rank: int) -> tuple[str, str]:
    """What a rank's exception tells the others: (kind, message)."""
    if isinstance(error, UsageError):
        return "usage", str(error)
    return "bug", f"rank {rank} failed with {type(error).__name__}: {error}"


def end_round(failure) -> None:
    """Gather every rank's failure, (kind, message) or None. A rank that failed goes on raising its own
    exception; every other rank raises the first UsageError gathered (else a RuntimeError) as its own."""
    failures = [f for f in all_gather_objects(failure) if f is not None]
    if not failures or failure is not None:
        return
    kind, message = next((f for f in failures if f[0] == "usage"), failures[0])
    raise UsageError(message) if kind == "usage" else RuntimeError(message)


def end_processes() -> None:
    """Tear the process group down at the end of a run (NCCL otherwise warns that destroy_process_group() was not
    called and may leak resources)."""
    global _host_group
    if is_distributed():
        dist.destroy_process_group()
    _host_group = None


_host_group = None


def host_group():
    """A gloo group over all ranks for reductions of host values: under NCCL a tiny host-side collective, with no
    device copy and no GPU synchronisation. Created on first use, which every rank reaches at the same step."""
    global _host_group
    if _host_group is None:
        _host_group = dist.new_group(backend="gloo")
    return _host_group


def host_sum(value: int) -> int:
    """The sum over ranks of a count every rank knows on the host (e.g. the loss items of a step)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=host_group())
    return int(tensor.item())


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank: how all ranks agree to stop at the same step (over the
    host group, see `host_group`)."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=host_group())
    return bool(tensor.item())
