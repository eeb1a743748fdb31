"""Fine-tuning strategies: which parameters of a model train (classify and clm).

    full              everything trains
    freeze            embeddings and the lowest --freeze_layers encoder layers are frozen
    bitfit            only bias terms and the task head train (a causal LM's head is tied to the embeddings: biases
                      only)
    lora|prefix|prompt  adapters from the `peft` library (the base model stays frozen)
    adapter           bottleneck adapters (Houlsby or Pfeiffer, trainer.finetune.adapters): only the adapter and the
                      task head train; several tasks' adapters can sit in one model (classify only)
    gradual_unfreeze  head + top layer first, one more layer (embeddings last) every --unfreeze_every steps/epochs

Frozen parameters normally get `requires_grad=False` before the engine builds the optimizer and DDP, so neither
ever sees them. Gradual unfreezing cannot do that: DDP registers its gradient hooks and the optimizer its
parameters once, at start-up, and a parameter switched on later would train on each rank's local gradient alone.
So every parameter keeps `requires_grad=True`, and before each update the gradients of still-frozen layers are
set to None. AdamW skips a parameter whose `.grad` is None entirely: no weight decay, no moment update, no Adam
step count (zeroed gradients would be wrong: decay and the running moments would still move the weights).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.config.parsing import arg
from trainer.errors import UsageError, require
from trainer.finetune.adapters import ADAPTER_CONFIGS, check_adapter_name, prepare_adapter_training
from trainer.models.blocks import encoder_layers
from trainer.models.loading import is_adapter_directory
from trainer.tracking.console import logger

PEFT_STRATEGIES = ("lora", "prefix", "prompt")
STRATEGIES = ("full", "freeze", "bitfit", *PEFT_STRATEGIES, "adapter", "gradual_unfreeze")


@dataclass
class FinetuneArguments:
    """Which parameters train; shared by every job that fine-tunes (classify, clm)."""

    _argument_group_name = "fine-tuning"

    finetune_strategy: str = arg("full", "Which parameters train: " + ", ".join(STRATEGIES) + " (alias: --strategy; "
                                         "adapter: trainer.classify only).",
                                 choices=list(STRATEGIES), aliases=["--strategy"])
    freeze_layers: int = arg(0, "freeze: number of lowest encoder layers frozen (the embeddings always are).")
    unfreeze_every: int = arg(1, "gradual_unfreeze: open one more layer every this many --unfreeze_unit.")
    unfreeze_unit: str = arg("steps", "gradual_unfreeze: steps or epochs.", choices=["steps", "epochs"])
    lora_r: int = arg(8, "lora: rank of the update matrices.")
    lora_alpha: int = arg(16, "lora: scaling numerator (the update is scaled by alpha / r).")
    lora_dropout: float = arg(0.0, "lora: dropout on the adapter input.")
    lora_target_modules: list[str] = arg([], "lora: module names to adapt (default: peft's choice for the "
                                             "architecture).", nargs="*")
    num_virtual_tokens: int = arg(10, "prefix/prompt: number of virtual tokens learnt.")
    merge_adapters: bool = arg(False, "lora: also export the adapters merged into the base model to output_dir/merged.")
    adapter_config: str = arg("houlsby", "adapter: houlsby (after the attention and the feed-forward block of every "
                                         "layer) or pfeiffer (after the feed-forward block only).",
                              choices=list(ADAPTER_CONFIGS))
    adapter_reduction_factor: int = arg(16, "adapter: the bottleneck is hidden size / this factor wide.")
    adapter_name: str = arg("default", "adapter: the task's name (letters, digits, _ and -). With "
                                       "--model_name_or_path a directory that already holds adapters, a new name adds "
                                       "this task beside them (they stay frozen) and the output holds all of them.")

    def __post_init__(self):
        require(self.freeze_layers >= 0, "--freeze_layers must be >= 0")
        require(self.unfreeze_every > 0, "--unfreeze_every must be positive")
        require(self.lora_r > 0 and self.num_virtual_tokens > 0, "--lora_r and --num_virtual_tokens must be positive")
        require(self.adapter_reduction_factor > 0, f"--adapter_reduction_factor must be positive, got "
                                                   f"{self.adapter_reduction_factor}")
        require(not (self.merge_adapters and self.finetune_strategy == "adapter"),
                "--merge_adapters does not apply to --finetune_strategy adapter: a bottleneck adapter is not linear "
                "and cannot be folded into the base weights; drop --merge_adapters")
        require(not self.merge_adapters or self.finetune_strategy == "lora",
                "--merge_adapters only applies to --finetune_strategy lora (prefix and prompt tokens cannot merge)")
        if self.finetune_strategy == "adapter":
            check_adapter_name(self.adapter_name)

    @property
    def uses_adapters(self) -> bool:
        return self.finetune_strategy in (*PEFT_STRATEGIES, "adapter")

    def check_model(self, model_args, starting_point: str) -> None:
        """Adapters train on a pretrained model: refuse them on one trained from scratch. A directory of bottleneck
        adapters only continues as one (another strategy would lose the adapters or train the base under them)."""
        require(not self.uses_adapters or model_args.model_name_or_path,
                f"--finetune_strategy {self.finetune_strategy} trains adapters on a pretrained model; give "
                f"--model_name_or_path (e.g. {starting_point})")
        require(self.finetune_strategy == "adapter" or not is_adapter_directory(model_args.model_name_or_path),
                f"--model_name_or_path {model_args.model_name_or_path} holds bottleneck adapters, not a whole model; "
                f"add a task to it with --finetune_strategy adapter --adapter_name NEW_NAME, or give the base model")


def apply_strategy(model, args: FinetuneArguments, task_type: str = "SEQ_CLS"):
    """Return (the model to train, an optional `before_optimizer_step` hook) for `args.finetune_strategy`.

    `task_type` is peft's name of the task (SEQ_CLS, CAUSAL_LM): it decides how adapters wrap the model."""
    strategy = args.finetune_strategy
    hook = None
    if strategy == "freeze":
        require(args.freeze_layers <= len(encoder_layers(model)),
                f"--freeze_layers {args.freeze_layers} exceeds the model's {len(encoder_layers(model))} layers")
        for module in [*embeddings(model), *encoder_layers(model)[:args.freeze_layers]]:
            module.requires_grad_(False)
    elif strategy == "bitfit":
        head = {id(p) for p in head_parameters(model)}
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.endswith("bias") or id(parameter) in head)
        require(any(p.requires_grad for p in model.parameters()),
                f"--finetune_strategy bitfit: a {model.config.model_type} model has no bias terms to train; "
                f"choose lora or freeze")
    elif strategy in PEFT_STRATEGIES:
        model = wrap_with_adapters(model, args, task_type)
    elif strategy == "adapter":
        require(task_type == "SEQ_CLS", "--finetune_strategy adapter is for trainer.classify (a causal LM's head is "
                                        "its tied embeddings, not a per-task head); use lora or prefix")
        model = prepare_adapter_training(model, args.adapter_name, args.adapter_config, args.adapter_reduction_factor)
    elif strategy == "gradual_unfreeze":
        hook = GradualUnfreezing(model, args.unfreeze_every, args.unfreeze_unit)
    log_trainable_parameters(model, strategy)
    return model, hook


