"""One experiment job: build the game, compute the ground truth, run every valuer,
measure it, record it.

    config ─► Task ─► Partition ─► Game ─► Valuer ─► Valuation ─► metrics ─► records
"""
from __future__ import annotations

import inspect
import json
import os
import time
import traceback
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from bench import metrics as M
from bench import shapley
from bench.errors import ConfigError
from bench.game import Game
from bench.models import ModelSpec
from bench.partition import make_partition
from bench.shard import ASSEMBLE, missing, missing_message, parse_shard, run_shard
from bench.task import local_pref, synthetic_pref
from bench.train import FineTuneDiverged, TrainSettings
from bench.tracking import ResultsStore, SafeLogger, WandbLogger, provenance, sweep_group, to_jsonable

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


# ------------------------------------------------------------------ builders

def _kwargs(cfg: DictConfig, drop=("kind",)) -> dict:
    d = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in d.items() if k not in drop}


def build_task(cfg: DictConfig):
    t = cfg.task
    builders = {"synthetic_pref": synthetic_pref, "local_pref": local_pref}
    if t.kind not in builders:
        raise ConfigError(f"task.kind: unknown {t.kind!r}; choose one of {list(builders)}")
    fn = builders[t.kind]
    accepted = set(inspect.signature(fn).parameters)
    kw = _kwargs(t)
    ignored = sorted(set(kw) - accepted)   # e.g. an experiment's generator sizes under task=local_pref
    if ignored:
        print(f"[dvbench] task.kind={t.kind} ignores task.{', task.'.join(ignored)}")
    return fn(**{k: v for k, v in kw.items() if k in accepted})


def build_game(cfg: DictConfig, task=None, partition=None) -> tuple[Game, object]:
    task = task or build_task(cfg)
    part = partition or make_partition(task, **_kwargs(cfg.partition, drop=()))
    fields = set(ModelSpec.__dataclass_fields__)
    model = ModelSpec(**{k: v for k, v in _kwargs(cfg.model, drop=()).items() if k in fields})
    train = TrainSettings(**_kwargs(cfg.train, drop=()))
    game = Game(task, part, model, train, kind=cfg.game.kind, seed=int(cfg.seed), metric=cfg.game.metric,
                cache_dir=cfg.cache_dir, n_jobs=int(cfg.n_jobs), progress=bool(cfg.progress))
    return game, part


BASELINES = ("random", "retrain_shapley")     # always in a job's records


def available_valuers() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "valuer").glob("*.yaml"))


def default_valuers() -> list[str]:
    """What ``valuers=all`` runs: every valuer except those whose YAML says
    ``in_all: false`` (references that cost far more than the preset, e.g. point-level
    permutation Shapley); name those explicitly."""
    return [n for n in available_valuers()
            if OmegaConf.load(CONF_DIR / "valuer" / f"{n}.yaml").get("in_all", True)]


def build_valuer(name: str, overrides: dict | None = None):
    from hydra.utils import instantiate
    path = CONF_DIR / "valuer" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"valuers: unknown valuer {name!r}; choose from {available_valuers()}")
    vcfg = OmegaConf.merge(OmegaConf.load(path), overrides or {})
    vcfg.pop("in_all", None)                # a harness setting, not the valuer's
    target = str(vcfg.get("_target_", ""))
    if not target.startswith("valuers."):   # config-driven construction: the project's own classes only
        raise ConfigError(f"valuer {name}: _target_ {target!r} is not a class in valuers/; "
                          f"point it at valuers.<module>.<Class>")
    return instantiate(vcfg), OmegaConf.to_container(vcfg)


# ------------------------------------------------------------------ truth

def ground_truth(game: Game) -> dict:
    """Exact retraining Shapley of the game, and under a second seed (noise ceiling)."""
    table = game.table()
    phi = shapley.exact_shapley(table)
    shapley.check_efficiency(phi, table, atol=1e-9)
    return {"table": table, "phi": phi, "gain": float(table[-1] - table[0])}


