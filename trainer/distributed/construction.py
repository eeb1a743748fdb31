"""Sharded construction: under FSDP2 and ZeRO-3 with several processes the model is built (or loaded) whole by the
first process alone; the others build it on the meta device (`models.loading.shapes_only`: no memory, nothing read,
no random draws), and each process's shards are filled from the first process's values before or in `prepare`, one
parameter at a time: every process but the first peaks at its shards plus one parameter, the first at one model
(from scratch) or at its shards (from a checkpoint, whose mapped pages go back to the kernel once sent).

- FSDP2: accelerate's `cpu_ram_efficient_loading` (accelerate 1.16 `fsdp2_prepare_model`) shards the model on the
  meta device, then broadcasts every parameter from the first process, each process keeping its shard. It keeps the
  first process's whole state dict until the end, though (one model plus its shard): each parameter is let go of
  once sent (`ReleasedOnRead`).
- ZeRO-3: what `deepspeed.zero.Init(module=...)` does to a model built whole (broadcast each parameter from the first
  process, keep this process's partition), one parameter at a time, each materialised just before on the processes
  that built it on the meta device (`partitioned_from_first_process`). The DeepSpeed engine then finds the model
  partitioned and leaves it as it is. zero.Init itself would need every process to build the model together, and
  the jobs build it inside `main_process_first`, where the first process runs alone; its partitioned build also
  draws the weights in another order than a single process does.
Both leave two things to the caller, done first:
- the buffers: accelerate re-registers each process's own non-persistent ones (e.g. Llama's rotary `inv_freq`,
  BERT's `position_ids`), DeepSpeed broadcasts none, and on the meta-built processes they are empty;
- the torch generator: the first process's draws for the weights are the ones a single process makes, but the
  others drew nothing, so their dropout would differ from a run where every process builds the model (DDP).
  The first process's generator state is given to all, as if each had built the model itself.

The jobs build their model inside `main_process_first`: nothing here is a collective until
`filled_from_first_process`, which every process enters together in `assembly.prepared_model`.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import sys
from typing import Optional

import torch
import torch.distributed as dist

from trainer.distributed.collectives import host_group
from trainer.distributed.launch import uses_deepspeed, uses_fsdp
from trainer.models.loading import shapes_only


def fills_from_first_process(accelerator) -> bool:
    """FSDP2 or ZeRO-3 over several processes: the first process builds the model, the others receive their shards."""
    return accelerator.num_processes > 1 and (fsdp2(accelerator) or zero3(accelerator))


def fsdp2(accelerator) -> bool:
    return uses_fsdp(accelerator) and accelerator.state.fsdp_plugin.fsdp_version == 2


def zero3(accelerator) -> bool:
    return uses_deepspeed(accelerator) and accelerator.deepspeed_plugin.zero_stage == 3


def model_construction(accelerator, whole: bool = False):
    """The context a job builds its model in: on the meta device on every process but the first where
    `fills_from_first_process`, unless `whole` (every process needs the whole model anyway)."""
    if whole or not fills_from_first_process(accelerator) or accelerator.is_main_process:
        return contextlib.nullcontext()
    return shapes_only()


@contextlib.contextmanager
def filled_from_first_process(accelerator, model: torch.nn.Module):
    """The context of `accelerator.prepare(model)`, entered by every process together: the model's shards come from
    the first process (see the module's docstring). Nothing changes unless `fills_from_first_process`."""
    if not fills_from_first_process(accelerator):
        yield
        return
    for name, buffer in list(model.named_buffers()):
        set_buffer(model, name, from_first_process(buffer))
    torch.set_rng_state(from_first_process(torch.get_rng_state()))
    if zero3(accelerator):
        partitioned_from_first_process(accelerator, model)
        yield
    else:
        accelerator.state.fsdp_plugin.cpu_ram_efficient_loading = True
        with each_parameter_released_once_sent(), parameters_swapped_on_conversion():
            yield


@contextlib.contextmanager
def each_parameter_released_once_sent():
    """accelerate's FSDP2 fill, given its full state dict as `ReleasedOnRead`."""
    from accelerate.utils import fsdp_utils

    load = fsdp_utils.fsdp2_load_full_state_dict
    fsdp_utils.fsdp2_load_full_state_dict = lambda accelerator, model, full_sd, **options: load(
        accelerator, model, ReleasedOnRead(full_sd), **options)
    try:
        yield
    finally:
        fsdp_utils.fsdp2_load_full_state_dict = load


@contextlib.contextmanager
def parameters_swapped_on_conversion():
    """accelerate moves the first process's model to the meta device (`model.to("meta")`), which by default gives each
    module a new Parameter: weights tied across modules (BERT's MLM decoder, GPT-2's `lm_head`) come apart on that
    process alone (on the others the model is on the meta device already), and its FSDP units then hold more
    parameters than theirs, a collective mismatch. Swapped in place, each Parameter stays one object, tied as built."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


def partitioned_from_first_process(accelerator, model: torch.nn.Module) -> None:
    """ZeRO-3 partitions of every parameter, from the first process's values (see the module's docstring)."""
    import deepspeed

    # Not entered as a context: only its conversion of built parameters is used (zero.Init(module=...)'s own).
    zero_init = deepspeed.zero.Init(config_dict_or_path=accelerator.deepspeed_plugin.deepspeed_config)
    # The engine casts a model it partitions itself to bf16/fp16 and leaves a partitioned one as it is: cast here.
    zero_init._convert_to_zero_parameters(one_at_a_time(model, None if zero_init.dtype == torch.float32
                                                        else zero_init.dtype))
    zero_init._keep_in_fp32(model)


def one_at_a_time(model: torch.nn.Module, dtype):
    """The model's parameters, each in `dtype` (floating point ones; None: as built) and given host memory (if it is
    on the meta device) only when its turn comes."""
    for parameter in model.parameters():
        read = file_pages(parameter)
        target = dtype if dtype is not None and parameter.is_floating_point() else parameter.dtype
        if parameter.is_meta:  # `.data` cannot change a tensor's device: swapped in place (the optimizer holds it)
            torch.utils.swap_tensors(parameter, torch.nn.Parameter(
                torch.empty(parameter.shape, dtype=target), requires_grad=parameter.requires_grad))
        elif parameter.dtype != target:
            parameter.data = parameter.data.to(target)
        yield parameter
        give_back_file_pages(read)  # partitioned by now: the whole parameter is no longer read


class ReleasedOnRead(dict):
    """A view of accelerate's full state dict that takes each entry out of it when read: accelerate reads each
    parameter once, to send it, and the whole dict is otherwise kept alive by its caller until every shard is in."""

    def __init__(self, source: dict):
        super().__init__()
        self.source = source
        self.last_read: Optional[range] = None

    def __contains__(self, key) -> bool:
        return key in self.source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        # Read in turn: the previous entry is sent by now (accelerate asks for the next one after its broadcast).
        give_back_file_pages(self.last_read)
        self.last_read = file_pages(self.source[key])
        return self.source.pop(key)


def from_first_process(tensor: torch.Tensor) -> torch.Tensor:
    """The first process's `tensor` on every process, in host memory (a meta tensor gives its shape and dtype)."""
    received = tensor if dist.get_rank() == 0 else torch.empty(tensor.shape, dtype=tensor.dtype)
    dist.broadcast(received, src=0, group=host_group())
    return received


