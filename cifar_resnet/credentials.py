"""W&B's credentials and mode, read without importing wandb: the tools decide online or offline before any run."""

from __future__ import annotations

import netrc
import os
from urllib.parse import urlsplit

DEFAULT_PROJECT = "cifar-resnet"
DEFAULT_BASE_URL = "https://api.wandb.ai"
NO_CREDENTIALS = "WANDB_API_KEY: not set (and no `wandb login` key)"  # how a tool that needs W&B's server refuses


def has_credentials() -> bool:
    """True when `WANDB_API_KEY` is set or `wandb login` left a key in the netrc file for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def choose_mode() -> str:
    """`WANDB_MODE` when set to offline or disabled; otherwise online if there are credentials, else offline."""
    mode = os.environ.get("WANDB_MODE", "online")
    if mode in ("offline", "disabled", "dryrun"):
        return "offline" if mode == "dryrun" else mode
    return "online" if has_credentials() else "offline"
