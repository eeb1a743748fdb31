"""--gradient_checkpointing: each of the model's repeated blocks (models/blocks.py) keeps only its inputs in the
forward and runs again in the backward, with torch.utils.checkpoint. --gradient_checkpointing_every k does so for
the 1st, the (k+1)-th, ... block only, the others keeping their activations. Counted from the first block, so the
last is mostly left out: recomputed, it would add to every block held when the backward starts.

Wrapped here rather than with transformers' `gradient_checkpointing_enable`: that one checkpoints every
`GradientCheckpointingLayer` the model happens to contain (not only its stack of blocks, and nothing in a model
whose blocks are not one), needs `supports_gradient_checkpointing`, and would not be the one rule by which FSDP2
shards (`name_fsdp_blocks`) and --torch_compile compiles. Each block's `forward` is replaced in place (no wrapper
module, so parameter names, checkpoints and `save_pretrained` are those of the plain model) and the block's
__call__ stays outside the checkpoint: FSDP2's hooks gather a unit's parameters around exactly the forward that is
recomputed, as torchtitan orders it, and a compiled block traces the checkpoint into its graph. mlm's sparse last
layer (an instance `forward`, models/sparse_mlm.py) is wrapped like every other block: its masked-row forward is
what is recomputed.

Non-reentrant by default; torch keeps `preserve_rng_state=True`, so a recomputed dropout draws the same masks and
the parameters come out as without checkpointing. With `use_reentrant: true`, a block whose inputs need no gradient
(frozen embeddings: LoRA, prompt tuning, --finetune_strategy freeze) would get none, so the embeddings' output is
made to require it (transformers' `enable_input_require_grads`).
"""
from __future__ import annotations

import functools
import json

import torch
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache

from trainer.errors import UsageError, require
from trainer.models.blocks import repeated_blocks
from trainer.tracking.console import logger

# torch.utils.checkpoint.checkpoint's options, with the type each takes.
OPTIONS = {"use_reentrant": bool, "preserve_rng_state": bool, "determinism_check": str, "debug": bool}


def checkpoint_options(text: str | dict | None) -> dict:
    """--gradient_checkpointing_kwargs (a JSON dict, or a dict from a config file) as checkpoint() options."""
    flag = "--gradient_checkpointing_kwargs"
    try:
        options = json.loads(text) if isinstance(text, str) else text or {}
    except json.JSONDecodeError as error:
        raise UsageError(f"{flag} is not JSON ({error.msg}): {text!r}; e.g. '{{\"use_reentrant\": false}}'") from None
    require(isinstance(options, dict), f"{flag} must be a JSON object, e.g. '{{\"use_reentrant\": false}}'; "
                                       f"got {text!r}")
    unknown = sorted(set(options) - set(OPTIONS))
    require(not unknown, f"{flag}: unknown option {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    for name, value in options.items():
        require(isinstance(value, OPTIONS[name]), f"{flag}: {name} must be a {OPTIONS[name].__name__}, got {value!r}")
    return {"use_reentrant": False, **options}


def checkpoint_blocks(hf_model: torch.nn.Module, options: dict, every: int = 1) -> int:
    """Checkpoint every `every`-th repeated block of `hf_model` in training (the first, then each `every` blocks
    on); returns how many. Before compilation and before `prepare` (FSDP2 then shards the same blocks)."""
    blocks = repeated_blocks(hf_model)
    require(blocks is not None, f"--gradient_checkpointing: a {hf_model.config.model_type} model has no repeated "
                                f"blocks to checkpoint")
    checkpointed = blocks[::every]
    for block in checkpointed:
        block.forward = functools.partial(checkpointed_forward, block.forward, block, options)
    if options["use_reentrant"] and not all(p.requires_grad for p in hf_model.get_input_embeddings().parameters()):
        hf_model.enable_input_require_grads()
    logger.info("gradient checkpointing (%s): %d of the model's %d %s blocks", json.dumps(options),
                len(checkpointed), len(blocks), type(blocks[0]).__name__)
    return len(checkpointed)


def checkpointed_forward(forward, block: torch.nn.Module, options: dict, *args, **kwargs):
    if not (block.training and torch.is_grad_enabled()):  # evaluation: nothing to recompute
        return forward(*args, **kwargs)
    caches = [value for value in (*args, *kwargs.values()) if isinstance(value, Cache)]
    if caches:  # prefix tuning's virtual keys and values
        require(not options["use_reentrant"], "--gradient_checkpointing_kwargs use_reentrant true cannot carry "
                                              "gradients to prefix tuning's virtual tokens (they are no input of "
                                              "the block); use the default, use_reentrant false")
        forward = with_caches_rolled_back(forward, caches)
    # Keyword arguments bound by partial: the reentrant variant takes positional tensors only.
    return checkpoint(functools.partial(forward, **kwargs), *args, **options)


def with_caches_rolled_back(forward, caches: list[Cache]):
    """`forward`, each call starting from the caches as they are now. A block appends its keys and values to the
    cache (prefix tuning passes its virtual tokens as one): recomputed as it is, it would append them a second
    time and attend to both copies. Each update makes new tensors, so holding the layers' attributes is enough."""
    saved = [(cache, list(cache.layers), [dict(vars(layer)) for layer in cache.layers]) for cache in caches]

    def from_saved_caches(*args, **kwargs):
        for cache, layers, states in saved:
            cache.layers[:] = layers
            for layer, state in zip(layers, states):
                vars(layer).clear()
                vars(layer).update(state)
        return forward(*args, **kwargs)

    return from_saved_caches
