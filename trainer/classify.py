"""trainer.classify: sequence classification (single sentences or pairs) with a choice of fine-tuning strategies.

    python -m trainer.classify                               # offline demo on the generated sentiment data
    torchrun --nproc_per_node=8 -m trainer.classify --model_name_or_path output/mlm --train_file train.csv ...

This module holds only what is specific to classification: label mapping, tokenization, dynamic padding, the
per-sample loss, metrics and predictions. Training is the shared engine's; strategies live in
trainer.finetune.strategies.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from trainer.config.job_config import JobConfig
from trainer.config.parsing import arg
from trainer.continual.distillation import SharedLabels, distillation_loss, load_teacher
from trainer.data.arguments import DataArguments, DataFiles, check_data_file
from trainer.data.demo import write_sentiment_dataset
from trainer.data.loading import (check_text_column, first_samples, load_file, load_other_sources, load_raw_splits,
                                  pad_rows, resolve_text_column)
from trainer.data.prepared import PreparedData, is_prepared_directory
from trainer.data.tokenization import Tokenization, open_prepared, prepared_sequences
from trainer.distributed.collectives import main_process_first
from trainer.engine.jobs import JobSpec, run
from trainer.engine.task import EvalOutput, Task
from trainer.errors import UsageError, exits_cleanly_on_usage_error, require
from trainer.finetune.adapters import load_base_with_adapters, loading_code
from trainer.finetune.strategies import FinetuneArguments, apply_strategy
from trainer.layout import PREDICTIONS_FILE
from trainer.models.loading import check_sequence_length, is_adapter_directory, load_model, weights_dtype
from trainer.tracking.console import logger

DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "classify_demo.yaml")
LOCAL_METRICS = os.path.join(os.path.dirname(__file__), "metrics_modules")
AVERAGED_METRICS = ("f1", "precision", "recall")  # computed with average="macro" (binary would ignore a class)


@dataclass
class ClassifyArguments:
    _argument_group_name = "classification"

    text_pair_column: Optional[str] = arg(None, "Column with the second sentence of a pair (e.g. GLUE MRPC).")
    label_column: str = arg("label", "Column with the labels: integers or strings.")
    test_file: Optional[str] = arg(None, "Data to predict with --do_predict (labels optional).")
    do_predict: bool = arg(False, f"After training, write predictions for --test_file to "
                                  f"output_dir/{PREDICTIONS_FILE}.")
    metrics: list[str] = arg(["accuracy", "f1", "matthews_correlation"],
                             "evaluate metrics: names of the package's offline modules (accuracy, f1, "
                             "matthews_correlation), paths to metric scripts, or Hub metric names.", nargs="+")
    group_by_length: bool = arg(False, "Length-grouped training batches (less padding), still shuffled per epoch.")
    teacher_model_name_or_path: Optional[str] = arg(
        None, "Knowledge distillation from this classifier (same tokenizer), with every strategy (alias: --teacher). "
        "Learning without forgetting: give the previous task's model, and training on the new data keeps its outputs. "
        "Labels are matched by name; when the label sets differ, only the shared labels (at least two) are distilled.",
        aliases=["--teacher"])
    distill_temperature: float = arg(2.0, "Distillation temperature T (logits are divided by T).")
    distill_alpha: float = arg(0.5, "Weight of the distillation term; 1 - alpha weighs the hard-label loss.")

    def __post_init__(self):
        require(not self.do_predict or self.test_file, "--do_predict needs --test_file")
        if self.test_file:
            check_data_file(self.test_file, "test_file")
        require(self.distill_temperature > 0, "--distill_temperature must be positive")
        require(0 <= self.distill_alpha <= 1, "--distill_alpha must be in [0, 1]")
        require(bool(self.metrics), "--metrics needs at least one metric")


# ------------------------------------------------------------------------------------------------------- labels
@dataclass
class LabelMapping:
    values: list  # raw label values (ints or strings), index = class id

    @classmethod
    def from_training_data(cls, dataset, column: str) -> "LabelMapping":
        values = sorted(set(raw_labels(dataset, column, "training")))
        require(len(values) >= 2, f"the training data has a single class ({values[0]!r}) in --label_column "
                                  f"{column}; classification needs at least two")
        return cls(values)

    @property
    def id2label(self) -> dict:
        return {i: str(value) for i, value in enumerate(self.values)}

    @property
    def label2id(self) -> dict:
        return {str(value): i for i, value in enumerate(self.values)}

    def ids(self, dataset, column: str, split: str) -> list[int]:
        index = {value: i for i, value in enumerate(self.values)}
        labels = raw_labels(dataset, column, split)
        unseen = sorted({str(label) for label in labels if label not in index})
        require(not unseen, f"the {split} data has labels never seen in training: {', '.join(unseen[:5])}")
        return [index[label] for label in labels]


def raw_labels(dataset, column: str, split: str) -> list:
    """Labels as ints or strings (ClassLabel names for hub datasets); anything else is a usage error."""
    import datasets

    require(column in dataset.column_names, f"the {split} data has no label column '{column}' (columns: "
                                            f"{', '.join(dataset.column_names)}); name it with --label_column")
    feature = dataset.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return [feature.int2str(i) for i in dataset[column]]
    dtype = getattr(feature, "dtype", None)
    require(dtype in ("string", "large_string") or (dtype or "").startswith(("int", "uint")),
            f"the labels in column '{column}' of the {split} data are {dtype or type(feature).__name__}; "
            f"labels must be integers or strings")
    return dataset[column]


# ------------------------------------------------------------------------------------------ data preparation
def input_columns(dataset, data_args, cls_args, split: str) -> list[str]:
    """The text column (and pair column) of a split, checked."""
    candidates = dataset.remove_columns([c for c in (cls_args.label_column,) if c in dataset.column_names])
    text = resolve_text_column(candidates, data_args.text_column)
    check_text_column(dataset, text, f"the {split} data")
    if cls_args.text_pair_column is None:
        return [text]
    check_text_column(dataset, cls_args.text_pair_column, f"the {split} data", "--text_pair_column")
    return [text, cls_args.text_pair_column]


def tokenize(dataset, columns: list[str], tokenizer, max_length: int, labels: Optional[list[int]], desc: str):
    """input_ids (+ token_type_ids for pairs), length and labels; truncated, never padded."""
    pairs = len(columns) == 2

    def encode(batch):
        encoded = tokenizer(*(batch[c] for c in columns), truncation=True, max_length=max_length, verbose=False)
        out = {"input_ids": encoded["input_ids"], "length": [len(ids) for ids in encoded["input_ids"]]}
        if pairs and "token_type_ids" in encoded:
            out["token_type_ids"] = encoded["token_type_ids"]
        return out

    for column in columns:
        require(all(isinstance(text, str) for text in dataset[column]),
                f"the {desc} data has empty or non-text values in column '{column}'")
    processed = dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=f"tokenize {desc}")
    return processed.add_column("labels", labels) if labels is not None else processed


@dataclass(frozen=True)
class ClassifyInputs:
    """What classification reads of a training row: the text column (and pair column), and the label column, whose
    values the training data's `LabelMapping` turns into class ids."""

    columns: list[str]
    label_column: str
    labels: LabelMapping


