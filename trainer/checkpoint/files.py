"""Writing checkpoints so that a kill cannot corrupt them (fsync, atomic publish, write failures), and finding
the complete ones.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from trainer.layout import CHECKPOINT_NAME, COMPLETE_MARKER, PREFIX, STATE_FILE
from trainer.tracking.console import logger


# ------------------------------------------------------------------------------------- finding checkpoints
def checkpoint_problem(path: str) -> Optional[str]:
    """Why `path` is not a complete checkpoint, or None if it is."""
    if not os.path.isfile(os.path.join(path, COMPLETE_MARKER)):
        return "incomplete (no completion marker: the save was interrupted)"
    try:
        with open(os.path.join(path, STATE_FILE)) as handle:
            json.load(handle)["step"]
    except (OSError, ValueError, KeyError) as error:
        return f"corrupt {STATE_FILE} ({type(error).__name__})"
    return None


def complete_checkpoints(output_dir: str, warn: bool = True) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints in `output_dir`, oldest first; the others named in a warning."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if not name.startswith(PREFIX) or not os.path.isdir(path):
            continue
        match = CHECKPOINT_NAME.match(name)
        problem = checkpoint_problem(path) if match else "incomplete (an interrupted save's temporary directory)"
        if problem is None:
            found.append((int(match.group(1)), path))
        elif warn:
            logger.warning("skipping checkpoint %s: %s", path, problem)
    return sorted(found)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def read_trainer_state(path: str) -> dict:
    with open(os.path.join(path, STATE_FILE)) as handle:
        return json.load(handle)


# -------------------------------------------------------------------------------------------- file writing
def fsync_tree(directory: str) -> None:
    """Flush every file, then the directories, so that the rename below publishes data that is on disk."""
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(root)


def fsync_directory(directory: str) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)


def fresh_directory(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)  # left by an earlier, killed save of this step
    os.makedirs(path)


def publish(temporary: str, final: str, step: int) -> None:
    """Flush, mark complete, rename: a checkpoint directory without the marker never counts as complete."""
    fsync_tree(temporary)
    with open(os.path.join(temporary, COMPLETE_MARKER), "w") as handle:
        handle.write(f"{step}\n")
    fsync_tree(temporary)
    shutil.rmtree(final, ignore_errors=True)  # only ever an incomplete one: a complete one is not re-saved
    os.rename(temporary, final)
    fsync_directory(os.path.dirname(final))


class Writes:
    """This rank's writes of one save. The first that fails for lack of space, quota or permission is kept as
    `failure` and the later ones are skipped, so that every rank still reaches the next collective and learns
    of it there (see `Checkpointer.stop_if_any_write_failed`) instead of waiting forever for a rank that died.
    torch.save reports a full disk as a RuntimeError ("basic_ios::clear: iostream error", "file write failed",
    "unexpected pos") and safetensors as a SafetensorError ("IoError ... StorageFull"), not as OSError."""

    def __init__(self, directory: str):
        self.directory = directory
        self.failure: Optional[str] = None

    def run(self, function, *args, **kwargs) -> None:
        if self.failure is not None:
            return
        try:
            function(*args, **kwargs)
        except Exception as error:
            if not is_write_failure(error):
                raise
            self.failure = describe_write_failure(error, self.directory)


def is_write_failure(error: Exception) -> bool:
    from safetensors import SafetensorError

    if isinstance(error, OSError):
        return True
    text = str(error)
    return isinstance(error, (RuntimeError, SafetensorError)) and any(
        sign in text for sign in ("write failed", "iostream error", "unexpected pos", "No space left", "StorageFull",
                                  "Quota", "os error"))


def describe_write_failure(error: Exception, directory: str) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}{f' ({error.filename})' if error.filename else ''}"
    existing = directory if os.path.isdir(directory) else os.path.dirname(directory)
    if shutil.disk_usage(existing).free < 1 << 20:  # torch's and safetensors' words for a full disk vary
        return "No space left on device"
    return str(error).strip().splitlines()[0]
