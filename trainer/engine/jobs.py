"""Steps every job takes around the engine, given the job's `JobSpec`: `start_job` (the configuration, output
directory, processes, data files) before its task is built, `run_job` (assemble, train, the job's after-steps,
results) after; `run` is all of them, a job's `main`."""
from __future__ import annotations

import json
import os
import shlex
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

from trainer.checkpoint.arguments import CheckpointArguments
from trainer.config.job_config import JobConfig, parse_job_config
from trainer.continual.arguments import ContinualArguments
from trainer.data.arguments import DataFiles
from trainer.distributed.arguments import ParallelismArguments
from trainer.distributed.collectives import main_process_first
from trainer.distributed.construction import model_construction
from trainer.engine.evaluation import EvalArguments
from trainer.engine.optim import OptimizationArguments
from trainer.errors import UsageError, require
from trainer.hub.arguments import HubArguments
from trainer.layout import LOG_HISTORY_FILE, MERGED_DIR, PREFIX, RESULTS_FILE
from trainer.models.arguments import ModelArguments
from trainer.models.loading import cache_dir
from trainer.tracking.arguments import TrackingArguments
from trainer.tracking.console import format_number, logger

# The sections of every job, in command-line (and --help) order after "model" and the job's "data".
SHARED_SECTIONS = {"optimization": OptimizationArguments, "evaluation": EvalArguments,
                   "parallelism": ParallelismArguments, "checkpointing": CheckpointArguments,
                   "tracking": TrackingArguments, "hub": HubArguments, "continual": ContinualArguments}


def default_load_code(config: JobConfig) -> Optional[str]:
    """The default `JobSpec.load_code`: None, i.e. the `pipeline` line of the job's pipeline tag."""
    return None


@dataclass(frozen=True)
class JobSpec:
    """What sets a job apart in the steps every job takes around the engine: defined once in each job module, with
    builder slots for what only the job knows."""

    # The job's own sections by name: "data" (its data arguments) and e.g. "finetune", "clm"; the job's own last.
    sections: dict
    build_task: Callable  # (config, data files, accelerator) -> Task
    demo_config: str  # the packaged config run when no data is named
    write_demo_data: Callable[[str], tuple[str, str]]  # writes the embedded data into a directory: (train, validation)
    demo_name: str  # what the log calls that data, e.g. "movie-review corpus"
    model_card_task: str  # the model card's task, e.g. "causal language modelling"
    pipeline_tag: str  # the `pipeline` that loads the output, e.g. "text-generation"
    headline: Callable[[dict], str]  # the closing summary's first line, from the final metrics
    load_code: Callable[[JobConfig], Optional[str]] = default_load_code  # how the summary says to load the output
    # How the job makes its sequences from text (trainer.data.tokenization.Tokenization), shared by the job and
    # `python -m trainer.prepare`; None: a job that trainer.prepare does not prepare for.
    tokenization: Optional[object] = None
    # (config) -> engine.memory_plan.PlannedModel: the model on the meta device, the sequence length and the head,
    # for the memory plan (logged at start-up, --estimate_memory, the GPU fit check).
    planned_model: Optional[Callable] = None

    @property
    def all_sections(self) -> dict:
        """model, data, the shared sections, then the job's others (its own last: see config.parsing.job_module)."""
        own = dict(self.sections)
        return {"model": ModelArguments, "data": own.pop("data"), **SHARED_SECTIONS, **own}


def run(job: JobSpec, argv: list[str] | None = None) -> dict:
    """The whole job: start, build the task, train, finish. Returns the final metrics (with --estimate_memory:
    the memory plan, printed, and nothing else done)."""
    from trainer.engine.checks import check_sections

    config = job_config(job, argv)
    check_sections(config)
    if config.parallelism.estimate_memory:
        return estimate_memory(job, config)
    config, files, accelerator = start_job(job, config)
    # Under FSDP2 and ZeRO-3 only the first process builds the model whole (distributed/construction.py);
    # --save_fisher keeps a whole copy on every process anyway.
    with model_construction(accelerator, whole=config.continual.save_fisher):
        task = job.build_task(config, files, accelerator)
    return run_job(job, config, files, task, accelerator)


