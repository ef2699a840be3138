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


def weights_to_train(built: dict, games: list) -> dict[str, list[tuple]]:
    """What a served job's valuers must train beyond the shipped table: per valuer (of
    ``built``, ``{name: (valuer, config)}``), the (game, mask) pairs whose weights it loads
    (its ``models_needed``) that are served from the table (a table carries utilities, not
    weights) and whose stages are not on disk. A stage two valuers need is trained once."""
    out = {}
    for name, (valuer, _) in built.items():
        need = getattr(valuer, "models_needed", None)
        if need is None:
            continue
        todo = [(g, m) for g in games for m in need(g.n) if g._served(m) is not None and g.weights_to_train(m)]
        if todo:
            out[name] = todo
    return out


def _stages(todo: dict[str, list[tuple]]) -> dict[tuple, float]:
    """The distinct stages ``todo`` trains ((seed, stage key) -> the shipped train + eval
    seconds of its coalition): a stage two valuers or two twin coalitions need counts once."""
    seen = {}
    for items in todo.values():
        for g, m in items:
            for c in g.chain_masks(m):
                if g.weights_to_train(c):
                    rec = g._served(c) or {}
                    seen[(g.seed, g.key(c))] = float(rec.get("train_s") or 0.0) + float(rec.get("eval_s") or 0.0)
    return seen


def weights_line(todo: dict[str, list[tuple]]) -> str | None:
    """One line naming the fine-tunes a served job trains for its valuers (None: none)."""
    if not todo:
        return None
    parts = []
    for name, items in todo.items():
        n = items[0][0].n
        masks = sorted({m for _, m in items})
        what = ("the grand coalition" if masks == [(1 << n) - 1] else
                f"the {len(masks)} single owners" if all(bin(m).count("1") == 1 for m in masks) else
                f"{len(masks)} coalitions")
        parts.append(f"{name}: {what} × {len({g.seed for g, _ in items})} seeds")
    return (f"[dvbench] not shipped: the weights the valuers load ({'; '.join(parts)}): {len(_stages(todo))} fine-tunes "
            f"to train, metered as each valuer's own (a shipped truth carries utilities, not weights)")


def weights_seconds(todo: dict[str, list[tuple]]) -> tuple[int, float]:
    """(fine-tunes, seconds) of what ``weights_to_train`` found, priced by the shipped
    truth's own train + eval seconds of each coalition (measured where it was computed)."""
    seen = _stages(todo)
    return len(seen), sum(seen.values())
