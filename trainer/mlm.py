"""trainer.mlm: masked-language-model pretraining and domain adaptation.

    python -m trainer.mlm                                    # offline demo on the embedded corpus
    torchrun --nproc_per_node=8 -m trainer.mlm --model_name_or_path bert-base-uncased --train_file corpus.txt ...

This module holds only what is specific to MLM: tokenizing and chunking text, masking, the task model, perplexity
and fill-mask probes. The masked-rows-only model computation is in trainer.models.sparse_mlm; training is the engine's.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from trainer.config.job_config import JobConfig
from trainer.config.parsing import arg
from trainer.data.arguments import DataArguments, DataFiles
from trainer.data.batches import SampleWiseCollator
from trainer.data.demo import write_mlm_corpus
from trainer.data.loading import cache_file_for, first_samples, pad_rows
from trainer.data.tokenization import Tokenization, job_data
from trainer.distributed.collectives import main_process_first
from trainer.engine.jobs import JobSpec, run
from trainer.engine.memory_plan import Head, PlannedModel
from trainer.engine.task import Task, perplexity_metrics
from trainer.engine.throughput import training_flops_per_token
from trainer.errors import exits_cleanly_on_usage_error, require
from trainer.models.loading import (check_sequence_length, load_model, meta_model,
                                    planned_tokenizer_size)
from trainer.models.sparse_mlm import (IGNORE, MaskedRows, SPARSE_HEAD_TYPES, can_sparsify_last_layer,
                                       install_sparse_last_layer, last_encoder_layer, last_layer_row_parameters,
                                       masked_row_tensors, prediction_head)
from trainer.tracking.console import logger

DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "mlm_demo.yaml")
TRAIN_STREAM, EVAL_STREAM = 0, 1  # keep training and evaluation masks from sharing random draws
UNIGRAM_SEQUENCES = 1 << 17  # training sequences the unigram baseline counts: 16M tokens of 128


@dataclass
class MLMArguments:
    _argument_group_name = "masked-language modelling"

    mlm_probability: float = arg(0.15, "Fraction of tokens (or words) masked; of those 80%% become [MASK], 10%% a "
                                       "random token, 10%% stay.")
    whole_word_masking: bool = arg(False, "Mask all sub-tokens of a word together.")
    line_by_line: bool = arg(False, "Keep each line a separate (padded) sequence instead of concatenating and "
                                    "chunking the text.")
    eval_mask_seed: int = arg(0, "Seed of the evaluation masks, drawn once, so a model's perplexity is one number "
                                 "on every run, world size and batch size.")
    probe_sentences: list[str] = arg(
        ["the acting was [MASK] .", "this movie was a [MASK] of time .", "i would [MASK] recommend this film ."],
        "Fill-mask probes logged after each evaluation ([MASK] is replaced by the tokenizer's mask token). "
        "Pass an empty string to disable.", nargs="*")

    def __post_init__(self):
        require(0 < self.mlm_probability < 1, f"--mlm_probability must be in (0, 1), got {self.mlm_probability}")


# ------------------------------------------------------------------------------------------ data preparation
@dataclass(frozen=True)
class MlmEncoder:
    """Texts -> token columns: input ids with the tokenizer's special tokens, their mask, and with whole-word
    masking the word starts; truncated to `max_length` (--line_by_line). Blank texts are dropped. A picklable
    object: streamed data (trainer.data.streaming) encodes in the loader workers."""

    tokenizer: object
    keep_word_starts: bool
    max_length: Optional[int]

    def __call__(self, texts: list[str]) -> dict:
        texts = [text for text in texts if text and not text.isspace()]
        if not texts:  # the tokenizer refuses an empty list
            return {"input_ids": [], "special_tokens_mask": [], **({"word_start": []} if self.keep_word_starts
                                                                   else {})}
        encoded = self.tokenizer(texts, return_special_tokens_mask=True, truncation=self.max_length is not None,
                                 max_length=self.max_length, verbose=False)
        columns = {"input_ids": encoded["input_ids"], "special_tokens_mask": encoded["special_tokens_mask"]}
        if self.keep_word_starts:
            columns["word_start"] = [word_starts(encoded.word_ids(i)) for i in range(len(texts))]
        return columns


def mlm_encoder(tokenizer, data_args, mlm_args) -> MlmEncoder:
    return MlmEncoder(tokenizer, mlm_args.whole_word_masking,
                      data_args.max_seq_length if mlm_args.line_by_line else None)


class MLMTokenization(Tokenization):
    """Text -> masked-LM sequences: tokenized, then concatenated and cut into max_seq_length blocks unless
    --line_by_line (see trainer.data.tokenization)."""

    job = "mlm"

    def encoder(self, config, tokenizer) -> MlmEncoder:
        return mlm_encoder(tokenizer, config.data, config.mlm)

    def concatenates(self, config) -> bool:
        return not config.mlm.line_by_line

    def token_options(self, config) -> dict:
        return {"line_by_line": config.mlm.line_by_line, "whole_word_masking": config.mlm.whole_word_masking}

    def check_tokenizer(self, config, tokenizer) -> None:
        require(tokenizer.mask_token is not None, "the tokenizer has no mask token; pick a masked-LM tokenizer")


MLM_TOKENIZATION = MLMTokenization()


def word_starts(word_ids: list) -> list[int]:
    """1 where a token begins a word, 0 for word continuations and special tokens."""
    return [int(w is not None and (i == 0 or w != word_ids[i - 1])) for i, w in enumerate(word_ids)]


# ------------------------------------------------------------------------------------------------------- masking
@dataclass
class Masker:
    """BERT masking with one random stream per sample, keyed by (seed, stream, epoch, sample id).

    transformers' DataCollatorForLanguageModeling draws from one generator per collator (seeded per worker),
    so the masks depend on the batch split, the number of ranks and workers, and the position in the run.
    Keyed streams make them a function of the sample alone: world size, accumulation and resume cannot
    change them.
    """

    probability: float
    vocab_size: int  # random replacements are drawn from [0, vocab_size)
    mask_token_id: int
    seed: int
    whole_word: bool = False

    def __call__(self, input_ids: np.ndarray, special: np.ndarray, sample_ids, epoch: int, stream: int,
                 word_start: Optional[np.ndarray] = None, lengths=None):
        """Return (masked input ids, labels with IGNORE where not masked). `lengths`: each row's length before
        padding (default: the batch width)."""
        length = input_ids.shape[1]
        lengths = [length] * len(input_ids) if lengths is None else lengths
        draws = self.draws(sample_ids, epoch, stream, lengths, length)
        chosen, replacement, random_token = draws[:, 0], draws[:, 1], draws[:, 2]
        if self.whole_word:
            # Each token uses the draw of the word it belongs to (its nearest word start at or before it).
            positions = np.broadcast_to(np.arange(length), input_ids.shape)
            word_head = np.maximum.accumulate(np.where(word_start == 1, positions, 0), axis=1)
            chosen = np.take_along_axis(chosen, word_head, axis=1)
        masked = (chosen < self.probability) & (special == 0)
        labels = np.where(masked, input_ids, IGNORE)
        inputs = np.where(masked & (replacement < 0.8), self.mask_token_id, input_ids)
        use_random = masked & (replacement >= 0.8) & (replacement < 0.9)
        inputs = np.where(use_random, (random_token * self.vocab_size).astype(np.int64), inputs)
        return inputs.astype(np.int64), labels.astype(np.int64)

    def draws(self, sample_ids, epoch: int, stream: int, lengths, width: int) -> np.ndarray:
        """(samples, 3, width) uniform draws, each row from its sample's stream over the sample's own length, so
        that a line-by-line sample draws the same whatever the longest row of the batch it is padded in; padding
        draws 1.0 (never masked)."""
        draws = np.ones((len(lengths), 3, width))
        for row, (sample_id, length) in enumerate(zip(sample_ids, lengths)):
            draws[row, :, :length] = np.random.default_rng([self.seed, stream, epoch, int(sample_id)]).random(
                (3, length))
        return draws


def model_inputs(rows: dict, pad_token_id: int, padded: bool) -> dict:
    """The batch for `MaskedLMTask` from its samples' masked rows ("input_ids", "labels", "sample_id"; ragged rows
    padded here): token ids, the masked rows' indices and labels (see sparse_mlm)."""
    inputs, labels = pad_rows(rows["input_ids"], pad_token_id), pad_rows(rows["labels"], IGNORE)
    batch = {"input_ids": torch.from_numpy(inputs), **masked_row_tensors(labels),
             "num_loss_items": int((labels != IGNORE).sum()), "sample_id": torch.as_tensor(rows["sample_id"])}
    if padded:  # grouped blocks have no padding: no attention mask lets SDPA take its fastest path
        batch["attention_mask"] = torch.from_numpy((inputs != pad_token_id).astype(np.int64))
    return batch


