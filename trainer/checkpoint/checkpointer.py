"""Checkpoints that a crash, a kill -9 or a pre-emption cannot corrupt, and exact resumption from them.

`output_dir/checkpoint-<step>/` holds everything that decides the rest of the run:
- `model.safetensors` + config + tokenizer (`save_pretrained`; `from_pretrained` loads the directory as is),
- the file of each of the `tensor_states` it is given: `optimizer.pt`, `scheduler.pt`, `scaler.pt` (fp16 loss
  scaling only); under DeepSpeed and FSDP a sharded model + optimizer checkpoint instead of `optimizer.pt`,
  written by every rank: `deepspeed/` (DeepSpeed's own format) or `fsdp/` (torch.distributed.checkpoint). The
  weights beside it are gathered from the shards, so they load with `from_pretrained` all the same,
- `rank-<r>.pt` for EVERY rank: its `rank_states`, e.g. its python/numpy/torch/cuda RNG states (dropout draws
  from them) and its share of the open logging window (loss/item/token sums since the last log line, so a run
  resumed mid-window logs the same losses as one that never stopped),
- `trainer_state.json`: the step, the world size, the (token-redacted) arguments as given, and under "states"
  the JSON `states`: e.g. the train state (tokens seen, loss sums, metrics so far), the data position (epoch,
  samples consumed in the epoch's global order, replay samples drawn) and the best checkpoint,
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
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import numpy as np
import torch

from trainer.checkpoint.files import (Writes, checkpoint_problem, complete_checkpoints, fresh_directory,
                                      latest_checkpoint, publish, read_trainer_state, write_json)
from trainer.checkpoint.sharded import sharded_checkpoint_functions
from trainer.distributed.collectives import all_gather_objects
from trainer.distributed.launch import sharded_state_name
from trainer.distributed.parameters import full_state_dict
from trainer.engine.evaluation import BestMetric
from trainer.errors import JobStopped, require
from trainer.layout import (MODEL_WEIGHTS_FILE, PEFT_WEIGHTS_FILE, STATE_FILE, TEMPORARY_SUFFIX, checkpoint_name,
                            rank_state_file)
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


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, saved: dict) -> None: ...


class RngStates:
    """This rank's python, numpy, torch and CUDA generators as a stateful part (dropout draws from them). With
    another world size no rank's stream continues exactly (dropout differs anyway): it has no `merge_state_dicts`."""

    def state_dict(self) -> dict:
        return rng_states()

    def load_state_dict(self, saved: dict) -> None:
        set_rng_states(saved)


@dataclass
class ModelFiles:
    """The model as a checkpoint holds it: `prepared` (DDP, DeepSpeed or FSDP: it holds the shards) and `hf_model`,
    the transformers model inside it, written with `save_pretrained` beside `tokenizer`. Under DeepSpeed and FSDP
    the `optimizer` state is saved with the model's shards; otherwise it is one of the checkpointer's tensor states."""

    prepared: torch.nn.Module
    hf_model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer


class BestCheckpoint:
    """With --load_best_model_at_end (`metric` given): the checkpoint with the best metric so far, kept out of the
    rotation and loaded at the end."""

    def __init__(self, metric: Optional[BestMetric]):
        self.metric = metric
        self.value: Optional[float] = None
        self.checkpoint: Optional[str] = None

    def track(self, name: str, metrics: dict) -> None:
        if self.metric is not None and self.metric.better(metrics[self.metric.name], self.value):
            self.value, self.checkpoint = metrics[self.metric.name], name

    def state_dict(self) -> dict:
        return {"metric": self.metric and self.metric.name, "value": self.value, "checkpoint": self.checkpoint}

    def load_state_dict(self, saved: dict) -> None:
        self.value, self.checkpoint = saved["value"], saved["checkpoint"]


