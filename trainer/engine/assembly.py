"""The one place where a job's parts are built and handed to the `Engine`: the data source, the prepared model,
optimizer and scheduler, the continual-learning parts, trackers, and the checkpointer over its stateful parts.

Each part gets only its own command-line section(s). The order matters where noted: EWC and the Fisher pass read
the task model before `prepare` shards it, the blocks are checkpointed, then compiled, before `prepare`, and the
scheduler wraps the prepared optimizer.
"""
from __future__ import annotations

import functools
import itertools
import os

import torch

from trainer.checkpoint.checkpointer import BestCheckpoint, Checkpointer, ModelFiles, RngStates
from trainer.config.job_config import JobConfig
from trainer.continual.ewc import ElasticWeightConsolidation, FisherPass
from trainer.data.batches import loader_workers
from trainer.data.mixture import mixture_counts, mixture_sources, training_data
from trainer.data.samplers import CyclingSource, GlobalBatchSampler
from trainer.data.source import TrainingBatches, token_counts
from trainer.data.streaming import StreamingBatches, passes_of
from trainer.distributed.construction import filled_from_first_process
from trainer.distributed.launch import prepare_for_model, sharded_state_name
from trainer.engine.evaluation import BestMetric
from trainer.engine.fault_injection import FaultInjection
from trainer.engine.loop import Engine, EngineParts, LoopSettings, Window
from trainer.engine.optim import build_optimizer, build_scheduler
from trainer.engine.signals import StopSignals
from trainer.engine.state import TrainState
from trainer.engine.task import Task
from trainer.engine.throughput import Throughput, device_peak, precision_name, training_flops_per_token
from trainer.errors import require
from trainer.layout import OPTIMIZER_FILE, SCALER_FILE, SCHEDULER_FILE
from trainer.models.checkpointing import checkpoint_blocks
from trainer.models.compilation import compile_blocks
from trainer.models.kernels import fuse_activations
from trainer.tracking import MetricsLog, choose_trackers
from trainer.tracking.console import logger


def assemble(config: JobConfig, task: Task, accelerator, on_saved=lambda path: None) -> Engine:
    """The engine for `task`, its parts built from `config`. `on_saved(path)`: rank 0, after each checkpoint (Hub
    push)."""
    data = training_batches(config, task, accelerator)
    settings = loop_settings(config, task, data, accelerator)
    # Both read or copy the task model before `prepare` shards it; a refused --ewc_from has written nothing.
    ewc, fisher_pass = continual_learning(config.continual, task, accelerator)
    model, optimizer = prepared_model(config, task, accelerator)
    if ewc is not None:
        ewc.place(accelerator, model)
    scheduler = build_scheduler(optimizer, config.optimization, settings.total_steps)
    state, window = TrainState(), Window(accelerator.device)
    trackers = metrics_log(config, accelerator)
    faults = FaultInjection(accelerator.process_index, task.model, state)
    tensor_states = {SCHEDULER_FILE: scheduler}
    if sharded_state_name(accelerator) is None:  # otherwise the optimizer state is in the sharded checkpoint
        tensor_states[OPTIMIZER_FILE] = optimizer
    if accelerator.scaler is not None:  # fp16 loss scaling
        tensor_states[SCALER_FILE] = accelerator.scaler
    checkpointer = Checkpointer(
        config.checkpointing, accelerator, ModelFiles(model, task.hf_model, task.tokenizer, optimizer),
        states={"train_state": state, "data": data, "trackers": trackers}, tensor_states=tensor_states,
        rank_states={"rng": RngStates(), "window": window}, best=BestCheckpoint(settings.best_metric),
        arguments=config.as_dict(), inside_save=faults.inside_save, on_saved=on_saved,
        on_resumed=trackers.forget_after)
    parts = EngineParts(task=task, model=model, data=data, optimizer=optimizer, scheduler=scheduler,
                        checkpointer=checkpointer, trackers=trackers, state=state, window=window,
                        stop_signals=StopSignals(config.checkpointing.stop_signals), faults=faults,
                        throughput=throughput(config.parallelism, task, accelerator), ewc=ewc, fisher_pass=fisher_pass)
    return Engine(parts, settings, accelerator)


def metrics_log(config: JobConfig, accelerator) -> MetricsLog:
    """Where the numbers go: the log, log_history.jsonl and the --report_to trackers, under --run_name (default: the
    output directory's name); the trackers' runs are a stateful part, so that a resumed job continues them."""
    output_dir = config.checkpointing.output_dir
    run_name = config.tracking.run_name or os.path.basename(os.path.abspath(output_dir))
    return MetricsLog(output_dir, accelerator.is_main_process,
                      choose_trackers(config.tracking.report_to, run_name, output_dir), config.as_dict())


