"""The leaderboard and LDS tables over records whose differences are planted, and the
statistics behind their marks (sign-flip tests, Benjamini–Hochberg, TOST, floors)."""
from __future__ import annotations

import numpy as np
import pytest

from bench.analysis.tables import newest_jobs, summarize
from bench.analysis.verdicts import (format_lds, format_leaderboard, format_utilities, leaderboard_rows,
                                     pair_lds_cell, verdict_tables)
from bench.core.uncertainty import bh_adjust, paired_ci, sign_flip_p, spearman_step, t_interval, tost_p

N_OWNERS = 8


def rec(valuer, seed, rho, one_seed, job="j1", ts="2026-01-01T00:00:00+00:00", lds=None, status="ok",
        dirty=False, margin_rho=None, n_owners=N_OWNERS):
    m = {"fidelity": {"spearman": rho}, "one_seed_exact": {"spearman": one_seed},
         "detection_graded": {"concordance": 0.5 + rho / 2, "auroc_any": 0.5}}
    if margin_rho is not None:
        m["fidelity_by_utility"] = {"pref_acc": {"spearman": rho}, "margin": {"spearman": margin_rho}}
    if lds is not None:
        m["lds_pair"] = lds
    return {"experiment": "toy", "game": "union", "valuer": valuer, "seed": seed, "seeds": [0, 1, 2, 3, 4, 5],
            "job": job, "timestamp": ts, "status": status, "metrics": m, "n_owners": n_owners, "dirty": dirty,
            "cost": {"fine_tunes": 3, "device_s": 1.0}, "config": {"verdicts": {"margin": 0.1, "alpha": 0.05}}}


def planted(seeds=range(6)):
    """good ~ the one-seed exact, bad ~ 0.3 lower (both share each seed's ups and downs), random ~ 0."""
    rng = np.random.default_rng(0)
    out = []
    for s in seeds:
        one, shared = 0.8 + rng.normal(0, 0.05), rng.normal(0, 0.02)
        out += [rec("good", s, one + shared, one), rec("bad", s, one - 0.3 + shared, one),
                rec("random", s, rng.normal(0, 0.1), one)]
    return out


def _rows(recs):
    return {r["valuer"]: r for r in leaderboard_rows(summarize(recs)[("toy", "union")])}


def test_leaderboard_marks_the_planted_differences_against_fixed_comparators():
    recs = planted()
    rows = _rows(recs)
    assert list(rows) == ["good", "bad", "random"]
    assert rows["good"]["mark_vs_random"] == "+" and rows["bad"]["mark_vs_random"] == "+"
    assert rows["bad"]["mark_vs_one_seed"] == "−"
    assert rows["good"]["mark_vs_one_seed"] == "?", "6 seeds: the smallest TOST p (1/64) does not survive BH"
    assert _rows(planted(range(8)))["good"]["mark_vs_one_seed"] == "≈", "8 seeds: equivalence within ±0.1 shown"
    assert rows["random"]["vs_random"] is None and "vs_best" not in rows["good"]
    text = format_leaderboard(recs, markdown=True)
    assert "seeds [0, 1, 2, 3, 4, 5]" in text and "(best)" not in text and "one-seed exact" in text
    assert "q=" in text and "0.0312" in text


def test_three_identical_differences_of_a_coarse_statistic_are_not_marked():
    # 4 owners: rho moves in steps of 0.2; three seeds at the same value are no evidence of zero spread
    recs = [rec(v, s, r, 0.8, n_owners=4) for s in range(3) for v, r in (("logra", 0.2), ("random", 0.8))]
    row = _rows(recs)["logra"]
    d = row["vs_random"]
    assert d.mean == pytest.approx(-0.6) and d.hi - d.lo > 0.2, "the interval is as wide as rho's rounding"
    assert d.p == 0.25 and row["mark_vs_random"] == "?"
    assert sign_flip_p([-0.6] * 3) == 0.25 and sign_flip_p([-0.6] * 6) == pytest.approx(2 / 64)