# ------------------------------------------------------------------------------------------- checkpointer
class Checkpointer:
    """Saves, rotates and restores checkpoints of the parts it is given (as torchtitan's checkpointer: it never
    reaches into the trainer). Every method is called on every rank.

    Besides the model (`ModelFiles`), every part is an entry of one of three mappings of name -> object with
    `state_dict()`/`load_state_dict()`, so that a new stateful part is one more entry:
    - `states`: JSON-serialisable, the same on every rank (train state, data position): trainer_state.json; a part
      whose state is spread over the ranks (a stream's lane positions) has `gather_across_ranks()`, a collective
      called on every rank before each save;
    - `tensor_states`, by file name (trainer.layout): the same on every rank (optimizer, scheduler, scaler), each
      `torch.save`d by rank 0;
    - `rank_states`: each rank's own (RNG, logging window): rank-<r>.pt. When the world size changed, rank 0 hands
      every saved rank's state to the parts that can merge them (`merge_state_dicts(list)`); the others start anew.
    The best checkpoint (`BestCheckpoint`) is one of `states`, as "best_model".

    Callbacks: `inside_save()` on every rank while a save is under way (fault injection), `on_saved(path)` on rank 0
    after a checkpoint is published (Hub push), `on_resumed(step)` on every rank after a resume (the metrics log
    forgets what came later)."""

    def __init__(self, checkpointing, accelerator, model: ModelFiles, *, states: dict[str, Stateful],
                 tensor_states: dict[str, Stateful], rank_states: dict[str, Stateful], best: BestCheckpoint,
                 arguments: dict, inside_save: Callable[[], None], on_saved: Callable[[str], None],
                 on_resumed: Callable[[int], None]):
        self.config = checkpointing
        self.accelerator = accelerator
        self.model = model
        self.best = best
        self.states = {**states, "best_model": best}
        self.tensor_states, self.rank_states = tensor_states, rank_states
        self.arguments = arguments  # the parsed arguments, secrets redacted, kept in trainer_state.json
        self.inside_save, self.on_saved, self.on_resumed = inside_save, on_saved, on_resumed
        self.world_size = accelerator.num_processes
        self.last_saved_step: Optional[int] = None

    # ------------------------------------------------------------------------------------------------ save
    def save(self, step: int, metrics: dict) -> str:
        """Write checkpoint-<step> atomically (`metrics`: the run's so far, for the best checkpoint). A write that
        fails (disk full, quota, permissions) stops the run on every rank with one line naming the last good
        checkpoint, after removing the partial directory; the previous checkpoints stay as they were (rotation only
        runs after a complete save)."""
        accelerator = self.accelerator
        for part in self.states.values():  # a state spread over the ranks (a stream's lanes) is collected first
            if hasattr(part, "gather_across_ranks"):
                part.gather_across_ranks()
        final = os.path.join(self.config.output_dir, checkpoint_name(step))
        temporary = final + TEMPORARY_SUFFIX
        writes = Writes(temporary)
        if accelerator.is_main_process:
            writes.run(fresh_directory, temporary)
        accelerator.wait_for_everyone()
        rank_state = {name: part.state_dict() for name, part in self.rank_states.items()}
        writes.run(torch.save, {**rank_state, "world_size": self.world_size},
                   os.path.join(temporary, rank_state_file(accelerator.process_index)))
        # Under DeepSpeed and FSDP every rank takes part: the weight gather (ZeRO-3, FSDP) and the sharded save.
        model_state = full_state_dict(accelerator, self.model.prepared, self.model.hf_model)
        if self.sharded:
            self.save_sharded_state(os.path.join(temporary, self.sharded))
        if accelerator.is_main_process:
            self.best.track(os.path.basename(final), metrics)
            writes.run(self.write_shared_files, temporary, step, model_state)
        self.inside_save()
        self.stop_if_any_write_failed(writes, temporary)  # the barrier before publishing
        if accelerator.is_main_process:
            writes.run(publish, temporary, final, step)
        self.stop_if_any_write_failed(writes, temporary)
        if accelerator.is_main_process:
            logger.info("saved checkpoint %s", final)
            self.rotate()
            self.on_saved(final)
        accelerator.wait_for_everyone()
        self.last_saved_step = step
        return final

    def stop_if_any_write_failed(self, writes: "Writes", temporary: Optional[str] = None) -> None:
        """A collective: every rank learns of a failed write on any rank and stops the same way. `temporary`:
        the partial checkpoint directory, removed; None: the final model's save into --output_dir."""
        failures = [failure for failure in all_gather_objects(writes.failure) if failure]
        if not failures:
            return
        if self.accelerator.is_main_process and temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        last, output_dir = self.last_saved_step, self.config.output_dir
        what = (f"{os.path.basename(temporary.removesuffix(TEMPORARY_SUFFIX))} failed: {failures[0]}; removed the "
                f"partial {temporary}" if temporary is not None
                else f"the final model into {output_dir} failed: {failures[0]}")
        raise JobStopped(f"saving {what}. The last good checkpoint is "
                         f"{checkpoint_name(last) if last is not None else 'none (none was saved yet)'} in "
                         f"{output_dir}; free disk space (or choose another --output_dir) and run the same "
                         f"command again to resume", SAVE_FAILED_EXIT_CODE)

    @property
    def sharded(self) -> Optional[str]:
        """The subdirectory of the sharded model + optimizer state ("deepspeed", "fsdp"); None under DDP."""
        return sharded_state_name(self.accelerator)

    def save_sharded_state(self, directory: str) -> None:
        """Under DeepSpeed or FSDP: a sharded checkpoint of model and optimizer, every rank writing its shards."""
        save, _ = sharded_checkpoint_functions(self.accelerator)
        save(self.model.prepared, self.model.optimizer, directory)

    def load_sharded_state(self, directory: str) -> None:
        _, load = sharded_checkpoint_functions(self.accelerator)
        load(self.model.prepared, self.model.optimizer, directory)

    def write_shared_files(self, directory: str, step: int, model_state: Optional[dict]) -> None:
        self.model.hf_model.save_pretrained(directory, state_dict=model_state)
        self.model.tokenizer.save_pretrained(directory)
        for file_name, part in self.tensor_states.items():
            torch.save(part.state_dict(), os.path.join(directory, file_name))
        write_json(os.path.join(directory, STATE_FILE), {
            "step": step, "world_size": self.world_size, "args": self.arguments,
            "states": {name: part.state_dict() for name, part in self.states.items()}})

    def rotate(self) -> None:
        """Keep the newest --save_total_limit checkpoints, and the best one on top of them."""
        limit = self.config.save_total_limit
        if not limit:
            return
        checkpoints = complete_checkpoints(self.config.output_dir, warn=False)
        for _, path in checkpoints[:-limit]:
            if os.path.basename(path) != self.best.checkpoint:
                shutil.rmtree(path)
                logger.info("deleted checkpoint %s (--save_total_limit %d)", path, limit)

    # ---------------------------------------------------------------------------------------------- resume
    def checkpoint_to_resume(self) -> Optional[str]:
        requested, output_dir = self.config.resume_from_checkpoint, self.config.output_dir
        if requested is None:
            if self.config.overwrite_output_dir:  # asked to start afresh
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

    def resume(self) -> Optional[str]:
        """Restore the newest (or requested) checkpoint into every part; returns its path, None when starting
        fresh."""
        path = self.checkpoint_to_resume()
        if path is None:
            return None
        saved = read_trainer_state(path)
        require("states" in saved, f"checkpoint {path} was written by a version of trainer before the checkpoint "
                                   f"layout of named states; it cannot be resumed: start afresh (another "
                                   f"--output_dir, or --overwrite_output_dir)")
        if self.sharded:
            self.load_sharded_state(os.path.join(path, self.sharded))
        else:
            self.load_model_weights(path)
        for file_name, part in self.tensor_states.items():
            part.load_state_dict(torch.load(os.path.join(path, file_name), map_location="cpu"))
        for name, part in self.states.items():
            part.load_state_dict(saved["states"][name])
        self.last_saved_step = saved["step"]
        self.restore_rank_states(path, saved["world_size"])
        self.on_resumed(saved["step"])
        return path

    def restore_rank_states(self, path: str, saved_world_size: int) -> None:
        """Each rank takes back its own states when the world size is unchanged; otherwise rank 0 merges every saved
        rank's states into the parts that can (see the class docstring)."""
        rank = self.accelerator.process_index
        if saved_world_size == self.world_size:
            saved = torch.load(os.path.join(path, rank_state_file(rank)), weights_only=False)
            for name, part in self.rank_states.items():
                part.load_state_dict(saved[name])
        elif rank == 0:
            saved = [torch.load(os.path.join(path, rank_state_file(r)), weights_only=False)
                     for r in range(saved_world_size)]
            for name, part in self.rank_states.items():
                if hasattr(part, "merge_state_dicts"):
                    part.merge_state_dicts([states[name] for states in saved])

    def load_model_weights(self, path: str) -> None:
        from safetensors.torch import load_file

        model = self.model.hf_model
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

    def restore_best_model(self) -> dict:
        """With --load_best_model_at_end, put the best checkpoint's weights into the model before the final save;
        returns what the results say of it."""
        if self.best.checkpoint is None:
            return {}
        best = os.path.join(self.config.output_dir, self.best.checkpoint)
        if self.sharded:
            self.load_sharded_state(os.path.join(best, self.sharded))
        else:
            self.load_model_weights(best)
        logger.info("loaded the best model, %s (%s = %.6g)", self.best.checkpoint, self.best.metric.name,
                    self.best.value)
        return {"best_model_checkpoint": self.best.checkpoint, "best_metric": self.best.value}