@dataclass
class TrainCollator(SampleWiseCollator):
    """Masks each sample (`rows`: its masks depend on the sample alone, so they may be drawn in any part of a
    batch, e.g. in --streaming's loader workers), then pads and indexes (`assemble`)."""

    masker: Masker
    pad_token_id: int
    padded: bool

    def rows(self, batch: dict) -> dict:
        lengths = [len(row) for row in batch["input_ids"]]
        input_ids = pad_rows(batch["input_ids"], self.pad_token_id)
        special = pad_rows(batch["special_tokens_mask"], 1)
        word_start = pad_rows(batch["word_start"], 0) if "word_start" in batch else None
        inputs, labels = self.masker(input_ids, special, batch["sample_id"], batch["epoch"], TRAIN_STREAM,
                                     word_start, lengths=lengths)
        if self.padded:  # ragged rows unpadded again: a micro-batch's parts pad to its longest row together
            inputs, labels = [row[:n] for row, n in zip(inputs, lengths)], [row[:n] for row, n in zip(labels, lengths)]
        return {"input_ids": inputs, "labels": labels, "sample_id": np.asarray(batch["sample_id"])}

    def assemble(self, rows: dict) -> dict:
        return model_inputs(rows, self.pad_token_id, self.padded)


@dataclass
class EvalCollator:
    """The evaluation masks were drawn once (see `mask_evaluation_set`); this only pads and indexes."""

    pad_token_id: int
    padded: bool

    def __call__(self, batch: dict) -> dict:
        return model_inputs(batch, self.pad_token_id, self.padded)


