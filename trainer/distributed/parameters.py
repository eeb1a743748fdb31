"""Parameters rank by rank: what each rank holds of a parameter and its gradient, and the full weights."""
from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.distributed.launch import sharded_state_name, uses_deepspeed, uses_fsdp


# ------------------------------------------------------------------------------ parameters, rank by rank
# What each rank holds of a parameter and of its gradient, for code that works on parameters directly (EWC):
# - one process, DDP: the whole parameter and its (synced) `.grad`;
# - FSDP2: a DTensor whose local shard (`to_local`) is this rank's piece, and a DTensor gradient sharded alike;
# - DeepSpeed ZeRO-3: a flat fp32 partition of the padded, flattened parameter (the optimizer's master copy), read
#   and written through deepspeed.utils' local API (safe_get_local_fp32_param, safe_get/set_local_grad);
# - DeepSpeed ZeRO-1/2: the whole parameter, but the reduced gradient lives in the optimizer's flat partitions:
#   deepspeed.utils' safe_get_full_grad assembles it (an all-reduce per parameter) and safe_set_full_grad writes
#   back each rank's own fragment.
def zero3_partitioned(accelerator) -> bool:
    return uses_deepspeed(accelerator) and accelerator.deepspeed_plugin.zero_stage == 3


def parameters_whole_on_every_rank(accelerator) -> bool:
    """One process, DDP, ZeRO-1/2: every rank holds every parameter whole (and identical), not a shard of it."""
    return not (zero3_partitioned(accelerator) or uses_fsdp(accelerator))


def local_values(accelerator, parameter: torch.nn.Parameter) -> torch.Tensor:
    """This rank's piece of `parameter`, detached: all of it, its FSDP2 shard or its ZeRO-3 fp32 partition (under
    ZeRO-1/2 with bf16 the module's bf16 copy: the fp32 master weights are partitioned)."""
    if zero3_partitioned(accelerator):
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(parameter)
    values = parameter.detach()
    return values.to_local() if uses_fsdp(accelerator) else values


def local_part(accelerator, parameter: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """The piece of `full` (a tensor shaped like the whole parameter) that `local_values` covers on this rank; no
    communication (every rank has `full`)."""
    if zero3_partitioned(accelerator):
        # ZeRO-3 pads the flattened parameter to world size x partition size; rank r holds slice r.
        size = parameter.ds_tensor.numel()
        rank = dist.get_rank(group=parameter.ds_process_group)
        flat = torch.nn.functional.pad(full.flatten(), (0, size * dist.get_world_size(parameter.ds_process_group)
                                                        - full.numel()))
        return flat[rank * size:(rank + 1) * size].clone()
    if uses_fsdp(accelerator):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, parameter.device_mesh, parameter.placements, src_data_rank=None).to_local()
    return full


def add_to_local_gradient(accelerator, parameter: torch.nn.Parameter, delta: torch.Tensor) -> bool:
    """Add `delta` (shaped like `local_values`) to this rank's piece of the step's reduced gradient. False where the
    parameter has no gradient this step (frozen, or masked by `Task.before_optimizer_step`)."""
    if zero3_partitioned(accelerator):
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        gradient = safe_get_local_grad(parameter) if parameter.requires_grad else None
        if gradient is not None:
            safe_set_local_grad(parameter, gradient + delta.to(gradient.dtype))
        return gradient is not None
    if uses_deepspeed(accelerator):  # ZeRO-1/2: whole parameters, gradients in the optimizer's partitions
        from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

        gradient = safe_get_full_grad(parameter) if parameter.requires_grad else None
        if gradient is not None:
            safe_set_full_grad(parameter, gradient + delta.to(gradient.dtype))
        return gradient is not None
    if parameter.grad is None:
        return False
    gradient = parameter.grad.to_local() if uses_fsdp(accelerator) else parameter.grad
    gradient.add_(delta.to(gradient.dtype))
    return True


def gather_full_parameters(accelerator, named_parameters) -> dict[str, torch.Tensor]:
    """{name: the whole parameter, detached, fp32 master weights under DeepSpeed} on EVERY rank, from
    (name, prepared parameter) pairs: a collective per parameter under ZeRO-3 and FSDP2 (every rank calls it with
    the same parameters in the same order); a clone elsewhere."""
    full = {}
    for name, parameter in named_parameters:
        if uses_deepspeed(accelerator):
            from deepspeed.utils import safe_get_full_fp32_param

            full[name] = safe_get_full_fp32_param(parameter).detach().clone()
        elif uses_fsdp(accelerator):
            full[name] = parameter.detach().full_tensor()
        else:
            full[name] = parameter.detach().clone()
    return full


def full_state_dict(accelerator, model, submodule: torch.nn.Module) -> dict | None:
    """The complete weights of `submodule` (on rank 0) under DeepSpeed or FSDP; None elsewhere, where its own
    parameters are complete.

    Every rank must call this: under ZeRO-3 and FSDP each holds a shard and the gather is a collective.
    """
    if sharded_state_name(accelerator) is None:
        return None
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:  # the gather delivers to rank 0 only
        return None
    prefix = next(name for name, module in accelerator.unwrap_model(model).named_modules() if module is submodule)
    prefix = f"{prefix}." if prefix else ""
    state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return with_tied_weights_shared(state, submodule)


def with_tied_weights_shared(state: dict, model: torch.nn.Module) -> dict:
    """FSDP's gather gives each name of a tied weight (the MLM decoder tied to the word embeddings) its own copy;
    point the copies back at one tensor, so that `save_pretrained` stores it once, as it does for a plain model."""
    tied = model.get_expanded_tied_weights_keys() if hasattr(model, "get_expanded_tied_weights_keys") else {}
    return {**state, **{copy: state[source] for copy, source in tied.items() if copy in state and source in state}}
