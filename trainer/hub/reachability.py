"""Hub names: work where a network exists, fail in seconds with a clear message where none does.

Offline, transformers and datasets retry a Hub name for about 50 s before a long traceback. We check first:
a local directory is used as is; a name already in the local cache is loaded from there; otherwise a 3-second
TCP connect to the Hub endpoint decides between trying the Hub and a one-line error.
"""
from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

from trainer.errors import UsageError


@functools.lru_cache(maxsize=1)
def hub_is_reachable(timeout_seconds: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_seconds).close()
        return True
    except OSError:
        return False


def is_cached(repo_id: str, filename: str, repo_type: str = "model") -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename, repo_type=repo_type), str)


def looks_like_hub_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
        return True
    except HFValidationError:
        return False


def check_loadable(name: str, what: str, flag: str, cached_file: str = "config.json", repo_type: str = "model"):
    """Raise a UsageError now if `name` can be neither read locally nor fetched from the Hub."""
    if os.path.isdir(name):
        return
    if os.path.lexists(name) or not looks_like_hub_id(name):
        problem = " is a file, not a directory" if os.path.lexists(name) else ": no such directory, nor a Hub id"
        raise UsageError(f"{flag} {name}{problem}; give a directory written by save_pretrained, or a Hub id")
    if is_cached(name, cached_file, repo_type):
        if not hub_is_reachable():
            os.environ["HF_HUB_OFFLINE"] = "1"  # cached copy: skip the retries against an unreachable Hub
        return
    if not hub_is_reachable():
        raise UsageError(f"{flag} {name}: no such local directory, and the Hugging Face Hub cannot be reached to "
                         f"download this {what}; pass a local directory or run with network access")
