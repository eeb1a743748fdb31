"""The position and sums of a run that a checkpoint keeps: `TrainState`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    samples_in_epoch: int = 0  # position in the epoch's global sample order
    replay_position: int = 0  # replay samples drawn: the position in the replay stream (trainer.continual.replay)
    tokens_seen: int = 0  # input tokens over all ranks
    loss_sum: float = 0.0  # training loss summed over every loss item of the run so far, all ranks
    loss_items: int = 0
    metrics: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        """From a checkpoint's trainer state; a field the checkpoint predates keeps its starting value."""
        for name, start in asdict(TrainState()).items():
            setattr(self, name, saved.get(name, start))
