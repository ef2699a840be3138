"""``python -m bench <hydra overrides>`` runs one experiment job.

    python -m bench experiment=quick
    python -m bench experiment=smoke game=sequential seed=1
    python -m bench -m experiment=quick seed=0,1,2          # a sweep
    python -m bench experiment=quick game.shard=0/4          # one slice of the ground truth
    python -m bench assemble experiment=quick                # check all slices cached, then run
    python -m bench compare --help | python -m bench report --help
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def wants_online(argv: list[str]) -> dict[str, bool]:
    """Which network uses the command line opts into: hub downloads (``model.online=true``,
    ``task.online=true``, ``task=hf_pref``) and W&B (``logger=wandb_online``)."""
    true = ("true", "1", "yes")
    kv = dict(a.lstrip("+~").split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
    hub = any(k.endswith(".online") and v.lower() in true for k, v in kv.items()) or kv.get("task") == "hf_pref"
    return {"hub": hub, "wandb": kv.get("logger") == "wandb_online" or kv.get("logger.mode") == "online"}


# No network by default: hub libraries and W&B are offline unless the command line
# opts in (then the user's own environment decides). Set before any of them is imported.
_ONLINE = wants_online(sys.argv[1:])
if not _ONLINE["hub"]:
    for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(_k, "1")
if not _ONLINE["wandb"]:
    os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "task", "partition", "game", "train", "logger", "experiment", "local")


def check_overrides(argv: list[str]) -> str | None:
    """Unknown config names as one clear line (Hydra's own message is a page)."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key in GROUPS:
            for v in value.split(","):
                if v and v != "null" and not (CONF / key / f"{v}.yaml").exists():
                    names = sorted(p.stem for p in (CONF / key).glob("*.yaml"))
                    return f"{key}={v}: no such config; choose one of {names}"
    return None


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("compare", "report"):
        import importlib
        mod = importlib.import_module(f"bench.{sys.argv[1]}")
        sys.exit(mod.main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "assemble":   # = game.shard=assemble (bench/shard.py)
        sys.argv[1:2] = ["game.shard=assemble"]
    from bench.errors import fail
    msg = check_overrides(sys.argv[1:])
    if msg:
        fail(msg)
    for arg in sys.argv[1:]:          # fail before Hydra writes anything
        if arg.startswith("results_dir="):
            from bench.errors import ConfigError
            from bench.tracking import ResultsStore
            try:
                ResultsStore(arg.split("=", 1)[1]).check_writable()
            except ConfigError as e:
                fail(e)

    import hydra
    from omegaconf import DictConfig

    from bench.train import quiet_libraries
    quiet_libraries()

    @hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
    def _run(cfg: DictConfig) -> None:
        from bench.errors import ConfigError
        try:
            from bench.run import run_experiment, summary
            records = run_experiment(cfg)
        except ConfigError as e:
            fail(e)
        print(summary(records, cfg.results_dir))
        if any(r["status"] != "ok" for r in records):
            sys.exit(1)

    _run()


if __name__ == "__main__":
    main()
