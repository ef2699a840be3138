"""The bad-input catalogue: each case, run through the command line, exits non-zero
with exactly one ``error:`` line naming the field and the fix, and writes no record.

``python tests/test_bad_inputs.py --markdown`` prints the README's catalogue table
from these same cases (case → message → exit code).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

try:
    from conftest import REPO, subprocess_env
except ImportError:            # run as a script for --markdown
    REPO = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import subprocess_env

SMALL = ["experiment=smoke", "task.n_train_per_source=10", "task.n_eval_per_source=8", "partition.sizes=[8,5,5]",
         "logger=none", "progress=false"]
ROW = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}


def _files(tmp: Path) -> dict[str, Path]:
    """Bad dataset files for the local_pref cases."""
    def jsonl(name, rows):
        p = tmp / name
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return p
    out = {"empty": tmp / "empty.jsonl", "nocol": jsonl("nocol.jsonl", [{"prompt": "a", "chosen": "b"}] * 4),
           "blank": jsonl("blank.jsonl", [ROW] * 3 + [{**ROW, "chosen": "  "}]),
           "long": jsonl("long.jsonl", [ROW] * 3 + [{**ROW, "prompt": "x" * 5000}]),
           "dupid": jsonl("dupid.jsonl", [{**ROW, "id": i % 3} for i in range(6)]),
           "latin1": tmp / "latin1.jsonl"}
    out["empty"].write_text("")
    out["latin1"].write_bytes(json.dumps(ROW).replace("hi", "h\\u00e9").encode() + b'\n{"prompt": "caf\xe9"}\n')
    return out


def local(f: str) -> list[str]:
    return ["task=local_pref", f"task.path={{{f}}}", "task.eval_fraction=0.25"]


# id: (extra command-line arguments, text the one error line must contain, exit code)
CASES = {
    "unknown model": (["model=nope"], "model=nope: no such config", 2),
    "unknown task": (["task=nope"], "task=nope: no such config", 2),
    "unknown partition": (["partition=nope"], "partition=nope: no such config", 2),
    "unknown experiment": (["experiment=nope"], "experiment=nope: no such config", 2),
    "unknown valuer": (["valuers=[nope]"], "valuers: unknown ['nope']", 2),
    "unknown game": (["game.kind=nope"], "game.kind: unknown 'nope'", 2),
    "unknown metric": (["game.metric=nope"], "game.metric: unknown 'nope'", 2),
    "selection valuer not run (conflict)": (["valuers=[loo]", "selection.valuers=[shed]"],
                                            "selection.valuers: ['shed'] are not in valuers", 2),
    "more owners than examples": (["partition=iid", "partition.n_owners=100000"], "n_owners", 2),
    "an owner with no examples": (["partition.sizes=[0,5,5]"], "owner 0", 2),
    "zero fine-tune budget": (["budget.max_fine_tunes=0"], "budget.max_fine_tunes: 0", 2),
    "negative time budget": (["budget.max_seconds=-5"], "budget.max_seconds: -5", 2),
    "LDS with too few subsets": (["lds.n_subsets=2"], "lds: n_subsets=2", 2),
    "malformed shard": (["game.shard=4/4"], "game.shard: '4/4' needs 0 <= i < k", 2),
    "unknown W&B mode": (["logger=wandb", "logger.mode=bogus"], "logger.mode: unknown 'bogus'", 2),
    "SHED with more clusters than examples": (["valuers=[shed]", "+valuer_args.shed.n_clusters=500"],
                                              "n_clusters", 2),
    "empty dataset file": (local("empty"), "is empty", 2),
    "dataset without a column": (local("nocol"), "missing column(s) ['rejected']", 2),
    "empty string in a row": (local("blank"), "row 3 has an empty 'chosen'", 2),
    "over-long prompt": (local("long"), "prompt of 5000 characters", 2),
    "duplicate ids": (local("dupid"), "duplicate id 0", 2),
    "non-UTF-8 file": (local("latin1"), "is not UTF-8 (byte 0xe9", 2),
    "missing dataset file": (["task=local_pref", "task.path=/nonexistent/x.jsonl"], "not found", 2),
    "hub dataset without opt-in": (["task=local_pref", "task.path=org/some-dataset"], "task.online=true", 2),
    "results folder under a file": (["results_dir={afile}/r"], "results_dir", 2),
}


def run_case(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    files = {k: str(v) for k, v in _files(tmp).items()}
    (tmp / "afile").write_text("x")
    files["afile"] = str(tmp / "afile")
    argv = [a.format(**files) for a in SMALL + args]
    if not any(a.startswith("results_dir=") for a in argv):
        argv.append(f"results_dir={tmp}/results")
    return subprocess.run([sys.executable, "-m", "bench", *argv], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tmp_path):
    args, expect, code = CASES[case]
    out = run_case(args, tmp_path)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert out.returncode == code, out.stderr[-2000:]
    assert len(errors) == 1 and expect in errors[0], out.stderr[-2000:]
    assert not list(tmp_path.glob("results/runs/*.jsonl")), "nothing written"
    assert not list(tmp_path.rglob("*.tmp")), "no stray temporary files"


def markdown() -> str:
    import tempfile
    lines = ["| case | message | exit |", "|---|---|---|"]
    for case, (args, _, _) in CASES.items():
        with tempfile.TemporaryDirectory() as d:
            out = run_case(args, Path(d))
        msg = next((ln for ln in out.stderr.splitlines() if ln.startswith("error:")), "(none)")
        msg = msg.replace(d, "<tmp>").replace("|", "\\|")
        lines.append(f"| {case} | `{msg}` | {out.returncode} |")
    return "\n".join(lines)


if __name__ == "__main__" and "--markdown" in sys.argv:
    print(markdown())