def embeddings(model) -> list[torch.nn.Module]:
    """The embedding modules: BERT-style `embeddings` (with its norm), or else every embedding table of the base
    model outside its layers (GPT-2: token and position embeddings)."""
    module = getattr(model.base_model, "embeddings", None)
    if module is not None:
        return [module]
    in_layers = {id(m) for m in encoder_layers(model).modules()}
    return [m for m in model.base_model.modules() if isinstance(m, torch.nn.Embedding) and id(m) not in in_layers]


def head_parameters(model) -> list[torch.nn.Parameter]:
    """Parameters outside the base model: the new classification head."""
    base = {id(p) for p in model.base_model.parameters()}
    return [p for p in model.parameters() if id(p) not in base]


def log_trainable_parameters(model, label: str) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("fine-tuning strategy %s: %s of %s parameters trainable (%.2f%%)", label, f"{trainable:,}",
                f"{total:,}", 100 * trainable / total)


# ---------------------------------------------------------------------------------------------------------- peft
def wrap_with_adapters(model, args, task_type: str):
    import peft

    kind = args.finetune_strategy
    # peft trains and saves the classifier ("classifier"/"score") next to the adapters. A BERT pooler is part of
    # the head too, and new when starting from an MLM checkpoint: left frozen it would stay random and, not
    # being saved, come back with different random values on reload. So it trains and saves with the head.
    # A causal LM's head is the pretrained (usually tied) output embedding: it stays frozen.
    head = None
    if task_type == "SEQ_CLS":
        head = ["classifier", "score"] + (["pooler"] if getattr(model.base_model, "pooler", None) is not None else [])
    common = dict(task_type=peft.TaskType[task_type], modules_to_save=head)
    if kind == "lora":
        config = peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                 target_modules=args.lora_target_modules or None, **common)
    elif kind == "prefix":
        require_past_key_values(model, task_type)
        config = peft.PrefixTuningConfig(num_virtual_tokens=args.num_virtual_tokens, **common)
    else:
        config = peft.PromptTuningConfig(num_virtual_tokens=args.num_virtual_tokens, **common)
    try:
        return peft.get_peft_model(model, config)
    except (ValueError, TypeError, AttributeError, NotImplementedError, ZeroDivisionError) as error:  # e.g. rwkv
        raise UsageError(f"--finetune_strategy {kind} is not possible on a {model.config.model_type} model: "
                         f"{str(error).splitlines()[0]}" + (" (name the layers with --lora_target_modules)"
                                                            if kind == "lora" else "")) from None