def mask_evaluation_set(dataset, masker: Masker, pad_token_id: int):
    def mask(batch, indices):
        ids = pad_rows(batch["input_ids"], pad_token_id)
        special = pad_rows(batch["special_tokens_mask"], 1)
        word_start = pad_rows(batch["word_start"], 0) if "word_start" in batch else None
        lengths = [len(row) for row in batch["input_ids"]]
        inputs, labels = masker(ids, special, indices, 0, EVAL_STREAM, word_start, lengths)
        return {"input_ids": [row[:n] for row, n in zip(inputs, lengths)],
                "labels": [row[:n] for row, n in zip(labels, lengths)]}

    return dataset.map(mask, batched=True, with_indices=True, remove_columns=dataset.column_names,
                       cache_file_name=cache_file_for(dataset, mask, "evaluation-masks"),
                       desc="mask evaluation set once")


# ------------------------------------------------------------------------------------------------- the model
class MaskedLMTask(torch.nn.Module):
    """Loss summed over masked tokens, computed on the masked rows only where the model allows (see sparse_mlm).

    Any other *ForMaskedLM computes its dense logits, from which the masked rows are taken.
    The wrapped transformers model saves as usual.
    """

    def __init__(self, hf_model):
        super().__init__()
        self.hf_model = hf_model
        self.sparse_head = hf_model.config.model_type in SPARSE_HEAD_TYPES
        self.sparse_last_layer = can_sparsify_last_layer(hf_model)
        if self.sparse_last_layer:
            install_sparse_last_layer(hf_model)

    def forward(self, input_ids, masked_positions, masked_labels, query_positions, query_rows, attention_mask=None):
        model = self.hf_model
        if self.sparse_last_layer:  # the encoder returns the masked rows
            rows = MaskedRows(masked_positions, query_positions, query_rows)
            hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, masked_rows=rows)
            logits = prediction_head(model, hidden.last_hidden_state)
        elif self.sparse_head:
            hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            logits = prediction_head(model, hidden.flatten(0, 1).index_select(0, masked_positions))
        else:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            logits = logits.flatten(0, 1).index_select(0, masked_positions)
        return {"loss_sum": F.cross_entropy(logits.float(), masked_labels, reduction="sum")}