def set_buffer(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, local_name = name.rpartition(".")
    module = model.get_submodule(owner)
    module.register_buffer(local_name, value, persistent=local_name not in module._non_persistent_buffers_set)


# ------------------------------------------------------------------------------------------- file-backed weights
# from_pretrained maps a safetensors checkpoint (a private file mapping) and its parameters are views of it. The
# mapped pages a fill reads count in the first process's resident memory until the last tensor of the mapping is
# let go of, adding up to the whole checkpoint on top of the shards being made. No library gives them back: the
# pages of each parameter already sent are handed to the kernel with madvise(MADV_PAGEOUT), a reclaim hint that
# never loses data (a clean page is read again from the file if touched; a written one is kept, or swapped).
MADV_PAGEOUT = 21  # Linux 5.4+; elsewhere, or refused, the pages just stay


def file_pages(tensor: torch.Tensor) -> Optional[range]:
    """The whole pages of `tensor`'s bytes (addresses, page-aligned inwards: a page it shares with another tensor
    is kept) where they lie in a file mapping; None for memory of its own, on another OS or device."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or tensor.numel() == 0:
        return None
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not in_file_mapping(start, end):
        return None
    return range(-(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE)


def in_file_mapping(start: int, end: int) -> bool:
    """Whether the addresses [start, end) lie in one mapping of a file (/proc/self/maps names its path)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(address, 16) for address in fields[0].split("-"))
            if low <= start and end <= high:
                return len(fields) == 6 and fields[5].startswith("/")
    return False


def give_back_file_pages(pages: Optional[range]) -> None:
    """Hand `pages` (from `file_pages`) back to the kernel; see above."""
    if pages:
        c_library().madvise(ctypes.c_void_p(pages.start), ctypes.c_size_t(len(pages)), MADV_PAGEOUT)


@functools.cache
def c_library() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
