"""The step count and sums of a run that a checkpoint keeps: `TrainState`. (The data position is the data
source's own state, trainer.data.source.)"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # input tokens over all ranks
    loss_sum: float = 0.0  # training loss summed over every loss item of the run so far, all ranks
    loss_items: int = 0
    metrics: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        for name in asdict(self):
            setattr(self, name, saved[name])