def job_config(job: JobSpec, argv: list[str] | None) -> JobConfig:
    """The job's command line (None: sys.argv) parsed into its sections; with no data named, over the demo config."""
    return parse_job_config(job.all_sections, argv, default_config=job.demo_config)


def start_job(job: JobSpec, config: JobConfig):
    """Every job's first steps with its parsed configuration: check the output directory, start the processes,
    check the configuration against their number, set up logging, log the memory plan (refused on a GPU it cannot
    fit), find the data files (the embedded demo's when none are named), seed. Returns (config, data files,
    accelerator)."""
    from accelerate.utils import set_seed

    from trainer.distributed.launch import make_accelerator
    from trainer.engine.checks import check_with_processes
    from trainer.tracking import check_trackers
    from trainer.tracking.console import setup_logging

    check_output_dir(config.checkpointing)
    check_trackers(config.tracking.report_to)
    accelerator = make_accelerator(config.parallelism, config.optimization)
    check_with_processes(config, accelerator.num_processes)
    setup_logging(accelerator.is_main_process)
    plan_before_start(job, config, accelerator)
    files = data_files(config, accelerator, job)
    set_seed(config.optimization.seed)
    return config, files, accelerator


def job_memory_plan(job: JobSpec, config: JobConfig, backend: tuple, world_size: int, device: str):
    """The job's memory plan for `backend` ((kind, DeepSpeed config)) and `world_size` processes on `device`."""
    from trainer.engine.memory_plan import model_shape, plan_memory, training_setup

    planned = job.planned_model(config)
    training = training_setup(config, planned, backend[0], world_size, backend[1], device)
    return plan_memory(model_shape(planned, config.model.attn_implementation), training)


def estimate_memory(job: JobSpec, config: JobConfig) -> dict:
    """--estimate_memory: the plan for the launch's backend and world size (WORLD_SIZE, 1 without a launcher),
    printed by the first process, with the fit on a GPU; nothing started, built, read or written."""
    import torch

    from trainer.engine.memory_plan import (fit_error, fitting_changes, free_device_memory, gib, launch_backend,
                                            plan_table)

    require(job.planned_model is not None, "--estimate_memory is not available for this job yet; drop it")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = "cuda" if torch.cuda.is_available() and not config.parallelism.use_cpu else "cpu"
    plan = job_memory_plan(job, config, launch_backend(config.parallelism, config.optimization, world_size),
                           world_size, device)
    lines = plan_table(plan)
    capacity = free_device_memory(device)
    if capacity is not None:
        fits = fitting_changes(plan, capacity)
        lines.append(f"fits: the GPU has {gib(capacity)} free" if fits is None else fit_error(plan, capacity, fits))
    if int(os.environ.get("RANK", "0")) == 0:
        print("\n".join(lines), flush=True)
    return {"memory_plan": {**plan.parts(), "host": plan.host, "peak": plan.peak}}


def plan_before_start(job: JobSpec, config: JobConfig, accelerator) -> None:
    """Log the memory plan of the started processes; on a GPU, refuse one that does not fit the free memory of the
    tightest process (unless --skip_memory_check)."""
    from trainer.engine.memory_plan import accelerator_backend, check_fits, free_device_memory

    if job.planned_model is None:
        return
    plan = job_memory_plan(job, config, accelerator_backend(accelerator), accelerator.num_processes,
                           accelerator.device.type)
    logger.info("%s", plan.describe())
    capacity = free_device_memory(accelerator.device)
    if capacity is not None and not config.parallelism.skip_memory_check:
        check_fits(plan, smallest_across_processes(capacity, accelerator))


