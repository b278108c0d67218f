"""Loading from the Hugging Face Hub, failing fast with one clear line when it is out of reach."""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable
from typing import Any

HUB_HOST = "huggingface.co"


class HubUnavailableError(RuntimeError):
    """The hub could not be reached (or is switched off) and the thing asked for is not cached."""


@functools.cache
def hub_reachable(timeout: float = 2.0) -> bool:
    """True unless HF_HUB_OFFLINE is set or a TCP connection to the hub fails within ``timeout``."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def from_hub(what: str, offline_choice: str, load: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a hub loader; without the hub, use only the local cache and fail with one line.

    ``what`` names the thing (for the message); ``offline_choice`` is the flag to use instead.
    """
    if not hub_reachable():
        # No network: make the HF libraries answer from their cache at once instead of retrying.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        _set_offline_flags()
    try:
        return load(*args, **kwargs)
    except (OSError, ConnectionError, ValueError, FileNotFoundError) as err:
        if hub_reachable():
            raise
        raise HubUnavailableError(
            f"Cannot load {what}: the Hugging Face Hub is not reachable and it is not in the local cache. "
            f"Offline, use {offline_choice}."
        ) from err


def _set_offline_flags() -> None:
    """Flip the already-imported libraries' offline switches (they read the env at import)."""
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover
        pass
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):  # pragma: no cover
        pass
