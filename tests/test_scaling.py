"""``python -m bench scaling`` and ``experiment=scale_tiny``: the plan (fine-tune counts
without training), bad inputs refused in one line before any work, the preset's checks,
and one real run (n = 3 exact + n = 4 sampling only) on a very small tiny tier."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import REPO, one_line, run_cli

from bench.cli.scaling import mc_fine_tunes_at_most, plan

# a tiny tier small enough for seconds: 1 layer of width 32, a short warm-up, 20 eval pairs
SMALL = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.warmup_epochs=1",
         "task.n_warmup_per_source=30", "task.n_eval_per_source=5", "progress=false"]


# ------------------------------------------------------------------ the plan

def test_plan_counts_for_10_12_16_32():
    rows = {r["n"]: r for r in plan([4, 10, 12, 16, 32], exact_max=12, max_permutations=100)}
    assert {n: r["exact"] for n, r in rows.items()} == {4: 15, 10: 1023, 12: 4095, 16: None, 32: None}
    # every permutation visits n coalitions and all end at the full one
    assert {n: r["mc_at_most"] for n, r in rows.items()} == {4: 15, 10: 901, 12: 1101, 16: 1501, 32: 3101}
    assert {n: r["arith"] for n, r in rows.items()} == {4: 4, 10: 10, 12: 12, 16: 16, 32: 32}
    # the methods of one n share its cache: exact covers the others; without it, MC + the singletons
    assert {n: r["distinct_at_most"] for n, r in rows.items()} == {4: 15, 10: 1023, 12: 4095, 16: 1517, 32: 3133}
    assert mc_fine_tunes_at_most(32, 5) == 156 and mc_fine_tunes_at_most(3, 1000) == 7


def test_plan_prints_without_training(tmp_path):
    code, out, err = run_cli(["scaling", "--owners", "4", "10", "12", "16", "32", "--plan",
                              "--results", str(tmp_path)])
    assert code == 0, err
    lines = out.splitlines()
    body = {int(ln.split()[0]): ln.split()[1:] for ln in lines if ln.strip()[:1].isdigit()}
    assert body[12][:3] == ["4,095", "1,101", "12"]
    assert body[10][:3] == ["1,023", "901", "10"]
    assert body[32][:3] == ["-", "3,101", "32"]
    assert "total: at most 9,783 fine-tunes" in out
    assert not (tmp_path / "runs").exists()          # nothing recorded, nothing composed or trained
    # --dry-run is the same flag; --max-permutations bounds MC
    code, out, _ = run_cli(["scaling", "--owners", "32", "--dry-run", "--max-permutations", "5"])
    assert code == 0 and " 156 " in out


# ------------------------------------------------------------------ sampling to a target SE

def _table_game(table):
    from types import SimpleNamespace
    return SimpleNamespace(utility=lambda mask: float(table[mask]))


def test_mc_stops_at_the_target_se_and_reports_the_engines_se():
    from bench.cli.scaling import mc_to_target
    from bench.core.toy_games import additive_game, glove_game

    table, phi = glove_game(2, 3)                      # marginals vary by permutation: SE > 0
    res, hit = mc_to_target(_table_game(table), 5, np.random.default_rng(0), 1e-9, 3, 12)
    assert not hit and res.n_permutations == 12 and np.max(res.stderr) > 1e-9
    assert np.sum(res.values) == pytest.approx(table[-1] - table[0])
    # a loose target stops it at --min-permutations, a middling one once the largest SE is below it
    res, hit = mc_to_target(_table_game(table), 5, np.random.default_rng(0), 10.0, 3, 12)
    assert hit and res.n_permutations == 3
    full, _ = mc_to_target(_table_game(table), 5, np.random.default_rng(1), 1e-9, 2, 40)
    target = float(np.median([np.max(full.stderr), 0.2]))
    res, hit = mc_to_target(_table_game(table), 5, np.random.default_rng(1), target, 2, 40)
    if hit:
        assert np.max(res.stderr) <= target and res.n_permutations <= 40
    # an additive game's marginals never vary: SE 0 at once, values exact
    table, phi = additive_game([0.1, 0.2, 0.3])
    res, hit = mc_to_target(_table_game(table), 3, np.random.default_rng(0), 1e-6, 2, 50)
    assert hit and res.n_permutations == 2 and np.allclose(res.values, phi)


def test_arithmetic_by_permutations_matches_the_exact_arithmetic_shapley():
    """Beyond n = 16 the arithmetic's 2^n table is not built: its utilities are sampled by
    permutation. On a small n, that agrees with the valuer's exact Shapley of the table."""
    from types import SimpleNamespace

    from bench.cli.scaling import arithmetic_by_permutations
    from bench.core.shapley import exact_shapley
    from valuers.dpo_arithmetic import coalition_utilities, coalition_weights

    rng = np.random.default_rng(3)
    n, pairs, beta = 5, 40, 0.1
    base_gap, margins = rng.normal(0, 1, pairs), rng.normal(0.2, 1, (n, pairs))
    valuer = SimpleNamespace(metric=None, owner_margins=lambda game: (base_gap, margins))
    game = SimpleNamespace(n=n, metric="pref_acc", train=SimpleNamespace(beta=beta),
                           usage=SimpleNamespace(entries={}), device_kind="cpu")
    res, cost = arithmetic_by_permutations(game, valuer, np.random.default_rng(0), 2000)
    table = coalition_utilities(base_gap, margins, coalition_weights(n, "identity"), beta)["pref_acc"]
    exact = exact_shapley(table)
    assert np.sum(res.values) == pytest.approx(table[-1] - table[0])
    assert np.all(np.abs(res.values - exact) <= 5 * res.stderr + 1e-12)
    assert cost.fine_tunes == 0 and set(cost.phases) == {"owner_fine_tunes", "arithmetic"}


