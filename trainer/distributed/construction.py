"""Sharded construction: under FSDP2 with several processes the model is built (or loaded) whole by the first
process alone; the others build it on the meta device (`models.loading.shapes_only`: no memory, nothing read, no
random draws), and `prepare` fills each process's shards from the first process's values.

The fill is accelerate's `cpu_ram_efficient_loading` (accelerate 1.16 `fsdp2_prepare_model`): the model is sharded
on the meta device, then every parameter is broadcast from the first process, one at a time, and each process keeps
its shard. accelerate leaves two things to the caller, done here before `prepare`:
- the non-persistent buffers (e.g. Llama's rotary `inv_freq`, BERT's `position_ids`) are not in the state dict it
  broadcasts; accelerate re-registers each process's own, which on the meta-built processes are empty;
- the torch generator: the first process's draws for the weights are the ones a single process makes, but the
  others drew nothing, so their dropout would differ from a run where every process builds the model (DDP).
The first process's generator state is given to all, as if each had built the model itself.
And one gap while it runs: accelerate keeps the first process's whole state dict until every shard is filled, so that
process would peak at one model plus its shard. Each parameter is let go of once sent (`ReleasedOnRead`): it peaks
at one model.

The jobs build their model inside `main_process_first`, where the first process runs alone: nothing here is a
collective until `filled_from_first_process`, which every process enters together in `assembly.prepared_model`.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from trainer.distributed.collectives import host_group
from trainer.distributed.launch import uses_fsdp
from trainer.models.loading import shapes_only


def fills_from_first_process(accelerator) -> bool:
    """FSDP2 over several processes: the first process builds the model, the others receive their shards."""
    return (uses_fsdp(accelerator) and accelerator.state.fsdp_plugin.fsdp_version == 2
            and accelerator.num_processes > 1)


def model_construction(accelerator, whole: bool = False):
    """The context a job builds its model in: on the meta device on every process but the first where
    `fills_from_first_process`, unless `whole` (every process needs the whole model anyway)."""
    if whole or not fills_from_first_process(accelerator) or accelerator.is_main_process:
        return contextlib.nullcontext()
    return shapes_only()


@contextlib.contextmanager
def filled_from_first_process(accelerator, model: torch.nn.Module):
    """The context of `accelerator.prepare(model)`, entered by every process together: `prepare` fills the shards
    from the first process (see the module's docstring). Nothing changes unless `fills_from_first_process`."""
    if not fills_from_first_process(accelerator):
        yield
        return
    from accelerate.utils import fsdp_utils

    accelerator.state.fsdp_plugin.cpu_ram_efficient_loading = True
    non_persistent = fsdp_utils.get_non_persistent_buffers(model, recurse=True, fqns=True)
    for name, buffer in model.named_buffers():
        if name in non_persistent:
            set_buffer(model, name, from_first_process(buffer))
    torch.set_rng_state(from_first_process(torch.get_rng_state()))
    load = fsdp_utils.fsdp2_load_full_state_dict
    fsdp_utils.fsdp2_load_full_state_dict = lambda accelerator, model, full_sd, **options: load(
        accelerator, model, ReleasedOnRead(full_sd), **options)
    try:
        yield
    finally:
        fsdp_utils.fsdp2_load_full_state_dict = load


class ReleasedOnRead(dict):
    """A view of accelerate's full state dict that takes each entry out of it when read: accelerate reads each
    parameter once, to send it, and the whole dict is otherwise kept alive by its caller until every shard is in."""

    def __init__(self, source: dict):
        super().__init__()
        self.source = source

    def __contains__(self, key) -> bool:
        return key in self.source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        return self.source.pop(key)


def from_first_process(tensor: torch.Tensor) -> torch.Tensor:
    """The first process's `tensor` on every process, in host memory (a meta tensor gives its shape and dtype)."""
    received = tensor if dist.get_rank() == 0 else torch.empty(tensor.shape, dtype=tensor.dtype)
    dist.broadcast(received, src=0, group=host_group())
    return received


def set_buffer(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, local_name = name.rpartition(".")
    model.get_submodule(owner).register_buffer(local_name, value, persistent=False)
