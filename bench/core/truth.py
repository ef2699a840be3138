"""Ground truth that ships: a game's retrained utilities as plain files in git.

The exact retraining Shapley of an n-owner game costs 2^n fine-tunes per seed; the
LDS targets another fine-tune per subset and seed. Once computed, they are a fact of
the game, not of the machine: ``python -m bench truth export <overrides>`` writes them
to ``results/published/truth/<experiment>/`` and a job on any machine scores a new
valuer against them, training only what that valuer itself asks for.

    results/published/truth/<experiment>/
      manifest.json          what the game is, how it was computed, the canaries, the files
      utilities-<sha>.csv    one row per coalition (seed, mask) or LDS subset (seed, its key): every
                             metric of ``train.METRICS``, the training-set size, train and eval seconds
      eval_logps-<sha>.npz   the rows' log-probs of every eval pair (chosen, rejected; float64) and
                             the base's: the per-pair margins LDS and the valuers read (no pickle)

The data files are named by their content's SHA-256 and the manifest, written last,
names them: a re-export (another shard's rows) writes the new files, then the
manifest, then deletes the old files, so a crash at any point leaves a manifest whose
files are all there.

The manifest separates

- ``definition``: what decides each utility: the task's data, the eval pairs, the
  base model's weights, the trainer settings (precision included), the game kind,
  the owners' data (``Game.definition``). A job whose game differs is not served:
  ``truth=auto`` says so in one line and retrains; a ``truth=<folder>`` named on the
  command line refuses to run. Seeds and LDS subsets are rows, not definition: a job
  with another seed trains that seed's coalitions and may export them into the table.
- ``drift``: how they were computed: the utility path's code version and the
  libraries (``game.code_version``, ``game.library_versions``), the commit, the device
  and CPU. A difference is printed in one warning line naming it and written into every
  record scored against the table (``truth.drift``).

``canaries`` are a few single-owner coalitions of the first seed (the cheapest
fine-tunes): ``python -m bench truth canary <overrides>`` retrains them with the code
and libraries of this machine and checks each metric against the shipped value within
``CANARY_SIGMAS`` seed-to-seed standard deviations of that coalition (floored at
``CANARY_FLOOR`` of the table's spread, and for an accuracy at one eval pair), so a change of code, library or hardware that
moves the utilities is caught in seconds without retraining the game.

A sharded ground truth (``game.shard=i/k``) ships shard by shard: export after each,
commit, and the next session's shards are served what is already shipped
(docs/cluster-gpu.md, "A ground truth across sessions").
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.core.cache import atomic_write_bytes
from bench.core.errors import ConfigError
from bench.core.game import Game, Subset, code_version, library_versions
from bench.core.shapley import members
from bench.core.train import METRICS

FORMAT = "dvbench-truth/1"
MANIFEST = "manifest.json"
ROLES = {"table": ("utilities", "csv"), "logps": ("eval_logps", "npz")}     # role -> (stem, suffix)
COLUMNS = ("key", "kind", "seed", "mask", "members", "n_train", *METRICS, "train_s", "eval_s")
N_CANARIES = 3
CANARY_SIGMAS = 3.0
CANARY_FLOOR = 0.01     # of the metric's standard deviation over the whole table
ACCURACIES = ("pref_acc", "reward_acc")      # and at least one eval pair for these


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------ reading

@dataclass
class Truth:
    """A shipped ground truth, loaded: ``get(definition_key)`` is the utility record the
    game would have cached (metrics, eval log-probs, sizes, timings), marked ``shipped``."""
    folder: Path
    manifest: dict
    records: dict = field(repr=False)           # definition key -> record

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    @property
    def manifest_sha256(self) -> str:
        return sha256(self.folder / MANIFEST)

    def counts(self) -> dict:
        return self.manifest["contents"]

    def summary(self, drift: dict | None = None) -> dict:
        """What a record says about the ground truth it was scored against."""
        return {"folder": str(self.folder), "manifest_sha256": self.manifest_sha256,
                "commit": self.manifest["drift"].get("commit"), "drift": drift or {}}


def load(folder: str | Path) -> Truth:
    """Read and verify a truth folder: the manifest's format, every file's SHA-256, the
    table's columns; each problem is one ``ConfigError`` line naming the file."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise ConfigError(f"truth: no {MANIFEST} in {folder}; name a folder `python -m bench truth export` wrote, "
                          f"or set truth=off to retrain the ground truth")
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError as e:
        raise ConfigError(f"truth: {mpath} is not JSON ({e}); restore it with `git checkout -- {mpath}`") from None
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"truth: {mpath} has format {manifest.get('format')!r}, this code reads {FORMAT!r}; "
                          f"export it again with `python -m bench truth export`")
    paths = {}
    for role, meta in manifest["files"].items():
        path = paths[role] = folder / meta["name"]
        if not path.is_file():
            raise ConfigError(f"truth: {path} is missing; restore it with `git checkout -- {path}`")
        if sha256(path) != meta["sha256"]:
            raise ConfigError(f"truth: {path} does not match its SHA-256 in {mpath} (edited or damaged); restore "
                              f"it with `git checkout -- {path}` or export the truth again")
    with open(paths["table"], newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and tuple(rows[0]) != COLUMNS:
        raise ConfigError(f"truth: {paths['table']} has columns {list(rows[0])}, expected {list(COLUMNS)}")
    with np.load(paths["logps"], allow_pickle=False) as z:
        chosen, rejected = z["chosen"], z["rejected"]
    if len(chosen) != len(rows):
        raise ConfigError(f"truth: {paths['logps']} has {len(chosen)} rows, {paths['table']} {len(rows)}; "
                          f"export the truth again")
    device, precision = manifest["drift"].get("device"), manifest["definition"]["game_key"]["train"].get("precision")
    records = {}
    for i, r in enumerate(rows):
        seed = int(r["seed"])
        info = {"subset": True} if r["kind"] == "subset" else \
            {"mask": int(r["mask"]), "members": [int(x) for x in r["members"].split()]}
        records[r["key"]] = {**info, "game": manifest["definition"]["game_key"]["game"], "seed": seed,
                             "metrics": {m: float(r[m]) for m in METRICS},
                             "logp_chosen": chosen[i].tolist(), "logp_rejected": rejected[i].tolist(),
                             "n_train": int(r["n_train"]), "train_s": float(r["train_s"]),
                             "eval_s": float(r["eval_s"]), "stats": {}, "peak_rss": 0, "device": device,
                             "precision": precision, "peak_gpu_mem": None, "shipped": True}
    return Truth(folder, manifest, records)


def _first_difference(shipped, now, path: str) -> tuple[str, object, object] | None:
    if isinstance(shipped, dict) and isinstance(now, dict):
        for k in sorted(set(shipped) | set(now)):
            d = _first_difference(shipped.get(k), now.get(k), f"{path}.{k}" if path else k)
            if d:
                return d
        return None
    return None if shipped == now else (path, shipped, now)


# where each definition field comes from in the config, for the refusal line
_FIELD_NAMES = {"task": "the task's data (task.*)", "eval": "the eval pairs (task.*)",
                "owners": "the owners' data (partition.*)", "game": "game.kind"}


def mismatch(truth: Truth, game: Game) -> str | None:
    """The first field in which the game differs from the shipped one, as a phrase; None
    when the game is the shipped one."""
    d = _first_difference(truth.manifest["definition"]["game_key"], game.definition(), "")
    if d is None:
        return None
    path, old, new = d
    top = path.split(".")[0]
    if top in ("train", "model"):
        return f"{path}={json.dumps(old)} (this job: {json.dumps(new)})"
    return f"{_FIELD_NAMES.get(top, path)} (shipped {str(old)[:40]}, this job {str(new)[:40]})"


def drift_of(truth: Truth, game: Game, hardware: str | None = None) -> dict:
    """How this machine's utility path differs from the one that computed the table:
    ``{"code": [shipped, now], "libraries": {name: [shipped, now]}, "device": [...]}``
    (only what differs; ``{}`` when nothing does)."""
    d = truth.manifest["drift"]
    out = {}
    if d.get("code") != code_version():
        out["code"] = [d.get("code"), code_version()]
    here = library_versions()
    libs = {k: [v, here.get(k)] for k, v in d.get("libraries", {}).items() if here.get(k) != v}
    if libs:
        out["libraries"] = libs
    if d.get("device") != game.device_kind:
        out["device"] = [d.get("device"), game.device_kind]
    if hardware is not None and d.get("cpu") not in (None, hardware):
        out["cpu"] = [d.get("cpu"), hardware]
    return out


def drift_line(truth: Truth, drift: dict) -> str | None:
    if not drift:
        return None
    parts = []
    if "code" in drift:
        parts.append(f"the utility path's code ({drift['code'][0]} at commit {truth.manifest['drift'].get('commit')}"
                     f" → {drift['code'][1]} here)")
    for k, (a, b) in drift.get("libraries", {}).items():
        parts.append(f"{k} {a} → {b}")
    for k in ("device", "cpu"):
        if k in drift:
            parts.append(f"{k} {drift[k][0]} → {drift[k][1]}")
    return (f"[dvbench] warning: the shipped ground truth was computed differently: {'; '.join(parts)}; scoring "
            f"against it anyway (recorded in every record's truth.drift); check it still holds with "
            f"`python -m bench truth canary <same overrides>`")


# ------------------------------------------------------------------ writing

def _row(game: Game, item, rec: dict, kind: str) -> dict:
    mask = item if kind == "coalition" else ""
    return {"key": game.definition_key(item), "kind": kind, "seed": game.seed, "mask": mask,
            "members": " ".join(map(str, members(item, game.n))) if kind == "coalition" else "",
            "n_train": int(rec["n_train"]), **{m: repr(float(rec["metrics"][m])) for m in METRICS},
            "train_s": f"{float(rec.get('train_s', 0)):.3f}", "eval_s": f"{float(rec.get('eval_s', 0)):.3f}"}


def _noise(rows: list[dict], seeds: list[int], mask: int) -> dict:
    """Seed-to-seed standard deviation of one coalition's metrics over the shipped seeds."""
    got = [r for r in rows if r["kind"] == "coalition" and r["mask"] == mask]
    return {m: float(np.std([float(r[m]) for r in got], ddof=1)) if len(got) >= 2 else None for m in METRICS}


def canaries_of(rows: list[dict], seeds: list[int], n: int) -> list[dict]:
    """The cheapest coalitions of the first seed that has all its singletons: single
    owners with the fewest training pairs, with their seed-to-seed noise."""
    first = [r for r in rows if r["kind"] == "coalition" and r["seed"] == seeds[0] and len(r["members"].split()) == 1]
    first.sort(key=lambda r: (r["n_train"], r["mask"]))
    return [{"seed": r["seed"], "mask": r["mask"], "n_train": r["n_train"], "noise": _noise(rows, seeds, r["mask"])}
            for r in first[:n]]


def export(games: list[Game], subsets: list[tuple[Game, Subset]], dest: str | Path, experiment: str,
           provenance: dict, lds: dict, extra: list[tuple[Game, int]] = ()) -> dict:
    """Write what ``games`` (one per seed) and ``subsets`` (LDS subsets, each with its game)
    have computed — in the cache or an already loaded truth — to ``dest`` (each file
    atomically, the manifest last), and the coalitions of ``extra`` (other seeds' games:
    the LDS seeds' base scores). Returns the manifest."""
    game0 = games[0]
    for g in games[1:]:
        if g.definition() != game0.definition():
            raise ConfigError("truth export: the seeds' games differ in definition; export one game")
    rows, chosen, rejected = [], [], []
    items = [(g, m, "coalition") for g in games for m in range(2 ** g.n)] + \
        [(g, m, "coalition") for g, m in extra] + [(g, s, "subset") for g, s in subsets]
    for g, item, kind in items:
        rec = g._lookup(item)
        if rec is not None:
            rows.append(_row(g, item, rec, kind))
            chosen.append(rec["logp_chosen"]), rejected.append(rec["logp_rejected"])
    if not rows:
        raise ConfigError(f"truth export: no utility of {experiment} is cached in {game0.cache_dir}; run the job (or "
                          f"its shards) first, with the same overrides and cache_dir")
    base = game0._lookup(0)                  # v(∅)'s record: the base's log-probs
    base_lc, base_lr = (base["logp_chosen"], base["logp_rejected"]) if base else ([], [])
    seeds = sorted({g.seed for g in games})
    coalitions = {str(s): sum(r["kind"] == "coalition" and r["seed"] == s for r in rows) for s in seeds}
    lds_seeds = sorted({g.seed for g, _ in subsets})
    n_subsets = {str(s): sum(r["kind"] == "subset" and r["seed"] == s for r in rows) for s in lds_seeds}
    per_seed = 2 ** game0.n
    manifest = {
        "format": FORMAT, "experiment": experiment,
        "definition": {"game_key": game0.definition(), "seeds": seeds, "lds": lds, "metrics": list(METRICS),
                       "n_owners": game0.n, "owner_sizes": game0.owner_sizes, "n_eval": len(game0.eval)},
        "drift": {"code": game0._static["code"], "libraries": provenance.get("libraries") or library_versions(),
                  "commit": provenance.get("commit"), "dirty": provenance.get("dirty"),
                  "device": game0.device_kind, "cpu": provenance.get("cpu")},
        "contents": {"coalitions": coalitions, "coalitions_per_seed": per_seed, "lds_subsets": n_subsets,
                     "lds_subsets_per_seed": len({s for _, s in subsets}) if subsets else 0,
                     "complete": all(v == per_seed for v in coalitions.values())},
        "canaries": canaries_of(rows, seeds, N_CANARIES),
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, chosen=np.asarray(chosen, np.float64), rejected=np.asarray(rejected, np.float64),
                        base_chosen=np.asarray(base_lc, np.float64), base_rejected=np.asarray(base_lr, np.float64))
    table = io.StringIO()
    w = csv.DictWriter(table, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    data = {"table": table.getvalue().encode(), "logps": buf.getvalue()}
    manifest["files"] = {}
    for role, blob in data.items():
        digest = hashlib.sha256(blob).hexdigest()
        stem, suffix = ROLES[role]
        manifest["files"][role] = {"name": f"{stem}-{digest[:16]}.{suffix}", "sha256": digest, "bytes": len(blob)}
    dest = Path(dest)
    old = _names(dest)
    for role, blob in data.items():            # the data first, under new names; the manifest names them last
        atomic_write_bytes(dest / manifest["files"][role]["name"], blob)
    atomic_write_bytes(dest / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    for name in old - _names(dest):            # the previous export's files, no longer named
        (dest / name).unlink(missing_ok=True)
    return manifest


def _names(folder: Path) -> set[str]:
    """The data files the folder's manifest names (none when there is none)."""
    try:
        return {m["name"] for m in json.loads((folder / MANIFEST).read_text())["files"].values()}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


# ------------------------------------------------------------------ canaries

def spread(truth: Truth, metric: str) -> float:
    vals = [r["metrics"][metric] for r in truth.records.values() if "mask" in r]
    return float(np.std(vals)) if len(vals) > 1 else 0.0


def canary_rows(truth: Truth, games: dict[int, Game]) -> list[dict]:
    """Retrain each canary with this machine's code (the game's own cache, never the
    shipped table) and compare every metric: one row per (canary, metric) with the shipped
    value, the new one, the tolerance and ``ok``."""
    out = []
    # an accuracy moves in steps of one eval pair: one pair's flip is never more than noise
    quantum = {m: 1.0 / truth.manifest["definition"]["n_eval"] for m in ACCURACIES}
    for c in truth.manifest["canaries"]:
        g = games[c["seed"]]
        shipped = truth.get(g.definition_key(c["mask"]))
        served, g._shipped = g._shipped, None            # this code's fine-tune, not the table's
        try:
            now = g.record(c["mask"])
        finally:
            g._shipped = served
        for m in METRICS:
            sd = c["noise"].get(m)
            tol = max(CANARY_SIGMAS * (sd or 0.0), CANARY_FLOOR * spread(truth, m), quantum.get(m, 0.0))
            a, b = shipped["metrics"][m], float(now["metrics"][m])
            out.append({"seed": c["seed"], "mask": c["mask"], "metric": m, "shipped": a, "now": b,
                        "diff": b - a, "tolerance": tol, "seed_sd": sd,
                        "ok": bool(math.isfinite(b) and abs(b - a) <= tol + 1e-12)})
    return out
