"""Steps every job's `main` takes around the engine, given the job's `JobSpec`: `start_job` (arguments, output
directory, processes, demo data) before its task is built, `run_job` (train, the job's after-steps, results)
after."""
from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from trainer.distributed.collectives import main_process_first
from trainer.errors import require
from trainer.layout import LOG_HISTORY_FILE, MERGED_DIR, PREFIX, RESULTS_FILE
from trainer.models.loading import cache_dir
from trainer.tracking.console import format_number, logger

if TYPE_CHECKING:
    from trainer.engine.loop import Engine


@dataclass(frozen=True)
class JobSpec:
    """What sets a job apart in the steps every job takes around the engine (`start_job`, `run_job`): defined once
    in each job module."""

    arguments: tuple[type, ...]  # the argument dataclasses, parsed in this order; the job's own last (see job_module)
    demo_config: str  # the packaged config run when no data is named
    write_demo_data: Callable[[str], tuple[str, str]]  # writes the embedded data into a directory: (train, validation)
    demo_name: str  # what the log calls that data, e.g. "movie-review corpus"
    model_card_task: str  # the model card's task, e.g. "causal language modelling"
    pipeline_tag: str  # the `pipeline` that loads the output, e.g. "text-generation"
    headline: Callable[[dict], str]  # the closing summary's first line, from the final metrics
    check_arguments: Optional[Callable[..., None]] = None  # a check across the parsed arguments, given all of them


def start_job(job: JobSpec, argv: list[str] | None):
    """Every job's first steps: parse the arguments, check them together (`job.check_arguments(*parsed)`) and the
    output directory, start the processes, check --replay_ratio against the global batch, set up logging, fall back to the embedded demo data, seed. Returns
    the parsed arguments and the accelerator."""
    from accelerate.utils import set_seed

    from trainer.config.arguments import CorpusArguments, TrainingArguments
    from trainer.config.parsing import parse_arguments
    from trainer.distributed.launch import make_accelerator
    from trainer.tracking import check_trackers
    from trainer.tracking.console import setup_logging
    from trainer.continual.replay import check_replay_ratio

    parsed = parse_arguments(job.arguments, argv, default_config=job.demo_config)
    training_args = next(a for a in parsed if isinstance(a, TrainingArguments))
    data_args = next(a for a in parsed if isinstance(a, CorpusArguments))
    if job.check_arguments is not None:
        job.check_arguments(*parsed)
    check_output_dir(training_args)
    check_trackers(training_args.report_to)
    accelerator = make_accelerator(training_args)
    check_replay_ratio(data_args, training_args, accelerator.num_processes)
    setup_logging(accelerator.is_main_process)
    embedded_corpus_if_no_data(data_args, accelerator, job.write_demo_data, job.demo_name)
    set_seed(training_args.seed)
    return parsed, accelerator


def run_job(job: JobSpec, task, parsed, accelerator,
            after_training: Optional[Callable[[Engine], Optional[dict]]] = None, load_code: Optional[str] = None) -> dict:
    """What every job does once its task is built: train it on the engine; the job's own after-steps,
    `after_training(engine)` (on every rank: e.g. predictions on a test set; a dict it returns joins the final
    metrics); with --merge_adapters, the LoRA-merged copy in output_dir/merged; then `finish_job`, with the job's
    model card, headline and `load_code` (how to load the output, default a `pipeline` line). Returns the final
    metrics."""
    from trainer.config.arguments import CorpusArguments, TrainingArguments
    from trainer.engine.loop import Engine
    from trainer.finetune.strategies import FinetuneArguments, export_merged

    training_args = next(a for a in parsed if isinstance(a, TrainingArguments))
    engine = Engine(training_args, task, accelerator)
    metrics = engine.train()
    if after_training is not None:
        metrics = {**metrics, **(after_training(engine) or {})}
    ft_args = next((a for a in parsed if isinstance(a, FinetuneArguments)), None)
    if accelerator.is_main_process and ft_args is not None and ft_args.merge_adapters:
        export_merged(task.hf_model, task.tokenizer, os.path.join(training_args.output_dir, MERGED_DIR))
    data_args = next(a for a in parsed if isinstance(a, CorpusArguments))
    finish_job(engine, metrics, data_args, {"task": job.model_card_task, "pipeline_tag": job.pipeline_tag},
               job.headline(metrics), load_code)
    return metrics