SPLIT_NAMES = {"train": "training", "validation": "validation"}  # as the error messages name the splits


class ClassifyTokenization(Tokenization):
    """Text rows -> classification rows, one per example: input ids (and token type ids for pairs) truncated to
    --max_seq_length, never padded (the collator pads each batch), their length and the class id. trainer.prepare
    writes these rows and records the labels; a run from the directory uses its labels."""

    job = "classify"

    def read_text(self, config, files: DataFiles):
        raw = load_raw_splits(config.data, files)
        columns = input_columns(raw["train"], config.data, config.classify, "training")
        input_columns(raw["validation"], config.data, config.classify, "validation")
        label_column = config.classify.label_column
        return raw, ClassifyInputs(columns, label_column, LabelMapping.from_training_data(raw["train"], label_column))

    def training_texts(self, raw, inputs: ClassifyInputs) -> list[str]:
        return [text for column in inputs.columns for text in raw["train"][column]]

    def tokenize(self, config, raw, inputs: ClassifyInputs, tokenizer):
        import datasets

        return datasets.DatasetDict({
            split: tokenize(dataset, inputs.columns, tokenizer, config.data.max_seq_length,
                            inputs.labels.ids(dataset, inputs.label_column, SPLIT_NAMES[split]), SPLIT_NAMES[split])
            for split, dataset in raw.items()})

    def concatenates(self, config) -> bool:
        return False

    def token_options(self, config) -> dict:
        return {"text_pair_column": config.classify.text_pair_column, "label_column": config.classify.label_column}

    def manifest_inputs(self, inputs: ClassifyInputs) -> dict:
        return {"text_column": inputs.columns[0], "labels": inputs.labels.values}

    def prepared_inputs(self, config, prepared: PreparedData) -> ClassifyInputs:
        """The inputs a prepared directory was made with: its text column (a --text_column must name it) and labels;
        the pair and label columns are checked with the other token options."""
        text_column, given = prepared.manifest["text_column"], config.data.text_column
        require(given in (None, text_column), f"--text_column {given} does not match {prepared.where}, prepared "
                                              f"with --text_column {text_column}; drop --text_column or prepare the "
                                              f"data again")
        labels = prepared.manifest.get("labels")
        require(isinstance(labels, list) and len(labels) >= 2, f"{prepared.where}: its manifest lists no labels "
                                                               f"(at least two); prepare the data again with "
                                                               f"python -m trainer.prepare --job classify")
        pair = config.classify.text_pair_column
        return ClassifyInputs([text_column, *([pair] if pair else [])], config.classify.label_column,
                              LabelMapping(labels))