def test_intervals_of_correlations_stay_in_range():
    m, lo, hi = t_interval([1.0, 1.0, 0.6], sd_floor=spearman_step(4) / np.sqrt(12), bounds=(-1, 1))
    assert hi == 1.0 and lo < m < hi
    assert t_interval([0.3, 0.3, 0.3], sd_floor=0.05)[2] > 0.3


def test_sign_flip_p_is_exact_and_tost_needs_both_sides():
    d = np.array([0.1, 0.2, -0.05, 0.3])
    signs = np.array([[1 - 2 * ((k >> i) & 1) for i in range(4)] for k in range(16)])
    assert sign_flip_p(d) == np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-12)
    assert tost_p([0.01, -0.02, 0.0, 0.01, 0.02, -0.01], 0.1) == pytest.approx(1 / 64)
    assert tost_p([0.5] * 6, 0.1) == 1.0


def test_benjamini_hochberg_keeps_its_false_discovery_rate():
    rng = np.random.default_rng(0)
    fdr = []
    for _ in range(300):
        null = rng.uniform(size=40)                          # 40 true nulls
        alt = rng.beta(0.1, 8, size=20)                      # 20 real effects: small p
        q = bh_adjust(np.r_[null, alt])
        found = q <= 0.1
        fdr.append(found[:40].sum() / max(found.sum(), 1))
    assert np.mean(fdr) <= 0.1 * 40 / 60 + 0.02, "BH controls the FDR at alpha * m0 / m"
    assert np.isnan(bh_adjust([0.01, np.nan, 0.04])[1]), "NaN is no test"
    np.testing.assert_allclose(bh_adjust([0.01, 0.04, 0.03]), [0.03, 0.04, 0.04])


def test_paired_ci_floors_identical_differences():
    p = paired_ci([0.8] * 6, [0.2] * 6, sd_floor=0.2 / np.sqrt(6), bounds=(-2, 2), margin=0.1)
    assert p.lo < 0.6 < p.hi and p.p == pytest.approx(2 / 64) and p.p_equiv == 1.0


def test_only_the_newest_job_is_read():
    old = [rec("good", s, 0.1, 0.9, job="old", ts="2025-01-01T00:00:00+00:00") for s in range(3)]
    new = [rec("good", s, 0.7, 0.9, job="new", ts="2026-01-01T00:00:00+00:00") for s in range(2)]
    legacy = [dict(rec("good", 7, 0.5, 0.9), job=None)]
    kept = newest_jobs(old + new + legacy)
    assert {r["job"] for r in kept} == {"new", None} and len(kept) == 3


def test_a_later_job_scored_against_the_same_reference_joins_the_newest_table():
    """A job that values new methods against a shipped ground truth has the same seeds and
    consensus as the job that computed it: its records join that table; a job with another
    consensus never does."""
    cons = {"values": [0.1, 0.2], "per_seed": [[0.1, 0.2]]}
    first = [dict(rec("good", s, 0.6, 0.9, job="truth", ts="2026-01-01T00:00:00+00:00"), consensus=cons)
             for s in range(3)]
    later = [dict(rec("new", s, 0.3, 0.9, job="served", ts="2026-02-01T00:00:00+00:00"), consensus=cons)
             for s in range(3)]
    other = [dict(rec("odd", s, 0.3, 0.9, job="other", ts="2025-06-01T00:00:00+00:00"),
                  consensus={"values": [0.2, 0.1]}) for s in range(3)]
    kept = newest_jobs(first + later + other)
    assert {r["job"] for r in kept} == {"truth", "served"}
    assert {r["job"] for r in newest_jobs(first + other)} == {"truth"}


def _lds(value, reps, ceiling=0.8):
    return {"lds": value, "replicates": list(reps), "ceiling": ceiling, "lo": min(reps), "hi": max(reps),
            "per_pair": [value] * 5}


