"""Sharding one game's ground truth across jobs (e.g. a SLURM array).

The exact retraining Shapley of an n-owner game needs 2^n fine-tunes per seed
(the run's seed and the noise-ceiling seed). ``game.shard=i/k`` trains only the
i-th of k interleaved slices of those coalitions into the shared cache and
exits; ``python -m bench assemble <same overrides>`` checks that every coalition
is cached (naming the missing ones and the shard that owns them) and then runs
the job as usual, now without training the ground truth.

    for i in 0 1 2 3; do python -m bench experiment=quick game.shard=$i/4 & done; wait
    python -m bench assemble experiment=quick

Slices interleave the masks of both seeds, so every shard gets a similar mix of
coalition sizes. In the sequential game a shard also trains the prefix stages
its coalitions build on (shared through the cache when another shard was first).
"""
from __future__ import annotations

from bench.core.errors import ConfigError

ASSEMBLE = "assemble"


def parse_shard(spec) -> tuple[int, int] | str | None:
    """``None`` (no sharding), ``"assemble"``, or ``(i, k)`` from ``"i/k"``."""
    if spec is None or spec == ASSEMBLE:
        return spec
    try:
        i, k = (int(x) for x in str(spec).split("/"))
    except ValueError:
        raise ConfigError(f"game.shard: {spec!r} is not i/k; use e.g. game.shard=0/4 (0 <= i < k), "
                          f"or `python -m bench assemble`") from None
    if not (k >= 1 and 0 <= i < k):
        raise ConfigError(f"game.shard: {spec!r} needs 0 <= i < k; the shards of k=4 are 0/4 .. 3/4")
    return i, k


def truth_items(games) -> list[tuple[int, int]]:
    """Every (game index, mask) the ground truth needs, in the canonical order."""
    return [(g, m) for g, game in enumerate(games) for m in range(2 ** game.n)]


def shard_of(position: int, k: int) -> int:
    return position % k


def run_shard(games, i: int, k: int) -> dict:
    """Train (or find cached) the i-th slice; returns counts for the log line."""
    items = truth_items(games)
    mine = [it for pos, it in enumerate(items) if shard_of(pos, k) == i]
    before = {g: len(games[g].log.entries) for g in range(len(games))}
    for g, game in enumerate(games):
        masks = [m for gi, m in mine if gi == g]
        game.prefetch(masks)
        for m in masks:
            game.record(m)
    fresh = sum(e["fresh"] for game in games for e in game.log.entries.values())
    return {"shard": f"{i}/{k}", "coalitions": len(mine), "of": len(items), "trained": fresh,
            "cached": len(mine) - fresh, "logged_before": before}


def missing(games) -> list[dict]:
    """The ground-truth coalitions neither shipped nor in the cache; ``position`` % k is the shard of k that owns one."""
    out = []
    for pos, (g, m) in enumerate(truth_items(games)):
        game = games[g]
        if game._lookup(m) is None:
            out.append({"seed": game.seed, "mask": m, "position": pos})
    return out


def missing_message(miss: list[dict], total: int) -> str:
    head = ", ".join(f"seed {x['seed']} mask {x['mask']:#b} (pos {x['position']})" for x in miss[:6])
    more = f" and {len(miss) - 6} more" if len(miss) > 6 else ""
    return (f"game.shard: {len(miss)} of {total} ground-truth coalitions are not cached: {head}{more}; "
            f"rerun shard (pos % k)/k for each, then assemble again")