def training_batches(config: JobConfig, task: Task, accelerator) -> TrainingBatches | StreamingBatches:
    """The training samples (then each other source's: a mixture, replay) in the global order of every step; under
    --streaming, the stream's lanes."""
    optimization = config.optimization
    sources = mixture_sources(config)
    if task.train_stream is not None:
        return StreamingBatches([task.train_stream, *task.other_sources], sources, task.train_collator,
                                optimization.per_device_train_batch_size, accelerator.num_processes,
                                accelerator.process_index, optimization.gradient_accumulation_steps,
                                data_loader_workers(config, accelerator), passes_of(optimization.num_train_epochs),
                                optimization.seed)
    size = len(task.train_dataset)
    global_batch_size = optimization.global_batch_size(accelerator.num_processes)
    counts = mixture_counts(sources, global_batch_size)
    firsts = list(itertools.accumulate([size, *(len(other) for other in task.other_sources)]))  # in the data
    others = [CyclingSource(firsts[index], len(other), counts[index + 1], optimization.seed, source=index + 1)
              for index, other in enumerate(task.other_sources)]
    sampler = GlobalBatchSampler(size, optimization.per_device_train_batch_size, accelerator.num_processes,
                                 accelerator.process_index, optimization.gradient_accumulation_steps,
                                 optimization.seed, lengths=task.train_lengths, others=others)
    require(sampler.steps_per_epoch > 0,
            f"the training set has {size} sequences, fewer than one global batch of {sampler.global_batch_size} "
            f"(per-device batch x processes x accumulation"
            f"{f' less {global_batch_size - counts[0]} from the other sources' if others else ''}); use more data "
            f"or a smaller batch")
    dataset = training_data(task.train_dataset, task.other_sources, task.columns)
    return TrainingBatches(dataset, task.columns, task.train_collator, sampler,
                           data_loader_workers(config, accelerator), pin_memory=accelerator.device.type == "cuda",
                           sources=sources, token_counts=token_counts(dataset))


def data_loader_workers(config: JobConfig, accelerator) -> int:
    return loader_workers(config.parallelism.dataloader_num_workers, accelerator.device)


def loop_settings(config: JobConfig, task: Task, data: TrainingBatches, accelerator) -> LoopSettings:
    evaluation = config.evaluation
    return LoopSettings(
        total_steps=config.optimization.total_steps(data.steps_per_epoch),
        accumulation_steps=config.optimization.gradient_accumulation_steps,
        max_grad_norm=config.optimization.max_grad_norm, logging_steps=config.tracking.logging_steps,
        eval_steps=evaluation.eval_steps, save_steps=config.checkpointing.save_steps,
        best_metric=BestMetric.of(evaluation, task.main_metric) if evaluation.load_best_model_at_end else None,
        eval_batch_size=evaluation.per_device_eval_batch_size, torch_compile=config.parallelism.torch_compile,
        output_dir=config.checkpointing.output_dir, loader_workers=data_loader_workers(config, accelerator))


def continual_learning(continual, task: Task, accelerator):
    """(EWC or None, the Fisher pass of --save_fisher or None)."""
    ewc = (ElasticWeightConsolidation(continual.ewc_from, continual.ewc_lambda, task.model) if continual.ewc_from
           else None)
    fisher_pass = FisherPass(task.model, accelerator, continual.fisher_samples) if continual.save_fisher else None
    return ewc, fisher_pass


def prepared_model(config: JobConfig, task: Task, accelerator):
    """(the task model, its optimizer), prepared by accelerate (DDP, DeepSpeed or FSDP), its blocks checkpointed
    and compiled when asked."""
    parallelism = config.parallelism
    fuse_activations(task.hf_model)
    if config.model.gradient_checkpointing:  # before compilation, which traces the checkpoint into each graph
        checkpoint_blocks(task.hf_model, config.model.checkpoint_options, config.model.gradient_checkpointing_every)
    if parallelism.torch_compile:
        compile_blocks(task.hf_model, parallelism.torch_compile_backend, parallelism.torch_compile_mode,
                       task.eager_modules)
    optimizer = build_optimizer(task.model, config.optimization)
    prepare_for_model(accelerator, task.hf_model)
    with filled_from_first_process(accelerator, task.model):
        return accelerator.prepare(task.model, optimizer)


def throughput(parallelism, task: Task, accelerator) -> Throughput:
    dense = functools.partial(training_flops_per_token, task.hf_model)
    peak = peak_flops(parallelism, accelerator) if accelerator.is_main_process else None
    return Throughput(task.flops_per_token or dense, dense, peak)


def peak_flops(parallelism, accelerator) -> float:
    """The datasheet peak of this device and precision (or --peak_tflops, or a measured one), logged."""
    device = accelerator.device
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    peak = device_peak(device, precision_name(parallelism.bf16, parallelism.fp16, tf32), parallelism.peak_tflops)
    logger.info("MFU is measured against %s", peak.source)
    return peak.flops