CLASSIFY_TOKENIZATION = ClassifyTokenization()


def training_lengths(train_set, other_sets: list) -> list[int]:
    """Sequence lengths for length-grouped batches: the training samples', then each other source's (replay's)."""
    return [length for dataset in (train_set, *other_sets) for length in dataset["length"]]


@dataclass
class PaddingCollator:
    """Pads each batch to its own longest sequence (rounded up to a multiple of 8), never to the data set's."""

    pad_token_id: int

    def __call__(self, batch: dict) -> dict:
        input_ids = pad_rows(batch["input_ids"], self.pad_token_id)
        lengths = np.asarray(batch["length"])
        out = {"input_ids": torch.from_numpy(input_ids),
               "attention_mask": torch.from_numpy((np.arange(input_ids.shape[1]) < lengths[:, None]).astype(np.int64)),
               "sample_id": torch.as_tensor(batch["sample_id"]), "num_loss_items": len(lengths)}
        if "token_type_ids" in batch:
            out["token_type_ids"] = torch.from_numpy(pad_rows(batch["token_type_ids"], 0))
        if "labels" in batch:
            out["labels"] = torch.as_tensor(batch["labels"], dtype=torch.long)
        return out


# ------------------------------------------------------------------------------------------------- the model
class ClassificationTask(torch.nn.Module):
    """Per-sample losses summed (the engine divides by the samples of the whole step), argmax predictions.

    The teacher, if any, is kept out of the module tree (not a registered submodule), so DDP neither wraps nor
    syncs it and the optimizer never sees it; it only runs in training, in eval mode and without gradients.
    """

    def __init__(self, hf_model, teacher=None, temperature: float = 1.0, alpha: float = 0.0,
                 shared_labels: SharedLabels | None = None):
        super().__init__()
        self.hf_model = hf_model
        self.__dict__["teacher"] = teacher
        self.temperature, self.alpha, self.shared_labels = temperature, alpha, shared_labels

    def forward(self, input_ids, attention_mask, labels=None, token_type_ids=None):
        """With labels: the summed loss and argmax predictions. Without (prediction): class probabilities."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        logits = self.hf_model(**inputs).logits.float()
        if labels is None:
            return {"probabilities": F.softmax(logits, dim=-1)}
        if self.teacher is not None and self.training:
            with torch.no_grad():
                teacher_logits = self.teacher(**inputs).logits.float()
            losses = distillation_loss(logits, teacher_logits, labels, self.temperature, self.alpha,
                                       self.shared_labels)
        else:
            losses = F.cross_entropy(logits, labels, reduction="none")
        return {"loss_sum": losses.sum(), "predictions": logits.argmax(-1)}


# ------------------------------------------------------------------------------------------------------ metrics
def load_metrics(names: list[str]) -> list:
    """evaluate modules: the package's offline copies first, then a path, then the Hub (fails fast offline)."""
    import evaluate

    from trainer.hub.reachability import hub_is_reachable

    modules = []
    for name in names:
        local = os.path.join(LOCAL_METRICS, f"{name}.py")
        path = local if os.path.isfile(local) else name
        if not os.path.exists(path):
            require(hub_is_reachable(), f"--metrics {name}: not one of the offline metrics "
                                        f"({', '.join(sorted(f[:-3] for f in os.listdir(LOCAL_METRICS)))}), not a "
                                        f"file, and the Hub cannot be reached to download it")
        try:  # in memory: ranks computing at once would otherwise contend for the same cache file lock
            modules.append((name, evaluate.load(path, keep_in_memory=True)))
        except Exception as error:  # evaluate raises many types for a bad script or name
            raise UsageError(f"--metrics {name} could not be loaded: {str(error).splitlines()[0]}") from None
    return modules