def smallest_across_processes(value: int, accelerator) -> int:
    """The minimum of `value` over the processes: every process then takes the same decision."""
    if accelerator.num_processes == 1:
        return value
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.int64, device=accelerator.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def run_job(job: JobSpec, config: JobConfig, files: DataFiles, task, accelerator) -> dict:
    """What every job does once its task is built: assemble the engine and train; the task's own after-steps
    (`Task.after_training(engine)`, on every rank: e.g. predictions on a test set; a dict it returns joins the final
    metrics); with --merge_adapters, the LoRA-merged copy in output_dir/merged; then `finish_job` on rank 0, and
    every rank leaves the process group. Returns the final metrics."""
    from trainer.distributed.collectives import end_processes
    from trainer.engine.assembly import assemble
    from trainer.finetune.strategies import export_merged
    from trainer.hub.push import HubPusher

    output_dir = config.checkpointing.output_dir
    hub = HubPusher(config.hub, output_dir, accelerator.is_main_process, config.as_dict())
    engine = assemble(config, task, accelerator, on_saved=hub.push_checkpoint)
    metrics = engine.train()
    if task.after_training is not None:
        metrics = {**metrics, **(task.after_training(engine) or {})}
    if accelerator.is_main_process:
        finetune = config.get("finetune")
        if finetune is not None and finetune.merge_adapters:
            export_merged(task.hf_model, task.tokenizer, os.path.join(output_dir, MERGED_DIR))
        model_card = {"task": job.model_card_task, "pipeline_tag": job.pipeline_tag,
                      "data": config.data.dataset_name or files.train or " ".join(config.data.train_files)}
        finish_job(output_dir, hub, metrics, model_card, job.headline(metrics), job.load_code(config),
                   tensorboard_dir(engine.trackers))
    end_processes()
    return metrics


def finish_job(output_dir: str, hub, metrics: dict, model_card: dict, summary: str, load_code: Optional[str],
               curves_dir: Optional[str]) -> None:
    """Rank 0: all_results.json, the model card and Hub push (when asked), and the closing summary: `summary` (the
    job's headline, e.g. perplexity before -> after), where the model is, final metrics, how to load it (`load_code`,
    default a `pipeline` line) and view its curves (`curves_dir`, TensorBoard's)."""
    write_results(output_dir, metrics)
    hub.push_final(model_card, metrics)
    for line in closing_summary(summary, output_dir, metrics, model_card["pipeline_tag"], curves_dir, load_code):
        logger.info(line)


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


def tensorboard_dir(trackers) -> str | None:
    tensorboard = trackers.tracker("tensorboard")
    return tensorboard.directory if tensorboard is not None else None


def pipeline_loading(pipeline_tag: str, output_dir: str) -> str:
    return f"from transformers import pipeline; pipe = pipeline({pipeline_tag!r}, model={os.path.abspath(output_dir)!r})"


def check_output_dir(checkpointing: CheckpointArguments) -> None:
    """Refuse a non-empty output directory unless --overwrite_output_dir (never clobber an earlier run), or
    unless the run resumes: the directory holds checkpoints (complete or not: the engine picks and reports),
    or --resume_from_checkpoint is given."""
    path = checkpointing.output_dir
    check_output_path(path)
    if not os.path.isdir(path) or not os.listdir(path) or checkpointing.overwrite_output_dir:
        return
    resumes = checkpointing.resume_from_checkpoint or any(name.startswith(PREFIX) for name in os.listdir(path))
    require(resumes, f"--output_dir {path} is not empty and holds no checkpoint to resume from; pass "
                     f"--overwrite_output_dir or choose another directory")


def check_output_path(path: str) -> None:
    """--output_dir names a directory that exists or can be created."""
    require(bool(path.strip()), "--output_dir is empty; give a directory")
    require(not os.path.isfile(path), f"--output_dir {path} is a file; give a directory")
    check_creatable(path)


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
    try:  # os.access answers by the permission bits: root passes it where nothing can be made (/proc, /sys)
        os.rmdir(tempfile.mkdtemp(prefix=".trainer-probe-", dir=existing))
    except OSError as error:
        raise UsageError(f"{what} {existing} is not writable ({error.strerror}); choose another --output_dir") from None


def data_files(config: JobConfig, accelerator, job: JobSpec) -> DataFiles:
    """The files named on the command line or, with none of --train_file, --train_files and --dataset_name, the
    package's generated offline data set (written once per node), plus --replay_file."""
    data, replay = config.data, config.continual.replay_file
    if data.train_file or data.train_files or data.dataset_name:
        return DataFiles(data.train_file, data.validation_file, replay, tuple(data.train_sources()))
    with main_process_first(accelerator):
        train, validation = job.write_demo_data(cache_dir(job.demo_name))
    logger.info("no data given: using the embedded %s (%s)", job.demo_name, train)
    return DataFiles(train, validation, replay)


def write_results(output_dir: str, metrics: dict) -> None:
    with open(os.path.join(output_dir, RESULTS_FILE), "w") as handle:
        json.dump(metrics, handle, indent=2, sort_keys=True)
