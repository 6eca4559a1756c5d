"""The one check for "can this machine reach the Hugging Face hub?", used by every step that may download.

`from_pretrained` and `load_dataset` retry for about 45 s before giving up; a user should learn in seconds that
the hub is out of reach, with what to do instead. Offline mode (`HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE`) is not
an error by itself: the local cache may still answer, so callers decide whether offline means "fail" or "cache".
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

HUB_TIMEOUT_SECONDS = 3.0
_TRUE = ("1", "true", "yes", "on")


class HubUnavailable(RuntimeError):
    """The Hugging Face hub cannot be reached (offline mode or no network); the message says what to do."""


def offline_variable(datasets: bool = False) -> str | None:
    """The variable that puts the hub libraries offline (HF_HUB_OFFLINE; for datasets also HF_DATASETS_OFFLINE)."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if datasets else ("HF_HUB_OFFLINE",)
    return next((name for name in names if os.environ.get(name, "").strip().lower() in _TRUE), None)


def hub_offline(datasets: bool = False) -> bool:
    """True when the hub libraries are set to offline mode (they then answer from the local cache only)."""
    return offline_variable(datasets) is not None


def ensure_hub_reachable(advice: str, datasets: bool = False, timeout: float = HUB_TIMEOUT_SECONDS) -> None:
    """Fail fast when the hub is out of reach: offline mode, or no TCP connection to HF_ENDPOINT within `timeout`.

    Raises HubUnavailable whose message ends with `advice` (what to do instead).
    """
    variable = offline_variable(datasets)
    if variable:
        raise HubUnavailable(f"the Hugging Face hub is disabled ({variable}=1). {advice}")
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        raise HubUnavailable(f"cannot reach the Hugging Face hub at {host}:{port} ({error}). {advice}") from None
