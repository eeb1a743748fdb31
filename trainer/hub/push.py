"""`--push_to_hub`: upload checkpoints (with `--hub_strategy every_save`) and the final model with a model card.

Rank 0 alone talks to the Hub. Uploads run in huggingface_hub's background thread (`run_as_future`), so training
does not wait for the network; a checkpoint is pushed from a hard-linked snapshot, so the rotation may delete the
checkpoint while it uploads. At the end the job waits for its uploads. A failed upload is a warning: training goes
on and the local files are untouched. The token (`--hub_token` or HF_TOKEN) is handed to huggingface_hub only:
it is redacted in every message, argument dump and the model card.
"""
from __future__ import annotations

import json
import os
import shutil

from trainer.layout import HUB_SNAPSHOT_DIR, LOG_HISTORY_FILE, MODEL_CARD_FILE, PREFIX, TORCH_STATE_FILES
from trainer.tracking.console import logger

NOT_PUSHED = [f"{PREFIX}*", f"{PREFIX}*/**", f"{HUB_SNAPSHOT_DIR}/**", TORCH_STATE_FILES]


class HubPusher:
    """Given the hub section, the output directory, whether this is rank 0, and the (token-redacted) arguments for
    the model card."""

    def __init__(self, hub, output_dir: str, is_main_process: bool, arguments: dict):
        self.hub, self.output_dir, self.arguments = hub, output_dir, arguments
        self.enabled = hub.push_to_hub and is_main_process
        self.token = hub.hub_token or os.environ.get("HF_TOKEN")
        self.pending = []
        self.repo_created = False
        if self.enabled:
            from huggingface_hub import HfApi

            self.api = HfApi(token=self.token)
            self.repo_id = hub.hub_model_id or os.path.basename(os.path.abspath(output_dir))

    def redact(self, text: str) -> str:
        return text.replace(self.token, "<redacted>") if self.token else text

    def push_checkpoint(self, checkpoint_dir: str) -> None:
        """Called after each save: with --hub_strategy every_save, upload its model and tokenizer files."""
        if not self.enabled or self.hub.hub_strategy != "every_save":
            return
        snapshot = os.path.join(self.output_dir, HUB_SNAPSHOT_DIR, os.path.basename(checkpoint_dir))
        shutil.rmtree(snapshot, ignore_errors=True)
        shutil.copytree(checkpoint_dir, snapshot, copy_function=os.link, ignore=shutil.ignore_patterns(TORCH_STATE_FILES))
        self.upload(snapshot, f"Training in progress: {os.path.basename(checkpoint_dir)}")

    def push_final(self, job_card: dict, metrics: dict) -> None:
        """At the end: write README.md into output_dir, upload the final model, wait for every upload."""
        if not self.enabled:
            return
        write_model_card(self.output_dir, self.arguments, job_card, metrics)
        self.upload(self.output_dir, "End of training")
        for future in self.pending:
            self.report(future)
        shutil.rmtree(os.path.join(self.output_dir, HUB_SNAPSHOT_DIR), ignore_errors=True)

    def upload(self, folder: str, message: str) -> None:
        self.pending = [future for future in self.pending if not self.report(future, wait=False)]
        if not self.repo_created:
            self.pending.append(self.api.run_as_future(self.api.create_repo, self.repo_id, exist_ok=True,
                                                       private=self.hub.hub_private_repo))
            self.repo_created = True
        self.pending.append(self.api.upload_folder(repo_id=self.repo_id, folder_path=folder, commit_message=message,
                                                   ignore_patterns=NOT_PUSHED, run_as_future=True))
        logger.info("pushing %s to the Hub repository %s in the background", folder, self.repo_id)

    def report(self, future, wait: bool = True) -> bool:
        """Log a finished upload's failure as a warning; True when the upload is finished."""
        if not wait and not future.done():
            return False
        error = future.exception()
        if error is not None:
            logger.warning("push to the Hub repository %s failed (training goes on, local files are intact): %s",
                           self.repo_id, self.redact(f"{type(error).__name__}: {str(error).splitlines()[0]}"))
        return True


def write_model_card(output_dir: str, arguments: dict, job_card: dict, metrics: dict) -> None:
    """README.md: what was trained on what, how, and how it went (final metrics and the logged curve)."""
    history_path = os.path.join(output_dir, LOG_HISTORY_FILE)
    curve = []
    if os.path.isfile(history_path):
        with open(history_path) as handle:
            curve = [json.loads(line) for line in handle]
    hyper_parameters = {key: value for key, value in arguments.items() if value is not None}
    lines = ["---", "library_name: transformers", f"pipeline_tag: {job_card['pipeline_tag']}",
             "tags: [trainer-engine]", "---", "", f"# {os.path.basename(os.path.abspath(output_dir))}", "",
             f"Task: {job_card['task']}.", "", f"Data: {job_card['data']}.", "", "## Hyper-parameters", "",
             "| name | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in sorted(hyper_parameters.items())]
    lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in sorted(metrics.items())]
    lines += ["", "## Training curve", "", "| step | train_loss | eval_loss |", "|---|---|---|"]
    lines += [f"| {r['step']} | {r.get('train_loss', '')} | {r.get('eval_loss', '')} |" for r in curve
              if "train_loss" in r or "eval_loss" in r]
    with open(os.path.join(output_dir, MODEL_CARD_FILE), "w") as handle:
        handle.write("\n".join(lines) + "\n")
