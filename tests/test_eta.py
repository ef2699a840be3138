"""The plan and the estimate a job prints before its first fine-tune (bench.harness.eta)."""
from __future__ import annotations

import re
import time

import pytest

from bench.harness.eta import Plan, Warm, estimate_line, history_harness_s, history_valuer_s, plan_of, warm_up


def test_plan_counts_the_phases_and_what_is_cached(make_game, fresh_cache):
    games = [make_game(fresh_cache, seed=s) for s in (0, 1)]
    lds = [make_game(fresh_cache, seed=100)]
    cfg = {"n_subsets": 4, "frac": 0.5, "seed": 0}
    n = games[0].n
    plan = plan_of(games, lds, cfg)
    sizes = [sum(games[0].owner_sizes[i] for i in range(n) if m >> i & 1) for m in range(1, 2 ** n)]
    half = round(0.5 * sum(games[0].owner_sizes))
    assert plan == Plan(truth=2 * (2 ** n - 1), truth_cached=0, lds=4, lds_cached=0, sizes=(*sizes, *sizes, *[half] * 4))
    warm = warm_up(games)               # a burn-in coalition, then one timed (pack 1 x 1 worker)
    assert warm.n == 1 and warm.pairs == sizes[1] and 0 < warm.train_s < warm.wall_s
    assert plan_of(games, lds, cfg).sizes == plan.sizes[2:]
    assert plan_of(games, lds, cfg).truth_cached == 2                # the warm-up's fine-tunes are the job's
    games[0].table()                                                 # seed 0's ground truth, all of it
    after = plan_of(games, lds, cfg)
    assert after.truth_cached == 2 ** n - 1 and after.fresh == plan.fresh - (2 ** n - 1)
    assert warm_up(games).n == 1 and plan_of(games, lds, cfg).truth_cached == 2 ** n + 1   # seed 1's first two


def _rec(job, valuer, wall, hw="h1", experiment="quick", t="2026-12-01"):
    return {"job": job, "valuer": valuer, "cost": {"wall_s": wall}, "experiment": experiment, "status": "ok",
            "hardware": {"id": hw}, "timestamp": t}


def test_the_valuers_time_comes_from_the_latest_job_on_this_hardware():
    recs = [_rec("a", "logra", 10.0, t="2026-12-01"), _rec("a", "logra", 12.0, t="2026-12-01"),
            _rec("a", "shed", 4.0, t="2026-12-01"), _rec("b", "logra", 100.0, hw="other", t="2026-12-03"),
            _rec("c", "logra", 20.0, t="2026-12-02"), _rec("c", "logra", 22.0, t="2026-12-02"),
            _rec("d", "logra", 1.0, experiment="default", t="2026-12-04")]
    own, job = history_valuer_s(recs, "quick", "h1", ["logra", "shed"], seeds=3)
    assert job == "c" and own == pytest.approx(21.0 * 3)             # job c has no shed: only what it measured
    assert history_valuer_s(recs[::-1], "quick", "h1", ["logra"], 3)[1] == "c"      # newest by time, not order
    assert history_valuer_s(recs, "quick", "h2", ["logra"], 3) is None          # no job on this hardware
    assert history_valuer_s(recs, "quick", "h1", ["trak"], 3) is None


def test_the_valuers_history_leaves_out_fetching_fine_tunes_and_a_served_job_prices_them():
    """A served job's LoGra trains the grand coalition inside its "fine_tune" phase; the
    next job's estimate must not take that as LoGra's own time and price it again."""
    rec = _rec("a", "logra", 70.0)
    rec["cost"]["phases"] = {"fine_tune": 50.0, "log_train": 20.0}
    assert history_valuer_s([rec], "quick", "h1", ["logra"], seeds=3)[0] == pytest.approx(20.0 * 3)
    line, total = estimate_line(Plan(45, 45, 0, 0), None, (60.0, "a"), 5.0, None, (3, 45.0))
    assert total == pytest.approx(5 + 60 + 45) and "+ 3 fine-tunes of weights the valuers load ~45 s" in line
    warm = Warm(n=1, pairs=10, wall_s=12.0, train_s=8.0)            # timed here: priced by the warm-up instead
    _, total = estimate_line(Plan(45, 44, 0, 0, sizes=()), warm, (60.0, "a"), 5.0, None, (3, 45.0))
    assert total == pytest.approx(5 + 0 + 60 + 3 * 12.0)


def test_estimate_line_scales_training_with_the_pairs():
    """A fine-tune's training grows with its pairs, its scoring does not: the warm-up's one
    fine-tune of 10 pairs (8 s training + 4 s the rest) predicts 4 + 8 × 30 / 10 s for 30 pairs."""
    warm = Warm(n=1, pairs=10, wall_s=12.0, train_s=8.0)
    assert warm.seconds([30, 10]) == pytest.approx((4 + 24) + (4 + 8))
    left = Plan(truth=45, truth_cached=1, lds=32, lds_cached=2, sizes=(30, 10))
    line, total = estimate_line(left, warm, (300.0, "c"), 110.0)
    assert total == pytest.approx(110 + 40 + 300) and "for 2 more fine-tunes" in line and "0.80 s per training pair" in line
    assert "job c" in line
    packed = Warm(n=4, pairs=40, wall_s=20.0, train_s=0.0)        # a pack: per fine-tune, not per pair
    assert packed.seconds([30, 10, 5]) == pytest.approx(15.0)
    line, total = estimate_line(Plan(45, 45, 0, 0), None, None, 12.0)
    assert total == 12.0 and "every fine-tune cached" in line and "unknown" in line


