"""The Hub section of the command line: whether, where and when the model is pushed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainer.config.parsing import arg


@dataclass
class HubArguments:
    _argument_group_name = "hub"

    push_to_hub: bool = arg(False, "Upload the model (and a model card) to the Hugging Face Hub; rank 0 only, in "
                                   "the background.")
    hub_model_id: Optional[str] = arg(None, "Hub repository (user/name). Unset: the --output_dir folder name.")
    hub_token: Optional[str] = arg(None, "Hub token (default: the HF_TOKEN environment variable). Never logged.")
    hub_private_repo: bool = arg(False, "Create the Hub repository as private.")
    hub_strategy: str = arg("end", "When to push: end (the final model), or every_save (each checkpoint too).",
                            choices=["end", "every_save"])
