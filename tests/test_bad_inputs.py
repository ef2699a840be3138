"""The bad-input catalogue: each case, run through the command line (in-process,
``conftest.run_cli``), exits 2 with exactly one ``error:`` line naming the field and
the fix, writes nothing under results_dir and leaves no temporary file.

``python tests/test_bad_inputs.py --markdown`` prints docs/bad-inputs.md's catalogue table
from these same cases (case → message → exit code).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

try:
    from conftest import run_cli
except ImportError:            # run as a script for --markdown
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import run_cli

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
           "number": jsonl("number.jsonl", [ROW] * 2 + [{**ROW, "chosen": 5}] + [ROW]),
           "listed": jsonl("listed.jsonl", [ROW, {**ROW, "prompt": ["a", "b"]}] + [ROW] * 2),
           "null": jsonl("null.jsonl", [{**ROW, "rejected": None}] + [ROW] * 3),
           "degenerate": jsonl("degenerate.jsonl", [{**ROW, "rejected": " " + ROW["chosen"]}] * 4),
           "latin1": tmp / "latin1.jsonl",
           # task=hh_rlhf: rows that are not HH dialogues, and dialogues whose prefixes never match
           "hh_plain": jsonl("hh_plain.jsonl", [{"chosen": "Sure.", "rejected": "No."}] * 4),
           "hh_mismatch": jsonl("hh_mismatch.jsonl", [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: yes",
                                                       "rejected": "\n\nHuman: other\n\nAssistant: no"}
                                                      for i in range(4)])}
    out["empty"].write_text("")
    out["latin1"].write_bytes(json.dumps(ROW).replace("hi", "h\\u00e9").encode() + b'\n{"prompt": "caf\xe9"}\n')
    return out


def local(f: str) -> list[str]:
    return ["task=local_pref", f"task.path={{{f}}}", "task.eval_fraction=0.25"]


ONE_SOURCE = ["task.sources=[tone]", "partition.owner_sources=[tone,tone]", "partition.sizes=[5,5]",
              "partition.noisy_owners=[1]"]

# id: (extra command-line arguments, text the one error line must contain, exit code)
CASES = {
    "unknown model": (["model=nope"], "model=nope: no such config", 2),
    "unknown task": (["task=nope"], "task=nope: no such config", 2),
    "unknown partition": (["partition=nope"], "partition=nope: no such config", 2),
    "unknown experiment": (["experiment=nope"], "experiment=nope: no such config", 2),
    "unknown launcher": (["hydra/launcher=nope"], "hydra/launcher=nope: no such config; choose one of", 2),
    "unknown valuer": (["valuer=[nope]"], "valuer=nope: no such config", 2),
    "no valuer (only the baselines would run)": (["valuer=[]"], "valuer: none selected, so only the baselines", 2),
    "a valuer listed twice": (["valuer=[loo,shed,loo]"], "valuer: ['loo'] listed twice", 2),
    "unknown game": (["game.kind=nope"], "game.kind: unknown 'nope'", 2),
    "unknown metric": (["game.metric=nope"], "game.metric: unknown 'nope'", 2),
    "selection valuer not run (conflict)": (["valuer=[loo]", "selection.valuers=[shed]"],
                                            "selection.valuers: ['shed'] are not selected", 2),
    "unknown selection method": (["selection.methods=[bogus]"], "selection.methods[0]: unknown 'bogus'", 2),
    "selection seed listed twice (CI understated)": (["valuer=[shed]", "selection.valuers=[shed]",
                                                      "selection.seeds=[0,1,1]"], "selection.seeds: 1 listed twice", 2),
    "selection size beyond the training set": (["valuer=[shed]", "selection.valuers=[shed]", "selection.sizes=[50]"],
                                               "selection.sizes[0]: count 50 must be in [1, 18]", 2),
    "more owners than examples": (["partition=iid", "partition.n_owners=100000"], "n_owners", 2),
    "an owner with no examples": (["partition.sizes=[0,5,5]"], "owner 0", 2),
    "every owner noisy (detection has no clean class)": (["partition.noisy_owners=[0,1,2]"],
                                                         "partition.noisy_owners: every owner", 2),
    "a noisy owner with nothing corrupted": (["partition.flip_frac=0"], "flip_frac=0 and garble_frac=0 corrupt "
                                                                          "nothing", 2),
    "a noisy owner listed twice": (["partition.noisy_owners=[2,2]"], "owner(s) [2] listed twice", 2),
    "zero fine-tune budget": (["budget.max_fine_tunes=0"], "budget.max_fine_tunes: 0", 2),
    "negative time budget": (["budget.max_seconds=-5"], "budget.max_seconds: -5", 2),
    "LDS with too few subsets": (["lds.n_subsets=2"], "lds.n_subsets: 2 subsets give no rank correlation", 2),
    "LDS subsets of no example": (["lds.frac=0.01"], "lds.frac: 0.01 of the 18 training examples gives subsets "
                                                     "of 0", 2),
    "an eval set of one pair": (["task.n_eval_per_source=1", *ONE_SOURCE],
                                "task.n_eval_per_source: the eval set has 1 usable pair", 2),
    "one training seed (no reference, no ceiling)": (["seeds=[0]"], "seeds: [0]: a valuation is scored against "
                                                                    "the exact values of the other seeds", 2),
    "a training seed listed twice": (["seeds=[0,0]"], "seeds: [0] listed twice", 2),
    "LDS targets under the valuation seeds": (["lds.seeds=[1,7]"], "lds.seeds: [1] are also valuation seeds", 2),
    "LDS under one seed": (["lds.seeds=[100]"], "lds.seeds: [100]: the LDS ceiling needs", 2),
    "the LDS seed count of older versions": (["lds.n_seeds=2"], "lds.n_seeds: replaced by lds.seeds", 2),
    "the single seed of older versions": (["seed=1"], "seed: replaced by seeds", 2),
    "malformed shard": (["game.shard=4/4"], "game.shard: '4/4' needs 0 <= i < k", 2),
    "a truth folder that is not one": (["truth=results/nope"], "truth: 'results/nope' is neither auto, off nor a "
                                                               "folder", 2),
    "pack below 1": (["game.pack=0"], "game.pack: 0; use a value >= 1", 2),
    "a GPU on a CPU build of torch": (["game.device=cuda"], "game.device: 'cuda' but this torch", 2),
    "pack above the coalitions": (["game.pack=8", "train.lora_r=8"], "game.pack: 8 is more than the 7 coalitions", 2),
    "pack with a full fine-tune": (["game.pack=2"], "game.pack: 2 packs LoRA adapters on one base, and train.lora_r "
                                                    "is null", 2),
    "pack in the sequential game": (["game.pack=2", "train.lora_r=8", "game=sequential"],
                                    "the sequential game starts each stage from its own prefix model", 2),
    "unknown device": (["game.device=tpu"], "game.device: unknown 'tpu'; use auto, cpu, cuda or cuda:N", 2),
    "unknown W&B mode": (["logger=wandb", "logger.mode=bogus"], "logger.mode: unknown 'bogus'", 2),
    "SHED with more clusters than examples": (["valuer=[shed]", "valuer.shed.n_clusters=500"],
                                              "valuer.shed.n_clusters: 500 exceeds the 18 training", 2),
    "SHED with more clusters than distinct examples": (["valuer=[shed]", "partition.duplicate_pairs=[[3,0]]",
                                                        "valuer.shed.n_clusters=20"],
                                                       "valuer.shed.n_clusters: 20 exceeds the 18 distinct", 2),
    "a valuer setting out of range": (["valuer=[shed]", "valuer.shed.n_clusters=0"],
                                      "valuer.shed.n_clusters: 0; use a value >= 1", 2),
    "an unknown valuer setting": (["valuer=[point_mc_shapley]", "valuer.point_mc_shapley.permutations=3"],
                                  "valuer.point_mc_shapley.permutations: no such setting", 2),
    "a valuer setting of the wrong type": (["valuer=[dpo_arithmetic_gen]",
                                            "valuer.dpo_arithmetic_gen.top_p=high"],
                                           "valuer.dpo_arithmetic_gen.top_p: 'high' is not a number", 2),
    "an option of a valuer not selected": (["valuer=[loo]", "valuer.shed.n_clusters=5"], "valuer.shed: no such setting", 2),
    # Hydra's own errors, as one line
    "wrong type (lds.seed)": (["lds.seed=abc"], "lds.seed: 'abc' is not an integer", 2),
    "wrong type (n_jobs)": (["n_jobs=x"], "n_jobs: 'x' is not an integer", 2),
    "wrong type in a node (train.lr)": (["train.lr=fast"], "train.lr: 'fast' is not a number", 2),
    "a node set to a value": (["budget=3"], "budget: 3 is not a mapping", 2),
    "override of a missing key": (["train.nope=1"], "train.nope: no such setting; choose from ['batch_size'", 2),
    "+ on an existing key": (["+n_jobs=1"], "n_jobs: already in the config, so +n_jobs cannot add it; drop the +", 2),
    "an unknown key added with +": (["+train.nope=1"], "train.nope: unknown setting; choose from", 2),
    "an unknown top-level key added with +": (["+seeed=1"], "seeed: unknown setting; choose from", 2),
    "deleting a key the job needs": (["~seeds"], "seeds: missing (was it deleted with ~seeds?)", 2),
    "deleting a key that does not exist": (["~nope"], "nope: not in the config, so ~nope has nothing to delete", 2),
    "malformed override": (["seeds=[1"], "seeds: cannot parse 'seeds=[1'", 2),
    "not an override": (["n_jobs"], "n_jobs: not an override; write key=value", 2),
    "several values without -m": (["n_jobs=1,2"], "n_jobs: '1,2' is several values; add -m to sweep", 2),
    "a sweep whose first value is bad": (["-m", "n_jobs=abc,1"], "n_jobs: 'abc' is not an integer", 2),
    "unresolvable interpolation": (["cache_dir=${nope}"], "cache_dir: cannot resolve", 2),
    "a required value left ???": (["task=local_pref"], "task.path: required, the config leaves it ???", 2),
    "train.max_length beyond the tiny model": (["train.max_length=256"],
                                               "train.max_length: 256 exceeds model.n_positions=128", 2),
    "tiny model width not a multiple of heads": (["model.n_embd=30"], "model.n_embd: 30 is not a multiple", 2),
    "experiment name with a slash": (["experiment_name=a/b"], "experiment_name: 'a/b'", 2),
    # data files
    "empty dataset file": (local("empty"), "is empty", 2),
    "dataset without a column": (local("nocol"), "missing column(s) ['rejected']", 2),
    "empty string in a row": (local("blank"), "row 3 has an empty 'chosen'", 2),
    "a number where a string belongs": (local("number"), "task.path: row 2: 'chosen' is 5 (a number), not a "
                                                         "string", 2),
    "a list where a string belongs": (local("listed"), "task.path: row 1: 'prompt' is [\"a\", \"b\"] (a list)", 2),
    "null where a string belongs": (local("null"), "task.path: row 0: 'rejected' is null, not a string", 2),
    "every row has chosen == rejected": (local("degenerate"), "task.path: all 4 rows have chosen == rejected", 2),
    "over-long prompt": (local("long"), "prompt of 5000 characters", 2),
    "duplicate ids": (local("dupid"), "duplicate id 0", 2),
    "non-UTF-8 file": (local("latin1"), "is not UTF-8 (byte 0xe9", 2),
    "missing dataset file": (["task=local_pref", "task.path=/nonexistent/x.jsonl"], "not found", 2),
    "hub dataset without opt-in": (["task=local_pref", "task.path=org/some-dataset"], "task.online=true", 2),
    "HH-RLHF file not in the dialogue format": (["task=hh_rlhf", "task.path={hh_plain}"],
                                                "task.path: not in the HH dialogue format", 2),
    "HH-RLHF prefix mismatch in every row": (["task=hh_rlhf", "task.path={hh_mismatch}"],
                                             "task.path: every row's chosen and rejected differ before", 2),
    "HH-RLHF subset that does not exist": (["task=hh_rlhf", "task.subset=nope"],
                                           "task.subset: unknown 'nope'; choose one of ['harmless-base'", 2),
    "HH-RLHF subset not embedded (offline)": (["task=hh_rlhf", "task.subset=helpful-base"],
                                              "task.subset: 'helpful-base' is not embedded", 2),
    "HH-RLHF file not the pinned one": (["task=hh_rlhf", "task.path={hh_plain}", f"task.sha256={'0' * 64}"],
                                        "task.sha256: ", 2),
    "results folder under a file": (["results_dir={afile}/r"], "results_dir", 2),
    "cache folder that is a file": (["cache_dir={afile}"], "cache_dir: ", 2),
    # (the check loads the base, which the shared cache keeps: a cache outside results_dir here)
    "max_length that leaves no response token": (["train.max_length=3", "cache_dir={afile}_cache"],
                                                 "train.max_length: 3 tokens leave no response token", 2),
    "cache folder under a file": (["cache_dir={afile}/cache"], "is a file, not a folder", 2),
}


def run_case(args: list[str], tmp: Path) -> tuple[int, str, str]:
    files = {k: str(v) for k, v in _files(tmp).items()}
    (tmp / "afile").write_text("x")
    files["afile"] = str(tmp / "afile")
    argv = [a.format(**files) if "{" in a and "${" not in a else a for a in SMALL + args]
    if not any(a.startswith("results_dir=") for a in argv):
        argv.append(f"results_dir={tmp}/results")
    argv += [f"hydra.run.dir={tmp}/hydra", f"hydra.sweep.dir={tmp}/hydra"]   # Hydra's own folder, not the repo's
    return run_cli(argv)


def _written(tmp: Path) -> list[Path]:
    return [p for p in (tmp / "results").rglob("*") if p.is_file()]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tmp_path):
    args, expect, code = CASES[case]
    rc, out, err = run_case(args, tmp_path)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == code, err[-2000:]
    assert len(errors) == 1 and expect in errors[0], (errors, err[-2000:])
    assert not _written(tmp_path), "nothing written under results_dir"
    stray = [p for p in tmp_path.rglob("*") if ".tmp" in p.name or p.name.startswith(".probe-")]
    assert not stray, f"no stray temporary files: {stray}"


def test_config_errors_come_before_hydra_writes_anything(tmp_path):
    """A setting refused from the config alone stops before Hydra makes its run folder."""
    for args in (["seed=abc"], ["train.nope=1"], ["valuer=[]"], ["valuer.shed.n_clusters=0"]):
        rc, _, _ = run_case(args, tmp_path)
        assert rc == 2 and not (tmp_path / "hydra").exists(), args


def markdown() -> str:
    import tempfile
    lines = ["| case | message | exit |", "|---|---|---|"]
    for case, (args, _, _) in CASES.items():
        with tempfile.TemporaryDirectory() as d:
            rc, _, err = run_case(args, Path(d))
        msg = next((ln for ln in err.splitlines() if ln.startswith("error:")), "(none)")
        msg = msg.replace(d, "<tmp>").replace("|", "\\|")
        lines.append(f"| {case} | `{msg}` | {rc} |")
    return "\n".join(lines)


if __name__ == "__main__" and "--markdown" in sys.argv:
    print(markdown())
