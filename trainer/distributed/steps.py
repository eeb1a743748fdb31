"""The mechanics of an optimizer step across processes: gradient sync, backward, DeepSpeed's step, clipping."""
from __future__ import annotations

import torch

from trainer.distributed.launch import uses_deepspeed


def set_gradient_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Skip the gradient reduction (DDP's all-reduce, FSDP's reduce-scatter) on non-final micro-steps of
    gradient accumulation; FSDP then accumulates unsharded gradients locally until the final micro-step.

    We flip the flag that `DDP.no_sync()` flips rather than use the context manager, so that the loop need not
    wrap the final micro-step differently from the others (the same trick as nanoGPT).
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = enabled
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


def backward(accelerator, loss: torch.Tensor, last_micro_step: bool) -> None:
    """Backward of one micro-step; the gradient sync flag (`set_gradient_sync`) was set before the forward.

    Under DeepSpeed the engine accumulates and reduces itself, at the boundary we mark; it clips and steps in
    `step_deepspeed_engine`. It would also divide the loss by the accumulation steps; that is switched off (`scale_wrt_gas`)
    because the loss is already normalised by the item count of the whole step, exactly as under DDP.
    """
    if uses_deepspeed(accelerator):
        engine = accelerator.deepspeed_engine_wrapped.engine
        engine.set_gradient_accumulation_boundary(is_boundary=last_micro_step)
        engine.backward(loss, scale_wrt_gas=False)
    else:
        accelerator.backward(loss)


def step_deepspeed_engine(accelerator) -> None:
    """Under DeepSpeed: the engine's step (clipping, optimizer update, zeroed gradients); a no-op elsewhere.

    accelerate's `DeepSpeedEngineWrapper.backward` runs `engine.backward` and, at the accumulation boundary,
    `engine.step` in one call, which leaves no point where the step's reduced gradients can be changed before the
    update. `backward` above runs the same `engine.backward`; the engine calls this after the hooks that sit
    between the backward passes and the update (`Task.before_optimizer_step`, EWC's penalty gradient).
    """
    if uses_deepspeed(accelerator):
        accelerator.deepspeed_engine_wrapped.engine.step()


def clip_gradients(accelerator, model, max_norm: float):
    """Clip to `max_norm` and return the gradient norm, a device tensor read only when logged.

    Under DeepSpeed the engine clipped in its step (at the boundary `backward` marks); its norm is read from the
    DeepSpeed engine itself, because accelerate's `clip_grad_norm_` turns it into a float: a device sync per step.
    """
    if uses_deepspeed(accelerator):
        return model.get_global_grad_norm()
    return accelerator.clip_grad_norm_(model.parameters(), max_norm)
