"""``python -m bench <hydra overrides>`` runs one experiment job.

    python -m bench experiment=quick
    python -m bench experiment=smoke game=sequential seeds=[1,2]
    python -m bench -m experiment=quick model.n_layer=1,2   # a sweep (one job per game; seeds inside each)
    python -m bench experiment=quick game.shard=0/4          # one slice of the ground truth
    python -m bench assemble experiment=quick                # check all slices cached, then run
    python -m bench compare --help | python -m bench report --help
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from bench.analysis.tables import format_table
from bench.analysis.verdicts import format_lds, format_leaderboard
from bench.core.env import use_environment
from bench.core.errors import ConfigError, fail


CONF = Path(__file__).resolve().parent.parent.parent / "conf"
GROUPS = ("model", "task", "partition", "game", "train", "logger", "experiment", "local", "valuer")


def check_overrides(argv: list[str]) -> str | None:
    """Unknown config names as one clear line (Hydra's own message is a page)."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key in GROUPS:
            lists = value.split("],[") if value.startswith("[") else [value]   # a sweep over lists: [a],[b,c]
            for one in lists:
                chosen = [v.strip().strip("[]").strip() for v in one.split(",")]
                twice = sorted({v for v in chosen if v and chosen.count(v) > 1})
                if twice:
                    return f"{key}: {twice} listed twice; name each once"
            for v in value.split(","):                 # a choice, a sweep (a,b), a list ([a,b]) or lists ([a],[b])
                v = v.strip().strip("[]").strip()
                if v and v != "null" and not (CONF / key / f"{v}.yaml").exists():
                    names = sorted(p.stem for p in (CONF / key).glob("*.yaml"))
                    return f"{key}={v}: no such config; choose one of {names}"
    return None


RUN_FLAGS = ("-m", "--multirun")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _parse(overrides: list[str]) -> list:
    """Hydra's parse of each override; a malformed one as one line naming it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException
    parser, out = OverridesParser.create(), []
    for arg in overrides:
        try:
            out += parser.parse_overrides([arg])
        except OverrideParseException as e:
            if "=" not in arg and not arg.startswith("~"):
                raise ConfigError(f"{arg}: not an override; write key=value (e.g. n_jobs=2), +key=value to add a "
                                  f"key, ~key to delete one") from None
            key = arg.split("=", 1)[0].lstrip("+~")
            lines = [ln for ln in str(e).splitlines() if ln.strip() and not ln.startswith("See ")]
            why = lines[1] if len(lines) > 1 and lines[0].startswith("Error parsing") else (lines or [""])[0]
            why = re.sub(r" expecting \{.*\}", "", why)        # the grammar's token list
            raise ConfigError(f"{key}: cannot parse {arg!r} ({_one_line(why)}); quote a value with special "
                              f"characters (key='a,b'), write a list as key=[1,2]") from None
    return out


def _first_of_sweeps(parsed: list, multirun: bool) -> list[str] | None:
    """The overrides of a sweep's first job (each sweep at its first value); None when a
    sweep cannot be expanded here (glob): Hydra checks that one itself."""
    out = []
    for o in parsed:
        if not (multirun and o.is_sweep_override()):
            out.append(o.input_line)
            continue
        try:
            values = list(o.sweep_string_iterator())
        except Exception:
            return None
        if not values:
            return None
        out.append(f"{o.get_key_element()}={values[0]}")
    return out


def _nearest_node(overrides: list[str], key: str) -> tuple[str, list[str] | None]:
    """(the deepest existing ancestor of ``key``, its keys, or None when it is a single
    value) in the config composed without the overrides of ``key``."""
    from bench.harness.build import compose_config
    try:
        node = compose_config([o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key])
    except Exception:
        return "", None
    path = []
    for part in key.split(".")[:-1]:
        if not hasattr(node, "keys") or part not in node:
            break
        node, path = node[part], path + [part]
    return ".".join(path), (sorted(str(k) for k in node.keys()) if hasattr(node, "keys") else None)


def _value_of(overrides: list[str], key: str) -> str:
    return next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == key), "<value>")


def hydra_message(e: BaseException, overrides: list[str]) -> str:
    """One line for an error Hydra or OmegaConf raised composing the config: the key and
    what to write instead."""
    msg = str(e)
    first = msg.splitlines()[0] if msg else type(e).__name__
    m = re.match(r"Could not override '([^']+)'", msg)
    if m:
        key = m.group(1)
        if key.split(".")[0] in ("valuers", "valuer_args"):
            return (f"{key}: valuers are the config group `valuer` now: select them with valuer=[loo,shed] "
                    f"(or valuer=all) and set an option with valuer.<name>.<key>=<value>")
        if key in ("seed", "noise_seed_offset"):
            return (f"{key}: replaced by seeds, the list of training seeds one job trains and scores against "
                    f"each other's consensus; write e.g. seeds=[0,1,2]")
        if key == "lds.n_seeds":
            return ("lds.n_seeds: replaced by lds.seeds, the training seeds of the LDS subsets, disjoint from "
                    "the job's seeds; write e.g. lds.seeds=[100,101]")
        parent, keys = _nearest_node(overrides, key)
        if keys is None:
            return f"{key}: {parent or key} is a single value, not a group of settings; set {parent or key}=<value>"
        missing = key[len(parent) + 1:].split(".")[0] if parent else key.split(".")[0]
        full = f"{parent}.{missing}" if parent else missing
        return f"{full}: no such setting; choose from {keys}"
    m = re.match(r"Could not append to config\. An item is already at '([^']+)'", msg)
    if m:
        key = m.group(1)
        return f"{key}: already in the config, so +{key} cannot add it; drop the + to change it: " \
               f"{key}={_value_of(overrides, key)}"
    m = re.match(r"Could not delete from config\. '([^']+)' does not exist", msg)
    if m:
        return f"{m.group(1)}: not in the config, so ~{m.group(1)} has nothing to delete; check the spelling"
    m = re.match(r"Could not delete from config\. The value of '([^']+)' is (.*) and not (.*)\.$", first)
    if m:
        key, have, asked = m.groups()
        return f"{key}: ~{key}={asked} deletes only that value, but it is {have}; write ~{key} to delete it"
    m = re.match(r"Ambiguous value for argument '([^=]+)=(.*)'$", first)
    if m:
        key, value = m.groups()
        return (f"{key}: {value!r} is several values; add -m to sweep over them (python -m bench -m {key}={value}), "
                f"write a list as {key}=[{value}], or quote one string: {key}='{value}'")
    m = re.search(r"Could not find '([^']+)'", msg)
    if m:
        group, _, name = m.group(1).rpartition("/")
        options = re.findall(r"^\t(\S+)$", msg.split("Config search path")[0], flags=re.M)
        return f"{group}={name}: no such config; choose one of {options}"
    if re.match(r"Config group override must be a string or a list", first):
        pairs = [o.split("=", 1) for o in overrides if "=" in o]
        key, value = next(((k.lstrip("+~"), v) for k, v in pairs if (CONF / k.lstrip("+~")).is_dir()),
                          ("<group>", "?"))
        names = sorted(p.stem for p in (CONF / key).glob("*.yaml")) if key != "<group>" else []
        return f"{key}={value}: a config group takes the name of one config; choose one of {names}"
    key = getattr(e, "full_key", None) or getattr(e.__cause__, "full_key", None)
    return f"{key or 'overrides'}: {_one_line(msg) or type(e).__name__}"


def compose(argv: list[str]):
    """The config a run of ``argv`` composes (a sweep: its first job), Hydra's errors as
    one ``ConfigError`` line; None when flags other than -m leave the parsing to Hydra."""
    if any(a.startswith("-") and a not in RUN_FLAGS for a in argv):
        return None
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    overrides = [a for a in argv if not a.startswith("-")]
    first = _first_of_sweeps(_parse(overrides), multirun=any(a in RUN_FLAGS for a in argv))
    if first is None:
        return None
    try:
        from bench.harness.build import compose_config
        return compose_config(first)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise ConfigError(hydra_message(e, first)) from None


def summary(records: list[dict], results_dir: str) -> str:
    if not records:
        return "no records (a shard job writes only cache entries)"
    lines = [format_leaderboard(records), format_table(records, brief=True), format_lds(records)]
    lines = [x for x in lines if x]
    ok = [r for r in records if r["status"] == "ok"]
    if ok:
        r = ok[0]
        c = r["consensus"]
        lines.append(f"consensus exact retraining Shapley over seeds {c['seeds']} (± SE): "
                     + ", ".join(f"{v:+.3f}±{e:.3f}" for v, e in zip(c["values"], c["se"])))
        lines.append(f"planted: noisy owners {r['planted']['noisy_owners']}, corrupted share per owner "
                     f"{[round(x, 2) for x in r['planted']['corruption']]}, duplicate pairs "
                     f"{r['planted']['duplicate_pairs']}")
    for r in records:
        if r["status"] != "ok":
            lines.append(f"FAILED {r['valuer']}: {r['error']}")
    lines.append(f"records appended to {Path(results_dir) / 'runs' / (records[0]['experiment'] + '.jsonl')}"
                 if records else "no records")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    use_environment(argv)                 # offline unless the overrides opt in; before any library import
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
    from hydra.errors import HydraException
    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException

    from bench.core.env import quiet_libraries
    from bench.harness.checks import check_config
    quiet_libraries()
    try:                                  # every setting, before Hydra makes its output folder
        cfg = compose(argv)
        if cfg is not None:
            check_config(cfg)             # run_experiment checks each job again (a sweep's later values)
    except ConfigError as e:
        fail(e)

    @hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
    def _run(cfg: DictConfig) -> None:
        from bench.core.env import use_job_environment
        line = use_job_environment(argv)  # a launched job's own process (SLURM) may not inherit the shell's
        if line:
            print(line, flush=True)
        try:
            from bench.harness.job import run_experiment
            records = run_experiment(cfg)
        except ConfigError as e:
            fail(e)
        finally:
            from bench.core.game import release_pool
            release_pool()                # the job's idle workers end with it
        print(summary(records, cfg.results_dir))
        if any(r["status"] != "ok" for r in records):
            sys.exit(1)

    sys.argv = [sys.argv[0], *argv]       # what @hydra.main parses
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing a page and exiting 1
    try:
        _run()
    except (HydraException, OmegaConfBaseException) as e:
        fail(hydra_message(e, [a for a in argv if not a.startswith("-")]))
    finally:
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error
    return 0
