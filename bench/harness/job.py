"""One experiment job: build the game, compute the exact reference, run every
valuer under its budget, measure it, record it.

    config ─► Task ─► Partition ─► Game ─► Valuer ─► Valuation ─► metrics ─► records

Every setting is checked (``check_job``) before anything is trained. Each valuer
runs inside ``game.metered(budget)``: the game counts what the valuer used and
stops it at the budget; LDS and selection are metered apart, so a valuer's cost
is its own.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from bench.core import metrics as M
from bench.core import shapley
from bench.core.errors import ConfigError
from bench.core.game import Game
from bench.core.metering import fresh_compute_s
from bench.core.partition import Planted
from bench.core.shard import ASSEMBLE, missing, missing_message, parse_shard, run_shard
from bench.core.train import FineTuneDiverged
from bench.core.valuation import Budget, BudgetExhausted, Valuation
from bench.harness.build import build_game, build_task, build_valuer
from bench.harness.checks import check_config
from bench.tracking import ResultsStore, SafeLogger, WandbLogger, provenance, sweep_group, to_jsonable
from bench.tracking.schema import VERSION


# ------------------------------------------------------------------ the exact reference

@dataclass(frozen=True)
class Exact:
    """Exact retraining Shapley of a game: every v(S) retrained."""
    table: np.ndarray     # [2^n]
    phi: np.ndarray       # [n]

    @property
    def gain(self) -> float:
        return float(self.table[-1] - self.table[0])


def exact_shapley(game: Game) -> Exact:
    table = game.table()
    phi = shapley.exact_shapley(table)
    shapley.check_efficiency(phi, table, atol=1e-9)
    return Exact(table, phi)


def evaluate(val: Valuation, exact: Exact, exact2: Exact, planted: Planted, example_ids: list,
             game: Game | None = None, lds_cfg: dict | None = None) -> dict:
    """Every metric of one valuation; computed here, never by a valuer."""
    noisy = np.zeros(len(exact.phi), bool)
    noisy[planted.noisy_owners] = True
    out = {
        "fidelity": M.fidelity(val.owner_values, exact.phi, exact.gain),
        "noise_ceiling": M.fidelity(exact2.phi, exact.phi, exact.gain),
        "detection": M.detection(val.owner_values, noisy),
    }
    if val.table is not None:                    # a method with its own v(S) for all S
        t = np.asarray(val.table, float)
        out["utilities"] = {"r2": M.r2(t, exact.table), "r2_seed2": M.r2(exact2.table, exact.table),
                            "pearson": M.fidelity(t, exact.table)["pearson"],
                            "max_abs_err": float(np.max(np.abs(t - exact.table)))}
    if val.point_values is not None:
        bad = np.isin(example_ids, planted.corrupted_ids)
        out["detection_points"] = M.detection(val.point_values, bad)
        if game is not None and lds_cfg and lds_cfg.get("n_subsets", 0) > 0:
            from bench.core.lds import lds
            r = lds(game, val.point_values, m_subsets=lds_cfg["n_subsets"], frac=lds_cfg["frac"],
                    seed=lds_cfg["seed"])
            out["lds"] = {"lds": r["lds"], "pearson": r.get("pearson"), "n_subsets": r["n_subsets"]}
    return out


# ------------------------------------------------------------------ accounting

def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), so imports count too."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = float(Path("/proc/uptime").read_text().split()[0])
        return boot - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def overhead_line(t_start: float, fine_tune_s: float, valuer_own_s: float, worker_s: float | None = None,
                  n_jobs: int = 1) -> str:
    """Where the job's wall time went: the wall seconds spent producing fresh
    fine-tunes + evals (in this process or its workers), valuers' own work, and the
    rest (imports, model loading, bookkeeping, metrics, logging) = harness overhead.
    ``worker_s``: the compute seconds of those fine-tunes summed over workers."""
    age = process_age_s()
    wall = age if age is not None else time.time() - t_start
    rest = max(wall - fine_tune_s - valuer_own_s, 0.0)
    workers = f" ({worker_s:.1f} s of compute on {n_jobs} workers)" if n_jobs > 1 and worker_s is not None else ""
    return (f"[dvbench] wall {wall:.1f} s = fine-tunes+evals {fine_tune_s:.1f} s{workers} + valuers' own work "
            f"{valuer_own_s:.1f} s + harness overhead {rest:.1f} s ({100 * rest / max(wall, 1e-9):.1f}%)")


# ------------------------------------------------------------------ checks before any work

def check_job(cfg: DictConfig) -> tuple[dict, dict]:
    """Every setting of the job, before anything is trained (the checks live in
    ``bench.harness.checks``; the data-dependent ones run in ``build_game``). Returns the
    selected valuers, built (``{name: (valuer, config)}``), and the selection settings."""
    c, valuers = check_config(cfg)   # every node's fields, types, ranges, cross-field rules
    WandbLogger.check(c["logger"]["mode"], c["logger"]["dir"])
    return valuers, c["selection"]


# ------------------------------------------------------------------ the job

def run_experiment(cfg: DictConfig) -> list[dict]:
    t_start = time.time()
    store = ResultsStore(cfg.results_dir)
    store.check_writable()                    # before any expensive work
    from bench.core.cache import sweep_stale_tmp
    for d in {str(cfg.cache_dir), str(store.runs)}:   # a killed earlier run's half-written temp files
        if Path(d).exists():
            sweep_stale_tmp(d)
    shard = parse_shard(cfg.game.get("shard"))    # a malformed shard spec fails now
    built, sel = check_job(cfg)
    budget = Budget(**OmegaConf.to_container(cfg.budget))

    task = build_task(cfg)
    game, part = build_game(cfg, task)
    example_ids = [p.id for p in game.flat_pairs()]
    config = OmegaConf.to_container(cfg, resolve=True)
    base = {"schema": VERSION, "experiment": cfg.experiment_name, "game": game.kind, "seed": int(cfg.seed),
            "n_owners": part.n_owners, "metric": game.metric, **provenance(config),
            "planted": {"noisy_owners": part.planted.noisy_owners,
                        "duplicate_pairs": part.planted.duplicate_pairs,
                        "corrupted_ids": part.planted.corrupted_ids,
                        "n_corrupted": len(part.planted.corrupted_ids)},
            "example_ids": example_ids, "owner_sizes": part.sizes(), "task_dropped": dict(task.dropped),
            "config": config}
    print(f"[dvbench] {cfg.experiment_name}: {part.n_owners} owners {part.sizes()}, game={game.kind}, "
          f"metric={game.metric}, seed={cfg.seed}, model={cfg.model.name}, n_jobs={cfg.n_jobs}")

    for valuer, _ in built.values():          # game-dependent valuer settings, before any training
        if hasattr(valuer, "check"):
            valuer.check(game)
    game2 = game.with_seed(int(cfg.seed) + int(cfg.noise_seed_offset))
    if isinstance(shard, tuple):             # train one slice of the exact reference, then stop
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
    exact = exact2 = None
    exact_error = None
    t0 = time.perf_counter()
    with game.metered() as job_use, game2.metered() as job_use2:
        try:
            exact = exact_shapley(game)
            exact2 = exact_shapley(game2)
        except FineTuneDiverged as e:
            exact_error = f"exact reference: {e}"
        exact_s = time.perf_counter() - t0
        selection_s = selection_worker_s = 0.0
        valuer_own_s = 0.0     # valuers' work outside fine-tunes (gradients, embeddings, scoring)

        wandb_run = lambda: WandbLogger(  # noqa: E731
            mode=cfg.logger.mode, project=cfg.logger.project, dir=cfg.logger.dir,
            run_name=f"{cfg.experiment_name}-{game.kind}-s{cfg.seed}", config=config,
            tags=[cfg.experiment_name, game.kind], group=sweep_group(str(cfg.experiment_name)))
        lds_cfg = OmegaConf.to_container(cfg.lds, resolve=True)
        with SafeLogger(wandb_run) as wb:
            for name, (valuer, vcfg) in built.items():
                rec = {**base, "valuer": name, "valuer_config": vcfg, "status": "ok", "error": None}
                try:
                    if exact_error:
                        raise FineTuneDiverged(exact_error)
                    tv = time.time()
                    with game.metered(budget) as use:
                        val = valuer.value(game, budget)
                    valuer_own_s += max(time.time() - tv - use.busy_s, 0.0)
                    val.check(game.n, len(example_ids))
                    with game.metered():            # LDS retrains subsets: the harness's work, not the valuer's
                        metrics = evaluate(val, exact, exact2, part.planted, example_ids, game, lds_cfg)
                    rec.update(owner_values=val.owner_values, stderr=val.stderr, cost=val.cost.to_dict(),
                               metrics=metrics, valuation=valuation_fields(val), extras=val.extras)
                    if val.point_values is not None:
                        rec["point_values"] = val.point_values
                    if name in sel["valuers"]:
                        rec["metrics"]["selection"] = run_selection(game, val, task, sel, built, cfg, name)
                        selection_s += rec["metrics"]["selection"]["fresh_wall_s"]
                        selection_worker_s += rec["metrics"]["selection"]["fresh_compute_s"]
                except BudgetExhausted as e:
                    rec.update(status="over_budget", error=f"{name}: {e}", owner_values=[], metrics={}, cost={})
                except FineTuneDiverged as e:
                    rec.update(status="failed", error=str(e), owner_values=[], metrics={}, cost={})
                except ConfigError:
                    raise
                except Exception as e:   # a valuer crash is a failed record, with its traceback
                    rec.update(status="failed", error=f"{type(e).__name__}: {e}", owner_values=[], metrics={},
                               cost={}, traceback=traceback.format_exc(limit=5))
                rec["exact_values"] = exact.phi if exact else None
                rec["exact_values_seed2"] = exact2.phi if exact2 else None
                rec["utility_table"] = exact.table if exact else None
                rec["exact_wall_s"] = exact_s
                rec = to_jsonable(rec)
                store.append(rec)
                wb.log_record(rec, prefix=f"{name}/")
                records.append(rec)
            wb.log_tables(records)
            log_point_values(wb, records)
    fine_tune_s = job_use.busy_s + job_use2.busy_s + selection_s
    worker_s = fresh_compute_s(job_use) + fresh_compute_s(job_use2) + selection_worker_s
    print(overhead_line(t_start, fine_tune_s, valuer_own_s, worker_s, game.n_jobs))
    return records


def valuation_fields(val: Valuation) -> dict:
    """The typed fields of a valuation, as the record stores them."""
    return {"table": val.table, "clusters": val.clusters, "cluster_scores": val.cluster_scores,
            "trajectory": [s.to_dict() for s in val.trajectory]}


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


def selection_clusters(game, val, shed=None):
    """What a selection curve samples clusters from when the valuation has none of its
    own (SHED has): SHED's clustering of the examples (``shed``: a built SHED valuer,
    default its YAML); None when the valuation brings its own."""
    if val.clusters is not None:
        return None
    return (shed or build_valuer("shed")[0]).clusters(game)[0].labels


def run_selection(game, val, task, sel: dict, built: dict, cfg, name: str) -> dict:
    """The data-selection curve of one valuation (judged on the task's test split),
    its plot under <results_dir>/plots/, and the compact curve for the record."""
    from bench.analysis.plots import plot_selection
    from bench.core.selection import compact, curve_for_valuation, format_curve
    clusters = selection_clusters(game, val, built["shed"][0] if "shed" in built else None)
    curve = curve_for_valuation(game, val, task.test, clusters, sizes=sel["sizes"],
                                seeds=sel["seeds"], methods=sel["methods"], beta=sel["beta"])
    png = Path(cfg.results_dir) / "plots" / f"selection_{cfg.experiment_name}_{name}_s{cfg.seed}.png"
    plot_selection(curve, png, title=f"{cfg.experiment_name}: {name} selection, {len(sel['seeds'])} seeds, "
                                     f"95% CI" + ("" if curve["held_out_eval"] else " (not held out)"))
    print(format_curve(curve))
    return {**compact(curve), "plot": str(png)}
