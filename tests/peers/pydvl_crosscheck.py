"""Run once, in an environment of its own, to record pyDVL's MSR Banzhaf and Owen-sampling
Shapley on a published utility table of real fine-tunes; ``tests/test_semivalues.py``
checks dvbench's estimators (valuers/semivalues.py) against the figures written here.

pyDVL 0.10 requires numpy < 2 and so cannot share the project's environment:

    python3 -m venv /tmp/pydvl-venv && /tmp/pydvl-venv/bin/pip install pydvl==0.10.0
    /tmp/pydvl-venv/bin/python tests/peers/pydvl_crosscheck.py

The table: ``results/published/runs/quick.jsonl``, the seed-0 exact-retraining record
(6 owners, 64 coalitions, each a real fine-tune). The utility of a coalition is the
table's entry for it (the empty coalition included: v(∅) is the base model's score).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from pydvl.valuation.dataset import Dataset
from pydvl.valuation.methods.banzhaf import MSRBanzhafValuation
from pydvl.valuation.methods.shapley import ShapleyValuation
from pydvl.valuation.samplers.owen import AntitheticOwenSampler, GridOwenStrategy
from pydvl.valuation.stopping import MaxSamples, NoStopping
from pydvl.valuation.utility.base import UtilityBase

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).with_suffix(".json")


class TableUtility(UtilityBase):
    """v(S) = the published table's entry for the coalition of owners S."""

    def __init__(self, table):
        self.table = np.asarray(table, float)

    def __call__(self, sample) -> float:
        if sample is None or len(sample.subset) == 0:
            return float(self.table[0])
        return float(self.table[int(sum(1 << int(i) for i in sample.subset))])


def published_table() -> tuple[list[float], dict]:
    for line in (ROOT / "results/published/runs/quick.jsonl").read_text().splitlines():
        r = json.loads(line)
        name = r["valuer"]["name"] if isinstance(r["valuer"], dict) else r["valuer"]
        if name == "retrain_shapley" and r["seed"] == 0:
            return r["utility_table"], {"job": r["job"], "commit": r["commit"], "seed": 0, "experiment": "quick"}
    sys.exit("no seed-0 retrain_shapley record in results/published/runs/quick.jsonl")


def main() -> None:
    import pydvl
    table, source = published_table()
    n = int(np.log2(len(table)))
    data = Dataset(np.arange(n, dtype=float)[:, None], np.zeros(n))
    out = {"pydvl": pydvl.__version__, "numpy": np.__version__, "source": source, "table": table}

    t0 = time.perf_counter()
    msr = MSRBanzhafValuation(TableUtility(table), is_done=MaxSamples(None, 1), seed=0)
    msr.is_done = MaxSamples(msr.sampler, 20000)
    res = msr.fit(data).result
    out["msr_banzhaf"] = {"values": res.values.tolist(), "stderr": res.stderr.tolist(), "n_samples": 20000,
                          "seconds": time.perf_counter() - t0}

    t0 = time.perf_counter()
    sampler = AntitheticOwenSampler(GridOwenStrategy(n_samples_outer=32), n_samples_inner=100, seed=0)
    owen = ShapleyValuation(TableUtility(table), sampler, NoStopping(sampler))
    res = owen.fit(data).result
    out["owen_shapley"] = {"values": res.values.tolist(), "stderr": res.stderr.tolist(),
                           "n_q": 32, "n_per_q": 100, "antithetic": True, "grid": "linspace(0, 1, 32)",
                           "seconds": time.perf_counter() - t0}
    tmp = OUT.with_name(OUT.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(OUT)
    print(json.dumps({k: v for k, v in out.items() if k != "table"}, indent=1))


if __name__ == "__main__":
    main()
