"""--torch_compile: the model's repeated blocks compiled one by one, in place, on shapes that never change.

Compiling the whole task model (what accelerate's `dynamo_backend` does) put trainer.mlm's masked-row tensors into
the graph: their sizes change every batch, so the graph recompiled and then ran with dynamic shapes, and gained
nothing on a GPU. The transformer blocks see only [batch, sequence, width] hidden states, the same every step, and
are one class: `nn.Module.compile` on each gives one graph that all of them reuse (parameters are graph inputs), the
way torchtitan compiles per block. A task names the modules whose shapes follow the data (`Task.eager_modules`:
mlm's last layer on the masked rows); they, the embeddings and the head stay eager. Compiling in place keeps every
parameter name, so checkpoints and `save_pretrained` are those of the eager model.
accelerate's `compile_regions` does regional compilation too, but compiles every block and every other leaf (mlm's
masked-row layer and head included, which then recompile per shape) and wraps blocks in OptimizedModule (renamed
parameters); hence this small version.

Evaluation runs the blocks eagerly (`evaluation_stance`): without gradients the graph differs, and every evaluation
batch size would be one more compilation, for a pass that runs a few times per run.
"""
from __future__ import annotations

import contextlib

import torch

from trainer.errors import require
from trainer.models.blocks import repeated_blocks
from trainer.tracking.console import logger


def compile_blocks(model: torch.nn.Module, backend: str, mode: str, eager_modules=()) -> int:
    """Compile each repeated block of `model` in place except `eager_modules`; returns how many were compiled."""
    known = torch._dynamo.list_backends(exclude_tags=())
    require(backend in known, f"--torch_compile_backend {backend} is not a torch.compile backend; use one of "
                              f"{', '.join(known)}")
    skipped = {id(module) for module in eager_modules}
    every_block = list(repeated_blocks(model) or [])
    blocks = [block for block in every_block if id(block) not in skipped]
    options = {} if mode == "default" else {"mode": mode}
    for block in blocks:
        block.compile(backend=backend, **options)
    logger.info("torch.compile (%s, mode %s): %d of the model's %d %s blocks; the rest runs eagerly", backend, mode,
                len(blocks), len(every_block), type(blocks[0]).__name__ if blocks else "repeated")
    return len(blocks)


def evaluation_stance(compiled: bool):
    """A context in which compiled blocks run eagerly and nothing compiles (see the module docstring)."""
    return torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()
