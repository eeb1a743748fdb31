"""The model section of the command line: what to start from, or what to build from scratch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainer.config.parsing import arg
from trainer.errors import require
from trainer.models.checkpointing import checkpoint_options

LOW_PRECISION = ("bfloat16", "float16")


@dataclass
class ModelArguments:
    _argument_group_name = "model"

    model_name_or_path: Optional[str] = arg(
        None, "Local model directory or Hub model id to start from. Leave unset to train from scratch.")
    config_name: Optional[str] = arg(None, "Config (directory or Hub id) for a model trained from scratch.")
    model_type: Optional[str] = arg(
        None, "Architecture for a model trained from scratch (e.g. bert, roberta, gpt2, llama). Unset, with no "
        "model or config given: the job's tiny preset (BERT for mlm and classify, GPT-2 for clm).")
    config_overrides: Optional[str] = arg(
        None, "Comma-separated config changes for a model trained from scratch, e.g. "
        "'num_hidden_layers=4,hidden_size=256'.")
    tokenizer_name: Optional[str] = arg(
        None, "Tokenizer (directory or Hub id) if not the model's. With neither this nor a model given, one is "
        "trained on the training text (WordPiece for mlm and classify, byte-level BPE for clm).")
    tokenizer_vocab_size: int = arg(8000, "Vocabulary size of a tokenizer trained on the training text.")
    attn_implementation: Optional[str] = arg(
        None, "Attention kernel: sdpa (transformers' default), eager, or flash_attention_2 (needs the flash-attn "
        "package and a GPU; clm's --packing documents then takes its variable-length path).",
        choices=["sdpa", "eager", "flash_attention_2"])
    torch_dtype: Optional[str] = arg(
        None, "dtype the weights are loaded (or built) in, passed to from_pretrained/from_config as `dtype`: auto "
        "(the checkpoint's own; float32 from scratch), bfloat16, float16 or float32. Unset: float32, the master "
        "weights the optimizer updates (a bf16 checkpoint is upcast); --bf16 autocast computes in bfloat16 either "
        "way. Weights in bfloat16/float16 are trained without float32 master weights and need "
        "--allow_low_precision_weights.", choices=["auto", *LOW_PRECISION, "float32"])
    allow_low_precision_weights: bool = arg(
        False, "Train weights held in bfloat16/float16 (--torch_dtype bfloat16/float16, or auto on such a "
        "checkpoint) without float32 master weights: half the memory, but small updates are rounded away.")
    gradient_checkpointing: bool = arg(
        False, "Keep only each transformer block's input in the forward and recompute the block in the backward: "
        "less activation memory for about a third more compute (see trainer/models/checkpointing.py).")
    gradient_checkpointing_every: int = arg(
        1, "With --gradient_checkpointing, checkpoint only every k-th transformer block (the 1st, the (k+1)-th, "
        "...): the others keep their activations, for less recomputation and more memory. 1: every block.")
    gradient_checkpointing_kwargs: Optional[str] = arg(
        None, "Options of torch.utils.checkpoint with --gradient_checkpointing, a JSON object, e.g. "
        "'{\"use_reentrant\": false}' (the default; also preserve_rng_state, determinism_check, debug).")

    def __post_init__(self):
        require(not (self.config_overrides and self.model_name_or_path),
                "--config_overrides only applies to a model trained from scratch; drop it or drop "
                "--model_name_or_path")
        require(self.tokenizer_vocab_size >= 100, "--tokenizer_vocab_size must be at least 100")
        checkpoint_options(self.gradient_checkpointing_kwargs)  # a bad one is refused before any work
        every = self.gradient_checkpointing_every
        require(every >= 1, f"--gradient_checkpointing_every must be at least 1 (1: every block), got {every}")
        require(every == 1 or self.gradient_checkpointing, f"--gradient_checkpointing_every {every} needs "
                                                           f"--gradient_checkpointing; add it")
        if self.torch_dtype in LOW_PRECISION:
            self.check_weights_dtype(self.torch_dtype, f"--torch_dtype {self.torch_dtype}")

    def check_weights_dtype(self, dtype: str, source: str) -> None:
        """Refuse weights in `dtype` (e.g. "bfloat16") without --allow_low_precision_weights."""
        require(dtype not in LOW_PRECISION or self.allow_low_precision_weights,
                f"{source} trains the weights in {dtype} without float32 master weights; pass "
                f"--allow_low_precision_weights to do so, or drop --torch_dtype (float32 weights, with --bf16 "
                f"autocast for speed)")

    @property
    def checkpoint_options(self) -> dict:
        """torch.utils.checkpoint's options for --gradient_checkpointing."""
        return checkpoint_options(self.gradient_checkpointing_kwargs)
