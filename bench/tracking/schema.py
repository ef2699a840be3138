"""The run record: one JSON line per (experiment, game, seed, valuer), versioned.

Version 4 (written now): as version 3, with

    metrics.one_seed_exact      (v3: noise_ceiling) this seed's exact values scored
                                like the valuation: a reference point, not a ceiling
    metrics.fidelity_by_utility {pref_acc: {...}, margin: {...}}: fidelity to the
                                exact ground truth under each utility, read off the
                                same cached fine-tunes (and one_seed_exact_by_utility)
    metrics.fidelity.rel_l2_fit the scale-free relative error
    metrics.detection_graded    {concordance, auroc_any, auprc_any} (v3: kendall_tau)
    metrics.lds_pair            {lds, lo, hi, ceiling (Spearman–Brown, of the seed
                                mean scored), ratio, per_pair [E], replicates [B] (the
                                two-way bootstrap, the same draws for every valuer),
                                target: margin, interval}; lds_pair_bt is gone
    lds_targets                 {n_subsets, subset_size, seeds (lds.seeds, disjoint
                                from seeds), metric, target, ceiling, seed_vs_seed,
                                bootstrap, ceiling_replicates [B]}
    lds_artefact                <results_dir>/<this path>: the per-subset predictions
                                and targets (npz) the LDS was computed from

Rank statistics merge values equal within 1e-9 of their scale (``bench.core.ranks``).
``upgrade`` reads a v3 record as v4 (``_from_v3``): the rank statistics recomputed from
its stored values, the LDS ceiling corrected, ``rescored`` saying what it lacks.

Version 3: one job trains the game under every seed of ``seeds``
and writes a record per (valuer, seed):

    schema              3
    experiment, game, seed, seeds, job, n_owners, metric, owner_sizes, config
    job                 the job's id: its records (every seed) share it, and a
                        report reads one job per (experiment, game)
    commit, dirty, config_hash, hardware, timestamp       (provenance)
    planted             {noisy_owners, duplicate_pairs, corrupted_ids, n_corrupted, corruption}
                        what the partition planted (never shown to a valuer);
                        corrupted_ids are example ids, in the task's id space;
                        corruption = each owner's corrupted share
    example_ids         the training examples' ids in point-value order
    task_dropped        rows dropped from each dataset file ({"task.path": k, ...}),
                        chosen == rejected (nothing to prefer)
    valuer, valuer_config, status ("ok" | "failed" | "over_budget"), error
    owner_values, stderr, point_values (when the method has them)
    valuation           {table, clusters, cluster_scores, trajectory}: the typed
                        fields of ``Valuation`` (None / [] when the method has none)
    cost, metrics, extras (diagnostics only)
    exact_values        exact retraining Shapley of this seed's game
    reference_values    the consensus of the other seeds' exact values: what
                        ``metrics.fidelity`` is against (``metrics.noise_ceiling``:
                        exact_values scored the same way)
    consensus           {seeds, values, se, per_seed, split_half_spearman,
                        seed_to_seed_spearman}: the exact Shapley of the
                        seed-averaged table and its own uncertainty
    lds_targets         {n_subsets, subset_size, seeds, metric} of the LDS subsets
    utility_table       this seed's 2^n utilities; exact_wall_s

Version 2: one seed per record and job; ``exact_values_seed2`` (the same game
under seed + 1000) was the noise ceiling and fidelity was against the record's
own ``exact_values``. ``upgrade`` sets ``seeds = [seed]`` and
``reference_values = exact_values``.

Version 1 (before): no ``schema`` key; ``truth`` for ``planted`` (without the ids),
``truth_values*`` for ``exact_values*``, the typed fields inside ``extras``.
``upgrade`` reads both, so reports over old results keep working; a v1 record's
point-level detection is unavailable (its corrupted ids were not stored).
"""
from __future__ import annotations

from typing import Any

import numpy as np

VERSION = 4
STATUSES = ("ok", "failed", "over_budget")
_RENAMED = {"truth_values": "exact_values", "truth_values_seed2": "exact_values_seed2",
            "truth_wall_s": "exact_wall_s"}


def upgrade(rec: dict[str, Any]) -> dict[str, Any]:
    """A record of any version as the current version (a new dict; v2 returned as is)."""
    version = rec.get("schema", 1)
    if version == VERSION:
        return rec
    if version == 3:
        return _from_v3(rec)
    if version == 2:
        return upgrade({**rec, "schema": 3, "seeds": [rec.get("seed")], "job": None,
                        "reference_values": rec.get("exact_values"), "consensus": None, "lds_targets": None})
    if version != 1:
        raise ValueError(f"record schema {version!r}: this dvbench reads versions 1..{VERSION}; upgrade dvbench")
    out = {_RENAMED.get(k, k): v for k, v in rec.items() if k != "truth"}
    truth = rec.get("truth") or {}
    out["planted"] = {"noisy_owners": truth.get("noisy_owners", []),
                      "duplicate_pairs": truth.get("duplicate_pairs", []),
                      "corrupted_ids": None, "n_corrupted": truth.get("n_corrupted")}
    out["example_ids"] = None
    out["task_dropped"] = {}
    ex = dict(rec.get("extras") or {})
    out["valuation"] = {"table": ex.pop("table", None), "clusters": ex.get("clusters"),
                        "cluster_scores": ex.pop("proxy_values", None),
                        "trajectory": _v1_trajectory(ex, rec.get("owner_sizes") or [])}
    ex.pop("trajectory", None)
    out["extras"] = ex
    out["schema"] = 2
    return upgrade(out)