def require_past_key_values(model, task_type: str) -> None:
    """Prefix tuning feeds its virtual keys and values through the backbone's `past_key_values`. transformers 5
    dropped that argument from the encoder-only models (BERT, RoBERTa, DistilBERT, ...), where peft would fail
    only at the first forward; refuse up front instead. A causal LM is called with `past_key_values` as a keyword,
    which transformers 5 decoders take as their `cache` argument under its deprecated name."""
    import inspect

    names = ("past_key_values", "cache") if task_type == "CAUSAL_LM" else ("past_key_values",)
    if not any(name in inspect.signature(module.forward).parameters for name in names
               for module in (model, model.base_model)):
        raise UsageError(f"--finetune_strategy prefix needs a model that takes past_key_values, and this "
                         f"transformers version's {model.config.model_type} model does not; use "
                         f"--finetune_strategy prompt or lora")


def export_merged(peft_model, tokenizer, directory: str) -> None:
    """LoRA folded into the base weights: a plain transformers model that loads without peft."""
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    logger.info("merged model saved to %s", directory)


# ------------------------------------------------------------------------------------------- gradual unfreezing
class GradualUnfreezing:
    """Masks the gradients of layers not yet unfrozen; see the module docstring for why not requires_grad."""

    def __init__(self, model, every: int, unit: str):
        layers = encoder_layers(model)
        # Unfreezing order: top layer first, down to the embeddings; the head and everything else train always.
        self.groups = [list(layer.parameters()) for layer in reversed(layers)] + [
            [p for module in embeddings(model) for p in module.parameters()]]
        self.every, self.unit = every, unit
        self.model = model
        self.unfrozen = 0

    def groups_unfrozen_at(self, step: int, epoch: int) -> int:
        elapsed = step if self.unit == "steps" else epoch
        return min(1 + elapsed // self.every, len(self.groups))

    def __call__(self, step: int, epoch: int) -> None:
        unfrozen = self.groups_unfrozen_at(step, epoch)
        if unfrozen != self.unfrozen:
            self.unfrozen = unfrozen
            frozen = sum(p.numel() for group in self.groups[unfrozen:] for p in group)
            total = sum(p.numel() for p in self.model.parameters())
            logger.info("gradual unfreezing at step %d: %d of %d layer groups open, %s of %s parameters trainable",
                        step, unfrozen, len(self.groups), f"{total - frozen:,}", f"{total:,}")
        for group in self.groups[unfrozen:]:
            for parameter in group:
                parameter.grad = None
