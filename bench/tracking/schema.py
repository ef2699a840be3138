"""The run record: one JSON line per (experiment, game, seed, valuer), versioned.

Version 3 (written now): one job trains the game under every seed of ``seeds``
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

VERSION = 3
STATUSES = ("ok", "failed", "over_budget")
_RENAMED = {"truth_values": "exact_values", "truth_values_seed2": "exact_values_seed2",
            "truth_wall_s": "exact_wall_s"}


def upgrade(rec: dict[str, Any]) -> dict[str, Any]:
    """A record of any version as the current version (a new dict; v2 returned as is)."""
    version = rec.get("schema", 1)
    if version == VERSION:
        return rec
    if version == 2:
        return {**rec, "schema": VERSION, "seeds": [rec.get("seed")], "job": None,
                "reference_values": rec.get("exact_values"), "consensus": None, "lds_targets": None}
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
