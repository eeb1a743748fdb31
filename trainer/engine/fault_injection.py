"""Faults on demand, for the tests of checkpointing, pre-emption and divergence.

Environment variables (unset outside the tests, and then every hook here does nothing):
- TRAINER_FAULT_SIGNAL_AT_MICRO_BATCH=k: rank 0 sends itself SIGUSR1 during its k-th training micro-batch
  (counted from the start of this process), i.e. a pre-emption at a chosen point, mid-accumulation if wanted.
- TRAINER_FAULT_NAN_AT_STEP=s: the training loss of optimizer step s (1-based) becomes NaN on rank 0.
- TRAINER_FAULT_SLEEP_IN_SAVE=seconds: every rank pauses inside each checkpoint save, after writing its files
  and before the save is published, so that a test can kill -9 the job in the middle of a save.
- TRAINER_DEBUG_SAMPLE_LOG=path: each rank appends `{"step": s, "ids": [...]}` per micro-batch to `path.rank<r>`.
"""
from __future__ import annotations

import json
import os
import signal
import time


def env_number(name: str, kind=int):
    value = os.environ.get(name)
    return kind(value) if value else None


class FaultInjection:
    """Given this process's rank, the task model (hooked for the NaN fault) and the train state (its step)."""

    def __init__(self, rank: int, task_model, state):
        self.state = state
        self.signal_at = env_number("TRAINER_FAULT_SIGNAL_AT_MICRO_BATCH") if rank == 0 else None
        self.nan_at_step = env_number("TRAINER_FAULT_NAN_AT_STEP") if rank == 0 else None
        self.sleep_in_save = env_number("TRAINER_FAULT_SLEEP_IN_SAVE", float)
        sample_log = os.environ.get("TRAINER_DEBUG_SAMPLE_LOG")
        self.sample_log = f"{sample_log}.rank{rank}" if sample_log else None
        self.micro_batches = 0
        if self.nan_at_step is not None:
            task_model.register_forward_hook(self.nan_loss)

    def micro_batch(self, sample_ids) -> None:
        """Called with each training micro-batch's sample ids, before its forward pass."""
        self.micro_batches += 1
        if self.sample_log:
            with open(self.sample_log, "a") as handle:
                handle.write(json.dumps({"step": self.state.step + 1, "ids": sample_ids.tolist()}) + "\n")
        if self.micro_batches == self.signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)

    def nan_loss(self, module, inputs, output):
        if module.training and self.state.step + 1 == self.nan_at_step:
            return {**output, "loss_sum": output["loss_sum"] * float("nan")}
        return output

    def inside_save(self) -> None:
        if self.sleep_in_save:
            time.sleep(self.sleep_in_save)
