"""Weights & Biases. Project: $WANDB_PROJECT (default "trainer"); files under $WANDB_DIR (W&B's default: ./wandb);
WANDB_MODE=offline logs to local files that `wandb sync` uploads later. The command line is not sent (it may hold
a token): the run's config is the redacted arguments."""
from __future__ import annotations

import netrc
import os
from typing import Optional
from urllib.parse import urlsplit

from trainer.errors import require
from trainer.tracking.base import Tracker, require_reachable
from trainer.tracking.console import logger

OFFLINE_MODES = ("offline", "dryrun", "disabled")


class WandbTracker(Tracker):
    name = "wandb"
    package = "wandb"

    def check(self) -> None:
        super().check()
        if os.environ.get("WANDB_MODE", "online") in OFFLINE_MODES:
            return
        url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        require(has_api_key(url), "--report_to wandb: no W&B API key (run `wandb login`, or set WANDB_API_KEY); "
                                  "or set WANDB_MODE=offline to log locally")
        require_reachable(url, "--report_to wandb: the W&B server",
                          "check WANDB_BASE_URL and the network, or set WANDB_MODE=offline")

    def start(self, config: dict, resumed_state: Optional[dict]) -> None:
        import wandb

        resumed = resumed_state if resumed_state and "run_id" in resumed_state else None  # else: a new run
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "trainer"), name=self.run_name,
                              config=config, reinit="create_new",
                              id=resumed["run_id"] if resumed else None,
                              resume="allow" if resumed else None,
                              settings=wandb.Settings(x_disable_meta=True, silent=True))
        if resumed and self.run.step:  # online: W&B refuses steps below the run's current one
            self.already_logged = {"*": self.run.step - 1}
        logger.info("W&B: %s run %s (%s)", "resumed" if resumed else "new", self.run.id,
                    f"offline: wandb sync {self.run.dir.removesuffix('/files')}" if self.run.offline
                    else self.run.url)

    def new_scalars(self, step: int, metrics: dict) -> dict:
        return {} if step <= self.already_logged.get("*", -1) else super().new_scalars(step, metrics)

    def state_dict(self) -> dict:
        return {"run_id": self.run.id} if self.run is not None else {}

    def finish(self, completed: bool = True) -> None:
        if self.run is not None:
            if not completed:
                self.run.mark_preempting()
            self.run.finish(exit_code=0 if completed else 1)


def has_api_key(url: str) -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` keeps it) for the server's host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(urlsplit(url).hostname) is not None
    except (OSError, netrc.NetrcParseError):
        return False
