"""One experiment job: build the game, train it under every seed of ``seeds``,
compute the consensus ground truth, run every valuer on every seed's game under its
budget, measure it against the consensus of the other seeds, record it.

    config ─► Task ─► Partition ─► Game × seeds ─► Valuer ─► Valuation ─► metrics ─► records

One job holds every seed (rather than one Hydra job per ``seed=``) because the
reference of each seed is the consensus of the others, the one-seed exact reference and the
paired comparisons need every seed's valuation of the same game, and one worker
pool then trains every seed's coalitions; Hydra's sweeps are left for what makes
another game (models, partitions, presets). A record is one (valuer, seed).

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
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from bench.core import metrics as M
from bench.core import shapley
from bench.core.cache import full_disk, stop_on_full_disk
from bench.core.errors import ConfigError
from bench.core.devices import GpuMeter
from bench.core.game import Game
from bench.core.lds import LdsTargets, aggregate_lds, pair_lds
from bench.core.lds import predictions as lds_predictions
from bench.core.lds import lds_targets as lds_targets_of
from bench.core.metering import fresh_compute_s, fresh_peak_gpu
from bench.core.partition import Planted
from bench.core.shard import ASSEMBLE, missing, missing_message, parse_shard, run_shard
from bench.core.train import FineTuneDiverged
from bench.core.uncertainty import Consensus
from bench.core.valuation import Budget, BudgetExhausted, Valuation
from bench.analysis.verdicts import fidelity_ci, verdict_tables
from bench.harness.build import build_game, build_task, build_valuer, check_trainable
from bench.harness.checks import check_config
from bench.harness.truth import attach_truth, weights_line, weights_seconds, weights_to_train
from bench.harness.eta import estimate_line, history_harness_s, history_valuer_s, plan_line, plan_of, warm_up
from bench.tracking import REPO_DIR, ResultsStore, SafeLogger, WandbLogger, provenance, sweep_group, to_jsonable
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


UTILITIES = ("pref_acc", "margin")     # the ground truth under each (fidelity_by_utility)


def exact_under(game: Game, metric: str) -> Exact:
    """Exact retraining Shapley of the game under another utility, read off the cached
    coalition records (every record stores every metric: no retraining)."""
    table = np.array([float(game.record(m)["metrics"][metric]) for m in range(2 ** game.n)])
    phi = shapley.exact_shapley(table)
    shapley.check_efficiency(phi, table, atol=1e-9)
    return Exact(table, phi)


def consensus_of(exacts: dict[int, Exact]) -> Consensus:
    """The consensus ground truth of the game under every seed (``{seed: Exact}``)."""
    seeds = list(exacts)
    return Consensus.of(seeds, [exacts[s].phi for s in seeds], [exacts[s].gain for s in seeds])


def owner_corruption(owners: list[list], corrupted_ids) -> list[float]:
    """Each owner's share of planted-corrupted examples (copies inherit their original's)."""
    bad = set(corrupted_ids)
    return [float(np.mean([p.id in bad for p in o])) if o else 0.0 for o in owners]


@dataclass(frozen=True)
class Reference:
    """What one job scores every valuation against: each seed's exact values, their
    consensus, the planted noise, and the LDS targets (None when no valuer needs them)."""
    exacts: dict[int, Exact]
    consensus: Consensus
    planted: Planted
    corruption: list[float]
    example_ids: list
    lds: LdsTargets | None = None
    by_utility: dict | None = None    # {metric: Consensus}: the ground truth under each of UTILITIES

    def held_out_table(self, seed: int) -> np.ndarray:
        return np.mean([e.table for s, e in self.exacts.items() if s != seed], axis=0)


def evaluate(val: Valuation, seed: int, ref: Reference) -> dict:
    """Every metric of the valuation of seed ``seed``'s game; computed here, never by a
    valuer. Fidelity is against the consensus of the *other* seeds (``Consensus``), beside
    the one-seed exact reference (this seed's exact values scored the same way), and
    under each utility of ``UTILITIES`` (``fidelity_by_utility``): gradient methods
    estimate the base-referenced margin, ``pref_acc`` ignores the reference."""
    cons = ref.consensus
    noisy = np.zeros(len(cons.values), bool)
    noisy[ref.planted.noisy_owners] = True
    by_u = ref.by_utility or {}

    def owner_metrics(values) -> dict:
        out = {"fidelity": M.fidelity(values, cons.held_out(seed), cons.held_out_gain(seed)),
               "detection": M.detection(values, noisy),
               "detection_graded": M.detection_graded(values, ref.corruption)}
        if by_u:
            out["fidelity_by_utility"] = {u: M.fidelity(values, c.held_out(seed), c.held_out_gain(seed))
                                          for u, c in by_u.items()}
        return out
    if val.draws is None:
        out = owner_metrics(val.owner_values)
    else:                                        # a randomised valuer: the expectation over its draws
        out = M.mean_of_dicts([owner_metrics(d) for d in val.draws])
        out["draws"] = {"n": int(len(val.draws))}
    out["one_seed_exact"] = cons.ceiling(seed)
    if by_u:
        out["one_seed_exact_by_utility"] = {u: c.ceiling(seed) for u, c in by_u.items()}
    if val.table is not None:                    # a method with its own v(S) for all S
        t, target = np.asarray(val.table, float), ref.held_out_table(seed)
        out["utilities"] = {"r2": M.r2(t, target), "r2_ceiling": M.r2(ref.exacts[seed].table, target),
                            "pearson": M.fidelity(t, target)["pearson"],
                            "max_abs_err": float(np.max(np.abs(t - target)))}
    if val.point_values is not None:
        bad = np.isin(ref.example_ids, ref.planted.corrupted_ids)
        out["detection_points"] = M.detection(val.point_values, bad)
        if ref.lds is not None:
            out["lds"] = aggregate_lds(val.point_values, ref.lds)    # the aggregate LDS, its own column
    if val.pair_scores is not None and ref.lds is not None:
        out["lds_pair"] = pair_lds(val.pair_scores, ref.lds)
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
                  n_jobs: int = 1, estimate_s: float | None = None) -> str:
    """Where the job's wall time went: the wall seconds spent producing fresh
    fine-tunes + evals (in this process or its workers), valuers' own work, and the
    rest (imports, model loading, bookkeeping, metrics, logging) = harness overhead.
    ``worker_s``: the compute seconds of those fine-tunes summed over workers."""
    age = process_age_s()
    wall = age if age is not None else time.time() - t_start
    rest = max(wall - fine_tune_s - valuer_own_s, 0.0)
    workers = f" ({worker_s:.1f} s of compute on {n_jobs} workers)" if n_jobs > 1 and worker_s is not None else ""
    est = f"; estimated {estimate_s:.1f} s ({wall / estimate_s:.2f}x)" if estimate_s else ""
    return (f"[dvbench] wall {wall:.1f} s = fine-tunes+evals {fine_tune_s:.1f} s{workers} + valuers' own work "
            f"{valuer_own_s:.1f} s + harness overhead {rest:.1f} s ({100 * rest / max(wall, 1e-9):.1f}%){est}")


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
    from bench.core.devices import pin_one_gpu
    device, note = pin_one_gpu(cfg.game.device)    # one GPU per process, before CUDA is initialised
    if note:
        print(note)
        cfg.game.device = device
    store = ResultsStore(cfg.results_dir)
    store.check_writable()                    # before any expensive work
    from bench.core.cache import DiskCache, check_folder, sweep_stale_tmp
    check_folder(cfg.cache_dir, "cache_dir")
    results = Path(cfg.results_dir)       # a killed earlier run's half-written temp files and folders
    for d in {Path(cfg.cache_dir), store.runs, store.shared, results / "lds", results / "plots"}:
        if d.exists():
            sweep_stale_tmp(d)
    DiskCache(cfg.cache_dir).sweep_locks()       # the lock files of finished entries no one holds
    shard = parse_shard(cfg.game.get("shard"))    # a malformed shard spec fails now
    built, sel = check_job(cfg)
    budget = Budget(**OmegaConf.to_container(cfg.budget))
    seeds = [int(s) for s in cfg.seeds]

    task = build_task(cfg)
    game, part = build_game(cfg, task)
    games = {s: game if s == game.seed else game.with_seed(s) for s in seeds}
    example_ids = [p.id for p in game.flat_pairs()]
    config = OmegaConf.to_container(cfg, resolve=True)
    job_id = uuid.uuid4().hex[:12]
    base = {"schema": VERSION, "experiment": cfg.experiment_name, "game": game.kind, "seeds": seeds,
            "job": job_id, "n_owners": part.n_owners, "metric": game.metric, **provenance(config),
            # what train.precision and game.deterministic resolved to on this device
            "numerics": {"device": game.device_kind, "precision": game.train.precision,
                         "cuda_deterministic": game.deterministic if game.device_kind == "cuda" else None},
            "planted": {"noisy_owners": part.planted.noisy_owners,
                        "duplicate_pairs": part.planted.duplicate_pairs,
                        "near_duplicate_pairs": part.planted.near_duplicate_pairs,
                        "corrupted_ids": part.planted.corrupted_ids,
                        "n_corrupted": len(part.planted.corrupted_ids),
                        "corruption": owner_corruption(game.owners, part.planted.corrupted_ids)},
            "example_ids": example_ids, "owner_sizes": part.sizes(), "task_dropped": dict(task.dropped),
            "config": config}
    lds_cfg = OmegaConf.to_container(cfg.lds, resolve=True)
    lds_games = {int(s): game.with_seed(int(s)) for s in lds_cfg["seeds"]} if lds_cfg["n_subsets"] else {}
    base["truth"] = attach_truth(cfg.get("truth", "auto"), str(cfg.experiment_name),
                                 [*games.values(), *lds_games.values()], base["hardware"].get("cpu"))
    weights = weights_to_train(built, list(games.values())) if base["truth"] else {}
    if weights:
        print(weights_line(weights), flush=True)
    print(f"[dvbench] {cfg.experiment_name}: {part.n_owners} owners {part.sizes()}, game={game.kind}, "
          f"metric={game.metric}, seeds={seeds}, model={cfg.model.name}, n_jobs={cfg.n_jobs}"
          + (f", precision={game.train.precision}" if game.train.precision != "fp32" else ""))

    for valuer, _ in built.values():          # game-dependent valuer settings, before any training
        if hasattr(valuer, "check"):
            valuer.check(game)
    check_trainable(game)                    # something to train at all (loads the base, needed next)
    if isinstance(shard, tuple):             # train one slice of the exact reference, then stop
        info = run_shard(list(games.values()), *shard)
        print(f"[dvbench] shard {info['shard']}: {info['coalitions']} of {info['of']} ground-truth coalitions "
              f"({info['trained']} trained, {info['cached']} cached) in {cfg.cache_dir}")
        return []
    if shard == ASSEMBLE:
        miss = missing(list(games.values()))
        if miss:
            raise ConfigError(missing_message(miss, len(seeds) * 2 ** game.n))
        print(f"[dvbench] assemble: all {len(seeds) * 2 ** game.n} ground-truth coalitions are cached")

    records: list[dict] = []
    ref, exact_error = None, None
    lds_preds: dict[str, np.ndarray] = {}     # "<valuer>/s<seed>" -> [M, E] predicted targets (the artefact)
    t0 = time.perf_counter()
    with stop_on_full_disk(), ExitStack() as job_meters:
        job_uses = [job_meters.enter_context(g.metered()) for g in [*games.values(), *lds_games.values()]]
        estimate_s, estimate_at = None, None
        try:
            if shard is None:                # the plan and the estimate, before any other fine-tune
                estimate_s = announce(list(games.values()), list(lds_games.values()), lds_cfg, store,
                                      str(cfg.experiment_name), base["hardware"].get("id"), list(built),
                                      time.time() - t_start, weights_seconds(weights) if weights else None)
                at = process_age_s()          # on the clock of the summary's wall_s
                estimate_at = (at if at is not None else time.time() - t_start, sum(u.busy_s for u in job_uses))
            exacts = {s: exact_shapley(g) for s, g in games.items()}
            by_utility = {u: consensus_of({s: exacts[s] if u == game.metric else exact_under(g, u)
                                           for s, g in games.items()}) for u in UTILITIES}
            ref = Reference(exacts, consensus_of(exacts), part.planted, base["planted"]["corruption"],
                            example_ids, by_utility=by_utility)
        except FineTuneDiverged as e:
            exact_error = f"exact reference: {e}"
        exact_s = time.perf_counter() - t0
        selection_s = selection_worker_s = 0.0
        valuer_own_s = 0.0     # valuers' work outside fine-tunes (gradients, embeddings, scoring)
        if ref is not None:
            print(consensus_line(ref.consensus))

        wandb_run = lambda: WandbLogger(  # noqa: E731
            mode=cfg.logger.mode, project=cfg.logger.project, dir=cfg.logger.dir,
            run_name=f"{cfg.experiment_name}-{game.kind}-s{'_'.join(map(str, seeds))}", config=config,
            tags=[cfg.experiment_name, game.kind], group=sweep_group(str(cfg.experiment_name)))
        with SafeLogger(wandb_run) as wb:
            for name, (valuer, vcfg) in built.items():
                mine = []
                for seed, g in games.items():
                    rec = {**base, "seed": seed, "valuer": name, "valuer_config": vcfg, "status": "ok",
                           "error": None}
                    try:
                        if exact_error:
                            raise FineTuneDiverged(exact_error)
                        tv = time.time()
                        with g.metered(budget) as use, GpuMeter(g.device_kind) as gpu:
                            val = valuer.value(g, budget)
                        rec["own_s"] = max(time.time() - tv - use.busy_s, 0.0)   # outside fine-tunes
                        valuer_own_s += rec["own_s"]
                        val.check(g.n, len(example_ids), len(g.eval))
                        if val.point_values is not None and ref.lds is None and lds_games:
                            # the first point-valued valuation: retrain the LDS subsets (the harness's
                            # work, on the job's meters) under lds.seeds, disjoint from the job's seeds
                            ref = replace(ref, lds=lds_targets_of(list(lds_games.values()), lds_cfg["n_subsets"],
                                                                  lds_cfg["frac"], lds_cfg["seed"]))
                        metrics = evaluate(val, seed, ref)
                        if val.pair_scores is not None and ref.lds is not None:
                            lds_preds[f"{name}/s{seed}"] = lds_predictions(val.pair_scores, ref.lds)
                        rec.update(owner_values=val.owner_values, stderr=val.stderr,
                                   cost={**val.cost.to_dict(), **gpu.fields(fresh_peak_gpu(use))},
                                   metrics=metrics, valuation=valuation_fields(val), extras=val.extras)
                        if val.point_values is not None:
                            rec["point_values"] = val.point_values
                        if name in sel["valuers"] and seed == seeds[0]:    # its own seeds: one curve
                            rec["metrics"]["selection"] = run_selection(g, val, task, sel, built, cfg, name)
                            selection_s += rec["metrics"]["selection"]["fresh_wall_s"]
                            selection_worker_s += rec["metrics"]["selection"]["fresh_compute_s"]
                    except BudgetExhausted as e:
                        rec.update(status="over_budget", error=f"{name}: {e}", owner_values=[], metrics={}, cost={})
                    except FineTuneDiverged as e:
                        rec.update(status="failed", error=str(e), owner_values=[], metrics={}, cost={})
                    except ConfigError:
                        raise
                    except Exception as e:   # a valuer crash is a failed record, with its traceback
                        full = full_disk(e)
                        if full is not None:     # the machine's fault, not the valuer's: stop, keeping
                            raise full from None    # the records written so far (a rerun resumes)
                        rec.update(status="failed", error=f"{type(e).__name__}: {e}", owner_values=[], metrics={},
                                   cost={}, traceback=traceback.format_exc(limit=5))
                    if ref is not None:
                        rec.update(exact_values=ref.exacts[seed].phi, reference_values=ref.consensus.held_out(seed),
                                   consensus=ref.consensus.summary(), utility_table=ref.exacts[seed].table,
                                   lds_targets=None if ref.lds is None else ref.lds.summary(),
                                   lds_artefact=None if ref.lds is None else
                                   f"lds/{cfg.experiment_name}-{job_id}.npz")
                    rec["exact_wall_s"] = exact_s
                    rec = to_jsonable(rec)
                    store.append(rec)
                    wb.log_record(rec, prefix=f"{name}/s{seed}/")
                    records.append(rec)
                    mine.append(rec)
                print(valuer_line(name, mine))
            if lds_preds:
                rel = write_lds_artefact(Path(cfg.results_dir), cfg.experiment_name, job_id, ref.lds, lds_preds)
                print(f"[dvbench] LDS predictions and targets per subset and eval pair: {cfg.results_dir}/{rel}")
            wb.log_tables(records)
            for table, (columns, rows) in verdict_tables(records).items():   # the marks, in W&B too
                wb.log_table(table, columns, rows)
            log_point_values(wb, records)
    fine_tune_s = sum(u.busy_s for u in job_uses) + selection_s
    used = [e for u in job_uses for e in u.entries.values() if e["trained"]]      # ground truth and LDS
    worker_s = sum(fresh_compute_s(u) for u in job_uses) + selection_worker_s
    print(overhead_line(t_start, fine_tune_s, valuer_own_s, worker_s, game.n_jobs, estimate_s))
    age = process_age_s()
    store.append_job({k: base[k] for k in ("schema", "experiment", "game", "job", "seeds", "commit", "dirty",
                                           "hardware", "timestamp", "numerics") if k in base}
                     | {"kind": "job_summary", "wall_s": age if age is not None else time.time() - t_start,
                        "fine_tune_s": fine_tune_s, "valuer_own_s": valuer_own_s, "worker_s": worker_s,
                        "n_jobs": game.n_jobs, "estimate_s": estimate_s, "n_records": len(records),
                        "trained": sum(e["fresh"] for e in used), "cached": sum(not e["fresh"] for e in used)}
                     | ({"estimate_at_s": estimate_at[0], "fine_tune_before_estimate_s": estimate_at[1]}
                        if estimate_at else {}))
    from bench.core.cache import sweep_stale_tmp
    sweep_stale_tmp(cfg.cache_dir)     # the build locks this job left beside its artefacts (none held now)
    return records


def announce(games: list, lds_games: list, lds_cfg: dict, store, experiment: str, hardware_id: str | None,
             valuers: list[str], elapsed_s: float, weights: tuple[int, float] | None = None) -> float | None:
    """Print the plan (fine-tunes per phase, cached or not), train and time the warm-up
    batch, print the estimate (``bench.harness.eta``); returns the estimated wall seconds.
    ``weights``: (fine-tunes, shipped seconds) of the weights a served job's valuers load."""
    plan = plan_of(games, lds_games, lds_cfg)
    print(plan_line(plan, len(games), games[0].n, len(lds_games), lds_cfg.get("n_subsets") or 0), flush=True)
    t0 = time.time()
    warm = warm_up(games) if plan.truth > plan.truth_cached else None
    published = ResultsStore(REPO_DIR / "results" / "published")      # the committed records, when nothing newer
    stores = [published, store] if published.root.resolve() != store.root.resolve() else [store]
    own = history_valuer_s([r for st in stores for r in st.read(experiment)], experiment, hardware_id, valuers,
                           len(games))
    harness = history_harness_s([j for st in stores for j in st.read_jobs()], experiment, hardware_id)
    left = plan_of(games, lds_games, lds_cfg) if warm else plan      # what the warm-up left to train
    line, total = estimate_line(left, warm, own, elapsed_s + time.time() - t0, harness,     # the warm-up's time included
                                weights)
    print(line, flush=True)
    return total


def consensus_line(cons: Consensus) -> str:
    s2s = cons.seed_to_seed
    vals = ", ".join(f"{v:+.3f}±{e:.3f}" for v, e in zip(cons.values, cons.se))
    return (f"[dvbench] consensus exact Shapley over {cons.n_seeds} seeds (± SE): {vals}; seed-to-seed ρ "
            f"{s2s[0]:.3f}, split-half ρ {cons.split_half:.3f}")


def valuer_line(name: str, recs: list[dict]) -> str:
    good = [r for r in recs if r["status"] == "ok"]
    if not good:
        return f"[dvbench] {name}: {recs[0]['status']} ({recs[0]['error']})"
    m, lo, hi = fidelity_ci(good, int(good[0]["n_owners"]))      # the tables' interval, clipped to [-1, 1]
    ci = "" if np.isnan(lo) else f" [{lo:.2f}, {hi:.2f}]"
    return (f"[dvbench] {name}: fidelity ρ {m:.3f}{ci} over {len(good)}/{len(recs)} seeds, "
            f"{sum(r['cost'].get('wall_s', 0) for r in good):.1f} s")


def write_lds_artefact(results_dir: Path, experiment: str, job: str, targets: LdsTargets,
                       preds: dict[str, np.ndarray]) -> str:
    """The per-subset predictions of every (valuer, seed) and the targets of every LDS seed
    ([R, M, E] margins, the subsets), one compressed npz per job, written atomically:
    what the per-pair LDS and its bootstrap were computed from. Returns its path
    relative to ``results_dir``."""
    import io

    from bench.core.cache import atomic_write_bytes
    rel = f"lds/{experiment}-{job}.npz"
    buf = io.BytesIO()
    np.savez_compressed(buf, targets=targets.pairs["margin"].astype(np.float32),
                        target_seeds=np.asarray(targets.seeds), subsets=np.asarray(targets.subsets),
                        **{f"pred/{k}": v.astype(np.float32) for k, v in preds.items()})
    (results_dir / "lds").mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(results_dir / rel, buf.getvalue())
    return rel


def valuation_fields(val: Valuation) -> dict:
    """The typed fields of a valuation, as the record stores them."""
    return {"table": val.table, "clusters": val.clusters, "cluster_scores": val.cluster_scores,
            "trajectory": [s.to_dict() for s in val.trajectory]}


def log_point_values(wb, records: list[dict]) -> None:
    """Per-example values as a W&B artifact (a run table is cut at 10,000 rows)."""
    import tempfile
    rows = {f"{r['valuer']}/s{r['seed']}": r["point_values"] for r in records if r.get("point_values") is not None}
    if not rows or getattr(wb, "logger", None) is None:
        return
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "point_values.json"
        path.write_text(json.dumps({"experiment": records[0]["experiment"], "seeds": records[0]["seeds"],
                                    "values": rows}))
        wb.log_artifact(path, name=f"point_values-{records[0]['experiment']}-{records[0]['job']}")


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
    png = Path(cfg.results_dir) / "plots" / f"selection_{cfg.experiment_name}_{name}_s{game.seed}.png"
    plot_selection(curve, png, title=f"{cfg.experiment_name}: {name} selection, {len(sel['seeds'])} seeds, "
                                     f"95% CI" + ("" if curve["held_out_eval"] else " (not held out)"))
    print(format_curve(curve))
    return {**compact(curve), "plot": str(png)}