def classification_metrics(metric_modules: list, references: np.ndarray, id2label: dict):
    def compute(output: EvalOutput) -> dict:
        sample_ids = sorted(output.predictions)  # gathered from every rank, each sample once
        predictions = np.asarray([output.predictions[i] for i in sample_ids])
        truth = references[sample_ids]
        results = {"loss": output.mean_loss}
        for name, module in metric_modules:
            extra = {"average": "macro"} if name in AVERAGED_METRICS else {}
            results.update(module.compute(predictions=predictions, references=truth, **extra))
        matrix = confusion_matrix(truth, predictions, len(id2label))
        log_confusion_matrix(matrix, id2label)
        results["confusion_matrix"] = matrix.tolist()
        return results

    return compute


def confusion_matrix(truth: np.ndarray, predictions: np.ndarray, num_labels: int) -> np.ndarray:
    """Rows: true label, columns: predicted label."""
    return np.bincount(truth * num_labels + predictions, minlength=num_labels ** 2).reshape(num_labels, num_labels)


def log_confusion_matrix(matrix: np.ndarray, id2label: dict) -> None:
    names = [id2label[i] for i in range(len(id2label))]
    width = max(8, *(len(n) for n in names)) + 1
    lines = ["confusion matrix (rows: true, columns: predicted)", " " * width + "".join(n.rjust(width) for n in names)]
    lines += [name.rjust(width) + "".join(str(c).rjust(width) for c in row) for name, row in zip(names, matrix)]
    logger.info("\n".join(lines))


# -------------------------------------------------------------------------------------------------- predictions
def write_predictions(path: str, probabilities: dict, id2label: dict) -> None:
    with open(path, "w") as handle:
        for sample_id in sorted(probabilities):
            row = probabilities[sample_id]
            handle.write(json.dumps({"id": sample_id, "label": id2label[int(np.argmax(row))],
                                     "probabilities": {id2label[i]: p for i, p in enumerate(row)}}) + "\n")


# ------------------------------------------------------------------------------------------------------ main
def build_task(config: JobConfig, files: DataFiles, accelerator) -> Task:
    from transformers import AutoModelForSequenceClassification

    model_args, data_args, ft_args, cls_args = config.model, config.data, config.finetune, config.classify

    ft_args.check_model(model_args, "the output of trainer.mlm")
    with main_process_first(accelerator):  # one process per node tokenizes; the others load its cache
        inputs, tokenizer, training_rows = classification_data(config, files)
        columns, labels = inputs.columns, inputs.labels
        # The other sources' (and replay's) labels must be classes of the primary training data: the head is that
        # data's (see docs/continual.md).
        others_raw = load_other_sources(files, [*columns, cls_args.label_column])
        others_labels = [labels.ids(raw_other, cls_args.label_column, source.role)
                         for raw_other, source in zip(others_raw, files.other_sources())]
        test_raw = load_file(cls_args.test_file, "test_file") if cls_args.do_predict else None
        if test_raw is not None:
            input_columns(test_raw, data_args, cls_args, "test")
        teacher, shared_labels = (load_teacher(cls_args.teacher_model_name_or_path, labels.id2label,
                                               accelerator.device, weights_dtype(model_args, from_checkpoint=True))
                                  if cls_args.teacher_model_name_or_path else (None, None))
        if is_adapter_directory(model_args.model_name_or_path):  # its base model, with the tasks' adapters inside
            model = load_base_with_adapters(model_args.model_name_or_path, labels.id2label,
                                            weights_dtype(model_args, from_checkpoint=True))
            model_args.check_weights_dtype(str(model.dtype).removeprefix("torch."),
                                           f"--torch_dtype auto on the base model of {model_args.model_name_or_path} "
                                           f"({model.dtype})")
        else:
            model = load_model(model_args, AutoModelForSequenceClassification, tokenizer,
                               num_labels=len(labels.values), id2label=labels.id2label, label2id=labels.label2id)
        length, splits = training_rows(model.config)
        train_set, eval_set = splits["train"], splits["validation"]
        test_set = tokenize(test_raw, columns, tokenizer, length, None, "test") if test_raw is not None else None
        other_sets = [tokenize(raw_other, columns, tokenizer, length, other_labels, source.role)
                      for raw_other, other_labels, source in zip(others_raw, others_labels, files.other_sources())]
        train_set, eval_set = first_samples(train_set, eval_set, data_args)
        metric_modules = load_metrics(cls_args.metrics)
    logger.info("%d classes: %s", len(labels.values), ", ".join(labels.id2label.values()))
    trained_model, before_optimizer_step = apply_strategy(model, ft_args, task_type="SEQ_CLS")
    collator = PaddingCollator(tokenizer.pad_token_id)
    return Task(
        model=ClassificationTask(trained_model, teacher, cls_args.distill_temperature, cls_args.distill_alpha,
                                 shared_labels),
        train_dataset=train_set, eval_dataset=eval_set, train_collator=collator, eval_collator=collator,
        compute_metrics=classification_metrics(metric_modules, np.asarray(eval_set["labels"]), labels.id2label),
        hf_model=trained_model, tokenizer=tokenizer,
        train_lengths=training_lengths(train_set, other_sets) if cls_args.group_by_length else None,
        other_sources=other_sets,
        before_optimizer_step=before_optimizer_step,
        main_metric=f"eval_{os.path.basename(cls_args.metrics[0]).removesuffix('.py')}",  # the first metric asked for
        after_training=functools.partial(predict_test_set, test_set, labels) if test_set is not None else None,
    )


