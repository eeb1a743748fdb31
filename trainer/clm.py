"""trainer.clm: causal-language-model pretraining and fine-tuning (GPT-2, Llama, Qwen, Mistral, ...).

    python -m trainer.clm                                    # offline demo on the embedded corpus
    torchrun --nproc_per_node=8 -m trainer.clm --model_name_or_path gpt2 --train_file corpus.txt --block_size 512 ...

The command line is the transformers `run_clm.py` example's. This module holds only what is specific to causal
LM: documents into blocks (optionally packed with per-document attention), the next-token loss computed in chunks,
perplexity and generation probes. Training is the engine's; fine-tuning strategies are trainer.finetune.strategies's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.config.job_config import JobConfig
from trainer.config.parsing import arg
from trainer.data.arguments import CorpusArguments, DataFiles
from trainer.data.demo import tiny_gpt2_config, train_byte_level_bpe_tokenizer, write_mlm_corpus
from trainer.data.loading import first_samples, pad_rows
from trainer.data.tokenization import Tokenization, job_data
from trainer.distributed.collectives import main_process_first
from trainer.engine.jobs import JobSpec, run
from trainer.engine.memory_plan import Head, PlannedModel
from trainer.engine.task import Task, perplexity_metrics
from trainer.errors import exits_cleanly_on_usage_error, require
from trainer.finetune.strategies import FinetuneArguments, apply_strategy
from trainer.models.fused_loss import cross_entropy_in_place, fused_linear_cross_entropy
from trainer.models.loading import (check_sequence_length, load_model, max_positions, meta_model,
                                    planned_tokenizer_size)

DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "clm_demo.yaml")
RUN_CLM_MAX_BLOCK = 1024  # run_clm.py's cap on the default block size
DEFAULT_LOSS_CHUNK_TOKENS = 1024  # measured: the fused loss is as fast at 256-1024 rows, slower at one big chunk
PACKING = ("stream", "documents")


@dataclass
class ClmArguments:
    _argument_group_name = "causal-language modelling"

    block_size: Optional[int] = arg(None, "Tokens per training block. Unset: the model's positions, at most 1024 "
                                          "(as run_clm.py).")
    packing: str = arg("stream", "How documents fill blocks. stream: one token stream cut into blocks (run_clm.py), "
                                 "attention crossing documents. documents: the same blocks, but attention and "
                                 "position ids restart at each document (needs a tokenizer with an EOS token).",
                       choices=list(PACKING))
    keep_linebreaks: bool = arg(True, "Keep each line's newline in .txt data (run_clm.py's flag; "
                                      "--no_keep_linebreaks drops them).")
    loss_chunk_tokens: int = arg(
        DEFAULT_LOSS_CHUNK_TOKENS, "Predicted tokens per chunk of the fused output layer + cross-entropy (its "
        "gradients computed in the forward), so [batch, block, vocabulary] logits never exist at once. 0: the "
        "model's own full logits.")
    probe_prompts: list[str] = arg(["the acting was", "this movie is", "i would"],
                                   "Prompts continued greedily after each evaluation (log and TensorBoard text). "
                                   "Pass an empty string to disable.", nargs="*")
    probe_new_tokens: int = arg(24, "Tokens generated per probe prompt.")

    def __post_init__(self):
        require(self.block_size is None or self.block_size >= 2, f"--block_size must be at least 2, got "
                                                                 f"{self.block_size}")
        require(self.loss_chunk_tokens >= 0,
                f"--loss_chunk_tokens must be >= 0, got {self.loss_chunk_tokens}")
        require(self.probe_new_tokens > 0, f"--probe_new_tokens must be positive, got {self.probe_new_tokens}")


# ------------------------------------------------------------------------------------------ data preparation
@dataclass(frozen=True)
class DocumentEncoder:
    """Texts -> input ids: every non-empty text as the tokenizer encodes it (BOS where it adds one), followed by
    EOS when it has one. A picklable object: streamed data (trainer.data.streaming) encodes in the loader workers."""

    tokenizer: object

    def __call__(self, texts: list[str]) -> dict:
        eos = self.tokenizer.eos_token_id
        texts = [text for text in texts if text and not text.isspace()]
        encoded = self.tokenizer(texts, verbose=False)["input_ids"] if texts else []  # it fails on no texts
        if eos is not None:
            encoded = [ids if ids and ids[-1] == eos else ids + [eos] for ids in encoded]
        return {"input_ids": encoded}


class ClmTokenization(Tokenization):
    """Text -> causal-LM blocks: documents tokenized (EOS-terminated), concatenated and cut into --block_size
    blocks (see trainer.data.tokenization). Both --packing modes train on the same blocks (documents only restarts
    attention and positions in the collator), so packing is not a token option."""

    job = "clm"
    length_flag = "--block_size"
    new_tokenizer = staticmethod(train_byte_level_bpe_tokenizer)
    model_preset = staticmethod(tiny_gpt2_config)

    def encoder(self, config, tokenizer) -> DocumentEncoder:
        return DocumentEncoder(tokenizer)

    def sequence_length(self, config, model_config, prepared_length: int | None = None) -> int:
        default = min(RUN_CLM_MAX_BLOCK, max_positions(model_config) or RUN_CLM_MAX_BLOCK)
        return config.clm.block_size or prepared_length or default

    def token_options(self, config) -> dict:
        return {"keep_linebreaks": config.clm.keep_linebreaks}

    def keep_linebreaks(self, config) -> bool:
        return config.clm.keep_linebreaks

    def check_tokenizer(self, config, tokenizer) -> None:
        require(config.clm.packing != "documents" or tokenizer.eos_token_id is not None,
                "--packing documents separates documents by the EOS token, and this tokenizer has none; use "
                "--packing stream or a tokenizer with an EOS token")


CLM_TOKENIZATION = ClmTokenization()


def document_positions(input_ids: np.ndarray, eos_token_id: int) -> np.ndarray:
    """Position ids restarting at 0 after every EOS (and at the start of each block)."""
    index = np.broadcast_to(np.arange(input_ids.shape[1]), input_ids.shape)
    starts = np.zeros(input_ids.shape, dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = input_ids[:, :-1] == eos_token_id
    return index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)


@dataclass
class BlockCollator:
    """Blocks -> input ids, (packed) position ids, and the predicted tokens with the flat positions predicting them.

    Position t predicts token t+1 unless t+1 starts a document (packing): exactly the tokens the loss counts, so
    `num_loss_items` is the denominator of an exact token-weighted mean. Blocks are full, never padded. Positions and
    targets are computed here on the host, so the model needs no shift, no ignore index and no device sync.
    """

    pad_token_id: int
    eos_token_id: Optional[int]  # set: --packing documents
    epoch: int = 0  # set by the engine; causal LM has no per-epoch randomness

    def __call__(self, batch: dict) -> dict:
        input_ids = pad_rows(batch["input_ids"], self.pad_token_id)
        predicted = np.ones(input_ids.shape, dtype=bool)
        out = {"input_ids": torch.from_numpy(input_ids), "sample_id": torch.as_tensor(batch["sample_id"])}
        if self.eos_token_id is not None:
            positions = document_positions(input_ids, self.eos_token_id)
            predicted &= positions != 0
            out["position_ids"] = torch.from_numpy(positions)
        rows, targets = np.nonzero(predicted[:, 1:])
        out["predicting_positions"] = torch.from_numpy(rows * input_ids.shape[1] + targets)
        out["predicted_tokens"] = torch.from_numpy(input_ids[rows, targets + 1])
        out["num_loss_items"] = len(rows)
        return out


# ------------------------------------------------------------------------------------------------- the model
class CausalLMTask(torch.nn.Module):
    """Next-token cross-entropy summed over the predicted tokens (the engine divides by those of the whole step).

    The body runs once; the output layer and the loss run on the predicting rows only, `chunk` rows at a time,
    fused (trainer/models/fused_loss.py: each chunk's gradients computed in its forward): float32 logits exist for one
    chunk at a time, never for [batch, block, vocabulary]. Models whose logits are not a plain linear map of the last
    hidden state (a transform before the output layer as in BERT, soft-capping, logit scaling) and prefix/prompt
    tuning (peft inserts virtual tokens in the model's own forward) use the model's full logits instead, as does
    `chunk` 0.
    """

    def __init__(self, hf_model, chunk: int):
        super().__init__()
        self.hf_model = hf_model  # plain transformers model, or a peft model around one
        self.chunk = chunk
        inner = hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model
        self.virtual_tokens = getattr(getattr(hf_model, "active_peft_config", None), "num_virtual_tokens", None)
        config = inner.config
        head = inner.get_output_embeddings()
        # A head that is the model's own child, applied to the last hidden state (not, e.g., BERT's transform first).
        plain_head = (isinstance(head, torch.nn.Linear) and any(child is head for child in inner.children())
                      and getattr(config, "final_logit_softcapping", None) is None
                      and getattr(config, "logit_scale", None) is None)
        self.chunked = chunk > 0 and plain_head and self.virtual_tokens is None
        from transformers.utils.generic import is_flash_attention_requested

        self.flash_attention = is_flash_attention_requested(config)
        self.__dict__["inner"] = inner  # not a second registration of the same module
        self.output_loss = OutputLoss(head, chunk)  # before any backend wraps the task: ZeRO-3 hooks it too

    def forward(self, input_ids, predicting_positions, predicted_tokens, position_ids=None):
        # No cache: with one, transformers would not derive the per-document mask from the position ids.
        # Position ids only when packing: some architectures (e.g. Mamba) take none.
        if position_ids is not None and self.flash_attention:
            # transformers takes FlashAttention's variable-length path only for a batch of one row (what its
            # DataCollatorWithFlattening gives); with more rows it would attend across documents. Every block's
            # positions start at 0, so its blocks laid end to end in one row stay apart as well.
            input_ids, position_ids = input_ids.reshape(1, -1), position_ids.reshape(1, -1)
        inputs = {"input_ids": input_ids, "use_cache": False, **({} if position_ids is None else
                                                                {"position_ids": position_ids})}
        if self.chunked:
            hidden = self.inner.base_model(**inputs).last_hidden_state
            rows = hidden.flatten(0, 1).index_select(0, predicting_positions)
            return {"loss_sum": self.output_loss(rows, predicted_tokens)}
        logits = self.hf_model(**inputs).logits
        logits = logits[:, -input_ids.shape[1]:]  # prompt tuning prepends its virtual tokens' positions
        rows = logits.flatten(0, 1).index_select(0, predicting_positions)
        return {"loss_sum": F.cross_entropy(rows.float(), predicted_tokens, reduction="sum")}


class OutputLoss(torch.nn.Module):
    """The output layer + summed cross-entropy of the predicting rows, as a module of its own for ZeRO-3.

    The loss uses the head's parameters outside the head's forward. ZeRO-3 holds a parameter whole only while a
    module that owns it, or has it registered as an external parameter, runs its forward or backward (DeepSpeed's
    module hooks gather it there and release it after). DeepSpeed registers a parameter read in another module's
    forward by itself only when the read finds it partitioned: one already gathered (prefetched along the module
    trace of the evaluation, where the head ran as a module) stayed unregistered, was released before the backward,
    and the fused gradient met a size-0 parameter there. (GPT-2 escaped: its tied embedding is gathered
    again in the backward before the summed gradient lands.) So the head's parameters are registered here: whole in
    this module's forward, where the loss stays fused, and in its backward, where their gradients land."""

    def __init__(self, head: torch.nn.Linear, chunk: int):
        super().__init__()
        self.__dict__["head"] = head  # the model's own module, not registered twice
        self.chunk = chunk

    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Positional: DeepSpeed's backward hooks see only positional tensors. Registered before the call, whose
        # first pre-forward hook is DeepSpeed's fetch; idempotent, and without reading the parameters through the
        # module (which under ZeRO-3 gathers them).
        zero3 = [parameter for parameter in self.head.parameters(recurse=False) if hasattr(parameter, "ds_id")]
        if zero3:
            from deepspeed.runtime.zero import register_external_parameter

            for parameter in zero3:
                register_external_parameter(self, parameter)
        return super().__call__(hidden, targets)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return chunked_cross_entropy(hidden, self.head, targets, self.chunk)


def head_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    if torch.is_grad_enabled():  # recomputed in the backward (checkpoint): autograd needs the logits as they were
        return F.cross_entropy(logits, targets, reduction="sum")
    return cross_entropy_in_place(logits, targets)[0]  # evaluation: one chunk-sized buffer, not two


def chunked_cross_entropy(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor,
                          chunk: int) -> torch.Tensor:
    """sum_i CE(head(hidden_i), target_i), `chunk` rows of logits at a time.

    In training, fused (gradients in the forward, nothing recomputed) when the head's weight is materialised here,
    as it is under ZeRO-3 inside `OutputLoss`. A weight that exists only inside its own module's forward instead
    sends each chunk through `head` itself, recomputed in the backward (torch.utils.checkpoint)."""
    if torch.is_grad_enabled() and head.weight.numel() == head.in_features * head.out_features:
        return fused_linear_cross_entropy(hidden, head, targets, chunk)
    if hidden.shape[0] <= chunk:
        return head_loss(head, hidden, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        part = (head, hidden[start:start + chunk], targets[start:start + chunk])
        total = total + (checkpoint(head_loss, *part, use_reentrant=False) if torch.is_grad_enabled()
                         else head_loss(*part))
    return total


# --------------------------------------------------------------------------------------------------- probes
def generation_probes(tokenizer, prompts: list[str], new_tokens: int):
    """After each evaluation: greedy continuations of the prompts, returned for the log and TensorBoard."""
    prompts = [p for p in prompts if p.strip()]

    def probe(task_model: CausalLMTask) -> dict:
        model = task_model.hf_model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        continuations = []
        for prompt in prompts:
            encoded = tokenizer(prompt, return_tensors="pt").to(device)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            output = model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
            new = tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
            continuations.append(f"{prompt} -> {new.strip()}")
        model.train(was_training)
        return {"probes": continuations}

    return probe if prompts else None


# ------------------------------------------------------------------------------------------------------ main
def planned_model(config: JobConfig) -> PlannedModel:
    """The memory plan's view of the job: the model on the meta device with its --finetune_strategy applied (what
    it trains), the block size and the output layer (CausalLMTask's chunked, fused loss; the model's full logits
    with --loss_chunk_tokens 0)."""
    from transformers import AutoModelForCausalLM

    model = meta_model(config.model, AutoModelForCausalLM, planned_tokenizer_size(config.model),
                       preset=tiny_gpt2_config, decoder=True)
    block_size = CLM_TOKENIZATION.sequence_length(config, model.config)
    check_sequence_length(block_size, model.config, CLM_TOKENIZATION.length_flag)
    model, _ = apply_strategy(model, config.finetune, task_type="CAUSAL_LM")
    chunk = config.clm.loss_chunk_tokens
    return PlannedModel(model, block_size,
                        Head("fused", chunk_tokens=chunk) if chunk else Head("logits"))


def build_task(config: JobConfig, files: DataFiles, accelerator) -> Task:
    model_args, data_args, ft_args, clm_args = config.model, config.data, config.finetune, config.clm

    ft_args.check_model(model_args, "gpt2 or the output of an earlier trainer.clm run")
    with main_process_first(accelerator):  # one process per node tokenizes; the others load its cache
        packed = clm_args.packing == "documents"
        require(not (packed and ft_args.finetune_strategy in ("prefix", "prompt")),
                f"--packing documents restarts position ids inside blocks, which peft's "
                f"{ft_args.finetune_strategy} tuning does not pass to the model; use --packing stream")
        data = job_data(config, files, CLM_TOKENIZATION, lambda tokenizer: causal_lm(model_args, tokenizer))
        tokenizer, model, blocks, block_size = data.tokenizer, data.model, data.splits, data.length
        train_set, eval_set = map_style_blocks(blocks, data_args, block_size) if data.stream is None else (
            None, blocks["validation"])
        other_sets = data.other_sources(files)
    trained_model, before_optimizer_step = apply_strategy(model, ft_args, task_type="CAUSAL_LM")
    # Blocks are full: padding never happens; a tokenizer without a pad token (GPT-2's) is fine.
    pad_token_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    collator = BlockCollator(pad_token_id, tokenizer.eos_token_id if packed else None)
    return Task(
        model=CausalLMTask(trained_model, clm_args.loss_chunk_tokens),
        train_dataset=train_set, eval_dataset=eval_set, train_stream=data.stream,
        other_sources=other_sets,
        train_collator=collator, eval_collator=collator, compute_metrics=perplexity_metrics("predicted_tokens"),
        hf_model=trained_model, tokenizer=tokenizer, columns=["input_ids"],
        after_evaluation=generation_probes(tokenizer, clm_args.probe_prompts, clm_args.probe_new_tokens),
        before_optimizer_step=before_optimizer_step, main_metric="eval_perplexity",
    )


def causal_lm(model_args, tokenizer):
    """The model: a checkpoint's, or a new one (the tiny GPT-2 preset by default) with the tokenizer's BOS/EOS."""
    from transformers import AutoModelForCausalLM

    new_model_ids = {} if model_args.model_name_or_path else {
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    return load_model(model_args, AutoModelForCausalLM, tokenizer, preset=CLM_TOKENIZATION.model_preset,
                      decoder=True, **new_model_ids)


def map_style_blocks(blocks, data_args, block_size: int):
    """(training set, evaluation set), cut to --max_train_samples/--max_eval_samples and checked to be non-empty."""
    train_set, eval_set = first_samples(blocks["train"], blocks["validation"], data_args)
    require(len(train_set) > 0, f"the training text is too short for one block of {block_size} tokens; use "
                                f"more text or a smaller --block_size")
    require(len(eval_set) > 0, f"the evaluation text is too short for one block of {block_size} tokens; use "
                               f"more validation text or a smaller --block_size")
    return train_set, eval_set


def headline(metrics: dict) -> str:
    return f"perplexity {metrics['init_eval_perplexity']:.2f} -> {metrics['eval_perplexity']:.2f}"


CLM_JOB = JobSpec(
    sections={"data": CorpusArguments, "finetune": FinetuneArguments, "clm": ClmArguments}, build_task=build_task,
    demo_config=DEMO_CONFIG, write_demo_data=write_mlm_corpus, demo_name="movie-review corpus",
    model_card_task="causal language modelling", pipeline_tag="text-generation", headline=headline,
    tokenization=CLM_TOKENIZATION, planned_model=planned_model)


@exits_cleanly_on_usage_error
def main(argv: list[str] | None = None) -> dict:
    return run(CLM_JOB, argv)


if __name__ == "__main__":
    main()