# ------------------------------------------------------------------ bad inputs

@pytest.mark.parametrize("args, option", [
    (["--owners", "1", "4"], "--owners"),
    (["--owners", "4", "6", "4"], "--owners"),
    (["--per-owner", "0"], "--per-owner"),
    (["--epochs", "0"], "--epochs"),
    (["--n-jobs", "0"], "--n-jobs"),
    (["--target-se", "0"], "--target-se"),
    (["--min-permutations", "1"], "--min-permutations"),
    (["--max-permutations", "1"], "--max-permutations"),
    (["--min-permutations", "8", "--max-permutations", "4"], "--min-permutations"),
    (["--exact-max", "21"], "--exact-max"),
    (["--exact-max", "-1"], "--exact-max"),
    (["--owners", "four"], "--owners"),
])
def test_bad_input_one_line_before_any_work(tmp_path, args, option):
    code, _, err = run_cli(["scaling", *args, "--results", str(tmp_path)])
    assert code == 2
    assert one_line(err) and err.startswith("error: ") and option in err, err
    assert not (tmp_path / "runs").exists()


def test_bad_override_names_the_setting(tmp_path):
    code, _, err = run_cli(["scaling", "--owners", "3", "--results", str(tmp_path), "--", "model.n_emb=32"])
    assert code == 2 and one_line(err) and "model.n_emb" in err, err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ the preset

def test_scale_tiny_composes_and_passes_the_checks(tmp_path):
    from bench.harness.build import build_game, build_task, compose_config
    from bench.harness.checks import check_config

    cfg = compose_config(["experiment=scale_tiny", f"results_dir={tmp_path}"])
    c, valuers = check_config(cfg)
    assert list(valuers) == ["random", "retrain_shapley", "dpo_arithmetic", "loo", "mc_shapley"]
    assert c["model"]["kind"] == "tiny" and c["n_jobs"] == 2 and c["lds"]["n_subsets"] <= 8
    # what keeps a fine-tune + eval near 1.5 s of one core: small owners, few epochs, ~100 eval pairs
    assert c["train"]["epochs"] <= 3 and max(c["partition"]["sizes"]) <= 10
    assert c["task"]["n_eval_per_source"] * len(c["task"]["sources"]) <= 120
    task = build_task(cfg)
    game, part = build_game(cfg, task)           # runs check_inputs; loads no model
    assert part.n_owners == game.n == 10
    assert part.planted.noisy_owners == [8] and {p.source for p in part.owners[8]} == {"tone"}
    assert part.planted.duplicate_pairs == [[9, 1]]
    assert [p.id for p in part.owners[9]] == [p.id for p in part.owners[1]]
    assert len({src for o in part.owners for src in {p.source for p in o}}) == 4
    # the cost its comment states: 2^10 - 1 coalitions for each of the 2 seeds
    text = (REPO / "conf" / "experiment" / "scale_tiny.yaml").read_text()
    assert 2 * (2 ** game.n - 1) == 2046 and "2,046" in text and "target, not a measurement" in text


# ------------------------------------------------------------------ one real run

def test_real_run_exact_and_sampling(tmp_path):
    results = tmp_path / "results"
    code, out, err = run_cli(["scaling", "--owners", "3", "4", "--exact-max", "3", "--per-owner", "4",
                              "--epochs", "1", "--n-jobs", "1", "--threads", "1", "--min-permutations", "2",
                              "--max-permutations", "3", "--target-se", "1e-6", "--results", str(results),
                              "--", *SMALL])
    assert code == 0, err
    lines = (results / "runs" / "scaling.jsonl").read_text().splitlines()
    rows = {r["n"]: r for r in map(json.loads, lines)}
    assert sorted(rows) == [3, 4] and all(r["experiment"] == "scaling" and r["status"] == "ok"
                                          for r in rows.values())
    three, four = rows[3], rows[4]
    # n = 3: exact retraining, efficient; MC (telescoping marginals) is efficient too
    assert three["reference"] == "exact" and three["fine_tunes_exact"] == 7
    assert sum(three["exact_values"]) == pytest.approx(three["total_gain"], abs=1e-9)
    assert sum(three["mc_values"]) == pytest.approx(three["total_gain"], abs=1e-9)
    assert math.isfinite(three["mc_err_max"]) and three["mc_permutations"] <= 3
    assert three["fine_tunes_arith"] == 3 and three["fine_tunes_mc"] <= 7
    # n = 4 > --exact-max: sampling only, with a finite SE, and the arithmetic compared with it
    assert four["reference"] == "mc" and four["fine_tunes_exact"] is None and "exact_values" not in four
    assert math.isfinite(four["mc_se_max"]) and math.isfinite(four["mc_se_mean"])
    assert four["mc_se_mean"] <= four["mc_se_max"] and len(four["mc_stderr"]) == 4
    assert four["mc_reached_target"] == (four["mc_se_max"] <= 1e-6)   # flat utilities (SE 0) reach it
    assert four["mc_permutations"] == 3 or four["mc_reached_target"]
    assert 1 <= four["fine_tunes_mc"] <= mc_fine_tunes_at_most(4, 3) and four["fine_tunes_arith"] == 4
    assert "spearman" in four["fidelity_arith_vs_mc"] and four["preset"] == "scale_tiny"
    assert np.all(np.isfinite(four["mc_values"]))
    # the table: one row per n, the unreached target marked
    table = [ln.split() for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    assert [int(r[0]) for r in table] == [3, 4]
    assert table[1][1] == "-" and table[1][6] == f"{four['mc_permutations']}{'' if four['mc_reached_target'] else '*'}"
