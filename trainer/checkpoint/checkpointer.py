"""Checkpoints that a crash, a kill -9 or a pre-emption cannot corrupt, and exact resumption from them.

`output_dir/checkpoint-<step>/` holds everything that decides the rest of the run:
- `model.safetensors` + config + tokenizer (`save_pretrained`; `from_pretrained` loads the directory as is),
- `optimizer.pt`, `scheduler.pt`, `scaler.pt` (fp16 loss scaling only); under DeepSpeed and FSDP a sharded
  model + optimizer checkpoint instead of `optimizer.pt`, written by every rank: `deepspeed/` (DeepSpeed's own
  format) or `fsdp/` (torch.distributed.checkpoint). The weights beside it are gathered from the shards, so they
  load with `from_pretrained` all the same,
- `rank-<r>.pt` for EVERY rank: its python/numpy/torch/cuda RNG states (dropout draws from them) and its share
  of the open logging window (loss/item/token sums since the last log line, so a run resumed mid-window logs
  the same losses as one that never stopped),
- `trainer_state.json`: step, data position (epoch, samples consumed in the epoch's global order, replay samples
  drawn), tokens seen,
  metrics so far, the best checkpoint, the world size and the (token-redacted) arguments,
- `checkpoint_complete`, written last.

Atomicity: everything is written into `checkpoint-<step>.tmp`, flushed to disk (fsync), marked complete, then
renamed. A save killed half-way leaves a `.tmp` directory (or, on file systems without atomic rename, a
directory without the marker); resume skips it with a warning naming it and takes the previous one.
Checkpoints are only taken at optimizer-step boundaries; all ranks write into the same directory, so
multi-node runs need a shared file system for `output_dir`.
"""
from __future__ import annotations

import os
import random
import shutil
from typing import Callable, Optional

import numpy as np
import torch

from trainer.checkpoint.files import (Writes, checkpoint_problem, complete_checkpoints, fresh_directory,
                                      latest_checkpoint, publish, read_trainer_state, write_json)
from trainer.checkpoint.sharded import sharded_checkpoint_functions
from trainer.config.parsing import as_dict
from trainer.distributed.collectives import all_gather_objects
from trainer.distributed.launch import sharded_state_name
from trainer.distributed.parameters import full_state_dict
from trainer.errors import JobStopped, require
from trainer.layout import (MODEL_WEIGHTS_FILE, OPTIMIZER_FILE, PEFT_WEIGHTS_FILE, SCALER_FILE, SCHEDULER_FILE,
                            STATE_FILE, TEMPORARY_SUFFIX, checkpoint_name, rank_state_file)
from trainer.tracking.console import logger

SAVE_FAILED_EXIT_CODE = 2  # the environment (disk space, quota, permissions), like any other bad input


