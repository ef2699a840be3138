"""``python -m bench <hydra overrides>`` runs one experiment job.

    python -m bench experiment=quick
    python -m bench experiment=smoke game=sequential seed=1
    python -m bench -m experiment=quick seed=0,1,2          # a sweep
    python -m bench experiment=quick game.shard=0/4          # one slice of the ground truth
    python -m bench assemble experiment=quick                # check all slices cached, then run
    python -m bench compare --help | python -m bench report --help
"""
from __future__ import annotations

import sys
from pathlib import Path

from bench.analysis.tables import format_table
from bench.core.env import use_environment


CONF = Path(__file__).resolve().parent.parent.parent / "conf"
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


def summary(records: list[dict], results_dir: str) -> str:
    if not records:
        return "no records (a shard job writes only cache entries)"
    lines = [format_table(records)]
    ok = [r for r in records if r["status"] == "ok"]
    if ok:
        r = ok[0]
        lines.append(f"exact retraining Shapley (seed {r['seed']}): "
                     + ", ".join(f"{v:+.3f}" for v in r["exact_values"]))
        lines.append("second seed (noise ceiling):        "
                     + ", ".join(f"{v:+.3f}" for v in r["exact_values_seed2"]))
        lines.append(f"planted: noisy owners {r['planted']['noisy_owners']}, "
                     f"duplicate pairs {r['planted']['duplicate_pairs']}")
    for r in records:
        if r["status"] != "ok":
            lines.append(f"FAILED {r['valuer']}: {r['error']}")
    lines.append(f"records appended to {Path(results_dir) / 'runs' / (records[0]['experiment'] + '.jsonl')}"
                 if records else "no records")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    use_environment(argv)                 # offline unless the overrides opt in; before any library import
    from bench.core.errors import ConfigError, fail
    msg = check_overrides(argv)
    if msg:
        fail(msg)
    for arg in argv:                      # fail before Hydra writes anything
        if arg.startswith("results_dir="):
            from bench.tracking import ResultsStore
            try:
                ResultsStore(arg.split("=", 1)[1]).check_writable()
            except ConfigError as e:
                fail(e)

    import hydra
    from omegaconf import DictConfig

    from bench.core.env import quiet_libraries
    quiet_libraries()

    @hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
    def _run(cfg: DictConfig) -> None:
        try:
            from bench.harness.job import run_experiment
            records = run_experiment(cfg)
        except ConfigError as e:
            fail(e)
        print(summary(records, cfg.results_dir))
        if any(r["status"] != "ok" for r in records):
            sys.exit(1)

    sys.argv = [sys.argv[0], *argv]       # what @hydra.main parses
    _run()
    return 0