def unigram_perplexity(train_set, eval_set, vocab_size: int) -> float:
    """The perplexity of an add-one smoothed unigram model on the evaluation masks: the number the model must beat.

    P(token) = (count of the token among the training set's non-special tokens + 1) / (their total + vocab_size),
    so every token of the vocabulary has a probability; scored, like `perplexity_metrics`, as exp(mean NLL) over
    the masked positions of the evaluation set (their labels). Columns are read as flat Arrow arrays: one pass.
    The counts come from the first UNIGRAM_SEQUENCES training sequences (all of a small set), so that start-up
    does not read a whole large (e.g. prepared, memory-mapped) corpus for a baseline.
    """
    train_set = train_set.select(range(min(len(train_set), UNIGRAM_SEQUENCES)))
    tokens = flat_column(train_set, "input_ids")[flat_column(train_set, "special_tokens_mask") == 0]
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64) + 1.0
    labels = flat_column(eval_set, "labels")
    labels = labels[labels != IGNORE]
    mean_nll = -np.mean(np.log(counts[labels] / counts.sum())) if len(labels) else 0.0
    return math.exp(mean_nll)


def flat_column(dataset, name: str) -> np.ndarray:
    """All values of a list-valued column of `dataset` (only the rows a `select` kept), concatenated."""
    import pyarrow.compute as pc

    column = dataset.with_format("arrow")[:][name]
    return pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64)


def fill_mask_probes(tokenizer, sentences: list[str]):
    sentences = [s for s in sentences if s.strip()]

    def log_probes(task_model: MaskedLMTask) -> None:
        from transformers import pipeline

        model = task_model.hf_model
        was_training = model.training
        fill = pipeline("fill-mask", model=model, tokenizer=tokenizer, device=next(model.parameters()).device,
                        top_k=3)
        for sentence in sentences:
            text = sentence.replace("[MASK]", tokenizer.mask_token)
            if tokenizer.mask_token not in text:
                continue
            guesses = fill(text)
            guesses = guesses[0] if guesses and isinstance(guesses[0], list) else guesses
            logger.info("probe %-45s -> %s", sentence,
                        ", ".join(f"{g['token_str'].strip()} ({g['score']:.2f})" for g in guesses))
        model.train(was_training)

    return log_probes if sentences else None


# ------------------------------------------------------------------------------------------------------ main
def planned_model(config: JobConfig) -> PlannedModel:
    """The memory plan's view of the job: the model on the meta device, --max_seq_length, and the head on the
    masked rows (sparse_mlm's architectures) or the model's logits at every position (the others)."""
    from transformers import AutoModelForMaskedLM

    model = meta_model(config.model, AutoModelForMaskedLM, planned_tokenizer_size(config.model))
    check_sequence_length(config.data.max_seq_length, model.config)
    sparse = model.config.model_type in SPARSE_HEAD_TYPES
    return PlannedModel(model, config.data.max_seq_length,
                        Head("rows" if sparse else "logits", rows_per_token=config.mlm.mlm_probability))


