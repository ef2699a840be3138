"""The process environment, set in one place before any hub library is imported:
offline by default, quiet libraries.

``use_environment(argv)`` is called first by every program; the tests' conftest
calls it with no arguments (offline). Network use is opt-in from the command line:
hub downloads (``model.online=true``, ``task.online=true``, ``task=hf_pref``) and W&B
(``logger=wandb_online`` or ``logger.mode=online``); then the user's own environment
decides.
"""
from __future__ import annotations

import os

HUB_OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
QUIET = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}


def wants_online(argv: list[str]) -> dict[str, bool]:
    """Which network uses the command line opts into: hub downloads (``model.online=true``,
    ``task.online=true``, ``task=hf_pref``) and W&B (``logger=wandb_online``)."""
    true = ("true", "1", "yes")
    kv = dict(a.lstrip("+~").split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
    hub = any(k.endswith(".online") and v.lower() in true for k, v in kv.items()) or kv.get("task") == "hf_pref"
    return {"hub": hub, "wandb": kv.get("logger") == "wandb_online" or kv.get("logger.mode") == "online"}


def use_environment(argv: list[str] | tuple = (), force: bool = False) -> dict[str, bool]:
    """Offline hub and W&B unless ``argv`` opts in; quiet tokenizers and datasets.
    Fills only variables the user has not set, unless ``force`` (the tests: offline
    whatever the shell says). Returns what ``argv`` opted into."""
    online = wants_online(list(argv))
    want = dict(QUIET)
    if not online["hub"]:
        want.update(dict.fromkeys(HUB_OFFLINE, "1"))
    if not online["wandb"]:
        want["WANDB_MODE"] = "offline"
    for k, v in want.items():
        if force:
            os.environ[k] = v
        else:
            os.environ.setdefault(k, v)
    return online