def test_a_job_prints_plan_and_estimate_and_compares_at_the_end(smoke_run):
    out = smoke_run.stdout
    plan = re.search(r"\[dvbench\] plan: ground truth (\d+) fine-tunes \((\d+) seeds × (\d+) coalitions\), "
                     r"(\d+) cached", out)
    assert plan and int(plan[1]) == int(plan[2]) * int(plan[3]) and plan[4] == "0"
    assert re.search(r"\[dvbench\] estimate: ~.* in all: .* for \d+ more fine-tunes \(timed on 1 after a burn-in: "
                     r"[\d.]+ s each, [\d.]+ s per training pair\)", out), out[-3000:]
    assert out.index("[dvbench] plan:") < out.index("[dvbench] estimate:")
    ratio = re.search(r"\[dvbench\] wall .*; estimated [\d.]+ s \(([\d.]+)x\)", out)
    assert ratio and float(ratio[1]) > 0
    assert all(r.get("own_s") is not None for r in smoke_run.records if r["status"] == "ok")


def test_a_job_files_its_summary_and_the_readme_says_its_wall_time(smoke_run):
    """Each job appends its wall time, where it went and its estimate to
    ``<results>/jobs/<experiment>.jsonl``; ``make report`` turns it into the sentence under
    the job's leaderboard (a job published before summaries says it was not recorded)."""
    from bench.analysis.report import job_time
    from bench.analysis.tables import summarize
    from bench.tracking import ResultsStore
    store = ResultsStore(smoke_run.results)
    jobs = [j for j in store.read_jobs() if j["job"] == smoke_run.records[0]["job"]]
    assert len(jobs) == 1
    j = jobs[0]
    assert j["experiment"] == "smoke" and j["n_records"] == len(smoke_run.records) and j["estimate_s"] > 0
    assert j["wall_s"] >= j["fine_tune_s"] + j["valuer_own_s"] > 0 and j["commit"] == smoke_run.records[0]["commit"]
    assert store.read("smoke") == ResultsStore(smoke_run.results).read("smoke")      # records untouched by it
    (by_valuer,) = [v for k, v in summarize(smoke_run.records).items() if k[0] == "smoke"]
    text = job_time(by_valuer, store.read_jobs())
    assert text.startswith(f"Job wall time: {j['wall_s'] / 60:.1f} min on ") and "estimated before its first" in text
    assert "not recorded" in job_time(by_valuer, [])


def test_the_warm_up_times_a_fine_tune_not_the_once_per_process_work(make_game, fresh_cache, monkeypatch):
    """Preparing the training pool (TRL's tokenisation and reference pass, 15 s on SmolLM2)
    happens once per process: done before the clock starts, it does not inflate the seconds
    per fine-tune (it did: 34.5 s per SmolLM2 fine-tune instead of ~17 s)."""
    g = make_game(fresh_cache)
    real, slow = g.examples, []

    def examples(pairs):                     # the first preparation takes 3 s more
        if not slow:
            slow.append(1)
            time.sleep(3)
        return real(pairs)
    monkeypatch.setattr(g, "examples", examples)
    warm = warm_up([g])
    assert slow and warm.n == 1 and warm.wall_s < 3


def test_the_harness_time_after_the_estimate_comes_from_the_latest_summary_on_this_hardware():
    """wall 100 s, estimate made at 30 s when 20 s of fine-tunes were done, 60 s of
    fine-tunes in all, 15 s of valuers: 100 - 30 - (60 - 20) - 15 = 15 s of harness after."""
    def summary(job, t, hw="h1", **kw):
        return {"job": job, "experiment": "first", "hardware": {"id": hw}, "timestamp": t, "wall_s": 100.0,
                "fine_tune_s": 60.0, "valuer_own_s": 15.0, **kw}
    jobs = [summary("a", "2026-12-01", estimate_at_s=30.0, fine_tune_before_estimate_s=20.0),
            summary("b", "2026-12-02"),                                   # from before summaries said when
            summary("c", "2026-12-03", hw="other", estimate_at_s=1.0, fine_tune_before_estimate_s=0.0)]
    assert history_harness_s(jobs, "first", "h1") == (pytest.approx(15.0), "a")
    assert history_harness_s(jobs, "first", "h2") is None and history_harness_s(jobs, "quick", "h1") is None
    warm = Warm(n=1, pairs=10, wall_s=12.0, train_s=8.0)
    line, total = estimate_line(Plan(45, 1, 0, 0, sizes=(10,)), warm, None, 30.0, (15.0, "a"))
    assert total == pytest.approx(30 + 12 + 15) and "harness ~15 s (job a)" in line