def build_task(config: JobConfig, files: DataFiles, accelerator) -> Task:
    from transformers import AutoModelForMaskedLM

    model_args, data_args, mlm_args = config.model, config.data, config.mlm

    with main_process_first(accelerator):  # one process per node tokenizes; the others load its cache
        data = job_data(config, files, MLM_TOKENIZATION,
                        lambda tokenizer: load_model(model_args, AutoModelForMaskedLM, tokenizer))
        tokenizer, model, processed = data.tokenizer, data.model, data.splits
        masker = Masker(mlm_args.mlm_probability, len(tokenizer), tokenizer.mask_token_id, config.optimization.seed,
                        mlm_args.whole_word_masking)
        eval_masker = Masker(**{**masker.__dict__, "seed": mlm_args.eval_mask_seed})
        train_set, eval_set = map_style_data(processed, data_args) if data.stream is None else (
            None, processed["validation"])
        eval_set = mask_evaluation_set(eval_set, eval_masker, tokenizer.pad_token_id)
        other_sets = data.other_sources(files)
    padded = mlm_args.line_by_line
    task_model = MaskedLMTask(model)
    head_fraction = mlm_args.mlm_probability if task_model.sparse_head else 1.0
    row_parameters = last_layer_row_parameters(model) if task_model.sparse_last_layer else 0
    return Task(
        model=task_model, train_dataset=train_set, eval_dataset=eval_set, train_stream=data.stream,
        other_sources=other_sets,
        # The baseline counts the training tokens: a stream's are not known before training.
        after_training=None if train_set is None else unigram_baseline(train_set, eval_set, len(tokenizer)),
        train_collator=TrainCollator(masker, tokenizer.pad_token_id, padded),
        eval_collator=EvalCollator(tokenizer.pad_token_id, padded), compute_metrics=perplexity_metrics("masked_tokens"),
        hf_model=model, tokenizer=tokenizer, after_evaluation=fill_mask_probes(tokenizer, mlm_args.probe_sentences),
        # The sparse head (and last layer) run on the masked positions only: count their FLOPs for that fraction.
        flops_per_token=functools.partial(training_flops_per_token, model, head_fraction=head_fraction,
                                          masked_rows_layer_parameters=row_parameters),
        main_metric="eval_perplexity",
        eager_modules=[last_encoder_layer(model)] if task_model.sparse_last_layer else [],
    )


def map_style_data(processed, data_args):
    """(training set, evaluation set), cut to --max_train_samples/--max_eval_samples and checked to be non-empty."""
    train_set, eval_set = first_samples(processed["train"], processed["validation"], data_args)
    require(len(train_set) > 0, f"the training text is too short for one block of {data_args.max_seq_length} "
                                f"tokens; use more text, a smaller --max_seq_length or --line_by_line")
    require(len(eval_set) > 0, "the evaluation text is too short for one block; use more validation text or a "
                               "smaller --max_seq_length")
    return train_set, eval_set


def unigram_baseline(train_set, eval_set, vocab_size: int):
    """Logs the baseline to beat now; the task's after-training step puts it beside the final metrics."""
    unigram = unigram_perplexity(train_set, eval_set, vocab_size)
    logger.info("baseline to beat: an add-one smoothed unigram model of the training tokens has perplexity %.2f on "
                "the evaluation masks", unigram)
    return lambda engine: {"eval_unigram_perplexity": unigram}


def headline(metrics: dict) -> str:
    line = f"perplexity {metrics['init_eval_perplexity']:.2f} -> {metrics['eval_perplexity']:.2f}"
    if "eval_unigram_perplexity" in metrics:  # not under --streaming
        line += f" (smoothed unigram baseline {metrics['eval_unigram_perplexity']:.2f})"
    return line


MLM_JOB = JobSpec(
    sections={"data": DataArguments, "mlm": MLMArguments}, build_task=build_task, demo_config=DEMO_CONFIG,
    write_demo_data=write_mlm_corpus, demo_name="movie-review corpus", model_card_task="masked-language modelling",
    pipeline_tag="fill-mask", headline=headline, tokenization=MLM_TOKENIZATION, planned_model=planned_model)


@exits_cleanly_on_usage_error
def main(argv: list[str] | None = None) -> dict:
    return run(MLM_JOB, argv)


if __name__ == "__main__":
    main()