def test_pair_lds_cell_combines_bootstrap_and_seed_variance_and_pairs_valuers():
    rng = np.random.default_rng(1)
    common = rng.normal(0, 0.03, size=400)                       # the shared subsets' and pairs' draws
    a = [_lds(0.5 + 0.02 * s, 0.5 + 0.02 * s + common) for s in range(6)]
    b = [_lds(0.4 + 0.02 * s, 0.4 + 0.02 * s + common + rng.normal(0, 0.005, 400)) for s in range(6)]
    recs = [rec("logra", s, 0.5, 0.8, lds=a[s]) for s in range(6)] + [rec("trak", s, 0.4, 0.8, lds=b[s])
                                                                      for s in range(6)]
    for r in recs:
        r["lds_targets"] = {"ceiling_replicates": list(0.8 + 0 * common), "n_subsets": 64, "subset_size": 10,
                            "seeds": [100, 101]}
    cell = pair_lds_cell([r for r in recs if r["valuer"] == "logra"])
    assert cell["lds"] == pytest.approx(0.55) and cell["n_seeds"] == 6 and not cell["old"]
    boot_se, seed_se = np.std(common, ddof=1), np.std([0.02 * s for s in range(6)], ddof=1) / np.sqrt(6)
    assert cell["se"] == pytest.approx(np.hypot(boot_se, seed_se), rel=1e-6)
    assert cell["ratio"] == pytest.approx(0.55 / 0.8)
    text = format_lds(recs, markdown=True)
    assert "logra − trak" in text and "+ +0.100" in text, "the shared draws cancel: the paired difference is shown"
    assert format_lds([rec("loo", 0, 0.5, 0.8)]) == ""


def test_fidelity_under_each_utility_and_wandb_tables():
    recs = [rec(v, s, r, 0.8, margin_rho=m) for s in range(8) for v, r, m in (("logra", 0.2, 0.8),
                                                                              ("loo", 0.7, 0.7), ("random", 0, 0))]
    text = format_utilities(recs)
    assert "logra" in text and "+ +0.60" in text
    tables = verdict_tables(recs)
    assert set(tables) >= {"leaderboard/toy-union", "fidelity_by_utility/toy-union"}
    cols, rows = tables["leaderboard/toy-union"]
    assert cols[0] == "valuer" and {r[0] for r in rows} == {"logra", "loo", "random"}


def test_dirty_records_are_marked():
    recs = planted()
    recs[0]["dirty"] = True
    text = format_leaderboard(recs)
    assert "good †" in text and "dirty tree" in text


def test_readme_block_is_replaced_between_its_markers_only(tmp_path):
    from bench.analysis.report import README_BEGIN, README_END, update_readme
    from bench.core.errors import ConfigError
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{README_BEGIN}\nstale numbers\n{README_END}\n\ntail\n")
    update_readme(readme, planted())
    text = readme.read_text()
    assert text.startswith("# title\n\n" + README_BEGIN) and text.endswith(README_END + "\n\ntail\n")
    assert "stale numbers" not in text and "good" in text
    update_readme(readme, planted())
    assert readme.read_text() == text, "regenerating is idempotent"
    readme.write_text("no markers")
    with pytest.raises(ConfigError, match="--readme"):
        update_readme(readme, planted())
    dirty = planted()
    dirty[0]["dirty"] = True
    readme.write_text(f"{README_BEGIN}\n{README_END}\n")
    with pytest.raises(ConfigError, match="dirty"):
        update_readme(readme, dirty)
    update_readme(readme, dirty, allow_dirty=True)
    assert "†" in readme.read_text()


def test_the_concordance_interval_is_never_zero_width():
    recs = [dict(rec(v, s, r, 0.9), planted={"corruption": [0, 0, 0.25, 0.5, 1.0, 1.0, 0, 0]})
            for s in range(6) for v, r in (("good", 0.9), ("random", 0.0))]
    for r in recs:
        r["metrics"]["detection_graded"]["concordance"] = 0.95
    c = _rows(recs)["good"]["concordance"]
    assert c[1] < 0.95 < c[2], "six equal values of a coarse statistic are not zero variance"