# ---------------------------------------------------------------------------------------------- RNG states
def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ------------------------------------------------------------------------------------------- checkpointer
class Checkpointer:
    """Saves, rotates and restores checkpoints of the stateful parts it is given (as torchtitan's checkpointer:
    it never reaches into the trainer). Every method is called on every rank.

    `model` is the prepared model (DDP, DeepSpeed or FSDP: it holds the shards) and `hf_model` the transformers
    model inside it, written with `save_pretrained` beside `tokenizer`; `optimizer`, `scheduler` and `train_state`
    have `state_dict`/`load_state_dict`. Callbacks: `inside_save()` on every rank while a save is under way (fault
    injection), `on_saved(path)` on rank 0 after a checkpoint is published (Hub push), `on_resumed(step)` on every
    rank after a resume (the metrics log forgets what came later). `json_states`: more stateful parts, kept by
    name in trainer_state.json (rank 0's; e.g. the trackers' run ids) and given back on resume."""

    def __init__(self, args, accelerator, *, model, optimizer, scheduler, train_state, hf_model, tokenizer,
                 inside_save: Callable[[], None], on_saved: Callable[[str], None],
                 on_resumed: Callable[[int], None], json_states: Optional[dict] = None):
        self.args = args
        self.accelerator = accelerator
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_state = train_state
        self.hf_model, self.tokenizer = hf_model, tokenizer
        self.inside_save, self.on_saved, self.on_resumed = inside_save, on_saved, on_resumed
        self.json_states = json_states or {}
        self.world_size = accelerator.num_processes
        self.best_metric: Optional[float] = None
        self.best_checkpoint: Optional[str] = None
        self.last_saved_step: Optional[int] = None

    # ------------------------------------------------------------------------------------------------ save
    def save(self, window) -> str:
        """Write checkpoint-<step> atomically. A write that fails (disk full, quota, permissions) stops the run
        on every rank with one line naming the last good checkpoint, after removing the partial directory;
        the previous checkpoints stay as they were (rotation only runs after a complete save)."""
        state, accelerator = self.train_state, self.accelerator
        final = os.path.join(self.args.output_dir, checkpoint_name(state.step))
        temporary = final + TEMPORARY_SUFFIX
        writes = Writes(temporary)
        if accelerator.is_main_process:
            writes.run(fresh_directory, temporary)
        accelerator.wait_for_everyone()
        writes.run(torch.save, {"rng": rng_states(), "window": window.state_dict(), "world_size": self.world_size},
                   os.path.join(temporary, rank_state_file(accelerator.process_index)))
        # Under DeepSpeed and FSDP every rank takes part: the weight gather (ZeRO-3, FSDP) and the sharded save.
        model_state = full_state_dict(accelerator, self.model, self.hf_model)
        if self.sharded:
            self.save_sharded_state(os.path.join(temporary, self.sharded))
        if accelerator.is_main_process:
            self.track_best(os.path.basename(final))
            writes.run(self.write_shared_files, temporary, model_state)
        self.inside_save()
        self.stop_if_any_write_failed(writes, temporary)  # the barrier before publishing
        if accelerator.is_main_process:
            writes.run(publish, temporary, final, state.step)
        self.stop_if_any_write_failed(writes, temporary)
        if accelerator.is_main_process:
            logger.info("saved checkpoint %s", final)
            self.rotate()
            self.on_saved(final)
        accelerator.wait_for_everyone()
        self.last_saved_step = state.step
        return final

    def stop_if_any_write_failed(self, writes: "Writes", temporary: Optional[str] = None) -> None:
        """A collective: every rank learns of a failed write on any rank and stops the same way. `temporary`:
        the partial checkpoint directory, removed; None: the final model's save into --output_dir."""
        failures = [failure for failure in all_gather_objects(writes.failure) if failure]
        if not failures:
            return
        if self.accelerator.is_main_process and temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        last = self.last_saved_step
        what = (f"{os.path.basename(temporary.removesuffix(TEMPORARY_SUFFIX))} failed: {failures[0]}; removed the "
                f"partial {temporary}" if temporary is not None else f"the final model into {self.args.output_dir} failed: {failures[0]}")
        raise JobStopped(f"saving {what}. The last good checkpoint is "
                         f"{checkpoint_name(last) if last is not None else 'none (none was saved yet)'} in "
                         f"{self.args.output_dir}; free disk space (or choose another --output_dir) and run the same "
                         f"command again to resume", SAVE_FAILED_EXIT_CODE)

    @property
    def sharded(self) -> Optional[str]:
        """The subdirectory of the sharded model + optimizer state ("deepspeed", "fsdp"); None under DDP."""
        return sharded_state_name(self.accelerator)

    def save_sharded_state(self, directory: str) -> None:
        """Under DeepSpeed or FSDP: a sharded checkpoint of model and optimizer, every rank writing its shards."""
        save, _ = sharded_checkpoint_functions(self.accelerator)
        save(self.model, self.optimizer, directory)

    def load_sharded_state(self, directory: str) -> None:
        _, load = sharded_checkpoint_functions(self.accelerator)
        load(self.model, self.optimizer, directory)

    def write_shared_files(self, directory: str, model_state: Optional[dict]) -> None:
        self.hf_model.save_pretrained(directory, state_dict=model_state)
        self.tokenizer.save_pretrained(directory)
        if not self.sharded:  # otherwise the optimizer state is in the sharded checkpoint
            torch.save(self.optimizer.state_dict(), os.path.join(directory, OPTIMIZER_FILE))
        torch.save(self.scheduler.state_dict(), os.path.join(directory, SCHEDULER_FILE))
        if self.accelerator.scaler is not None:
            torch.save(self.accelerator.scaler.state_dict(), os.path.join(directory, SCALER_FILE))
        write_json(os.path.join(directory, STATE_FILE), {
            **self.train_state.state_dict(), "world_size": self.world_size,
            "best_metric": self.best_metric, "best_checkpoint": self.best_checkpoint,
            "metric_for_best_model": self.args.metric_for_best_model, "args": as_dict(self.args),
            **{name: part.state_dict() for name, part in self.json_states.items()}})

    def track_best(self, name: str) -> None:
        if not self.args.load_best_model_at_end:
            return
        value = self.train_state.metrics[self.args.metric_for_best_model]
        better = (self.best_metric is None or (value > self.best_metric if self.args.greater_is_better
                                               else value < self.best_metric))
        if better:
            self.best_metric, self.best_checkpoint = value, name

    def rotate(self) -> None:
        """Keep the newest --save_total_limit checkpoints, and the best one on top of them."""
        limit = self.args.save_total_limit
        if not limit:
            return
        checkpoints = complete_checkpoints(self.args.output_dir, warn=False)
        for _, path in checkpoints[:-limit]:
            if os.path.basename(path) != self.best_checkpoint:
                shutil.rmtree(path)
                logger.info("deleted checkpoint %s (--save_total_limit %d)", path, limit)

    # ---------------------------------------------------------------------------------------------- resume
    def checkpoint_to_resume(self) -> Optional[str]:
        requested, output_dir = self.args.resume_from_checkpoint, self.args.output_dir
        if requested is None:
            if self.args.overwrite_output_dir:  # asked to start afresh
                return None
            path = latest_checkpoint(output_dir)
            if path is not None:
                logger.info("output directory %s holds checkpoints: resuming from the newest complete one, %s",
                            output_dir, path)
            return path
        if requested == "latest":
            path = latest_checkpoint(output_dir)
            require(path is not None, f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}")
            return path
        problem = checkpoint_problem(requested)
        require(problem is None, f"--resume_from_checkpoint {requested}: {problem}")
        return requested

    def resume(self, window) -> bool:
        """Restore the newest (or requested) checkpoint into the stateful parts; False when starting fresh."""
        path = self.checkpoint_to_resume()
        if path is None:
            return False
        saved = read_trainer_state(path)
        if self.sharded:
            self.load_sharded_state(os.path.join(path, self.sharded))
        else:
            self.load_model_weights(path)
            self.optimizer.load_state_dict(torch.load(os.path.join(path, OPTIMIZER_FILE), map_location="cpu"))
        self.scheduler.load_state_dict(torch.load(os.path.join(path, SCHEDULER_FILE)))
        if self.accelerator.scaler is not None and os.path.isfile(os.path.join(path, SCALER_FILE)):
            self.accelerator.scaler.load_state_dict(torch.load(os.path.join(path, SCALER_FILE)))
        state = self.train_state
        state.load_state_dict(saved)
        self.best_metric, self.best_checkpoint = saved["best_metric"], saved["best_checkpoint"]
        self.last_saved_step = state.step
        self.restore_rank_state(path, saved["world_size"], window)
        for name, part in self.json_states.items():
            part.load_state_dict(saved.get(name, {}))
        self.on_resumed(state.step)
        logger.info("resumed from %s: step %d, epoch %d, %d samples into the epoch", path, state.step, state.epoch,
                    state.samples_in_epoch)
        return True

    def restore_rank_state(self, path: str, saved_world_size: int, window) -> None:
        """Each rank takes back its own RNG states and window sums when the world size is unchanged.

        With another world size no rank's RNG stream continues exactly (dropout differs anyway); the window sums
        of all saved ranks go to rank 0 so that the next logged loss still covers the whole window.
        """
        rank = self.accelerator.process_index
        if saved_world_size == self.world_size:
            rank_state = torch.load(os.path.join(path, rank_state_file(rank)), weights_only=False)
            set_rng_states(rank_state["rng"])
            window.load_state_dict(rank_state["window"])
        elif rank == 0:
            for saved_rank in range(saved_world_size):
                window.add_state_dict(torch.load(os.path.join(path, rank_state_file(saved_rank)),
                                                 weights_only=False)["window"])

    def load_model_weights(self, path: str) -> None:
        from safetensors.torch import load_file

        model = self.hf_model
        if hasattr(model, "load_saved_weights"):  # saves only part of itself (bottleneck adapters): reads it back
            model.load_saved_weights(path)
            return
        if hasattr(model, "peft_config"):  # a peft model saves its adapters (and trained head) only
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(model, load_file(os.path.join(path, PEFT_WEIGHTS_FILE)))
            require(not result.unexpected_keys, f"checkpoint {path} does not fit the model's adapters: unexpected "
                                                f"{sorted(result.unexpected_keys)[:5]}")
            return
        weights = load_file(os.path.join(path, MODEL_WEIGHTS_FILE))  # load_state_dict copies to the device
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = set(model.get_expanded_tied_weights_keys())  # save_pretrained stores tied weights once
        require(not unexpected and set(missing) <= tied,
                f"checkpoint {path} does not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}")

    def restore_best_model(self) -> None:
        """With --load_best_model_at_end, put the best checkpoint's weights into the model before the final save."""
        if not self.args.load_best_model_at_end or self.best_checkpoint is None:
            return
        best = os.path.join(self.args.output_dir, self.best_checkpoint)
        if self.sharded:
            self.load_sharded_state(os.path.join(best, self.sharded))
        else:
            self.load_model_weights(best)
        self.train_state.metrics.update(best_model_checkpoint=self.best_checkpoint, best_metric=self.best_metric)
        logger.info("loaded the best model, %s (%s = %.6g)", self.best_checkpoint, self.args.metric_for_best_model,
                    self.best_metric)
