"""Steps every job's `main` takes around the engine: output-directory checks, demo data, results."""
from __future__ import annotations

import json
import os

from trainer.checkpoint import PREFIX
from trainer.errors import require
from trainer.metrics import logger
from trainer.models import cache_dir


def start_job(dataclass_types, argv, default_config: str, write_demo_data, demo_name: str, check_arguments=None):
    """Every job's first steps: parse the arguments, check them together (`check_arguments(*parsed)`) and the
    output directory, start the processes, set up logging, fall back to the embedded demo data, seed. Returns
    the parsed arguments and the accelerator."""
    from accelerate.utils import set_seed

    from trainer.arguments import CorpusArguments, TrainingArguments, parse_arguments
    from trainer.distributed import make_accelerator
    from trainer.metrics import setup_logging

    parsed = parse_arguments(dataclass_types, argv, default_config=default_config)
    training_args = next(a for a in parsed if isinstance(a, TrainingArguments))
    data_args = next(a for a in parsed if isinstance(a, CorpusArguments))
    if check_arguments is not None:
        check_arguments(*parsed)
    check_output_dir(training_args)
    accelerator = make_accelerator(training_args)
    setup_logging(accelerator.is_main_process)
    embedded_corpus_if_no_data(data_args, accelerator, write_demo_data, demo_name)
    set_seed(training_args.seed)
    return parsed, accelerator


def finish_job(engine, metrics: dict, data_args, model_card: dict, summary: str) -> None:
    """Rank 0: all_results.json, the model card and Hub push (when asked), and a closing log line."""
    if engine.accelerator.is_main_process:
        write_results(engine.args.output_dir, metrics)
        engine.hub.push_final({**model_card, "data": data_args.dataset_name or data_args.train_file}, metrics)
        logger.info(summary)


def check_output_dir(training_args) -> None:
    """Refuse a non-empty output directory unless --overwrite_output_dir (never clobber an earlier run), or
    unless the run resumes: the directory holds checkpoints (complete or not: the engine picks and reports),
    or --resume_from_checkpoint is given."""
    path = training_args.output_dir
    require(not os.path.isfile(path), f"--output_dir {path} is a file; give a directory")
    if not os.path.isdir(path) or not os.listdir(path) or training_args.overwrite_output_dir:
        return
    resumes = training_args.resume_from_checkpoint or any(name.startswith(PREFIX) for name in os.listdir(path))
    require(resumes, f"--output_dir {path} is not empty and holds no checkpoint to resume from; pass "
                     f"--overwrite_output_dir or choose another directory")


def embedded_corpus_if_no_data(data_args, accelerator, write_files, name: str) -> None:
    """With neither --train_file nor --dataset_name, use the package's generated offline data set."""
    if data_args.train_file or data_args.dataset_name:
        return
    with accelerator.local_main_process_first():
        data_args.train_file, data_args.validation_file = write_files(cache_dir(name))
    logger.info("no data given: using the embedded %s (%s)", name, data_args.train_file)


def write_results(output_dir: str, metrics: dict) -> None:
    with open(os.path.join(output_dir, "all_results.json"), "w") as handle:
        json.dump(metrics, handle, indent=2, sort_keys=True)
