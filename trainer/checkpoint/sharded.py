"""Sharded checkpoint state under FSDP (torch.distributed.checkpoint) and DeepSpeed (its own format): every rank
writes and reads its own shards.
"""
from __future__ import annotations

import os

import torch

from trainer.distributed.launch import sharded_state_name
from trainer.errors import require
from trainer.layout import DEEPSPEED_STATE_DIR, FSDP_STATE_DIR


def save_fsdp_checkpoint(model, optimizer, directory: str) -> None:
    """torch.distributed.checkpoint of model and optimizer into `directory`: every rank writes its own shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, unwrap_optimizer(optimizer))
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)


def load_fsdp_checkpoint(model, optimizer, directory: str) -> None:
    """Every rank reads back its shards (into state dicts of the current sharding, so the layout may differ)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    require(os.path.isfile(os.path.join(directory, ".metadata")), f"no FSDP checkpoint in {directory}")
    optimizer = unwrap_optimizer(optimizer)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper: the state-dict helpers step it once to create its state,
    which must not go through the wrapper's gradient-accumulation bookkeeping."""
    return getattr(optimizer, "optimizer", optimizer)


def save_deepspeed_checkpoint(model, optimizer, directory: str, tag: str = DEEPSPEED_STATE_DIR) -> None:
    """DeepSpeed's sharded checkpoint under `directory/tag`: every rank writes its own model/optimizer shards
    (the DeepSpeed engine `model` holds the optimizer; `optimizer` is there for the signature FSDP's needs)."""
    model.save_checkpoint(directory, tag=tag)


def load_deepspeed_checkpoint(model, optimizer, directory: str, tag: str = DEEPSPEED_STATE_DIR) -> None:
    """Every rank reads back its shards; a missing or foreign checkpoint is an error, not a silent fresh start."""
    path, _ = model.load_checkpoint(directory, tag=tag, load_module_strict=True)
    require(path is not None, f"no DeepSpeed checkpoint '{tag}' in {directory}")


def sharded_checkpoint_functions(accelerator):
    """(save, load) of this run's sharded checkpoint, each called as f(model, optimizer, directory) on every rank."""
    kind = sharded_state_name(accelerator)
    require(kind is not None, "sharded state is only saved and loaded under DeepSpeed or FSDP")
    return {DEEPSPEED_STATE_DIR: (save_deepspeed_checkpoint, load_deepspeed_checkpoint),
            FSDP_STATE_DIR: (save_fsdp_checkpoint, load_fsdp_checkpoint)}[kind]
