"""The leaderboard and LDS tables over records whose differences are planted."""
from __future__ import annotations

import numpy as np

from bench.analysis.tables import newest_jobs
from bench.analysis.verdicts import format_lds, format_leaderboard, leaderboard_rows, pair_lds_cell


def rec(valuer, seed, rho, ceiling, job="j1", ts="2026-01-01T00:00:00+00:00", per_pair=None, status="ok"):
    m = {"fidelity": {"spearman": rho}, "noise_ceiling": {"spearman": ceiling},
         "detection_graded": {"kendall_tau": rho}}
    if per_pair is not None:
        m["lds_pair"] = {"per_pair": list(per_pair), "ceiling": 0.5, "lds": float(np.mean(per_pair))}
    return {"experiment": "toy", "game": "union", "valuer": valuer, "seed": seed, "seeds": [0, 1, 2, 3, 4],
            "job": job, "timestamp": ts, "status": status, "metrics": m,
            "cost": {"fine_tunes": 3, "device_s": 1.0}, "config": {}}


def planted(seeds=range(5)):
    """good ~ the ceiling, bad ~ 0.3 lower (both share each seed's ups and downs), random ~ 0."""
    rng = np.random.default_rng(0)
    out = []
    for s in seeds:
        ceiling, shared = 0.8 + rng.normal(0, 0.05), rng.normal(0, 0.05)
        out += [rec("good", s, ceiling + shared, ceiling), rec("bad", s, ceiling - 0.3 + shared, ceiling),
                rec("random", s, rng.normal(0, 0.1), ceiling)]
    return out


def test_leaderboard_marks_the_planted_differences():
    recs = planted()
    from bench.analysis.tables import summarize
    rows = {r["valuer"]: r for r in leaderboard_rows(summarize(recs)[("toy", "union")])}
    assert [r["valuer"] for r in leaderboard_rows(summarize(recs)[("toy", "union")])] == ["good", "bad", "random"]
    assert rows["good"]["best"] and rows["good"]["vs_random"].sign == "+"
    assert rows["bad"]["vs_best"].sign == "−" and rows["bad"]["vs_ceiling"].sign == "−"
    assert rows["good"]["vs_ceiling"].sign == "~", "a valuer at the ceiling is within it"
    assert rows["random"]["vs_random"] is None
    text = format_leaderboard(recs, markdown=True)
    assert "seeds [0, 1, 2, 3, 4]" in text and "good (best)" in text and "+ " in text


def test_only_the_newest_job_is_read():
    old = [rec("good", s, 0.1, 0.9, job="old", ts="2025-01-01T00:00:00+00:00") for s in range(3)]
    new = [rec("good", s, 0.7, 0.9, job="new", ts="2026-01-01T00:00:00+00:00") for s in range(2)]
    legacy = [dict(rec("good", 7, 0.5, 0.9), job=None)]
    kept = newest_jobs(old + new + legacy)
    assert {r["job"] for r in kept} == {"new", None} and len(kept) == 3


def test_pair_lds_cell_averages_seeds_per_pair_then_bootstraps_pairs():
    a, b = np.linspace(-0.2, 0.8, 50), np.linspace(0.0, 1.0, 50)
    cell = pair_lds_cell([rec("logra", 0, 0.5, 0.8, per_pair=a), rec("logra", 1, 0.5, 0.8, per_pair=b)])
    assert cell["lds"] == np.mean((a + b) / 2) and cell["lo"] < cell["lds"] < cell["hi"]
    assert cell["ratio"] == cell["lds"] / 0.5 and cell["n_seeds"] == 2
    assert "logra" in format_lds([rec("logra", 0, 0.5, 0.8, per_pair=a)])
    assert format_lds([rec("loo", 0, 0.5, 0.8)]) == ""


def test_readme_block_is_replaced_between_its_markers_only(tmp_path):
    import pytest

    from bench.analysis.report import README_BEGIN, README_END, update_readme
    from bench.core.errors import ConfigError
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{README_BEGIN}\nstale numbers\n{README_END}\n\ntail\n")
    update_readme(readme, planted())
    text = readme.read_text()
    assert text.startswith("# title\n\n" + README_BEGIN) and text.endswith(README_END + "\n\ntail\n")
    assert "stale numbers" not in text and "good (best)" in text
    update_readme(readme, planted())
    assert readme.read_text() == text, "regenerating is idempotent"
    readme.write_text("no markers")
    with pytest.raises(ConfigError, match="--readme"):
        update_readme(readme, planted())