def evaluate(val, truth: dict, truth2: dict, part, game=None, lds_cfg=None) -> dict:
    noisy = np.zeros(part.n_owners, bool)
    noisy[part.truth.noisy_owners] = True
    out = {
        "fidelity": M.fidelity(val.owner_values, truth["phi"], truth["gain"]),
        "noise_ceiling": M.fidelity(truth2["phi"], truth["phi"], truth["gain"]),
        "detection": M.detection(val.owner_values, noisy),
    }
    table = val.extras.get("table")
    if table is not None and len(table) == len(truth["table"]):   # a method with its own v(S) for all S
        t = np.asarray(table, float)
        out["utilities"] = {"r2": M.r2(t, truth["table"]), "r2_seed2": M.r2(truth2["table"], truth["table"]),
                            "pearson": M.fidelity(t, truth["table"])["pearson"],
                            "max_abs_err": float(np.max(np.abs(t - truth["table"])))}
    if val.point_values is not None:
        ids = [p.id for o in part.owners for p in o]
        bad = np.isin(ids, part.truth.corrupted_ids)
        out["detection_points"] = M.detection(val.point_values, bad)
        if game is not None and lds_cfg and lds_cfg.get("n_subsets", 0) > 0:
            from bench.lds import lds
            r = lds(game, val.point_values, m_subsets=lds_cfg["n_subsets"], frac=lds_cfg["frac"],
                    seed=lds_cfg["seed"])
            out["lds"] = {"lds": r["lds"], "pearson": r.get("pearson"), "n_subsets": r["n_subsets"]}
    return out


# ------------------------------------------------------------------ the job

def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), so imports count too."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = float(Path("/proc/uptime").read_text().split()[0])
        return boot - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def fresh_compute_s(log) -> float:
    """Train + eval seconds of the utilities a game computed (not read from the cache)."""
    return sum(e["compute_s"] for e in log.entries.values() if e["fresh"])


def overhead_line(t_start: float, fine_tune_s: float, valuer_own_s: float) -> str:
    """Where the job's wall time went: fine-tunes + evals this job computed, valuers'
    own work, and the rest (imports, model loading, bookkeeping, metrics, logging) =
    harness overhead."""
    age = process_age_s()
    wall = age if age is not None else time.time() - t_start
    rest = max(wall - fine_tune_s - valuer_own_s, 0.0)
    return (f"[dvbench] wall {wall:.1f} s = fine-tunes+evals {fine_tune_s:.1f} s + valuers' own work "
            f"{valuer_own_s:.1f} s + harness overhead {rest:.1f} s ({100 * rest / max(wall, 1e-9):.1f}%)")


