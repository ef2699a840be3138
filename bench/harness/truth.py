"""A job's ground truth from the shipped tables (``bench.core.truth``), chosen by the
``truth`` setting:

    truth=auto      results/published/truth/<experiment_name>/ when it exists and its game
                    is this job's; when it is another game (an override changed the data,
                    model or trainer), one line says which field, and the job retrains
    truth=off       retrain (or read from the cache) every utility
    truth=<folder>  that folder; a folder whose game is not this job's is refused
"""
from __future__ import annotations

from pathlib import Path

from bench.core import truth as T
from bench.core.errors import ConfigError
from bench.tracking import REPO_DIR

TRUTH_ROOT = REPO_DIR / "results" / "published" / "truth"


def truth_folder(spec: str, experiment: str) -> tuple[Path | None, bool]:
    """(folder, named explicitly) of a ``truth`` setting; (None, False) for off."""
    if spec == "off":
        return None, False
    if spec == "auto":
        return TRUTH_ROOT / experiment, False
    return Path(spec), True


def attach_truth(spec: str, experiment: str, games: list, cpu: str | None = None) -> dict | None:
    """Serve ``games`` (every game of the job: seeds and LDS seeds) from the shipped ground
    truth the setting names; prints what it serves (or why not) and any drift in one line
    each. Returns what each record stores under ``truth`` (None when nothing is served)."""
    folder, explicit = truth_folder(str(spec), experiment)
    if folder is None or (not explicit and not (folder / T.MANIFEST).is_file()):
        return None
    truth = T.load(folder)
    why = T.mismatch(truth, games[0])
    if why:
        if explicit:
            raise ConfigError(f"truth: {folder} holds another game than this job's: {why}; drop the override, or "
                              f"set truth=off to retrain the ground truth")
        print(f"[dvbench] the shipped ground truth in {_rel(folder)} is another game ({why}): retraining "
              f"(truth=off says so without this line)")
        return None
    drift = T.drift_of(truth, games[0], cpu)
    for g in games:
        g._shipped = truth
    print(served_line(truth, games), flush=True)
    line = T.drift_line(truth, drift)
    if line:
        print(line, flush=True)
    return {**truth.summary(drift), "folder": _rel(truth.folder)}      # relative to the repository when inside it


def served_line(truth, games: list) -> str:
    c = truth.counts()
    shipped = sum(c["coalitions"].values())
    lds = sum(c["lds_subsets"].values())
    seeds = sorted(int(s) for s in c["coalitions"])
    asked = sorted({g.seed for g in games})
    return (f"[dvbench] ground truth: shipped in {_rel(truth.folder)} ({shipped} coalition utilities of seeds "
            f"{seeds}, {lds} LDS subsets; computed at commit {str(truth.manifest['drift'].get('commit'))[:12]}): "
            f"of the job's fine-tunes of seeds {asked} only what is not shipped is trained")


def _rel(folder: Path) -> str:
    try:
        return str(Path(folder).resolve().relative_to(REPO_DIR))
    except ValueError:
        return str(folder)


def check_truth_setting(spec, experiment: str) -> None:
    """The setting alone, before any work: off, auto, or an existing folder."""
    folder, explicit = truth_folder(str(spec), experiment)
    if explicit and not (folder / T.MANIFEST).is_file():
        raise ConfigError(f"truth: {spec!r} is neither auto, off nor a folder with a {T.MANIFEST}; use truth=auto "
                          f"(the shipped one of this experiment, if any), truth=off, or a folder that "
                          f"'python -m bench truth export' wrote")
