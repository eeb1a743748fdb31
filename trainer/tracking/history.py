"""`log_history.jsonl`: every logged number, one JSON record per logging call, `{"step": s, ...}`."""
from __future__ import annotations

import json
import os

from trainer.layout import LOG_HISTORY_FILE


class History:
    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOG_HISTORY_FILE)

    def append(self, step: int, metrics: dict) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as history:
            history.write(json.dumps({"step": step, **metrics}) + "\n")

    def forget_after(self, step: int) -> None:
        """On resume from `step`: drop what the interrupted run logged after its checkpoint, which is redone."""
        if not os.path.isfile(self.path):
            return
        with open(self.path) as history:
            kept = [line for line in history if json.loads(line)["step"] <= step]
        with open(self.path, "w") as history:
            history.writelines(kept)