def run_experiment(cfg: DictConfig) -> list[dict]:
    t_start = time.time()
    store = ResultsStore(cfg.results_dir)
    store.check_writable()                    # before any expensive work
    from bench.cache import sweep_stale_tmp
    for d in {str(cfg.cache_dir), str(store.runs)}:   # a killed earlier run's half-written temp files
        if Path(d).exists():
            sweep_stale_tmp(d)
    shard = parse_shard(cfg.game.get("shard"))    # a malformed shard spec fails now
    for k in ("max_fine_tunes", "max_seconds"):
        v = cfg.budget.get(k)
        if v is not None and not v > 0:
            raise ConfigError(f"budget.{k}: {v}; use a positive number or null (no limit)")
    WandbLogger.check(cfg.logger.mode, cfg.logger.dir)   # W&B settings, before any training
    names = default_valuers() if cfg.valuers == "all" else list(cfg.valuers)
    # the floor and the ceiling of every table: random is free, retrain_shapley
    # reuses the ground truth the job computes anyway
    names = list(dict.fromkeys([*BASELINES, *names]))
    unknown = [n for n in names if n not in available_valuers()]
    if unknown:
        raise ConfigError(f"valuers: unknown {unknown}; choose from {available_valuers()}")
    valuer_args = OmegaConf.to_container(cfg.valuer_args, resolve=True) or {}
    built = {n: build_valuer(n, valuer_args.get(n)) for n in names}   # config errors surface now
    lds_n, lds_frac = int(cfg.lds.n_subsets), float(cfg.lds.frac)
    if lds_n and (lds_n < 3 or not 0 < lds_frac < 1):
        raise ConfigError(f"lds: n_subsets={lds_n}, frac={lds_frac}; use n_subsets >= 3 (or 0 = off) "
                          f"and frac in (0, 1)")

    sel = OmegaConf.to_container(cfg.selection, resolve=True)
    bad = [n for n in sel["valuers"] if n not in names]
    if bad:
        raise ConfigError(f"selection.valuers: {bad} are not in valuers={names}; add them to valuers or drop them")

    task = build_task(cfg)
    game, part = build_game(cfg, task)
    prov = provenance(OmegaConf.to_container(cfg, resolve=True))
    base = {"experiment": cfg.experiment_name, "game": game.kind, "seed": int(cfg.seed),
            "n_owners": part.n_owners, "metric": game.metric, **prov,
            "truth": {"noisy_owners": part.truth.noisy_owners, "duplicate_pairs": part.truth.duplicate_pairs,
                      "n_corrupted": len(part.truth.corrupted_ids)},
            "owner_sizes": part.sizes(), "config": OmegaConf.to_container(cfg, resolve=True)}
    print(f"[dvbench] {cfg.experiment_name}: {part.n_owners} owners {part.sizes()}, game={game.kind}, "
          f"metric={game.metric}, seed={cfg.seed}, model={cfg.model.name}, n_jobs={cfg.n_jobs}")

    for valuer, _ in built.values():          # game-dependent valuer settings, before any training
        if hasattr(valuer, "check"):
            valuer.check(game)
    game2 = game.with_seed(int(cfg.seed) + int(cfg.noise_seed_offset))
    if isinstance(shard, tuple):             # train one slice of the ground truth, then stop
        info = run_shard([game, game2], *shard)
        print(f"[dvbench] shard {info['shard']}: {info['coalitions']} of {info['of']} ground-truth coalitions "
              f"({info['trained']} trained, {info['cached']} cached) in {cfg.cache_dir}")
        return []
    if shard == ASSEMBLE:
        miss = missing([game, game2])
        if miss:
            raise ConfigError(missing_message(miss, 2 * 2 ** game.n))
        print(f"[dvbench] assemble: all {2 * 2 ** game.n} ground-truth coalitions are cached")

    records: list[dict] = []
    truth = truth2 = None
    truth_error = None
    t0 = time.perf_counter()
    try:
        truth = ground_truth(game)
        truth2 = ground_truth(game2)
    except FineTuneDiverged as e:
        truth_error = f"ground truth: {e}"
    truth_s = time.perf_counter() - t0
    fine_tune_s = fresh_compute_s(game.log) + fresh_compute_s(game2.log)   # this job's own fine-tunes

    wandb_run = lambda: WandbLogger(  # noqa: E731
        mode=cfg.logger.mode, project=cfg.logger.project, dir=cfg.logger.dir,
        run_name=f"{cfg.experiment_name}-{game.kind}-s{cfg.seed}", config=base["config"],
        tags=[cfg.experiment_name, game.kind], group=sweep_group(str(cfg.experiment_name)))
    valuer_own_s = 0.0     # valuers' work outside fine-tunes (gradients, embeddings, scoring)
    with SafeLogger(wandb_run) as wb:
        for name, (valuer, vcfg) in built.items():
            game.log.entries.clear()
            rec = {**base, "valuer": name, "valuer_config": vcfg, "status": "ok", "error": None}
            try:
                if truth_error:
                    raise FineTuneDiverged(truth_error)
                from valuers.base import Budget
                tv = time.time()
                val = valuer.value(game, Budget(**OmegaConf.to_container(cfg.budget)))
                fresh = fresh_compute_s(game.log)
                fine_tune_s += fresh
                valuer_own_s += max(time.time() - tv - fresh, 0.0)
                if not np.all(np.isfinite(val.owner_values)):
                    raise FineTuneDiverged("valuer returned non-finite values")
                lds_game = game.with_seed(game.seed)
                rec.update(owner_values=val.owner_values, stderr=val.stderr, cost=val.cost.to_dict(),
                           metrics=evaluate(val, truth, truth2, part, lds_game,
                                            OmegaConf.to_container(cfg.lds, resolve=True)),
                           extras=val.extras)
                fine_tune_s += fresh_compute_s(lds_game.log)
                if val.point_values is not None:
                    rec["point_values"] = val.point_values
                if name in sel["valuers"]:
                    rec["metrics"]["selection"] = run_selection(game, val, task, sel, valuer_args, cfg, name)
                    fine_tune_s += rec["metrics"]["selection"]["fresh_compute_s"]
            except FineTuneDiverged as e:
                rec.update(status="failed", error=str(e), owner_values=[], metrics={}, cost={})
            except ConfigError:
                raise
            except Exception as e:   # a valuer crash is a failed record, with its traceback
                rec.update(status="failed", error=f"{type(e).__name__}: {e}", owner_values=[], metrics={},
                           cost={}, traceback=traceback.format_exc(limit=5))
            rec["truth_values"] = truth["phi"] if truth else None
            rec["truth_values_seed2"] = truth2["phi"] if truth2 else None
            rec["utility_table"] = truth["table"] if truth else None
            rec["truth_wall_s"] = truth_s
            rec = to_jsonable(rec)
            store.append(rec)
            wb.log_record(rec, prefix=f"{name}/")
            records.append(rec)
        wb.log_tables(records)
        log_point_values(wb, records)
    print(overhead_line(t_start, fine_tune_s, valuer_own_s))
    return records