def finish_job(engine, metrics: dict, data_args, model_card: dict, summary: str, load_code: str | None = None) -> None:
    """Rank 0: all_results.json, the model card and Hub push (when asked), and the closing summary: `summary` (the
    job's headline, e.g. perplexity before -> after), where the model is, final metrics, how to load it (`load_code`,
    default a `pipeline` line) and view its curves; then every rank leaves the process group."""
    from trainer.distributed.collectives import end_processes

    if engine.accelerator.is_main_process:
        write_results(engine.args.output_dir, metrics)
        engine.hub.push_final({**model_card, "data": data_args.dataset_name or data_args.train_file}, metrics)
        for line in closing_summary(summary, engine.args.output_dir, metrics, model_card["pipeline_tag"],
                                    tensorboard_dir(engine), load_code):
            logger.info(line)
    end_processes()


def closing_summary(headline: str, output_dir: str, metrics: dict, pipeline_tag: str,
                    tensorboard_dir: str | None, load_code: str | None = None) -> list[str]:
    """The lines that end every job's log."""
    final = {key: value for key, value in metrics.items()
             if (key.startswith("eval_") or key == "train_loss") and isinstance(value, (int, float))}
    lines = [f"done: {headline}",
             f"  model:   {os.path.abspath(output_dir)} ({RESULTS_FILE} and {LOG_HISTORY_FILE} inside)",
             f"  final:   {'  '.join(f'{key}={format_number(value)}' for key, value in sorted(final.items()))}",
             f"  load it: {load_code or pipeline_loading(pipeline_tag, output_dir)}"]
    if tensorboard_dir:
        lines.append(f"  curves:  tensorboard --logdir {shlex.quote(os.path.abspath(tensorboard_dir))}")
    return lines


def tensorboard_dir(engine) -> str | None:
    tensorboard = engine.metrics.tracker("tensorboard")
    return tensorboard.directory if tensorboard is not None else None


def pipeline_loading(pipeline_tag: str, output_dir: str) -> str:
    return f"from transformers import pipeline; pipe = pipeline({pipeline_tag!r}, model={os.path.abspath(output_dir)!r})"


def check_output_dir(training_args) -> None:
    """Refuse a non-empty output directory unless --overwrite_output_dir (never clobber an earlier run), or
    unless the run resumes: the directory holds checkpoints (complete or not: the engine picks and reports),
    or --resume_from_checkpoint is given."""
    path = training_args.output_dir
    require(bool(path.strip()), "--output_dir is empty; give a directory")
    require(not os.path.isfile(path), f"--output_dir {path} is a file; give a directory")
    check_creatable(path)
    if not os.path.isdir(path) or not os.listdir(path) or training_args.overwrite_output_dir:
        return
    resumes = training_args.resume_from_checkpoint or any(name.startswith(PREFIX) for name in os.listdir(path))
    require(resumes, f"--output_dir {path} is not empty and holds no checkpoint to resume from; pass "
                     f"--overwrite_output_dir or choose another directory")


def check_creatable(path: str) -> None:
    """--output_dir exists as a writable directory, or can be created: its nearest existing parent is one."""
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    what = "--output_dir" if existing == os.path.abspath(path) else f"--output_dir {path}: its parent"
    require(os.path.isdir(existing), f"{what} {existing} is not a directory (a file or a broken link); choose "
                                     f"another --output_dir")
    require(os.access(existing, os.W_OK | os.X_OK), f"{what} {existing} is not writable (permissions or a "
                                                    f"read-only file system); choose another --output_dir")


def embedded_corpus_if_no_data(data_args, accelerator, write_files, name: str) -> None:
    """With neither --train_file nor --dataset_name, use the package's generated offline data set."""
    if data_args.train_file or data_args.dataset_name:
        return
    with main_process_first(accelerator):
        data_args.train_file, data_args.validation_file = write_files(cache_dir(name))
    logger.info("no data given: using the embedded %s (%s)", name, data_args.train_file)


def write_results(output_dir: str, metrics: dict) -> None:
    with open(os.path.join(output_dir, RESULTS_FILE), "w") as handle:
        json.dump(metrics, handle, indent=2, sort_keys=True)
