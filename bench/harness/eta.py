"""What a job will train and how long it will take, said before its first fine-tune.

``plan_of`` counts, from the config and the cache, the fine-tunes of the two phases every
job has: the exact ground truth (every coalition under every seed; the empty coalition
is the base model, scored but not trained) and the LDS subsets (``lds.n_subsets`` under
each of ``lds.seeds``), and how many of each are cached already. ``warm_up`` trains the
second batch of the ground truth (``game.pack`` × ``n_jobs`` coalitions, which the job
needs anyway; the first is an untimed burn-in) and times it: that is the seconds per fine-tune on this machine, in this
job's setting (packing, workers, precision). What a process does once (loading the base,
preparing the training pool, scoring the base) is done before the clock starts; with
``n_jobs > 1`` the workers' start-up is inside the warm-up, so the estimate errs high. The estimate is

    fresh fine-tunes × seconds per fine-tune  +  the valuers' time

where the valuers' time (gradients, embeddings, generation, solves, and fine-tunes a
valuer asks for beyond the two phases, e.g. SHED's proxy sets) is read from the latest
earlier job of this experiment on this hardware in the results store or the published
records (each record's ``cost.wall_s``), or said to be unknown. It assumes that job's
cache state; not counted: selection curves. The closing line compares.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from bench.core.game import Subset
from bench.core.lds import lds_subsets


@dataclass(frozen=True)
class Plan:
    truth: int              # ground-truth fine-tunes (coalitions but the empty one, × seeds)
    truth_cached: int
    lds: int                # LDS subset fine-tunes (subsets × lds.seeds)
    lds_cached: int
    sizes: tuple = ()       # training pairs of each fine-tune still to train

    @property
    def fresh(self) -> int:
        return self.truth - self.truth_cached + self.lds - self.lds_cached


@dataclass(frozen=True)
class Warm:
    """The warm-up batch: ``n`` fine-tunes of ``pairs`` training pairs in all, ``wall_s``
    seconds, of which ``train_s`` in training (the records' ``train_s``)."""
    n: int
    pairs: int
    wall_s: float
    train_s: float

    def seconds(self, sizes) -> float:
        """Estimated seconds of fine-tunes of ``sizes`` training pairs: training scales with
        the pairs (steps = pairs / batch × epochs), the rest (scoring the eval pairs, building
        the trainer, caching) is the same for every fine-tune."""
        if self.pairs <= 0 or not 0 < self.train_s <= self.wall_s:
            return len(sizes) * self.wall_s / self.n
        return len(sizes) * (self.wall_s - self.train_s) / self.n + sum(sizes) * self.train_s / self.pairs


def _cached(game, item) -> bool:
    return game._lookup(item) is not None


def _size(game, item) -> int:
    return len(item.pairs) if isinstance(item, Subset) else sum(game.owner_sizes[i] for i in range(game.n)
                                                                 if item >> i & 1)


def lds_items(lds_games: list, lds_cfg: dict) -> list[tuple]:
    """(game, Subset) of every LDS fine-tune: the subsets ``lds.lds_targets`` trains, under each LDS seed."""
    if not lds_games or not lds_cfg.get("n_subsets"):
        return []
    pairs = [p for o in lds_games[0].owners for p in o]
    sets = [Subset(tuple(pairs[i] for i in s))
            for s in lds_subsets(len(pairs), lds_cfg["n_subsets"], lds_cfg["frac"], lds_cfg["seed"])]
    return [(g, s) for g in lds_games for s in sets]


def plan_of(games: list, lds_games: list, lds_cfg: dict) -> Plan:
    """Fine-tunes per phase, how many are cached (one cache lookup each, no training), and
    the training pairs of each one still to train."""
    truth = [(g, m) for g in games for m in range(1, 2 ** g.n)]
    lds = lds_items(lds_games, lds_cfg)
    truth_todo = [(g, m) for g, m in truth if not _cached(g, m)]
    lds_todo = [(g, s) for g, s in lds if not _cached(g, s)]
    return Plan(len(truth), len(truth) - len(truth_todo), len(lds), len(lds) - len(lds_todo),
                tuple(_size(g, m) for g, m in (*truth_todo, *lds_todo)))


def warm_up(games: list) -> Warm | None:
    """Train the first two uncached batches of the ground truth (``pack`` × ``n_jobs``
    coalitions each, of the first game that has any) and time the second, or None when the
    ground truth is cached. The first is a burn-in: a process's first fine-tune pays for
    warming up the libraries (on ``default``: 24.4 s of training for 30 pairs, against
    14.6 s for the other 30-pair coalitions)."""
    for g in games:
        todo = [m for m in range(1, 2 ** g.n) if not _cached(g, m)]
        if todo:
            if g.kind != "union":          # sequential: prefixes first (the game trains them anyway)
                todo.sort(key=lambda m: bin(m).count("1"))
            size = max(1, g.pack) * max(1, g.n_jobs)
            burn_in, batch = todo[:size], todo[size:2 * size]
            if g.n_jobs <= 1:               # once-per-process work first, untimed: it is not a fine-tune's
                g.examples(g.flat_pairs())  # (the base, the training pool with its reference log-probs)
                g.record(0)                 # (the base scored on the eval pairs)
            if batch:                       # a process's first training is slower (1.7x on SmolLM2): untimed
                g.prefetch(burn_in)
            else:
                batch = burn_in
            t0 = time.perf_counter()
            g.prefetch(batch)
            wall = time.perf_counter() - t0
            recs = [g.record(m) for m in batch]
            # a packed batch's records each carry the whole pack's training: not per coalition
            train = sum(r.get("train_s") or 0.0 for r in recs) if g.pack == 1 and g.n_jobs <= 1 else 0.0
            return Warm(len(batch), sum(_size(g, m) for m in batch), wall, train)
    return None


# a valuer's phases that fetch coalitions' fine-tunes through the game (read when cached or
# shipped, trained when not): left out of its history time, as the plan prices them itself
FETCH_PHASES = ("fine_tune", "owner_fine_tunes")


def history_valuer_s(records: list[dict], experiment: str, hardware_id: str | None, valuers: list[str],
                  seeds: int) -> tuple[float, str] | None:
    """The valuers' wall time in the latest earlier job of ``experiment`` on this hardware
    (each record's ``cost.wall_s``: its own work plus any fine-tune it asked for beyond the
    ground truth, e.g. SHED's proxy sets, less its ``FETCH_PHASES``), per valuer and seed,
    scaled to this job's ``seeds``: (seconds, that job's id), or None."""
    mine = [r for r in records if r.get("experiment") == experiment and r.get("status") == "ok"
            and (r.get("cost") or {}).get("wall_s") is not None and r.get("job")
            and (r.get("hardware") or {}).get("id") == hardware_id]
    if not mine:
        return None
    job = max((str(r.get("timestamp") or ""), r["job"]) for r in mine)[1]
    per = {}
    for r in mine:
        if r["job"] == job:
            phases = r["cost"].get("phases") or {}
            fetch = sum(float(phases.get(p) or 0.0) for p in FETCH_PHASES)
            per.setdefault(r["valuer"], []).append(max(float(r["cost"]["wall_s"]) - fetch, 0.0))
    known = [v for v in valuers if v in per]
    if not known:
        return None
    return sum(sum(per[v]) / len(per[v]) for v in known) * seeds, job


def history_harness_s(jobs: list[dict], experiment: str, hardware_id: str | None) -> tuple[float, str] | None:
    """The harness's own work after the estimate (consensus, LDS metrics, records, W&B
    offline, report lines) in the newest earlier job of ``experiment`` on this hardware,
    from its summary: wall, less what was spent before its estimate, less its fine-tunes
    after the estimate and its valuers' own work: (seconds, that job's id), or None (no
    summary that says when its estimate was made)."""
    mine = [j for j in jobs if j.get("experiment") == experiment and j.get("estimate_at_s") is not None
            and (j.get("hardware") or {}).get("id") == hardware_id]
    if not mine:
        return None
    j = max(mine, key=lambda j: (str(j.get("timestamp") or ""), str(j.get("job"))))
    after = j["wall_s"] - j["estimate_at_s"] - (j["fine_tune_s"] - j["fine_tune_before_estimate_s"]) \
        - j["valuer_own_s"]
    return max(after, 0.0), str(j.get("job"))


def fmt_s(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"


def plan_line(plan: Plan, seeds: int, n: int, lds_seeds: int, n_subsets: int) -> str:
    lds = (f"; LDS {plan.lds} ({n_subsets} subsets × {lds_seeds} lds.seeds), {plan.lds_cached} cached"
           if plan.lds else "")
    return (f"[dvbench] plan: ground truth {plan.truth} fine-tunes ({seeds} seeds × {2 ** n - 1} coalitions), "
            f"{plan.truth_cached} cached{lds}; {plan.fresh} to train")


def estimate_line(plan: Plan, warm: Warm | None, own: tuple[float, str] | None,
                  elapsed_s: float, harness: tuple[float, str] | None = None,
                  weights: tuple[int, float] | None = None) -> tuple[str, float | None]:
    """The estimate line and the estimated wall seconds of the whole job (None: nothing
    measured); ``plan``: what is left after the warm-up; ``own``: the valuers' time and
    ``harness``: the harness's own work, both from an earlier job on this hardware;
    ``weights``: (fine-tunes, seconds) of the weights a served job's valuers load, priced
    by the shipped truth's seconds (or by the warm-up's, when this job timed one)."""
    own_s, own_txt = (own[0], f"valuers ~{fmt_s(own[0])} (their wall time in job {own[1]} on this hardware)") if own \
        else (0.0, "the valuers' time unknown (no earlier job of this experiment on this hardware)")
    if weights and weights[0]:
        n_w, w_s = weights[0], (warm.wall_s / warm.n * weights[0] if warm else weights[1])
        own_s += w_s
        own_txt += (f" + {n_w} fine-tunes of weights the valuers load ~{fmt_s(w_s)} "
                    f"({'as timed here' if warm else 'the shipped truth’s seconds for them'})")
    if harness:
        own_s += harness[0]
        own_txt += f" + harness ~{fmt_s(harness[0])} (job {harness[1]})"
    if warm is None:
        if plan.fresh:
            return "[dvbench] estimate: none (nothing measured)", None
        total = elapsed_s + own_s
        return f"[dvbench] estimate: ~{fmt_s(total)} in all: every fine-tune cached; {own_txt}", total
    left = plan.sizes                       # (the plan after the warm-up: what is left to train)
    fits = warm.seconds(left)
    total = elapsed_s + fits + own_s
    how = (f"{fmt_s(fits)} for {len(left)} more fine-tunes (timed on {warm.n} after a burn-in: "
           f"{warm.wall_s / warm.n:.1f} s each, {warm.train_s / max(warm.pairs, 1):.2f} s per training pair)"
           if warm.train_s else f"{len(left)} more fine-tunes × {warm.wall_s / warm.n:.1f} s (timed on "
           f"{warm.n})")
    return f"[dvbench] estimate: ~{fmt_s(total)} in all: {how} + {own_txt}", total