def log_point_values(wb, records: list[dict]) -> None:
    """Per-example values as a W&B artifact (a run table is cut at 10,000 rows)."""
    import tempfile
    rows = {r["valuer"]: r["point_values"] for r in records if r.get("point_values") is not None}
    if not rows or getattr(wb, "logger", None) is None:
        return
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "point_values.json"
        path.write_text(json.dumps({"experiment": records[0]["experiment"], "seed": records[0]["seed"],
                                    "values": rows}))
        wb.log_artifact(path, name=f"point_values-{records[0]['experiment']}-s{records[0]['seed']}")


def run_selection(game, val, task, sel: dict, valuer_args: dict, cfg, name: str) -> dict:
    """The data-selection curve of one valuation (judged on the task's test split),
    its plot under <results_dir>/plots/, and the compact curve for the record."""
    from bench.selection import compact, curve_for_valuation, format_curve, plot_selection
    curve = curve_for_valuation(game, val, task.test, valuer_args.get("shed"), sizes=sel["sizes"],
                                seeds=sel["seeds"], methods=sel["methods"], beta=sel["beta"])
    png = Path(cfg.results_dir) / "plots" / f"selection_{cfg.experiment_name}_{name}_s{cfg.seed}.png"
    plot_selection(curve, png, title=f"{cfg.experiment_name}: {name} selection, {len(sel['seeds'])} seeds, "
                                     f"95% CI" + ("" if curve["held_out_eval"] else " (not held out)"))
    print(format_curve(curve))
    return {**compact(curve), "plot": str(png)}


def summary(records: list[dict], results_dir: str) -> str:
    from bench.report import format_table
    if not records:
        return "no records (a shard job writes only cache entries)"
    lines = [format_table(records)]
    ok = [r for r in records if r["status"] == "ok"]
    if ok:
        r = ok[0]
        lines.append(f"exact retraining Shapley (seed {r['seed']}): "
                     + ", ".join(f"{v:+.3f}" for v in r["truth_values"]))
        lines.append("second seed (noise ceiling):        "
                     + ", ".join(f"{v:+.3f}" for v in r["truth_values_seed2"]))
        lines.append(f"noisy owners {r['truth']['noisy_owners']}, duplicate pairs {r['truth']['duplicate_pairs']}")
    for r in records:
        if r["status"] != "ok":
            lines.append(f"FAILED {r['valuer']}: {r['error']}")
    lines.append(f"records appended to {Path(results_dir) / 'runs' / (records[0]['experiment'] + '.jsonl')}"
                 if records else "no records")
    return "\n".join(lines)
