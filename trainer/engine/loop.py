"""The training engine every job runs on: sharded batches, exact loss normalisation, evaluation, saving.

A job hands the engine a `Task`: a module whose forward returns `{"loss_sum": ...}` (the loss SUMMED over
the batch's loss items: masked tokens for MLM, samples for classification), datasets, and collators that
put the item count on the host as `num_loss_items`. Summed losses are what make results independent of how
a step is split: each optimizer step divides by the number of loss items in the WHOLE step (all micro-batches,
all ranks), so batch 4 x accumulation 2 x 2 ranks makes the same update as one batch of 16.

The engine is handed its parts built (`EngineParts`, by trainer.engine.assembly) and the few numbers of its loop
(`LoopSettings`); it builds nothing and reads no command-line section.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from trainer.checkpoint.checkpointer import Checkpointer
from trainer.checkpoint.files import Writes
from trainer.continual.ewc import ElasticWeightConsolidation, FisherPass, save_fisher
from trainer.data.batches import make_loader
from trainer.data.samplers import shard_for_evaluation
from trainer.data.source import TrainingBatches, describe_consumed
from trainer.distributed.collectives import all_gather_objects, all_reduce_sum, any_rank, host_sum
from trainer.distributed.launch import describe_parallelism, describe_threads, parameters_sharded
from trainer.distributed.parameters import full_state_dict
from trainer.distributed.steps import backward, clip_gradients, set_gradient_sync, step_deepspeed_engine
from trainer.engine.evaluation import BestMetric
from trainer.engine.fault_injection import FaultInjection
from trainer.engine.signals import STOPPED_EXIT_CODE, StopSignals
from trainer.engine.state import TrainState
from trainer.engine.task import EvalOutput, Task
from trainer.engine.throughput import Throughput
from trainer.errors import DataSourceFailed, JobStopped, require
from trainer.layout import checkpoint_name
from trainer.models.compilation import evaluation_stance
from trainer.tracking import MetricsLog
from trainer.tracking.console import logger, show_progress_bars

DIVERGED_EXIT_CODE = 3
BAD_DATA_EXIT_CODE = 2  # bad input, found during the run


@dataclass(frozen=True)
class LoopSettings:
    """The numbers the loop runs by, derived from the command-line sections (trainer.engine.assembly)."""

    total_steps: int
    accumulation_steps: int
    max_grad_norm: float  # 0: no clipping
    logging_steps: int
    eval_steps: Optional[int]
    save_steps: Optional[int]
    best_metric: Optional[BestMetric]  # with --load_best_model_at_end: evaluated at every save, checked up front
    eval_batch_size: int
    torch_compile: bool
    output_dir: str
    loader_workers: int  # of the evaluation loaders


@dataclass
class EngineParts:
    """What the engine runs, built in one place (trainer.engine.assembly)."""

    task: Task
    model: torch.nn.Module  # the task model, prepared (DDP, DeepSpeed or FSDP)
    data: TrainingBatches  # or StreamingBatches: resumable micro-batches; its position is a checkpointer state
    optimizer: torch.optim.Optimizer
    scheduler: object
    checkpointer: Checkpointer
    trackers: MetricsLog
    state: TrainState
    window: "Window"
    stop_signals: StopSignals
    faults: FaultInjection
    throughput: Throughput
    ewc: Optional[ElasticWeightConsolidation] = None
    fisher_pass: Optional[FisherPass] = None


class Engine:
    def __init__(self, parts: EngineParts, settings: LoopSettings, accelerator):
        self.parts, self.settings, self.accelerator = parts, settings, accelerator
        self.task, self.model, self.data, self.state = parts.task, parts.model, parts.data, parts.state
        self.optimizer, self.scheduler = parts.optimizer, parts.scheduler
        self.checkpointer, self.trackers = parts.checkpointer, parts.trackers
        self.world_size = accelerator.num_processes

    # ----------------------------------------------------------------------------------------------- training
    def train(self) -> dict:
        """Train to the end; the trackers' runs end with it, marked unfinished when the job stops early."""
        try:
            metrics = self.train_to_end()
        except BaseException:
            self.trackers.close(completed=False)
            raise
        self.trackers.close()
        return metrics

    def train_to_end(self) -> dict:
        settings, state, window = self.settings, self.state, self.parts.window
        batches_per_step, *sources = self.data.describe()
        logger.info("training %d optimizer steps with %s: %s; %s", settings.total_steps,
                    describe_parallelism(self.accelerator), batches_per_step, describe_threads())
        for line in sources:
            logger.info(line)
        self.start_or_resume()
        batches = self.data.micro_batches()
        progress = tqdm(total=settings.total_steps, initial=state.step, desc="train", unit="step",
                        disable=not show_progress_bars(self.accelerator.is_main_process), mininterval=1.0)
        started = time.perf_counter()
        while state.step < settings.total_steps:
            step_started = time.perf_counter()
            micro_batches = self.next_micro_batches(batches)
            window.data_wait += time.perf_counter() - step_started
            self.optimizer_step(micro_batches, window)
            window.seconds += time.perf_counter() - step_started
            progress.update(1)
            if state.step % settings.logging_steps == 0 or state.step == settings.total_steps:
                self.log_window(window)
            if state.step < settings.total_steps:
                self.evaluate_and_save_when_due(window)
        progress.close()
        runtime = time.perf_counter() - started
        state.metrics.update(self.evaluate(prefix="eval_"))
        consumed = self.data.consumed()
        state.metrics.update(train_runtime=runtime, train_steps=state.step,
                             train_tokens_per_second=state.tokens_seen / runtime, **consumed)
        logger.info("trained on %s", describe_consumed(consumed))
        if self.checkpointer.last_saved_step != state.step:
            self.save_checkpoint(window)
        state.metrics.update(self.checkpointer.restore_best_model())
        self.save_model(settings.output_dir)
        if self.parts.fisher_pass is not None:
            self.save_fisher(settings.output_dir)
        return state.metrics

    def start_or_resume(self) -> None:
        """Resume from a checkpoint, or evaluate the model before training (checked before it is logged: with a
        --metric_for_best_model that is no metric of the job, a refused run writes nothing)."""
        path = self.checkpointer.resume()
        if path is None:
            self.state.metrics.update(self.evaluate(prefix="init_eval_", check=self.check_best_model_metric))
            return
        self.check_best_model_metric(self.state.metrics)
        logger.info("resumed from %s: step %d, %s", path, self.state.step, self.data.describe_position())

    def next_micro_batches(self, batches) -> list[dict]:
        """One optimizer step's micro-batches. A data source that fails on any rank (e.g. a streamed file that
        became unreadable) stops every rank at this step with that rank's line, naming the last good checkpoint:
        data is never skipped, and no rank is left waiting in the step's collectives. Only a source that reads
        files during training can fail so: the others skip the ranks' agreement, one host all-reduce a step."""
        if not self.data.reads_during_training:
            return [next(batches) for _ in range(self.settings.accumulation_steps)]
        failure = None
        try:
            micro_batches = [next(batches) for _ in range(self.settings.accumulation_steps)]
        except DataSourceFailed as error:
            failure, micro_batches = str(error), []
        if any_rank(failure is not None):
            failure = next(message for message in all_gather_objects(failure) if message)
            raise JobStopped(f"{failure}; stopping at optimizer step {self.state.step + 1}. The last good "
                             f"checkpoint is {self.last_good_checkpoint()}; fix the data, then run the same command "
                             f"again to resume", BAD_DATA_EXIT_CODE)
        return micro_batches

    def last_good_checkpoint(self) -> str:
        last_good = self.checkpointer.last_saved_step
        return (f"{checkpoint_name(last_good) if last_good is not None else 'none (none was saved yet)'} in "
                f"{self.settings.output_dir}")

    def optimizer_step(self, micro_batches: list[dict], window: "Window") -> None:
        # The counts are on the host: summed over ranks there, so that the step never waits for the device.
        local_items = sum(batch.pop("num_loss_items") for batch in micro_batches)
        global_items = host_sum(local_items)
        # DDP averages gradients over ranks, hence the world size: the update is d(sum of losses)/global_items.
        scale = self.world_size / max(global_items, 1)
        self.model.train()
        for index, batch in enumerate(micro_batches):
            set_gradient_sync(self.model, index == len(micro_batches) - 1)
            window.tokens += batch["input_ids"].numel()
            window.samples += batch["input_ids"].shape[0]
            self.parts.faults.micro_batch(batch.pop("sample_id"))
            loss_sum = self.model(**self.to_device(batch))["loss_sum"]
            backward(self.accelerator, loss_sum * scale, last_micro_step=index == len(micro_batches) - 1)
            window.loss_sum += loss_sum.detach().double()
        window.items += local_items
        if self.task.before_optimizer_step is not None:
            self.task.before_optimizer_step(self.state.step, self.data.epoch)
        # EWC: once per step, on the reduced gradients, so that the accumulation split cannot change it.
        if self.parts.ewc is not None:
            window.ewc_penalty += self.parts.ewc.add_gradient()
        step_deepspeed_engine(self.accelerator)  # DeepSpeed clips and updates here; elsewhere a no-op
        if self.settings.max_grad_norm > 0:  # under DeepSpeed, clipping happened in its step; this reads the norm
            window.grad_norm = clip_gradients(self.accelerator, self.model, self.settings.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.advance_state()

    def advance_state(self) -> None:
        self.state.step += 1
        self.data.advance()

    def log_window(self, window: "Window") -> None:
        """Read the device-side sums once per logging interval: the only host sync of the loop."""
        reading = time.perf_counter()
        counts = torch.tensor([window.items, window.tokens, window.samples], dtype=torch.float64,
                              device=window.loss_sum.device)
        sums = torch.cat([window.loss_sum.view(1), window.ewc_penalty.view(1), counts])
        loss_sum, ewc_penalty, items, tokens, samples = all_reduce_sum(sums).tolist()
        # The steps only queue work on a GPU: the wait for the device to finish the window's queue is training time.
        window.seconds += time.perf_counter() - reading
        self.stop_if_diverged(loss_sum, window)
        self.state.tokens_seen += int(tokens)
        seconds = max(window.seconds, 1e-9)
        record = {"loss": loss_sum / max(items, 1), "loss_items": int(items),
                  "learning_rate": float(self.scheduler.get_last_lr()[0]),  # a tensor for torchao's optimizers
                  "tokens_per_second": tokens / seconds, "samples_per_second": samples / seconds,
                  "data_wait_fraction": window.data_wait / seconds, "epoch": self.data.epoch}
        record.update(self.parts.throughput.mfu(tokens, seconds, samples, self.world_size))
        if window.grad_norm is not None:
            record["grad_norm"] = float(window.grad_norm)
        if self.parts.ewc is not None:  # the mean over the window's steps, at each step's parameters before its update
            record["ewc_penalty"] = ewc_penalty / (self.state.step - window.first_step + 1)
        self.trackers.log(self.state.step, record, prefix="train_")
        # train_loss in the results: the run's mean loss per loss item (masked token, sample), the sums of every
        # window kept in the train state, so a resumed run reports the same number as one that never stopped.
        self.state.loss_sum += loss_sum
        self.state.loss_items += int(items)
        self.state.metrics["train_loss"] = self.state.loss_sum / max(self.state.loss_items, 1)
        window.reset(self.state.step)

    def stop_if_diverged(self, reduced_loss_sum: float, window: "Window") -> None:
        """A NaN/Inf loss or gradient anywhere in the window ends the run before anything is saved from it.

        NaN and Inf propagate through the window's loss sum, so checking it when it is read anyway (at logging
        and before a checkpoint) costs no extra host sync; the last clipped gradient norm is checked with it.
        """
        grad_norm_finite = window.grad_norm is None or math.isfinite(float(window.grad_norm))
        if math.isfinite(reduced_loss_sum) and grad_norm_finite:
            return
        raise JobStopped(f"non-finite training loss or gradient between optimizer steps {window.first_step} and "
                         f"{self.state.step}; stopping. The last good checkpoint is {self.last_good_checkpoint()}; "
                         f"lower the learning rate or check the data, then resume", DIVERGED_EXIT_CODE)

    # ---------------------------------------------------------------------------------------------- checkpoints
    def evaluate_and_save_when_due(self, window: "Window") -> None:
        """Between optimizer steps: periodic evaluation and checkpoint, and a checkpoint-and-exit on a stop signal."""
        settings, step = self.settings, self.state.step
        save_due = bool(settings.save_steps) and step % settings.save_steps == 0
        if (settings.eval_steps and step % settings.eval_steps == 0) or (save_due and settings.best_metric is not None):
            self.state.metrics.update(self.evaluate(prefix="eval_"))
        stopping = self.parts.stop_signals.should_stop()
        if save_due or stopping:
            self.save_checkpoint(window)
        if stopping:
            raise JobStopped(f"stop signal received: saved {checkpoint_name(step)} in {settings.output_dir} and "
                             f"stopped; run the same command again to resume", STOPPED_EXIT_CODE)

    def save_checkpoint(self, window: "Window") -> None:
        reduced_loss_sum = all_reduce_sum(window.loss_sum.clone()).item()
        self.stop_if_diverged(reduced_loss_sum, window)
        self.checkpointer.save(self.state.step, self.state.metrics)

    def check_best_model_metric(self, metrics: dict) -> None:
        best = self.settings.best_metric
        if best is not None:
            require(best.name.startswith("eval_") and f"init_{best.name}" in metrics,
                    f"--metric_for_best_model {best.name} is not an evaluation metric of this job; choose one of "
                    f"{', '.join(sorted(k[len('init_'):] for k in metrics if k.startswith('init_')))}")

    def to_device(self, batch: dict) -> dict:
        return {key: value.to(self.accelerator.device, non_blocking=True) for key, value in batch.items()}

    # --------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, prefix: str = "eval_", check: Optional[Callable[[dict], None]] = None) -> dict:
        """Every evaluation sample exactly once over all ranks; sums reduced in float64. `check(metrics)` runs
        before anything is logged."""
        with evaluation_stance(self.settings.torch_compile):
            return self.evaluate_eagerly(prefix, check)

    def evaluate_eagerly(self, prefix: str, check: Optional[Callable[[dict], None]]) -> dict:
        """`evaluate` with compiled blocks (if any) running eagerly."""
        loader = self.sharded_batches(self.task.eval_dataset)
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.accelerator.device)
        num_items, predictions = 0, {}
        for batch in tqdm(loader, desc="evaluate", leave=False,
                          disable=not show_progress_bars(self.accelerator.is_main_process)):
            num_items += batch.pop("num_loss_items")
            sample_ids = batch.pop("sample_id").tolist()
            output = self.model(**self.to_device(batch))
            loss_sum += output["loss_sum"].double()
            if "predictions" in output:
                predictions.update(zip(sample_ids, output["predictions"].cpu().tolist()))
        totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(num_items), dtype=torch.float64,
                                                                    device=loss_sum.device)])).tolist()
        gathered = None
        if predictions:
            gathered = {sid: pred for part in all_gather_objects(predictions) for sid, pred in part.items()}
        metrics = self.task.compute_metrics(EvalOutput(totals[0], int(totals[1]), gathered))
        metrics = {f"{prefix}{key}": value for key, value in metrics.items()}
        if check is not None:
            check(metrics)
        self.trackers.log(self.state.step, metrics)
        # With sharded parameters a forward on rank 0 alone would wait forever for the other ranks' shards.
        if (self.accelerator.is_main_process and self.task.after_evaluation is not None
                and not parameters_sharded(self.accelerator)):
            shown = self.task.after_evaluation(self.accelerator.unwrap_model(self.model))
            if shown:  # e.g. generated text: logged (TensorBoard text), not part of the metrics
                self.trackers.log(self.state.step, {f"{prefix}{key}": value for key, value in shown.items()})
        return metrics

    @torch.no_grad()
    def predict(self, dataset, output_key: str, drop: tuple[str, ...] = ()) -> dict:
        """`output_key` of the task model's output for every sample of `dataset` (e.g. class probabilities),
        computed in shards on all ranks and gathered everywhere: {sample id: value}. `drop`: batch entries the
        forward must not see (e.g. labels, whose presence asks for a loss).

        The forward goes through the prepared model (DDP, DeepSpeed or FSDP) on every rank: under ZeRO-3 and FSDP
        each forward gathers parameter shards from all ranks, so the unwrapped model would wait forever.
        """
        self.model.eval()
        values = {}
        for batch in self.sharded_batches(dataset):
            sample_ids = batch.pop("sample_id").tolist()
            batch.pop("num_loss_items")
            for key in drop:
                batch.pop(key, None)
            output = self.model(**self.to_device(batch))
            values.update(zip(sample_ids, output[output_key].cpu().tolist()))
        return {sid: value for part in all_gather_objects(values) for sid, value in part.items()}

    def sharded_batches(self, dataset):
        """This rank's contiguous shard of `dataset` in evaluation batches: every sample once over all ranks."""
        shard = shard_for_evaluation(len(dataset), self.world_size, self.accelerator.process_index)
        batch_size = self.settings.eval_batch_size
        index_batches = [list(shard[start:start + batch_size]) for start in range(0, len(shard), batch_size)]
        return make_loader(dataset, self.task.columns, index_batches, self.task.eval_collator,
                           self.settings.loader_workers, pin_memory=self.accelerator.device.type == "cuda")

    # ------------------------------------------------------------------------------------------------- saving
    def save_fisher(self, directory: str) -> None:
        """--save_fisher: the Fisher information and anchor of the model just saved, beside it (see continual/ewc.py)."""
        def loader(dataset, columns, index_batches, collator):
            return make_loader(dataset, columns, index_batches, collator, 0, pin_memory=False)

        with evaluation_stance(self.settings.torch_compile):
            fisher, anchors, samples = self.parts.fisher_pass.compute(self.model, self.task.train_dataset,
                                                                self.task.columns, self.task.train_collator, loader)
        writes = Writes(directory)
        if self.accelerator.is_main_process:
            save_fisher(directory, fisher, anchors, samples, writes.run)
            logger.info("EWC: wrote the diagonal Fisher information of %d training samples and the anchor "
                        "weights to %s", samples, directory)
        self.checkpointer.stop_if_any_write_failed(writes)

    def save_model(self, directory: str) -> None:
        """A plain `save_pretrained` directory (safetensors + tokenizer) that `from_pretrained` loads."""
        self.accelerator.wait_for_everyone()
        state_dict = full_state_dict(self.accelerator, self.model, self.task.hf_model)  # gathered: ZeRO-3, FSDP
        writes = Writes(directory)  # a full disk stops every rank with one line naming the last checkpoint
        if self.accelerator.is_main_process:
            writes.run(self.task.hf_model.save_pretrained, directory, state_dict=state_dict)
            writes.run(self.task.tokenizer.save_pretrained, directory)
        self.checkpointer.stop_if_any_write_failed(writes)