def classification_data(config: JobConfig, files: DataFiles) -> tuple[ClassifyInputs, object, Callable]:
    """(the inputs, the tokenizer, `training_rows(model_config)` -> (the sequence length, checked against the model,
    {"train", "validation": rows})): the rows and labels of a prepared --train_file directory (trainer.prepare), or
    the text's, tokenized once the model is known."""
    if is_prepared_directory(files.train):
        prepared, tokenizer = open_prepared(config, files, CLASSIFY_TOKENIZATION)
        return (CLASSIFY_TOKENIZATION.prepared_inputs(config, prepared), tokenizer,
                functools.partial(prepared_sequences, config, CLASSIFY_TOKENIZATION, prepared))
    raw, inputs = CLASSIFY_TOKENIZATION.read_text(config, files)
    tokenizer = CLASSIFY_TOKENIZATION.text_tokenizer(config, raw, inputs)

    def training_rows(model_config) -> tuple[int, dict]:
        length = CLASSIFY_TOKENIZATION.sequence_length(config, model_config)
        check_sequence_length(length, model_config)
        return length, CLASSIFY_TOKENIZATION.tokenize(config, raw, inputs, tokenizer)

    return inputs, tokenizer, training_rows


def predict_test_set(test_set, labels: LabelMapping, engine) -> None:
    """After training, on every rank: the test set's class probabilities, written by rank 0."""
    probabilities = engine.predict(test_set, "probabilities", drop=("labels",))
    if engine.accelerator.is_main_process:
        write_predictions(os.path.join(engine.settings.output_dir, PREDICTIONS_FILE), probabilities, labels.id2label)


def headline(metrics: dict) -> str:
    return (f"accuracy {metrics.get('init_eval_accuracy', float('nan')):.4f} -> "
            f"{metrics.get('eval_accuracy', float('nan')):.4f}")


def adapter_loading_code(config: JobConfig) -> Optional[str]:
    """Bottleneck adapters load through trainer.finetune.adapters, not a `pipeline` line."""
    if config.finetune.finetune_strategy != "adapter":
        return None
    return loading_code(config.checkpointing.output_dir)


CLASSIFY_JOB = JobSpec(
    sections={"data": DataArguments, "finetune": FinetuneArguments, "classify": ClassifyArguments},
    build_task=build_task, demo_config=DEMO_CONFIG, write_demo_data=write_sentiment_dataset,
    demo_name="sentiment dataset", model_card_task="text classification", pipeline_tag="text-classification",
    headline=headline, load_code=adapter_loading_code, tokenization=CLASSIFY_TOKENIZATION)


@exits_cleanly_on_usage_error
def main(argv: list[str] | None = None) -> dict:
    return run(CLASSIFY_JOB, argv)


if __name__ == "__main__":
    main()
