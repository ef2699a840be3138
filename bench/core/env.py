"""The process environment, set in one place before any hub library is imported:
offline by default, quiet libraries.

``use_environment(argv)`` is called first by every program; the tests' conftest
calls it with no arguments (offline). ``quiet_libraries()`` is called by every
process that loads models (programs and game workers), before it trains or embeds. Network use is opt-in from the command line:
hub downloads (``model.online=true``, ``task.online=true``, ``task=hf_pref``) and W&B
(``logger=wandb_online`` or ``logger.mode=online``); then the user's own environment
decides.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings

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


# What a library prints on import, unasked: transformers' W&B integration prints this
# when WANDB_MODE=offline (which use_environment sets), in every process that imports
# a Trainer (every game worker, SHED's SentenceTransformer).
_IMPORT_NOTICES = ("[INFO] Running in WANDB offline mode",)
# Loggers whose INFO lines (Hydra shows INFO) land in the middle of progress bars:
# sentence-transformers logs "Loading SentenceTransformer model from <full path>".
_CHATTY_LOGGERS = ("sentence_transformers",)


def quiet_libraries() -> None:
    """Silence per-load progress bars, notices and INFO lines of the HF stack (a game
    loads hundreds of models; SHED loads its embedder once per process). Idempotent."""
    import datasets
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl|peft)\.")
    # Kronfluence 1.0.1 builds torch.cuda.amp.GradScaler (deprecated name), disabled, about 30
    # times per EK-FAC run: nothing a user can act on
    warnings.filterwarnings("ignore", message=r"`torch\.cuda\.amp\.GradScaler\(args\.\.\.\)` is deprecated",
                            category=FutureWarning)
    # torch.func's vmap over CPU attention (influence_naive's per-example gradients) warns
    # once per process that it loops instead of batching: a speed note, not a problem
    warnings.filterwarnings("ignore", message=r"There is a performance drop because we have not yet implemented "
                                              r"the batching rule", category=UserWarning)
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if "transformers.integrations.integration_utils" not in sys.modules:
        # imported here once, its import-time notice swallowed; anything else it prints passes
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            import transformers.integrations.integration_utils  # noqa: F401
        rest = [ln for ln in buf.getvalue().splitlines() if ln.strip() not in _IMPORT_NOTICES]
        if rest:
            print("\n".join(rest))


JOB_ENV_VARS = (*HUB_OFFLINE, "WANDB_MODE", "OMP_NUM_THREADS")


def use_job_environment(argv: list[str] | tuple = ()) -> str | None:
    """The environment of a launched job's own process (Hydra's task function, e.g. in a
    SLURM job through submitit): ``use_environment(argv)`` again, as the job may not inherit
    the submitting shell's variables (``sbatch --export=NONE``, a site's SBATCH_EXPORT); in a
    SLURM job also torch's thread count = the job's CPUs (``SLURM_CPUS_PER_TASK``) unless
    OMP_NUM_THREADS is set: without cgroups or affinity a job would see every core of the node.
    Returns the line a SLURM job prints (its python, host and offline variables), else None."""
    use_environment(argv)
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit() and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = cpus
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(cpus))
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    where = f"{os.environ.get('SLURM_ARRAY_JOB_ID')}_{task}" if task else job
    env = " ".join(f"{k}={os.environ.get(k, '')}" for k in JOB_ENV_VARS)
    return (f"[dvbench] slurm job {where} (id {job}, restarts {os.environ.get('SLURM_RESTART_COUNT', '0')}) on "
            f"{os.uname().nodename}: python {sys.executable}, {env}")