@dataclass
class Window:
    """Training sums over one logging interval, kept on the device until they are logged."""

    device: torch.device
    loss_sum: torch.Tensor = None
    items: int = 0
    tokens: int = 0
    samples: int = 0
    seconds: float = 0.0  # time in training steps (waiting for data included; evaluation and saving not)
    data_wait: float = 0.0  # of which waiting for the data loader
    grad_norm: Optional[torch.Tensor] = None
    ewc_penalty: torch.Tensor = None  # this rank's share of the EWC penalty, summed over the window's steps
    first_step: int = 1  # the first optimizer step the window covers

    def __post_init__(self):
        self.reset()

    def reset(self, step: int = 0) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.ewc_penalty = torch.zeros((), dtype=torch.float64, device=self.device)
        self.items = self.tokens = self.samples = 0
        self.seconds = self.data_wait = 0.0
        self.grad_norm = None
        self.first_step = step + 1

    def state_dict(self) -> dict:
        """This rank's sums; a checkpoint keeps them so that a resumed run logs the same window losses."""
        return {"loss_sum": self.loss_sum.cpu(), "items": self.items, "tokens": self.tokens,
                "samples": self.samples, "first_step": self.first_step, "ewc_penalty": self.ewc_penalty.cpu()}

    def load_state_dict(self, saved: dict) -> None:
        self.merge_state_dicts([saved])

    def merge_state_dicts(self, saved: list[dict]) -> None:
        """The sums of every saved rank's window (a resume on another world size gives them all to rank 0), so that
        the next logged loss still covers the whole window."""
        self.reset()
        for window in saved:
            self.loss_sum += window["loss_sum"].to(self.device)
            self.ewc_penalty += window["ewc_penalty"].to(self.device)
            self.items += window["items"]
            self.tokens += window["tokens"]
            self.samples += window["samples"]
            self.first_step = window["first_step"]