RESCORED_V3 = ("schema 3, re-scored on reading: rank statistics recomputed tie-aware from the stored values; "
               "LDS ceilings Spearman-Brown-corrected; its LDS targets were trained under the valuation seeds "
               "and its LDS interval is over eval pairs only")


def _from_v3(rec: dict[str, Any]) -> dict[str, Any]:
    """A v3 record read as v4: ``noise_ceiling`` is ``one_seed_exact``; the rank statistics
    are recomputed from the stored values with merged ties (v3 ranked values 1e-18 apart
    apart); graded detection is the concordance index; the per-pair LDS ceiling (v3: one
    seed's targets predicting another's) is the Spearman–Brown ceiling of the 2-seed mean
    it was scored against; the log σ LDS column (the margin's, re-ranked) is dropped."""
    from bench.core import metrics as M
    from bench.core.lds import sb_ceiling
    out = {**rec, "schema": VERSION, "rescored": RESCORED_V3}
    m = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (rec.get("metrics") or {}).items()}
    if "noise_ceiling" in m:
        m["one_seed_exact"] = m.pop("noise_ceiling")
    m.pop("lds_pair_bt", None)
    vals, ref, exact = rec.get("owner_values"), rec.get("reference_values"), rec.get("exact_values")
    corruption = (rec.get("planted") or {}).get("corruption")
    if rec.get("status", "ok") == "ok" and ref is not None and len(ref) > 1:
        if vals and "draws" not in m and "fidelity" in m:
            gap = m["fidelity"].get("efficiency_gap")
            m["fidelity"] = {**M.fidelity(vals, ref), "efficiency_gap": gap}
        if exact is not None and "one_seed_exact" in m:
            gap = m["one_seed_exact"].get("efficiency_gap")
            m["one_seed_exact"] = {**M.fidelity(exact, ref), "efficiency_gap": gap}
        if vals and "draws" not in m and corruption is not None and "detection_graded" in m:
            m["detection_graded"] = M.detection_graded(vals, corruption)
    n_lds = len((rec.get("lds_targets") or {}).get("seeds") or [0, 0])
    for key in ("lds_pair", "lds"):
        sec = m.get(key)
        if isinstance(sec, dict) and sec.get("ceiling") is not None and np.isfinite(sec["ceiling"]):
            sec["ceiling_one_seed"] = sec["ceiling"]
            sec["ceiling"] = float(sb_ceiling(sec["ceiling"], n_lds))
            if key == "lds_pair":
                sec["ratio"] = sec["lds"] / sec["ceiling"] if sec["ceiling"] > 0 else float("nan")
                sec["interval"] = "bootstrap over eval pairs only (v3)"
    out["metrics"] = m
    return out


def _v1_trajectory(ex: dict, sizes: list[int]) -> list[dict]:
    """v1 kept point-level TMC's trajectory in extras, and SHED's per-pass values."""
    if "trajectory" in ex:
        return [{k: t.get(k) for k in ("fine_tunes", "owner_values", "point_values")} for t in ex["trajectory"]]
    if "per_pass_values" not in ex:
        return []
    from bench.core.valuation import owner_sums
    per_pass, labels = np.asarray(ex["per_pass_values"], float), np.asarray(ex["clusters"], int)
    cost = len(ex["per_pass_groups"][0]) - 1
    out = []
    for j in range(1, len(per_pass) + 1):
        pv = per_pass[:j].mean(0)[labels]
        out.append({"fine_tunes": 1 + j * cost, "owner_values": owner_sums(pv, sizes).tolist(),
                    "point_values": pv.tolist()})
    return out


def corrupted_mask(rec: dict) -> np.ndarray | None:
    """Which training examples (point-value order) were planted as corrupted; None
    when the record does not say (a v1 record)."""
    ids, bad = rec.get("example_ids"), (rec.get("planted") or {}).get("corrupted_ids")
    if ids is None or bad is None:
        return None
    return np.isin(np.asarray(ids), np.asarray(bad))


def reference_values(rec: dict):
    """What a record's fidelity is measured against (v3: the held-out consensus; older
    records: their own exact values)."""
    return rec.get("reference_values") if rec.get("reference_values") is not None else rec.get("exact_values")