def test_what_has_been_run_comes_from_the_records_and_job_summaries():
    from bench.analysis.report import RUNS_BEGIN, RUNS_END, runs_block
    hw = {"n_cpus": 2, "cpu_name": "AMD EPYC"}
    recs = [dict(rec(v, s, 0.5, 0.5), job="j2", seeds=[0, 1], n_owners=4, commit="abcdef123", hardware=hw,
                 timestamp="2026-12-07T10:00:00", config={"model": {"name": "smollm2-135m"}})
            for v in ("good", "random") for s in (0, 1)]
    old = [dict(r, job="j1", timestamp="2026-12-01T10:00:00") for r in recs]
    block = runs_block(old + recs, [{"job": "j2", "wall_s": 630.0, "trained": 77, "cached": 3}])
    assert block.startswith(RUNS_BEGIN) and block.endswith(RUNS_END)
    rows = [line for line in block.splitlines() if line.startswith("| ") and "preset" not in line]
    assert len(rows) == 1, "one row per published job (the newest)"
    assert "| smollm2-135m | 4 | 2 | 2 × AMD EPYC | abcdef1 | 2026-12-07 | 10.5 min (77 fine-tunes trained, 3 cached) |" \
        in rows[0]
    assert "| not recorded |" in runs_block(recs, [])


def test_the_answer_table_sets_games_side_by_side_with_their_marks_against_random():
    from bench.analysis.report import answer_block
    six = [rec("good", s, 0.9, 0.95) for s in range(6)] + [rec("random", s, 0.01 * s, 0.95) for s in range(6)]
    three = [dict(r, experiment="toy3", seeds=[0, 1, 2]) for r in six if r["seed"] < 3 and r["valuer"] == "good"]
    three += [dict(rec("random", s, 0.0, 0.95), experiment="toy3", seeds=[0, 1, 2]) for s in range(3)]
    three += [dict(rec("only3", s, 0.5, 0.95), experiment="toy3", seeds=[0, 1, 2]) for s in range(3)]
    block = answer_block(six + three)
    assert "| good | +0.90 + | +0.90 ? |" in block        # 6 seeds can show it; 3 seeds cannot (p >= 1/4)
    assert "| only3 | not run | +0.50 ? |" in block
    assert block.index("| good |") < block.index("| random |")


def test_tier_agreement_is_one_for_the_same_ranking_minus_one_for_its_reverse_and_uncertain_with_noise():
    from bench.analysis.report import agreement_lines, tier_agreement
    levels = {"a": 0.9, "b": 0.6, "c": 0.3, "d": 0.0, "random": -0.1}
    tiny = {v: [rec(v, s, x, 0.9) for s in range(6)] for v, x in levels.items()}
    same = {v: [rec(v, s, x / 2, 0.9) for s in range(3)] for v, x in levels.items()}
    rev = {v: [rec(v, s, -x, 0.9) for s in range(3)] for v, x in levels.items()}
    up = tier_agreement(tiny, same)
    assert up["rho"] == pytest.approx(1.0) and up["lo"] == pytest.approx(up["hi"]) == pytest.approx(1.0)
    assert up["seeds"] == (6, 3)                                       # no seed spread: a zero-width interval
    assert tier_agreement(tiny, rev)["rho"] == pytest.approx(-1.0)
    noisy = {v: [rec(v, s, x + (0.8 if s == 0 else -0.4), 0.9) for s in range(3)] for v, x in levels.items()}
    noisy["a"] = [rec("a", s, [0.9, -0.9, 0.0][s], 0.9) for s in range(3)]      # one valuer all over the place
    n = tier_agreement(tiny, noisy)
    assert n["lo"] < n["rho"] <= n["hi"] and n["lo"] < 0.9
    assert tier_agreement({"a": tiny["a"]}, {"a": same["a"]}) is None            # too few valuers to rank
    line = agreement_lines({("graded", "union"): tiny, ("graded_smollm2", "union"): same})[0]
    assert "Spearman ρ of the 5 valuers' mean fidelities +1.00 [+1.00, +1.00]" in line
