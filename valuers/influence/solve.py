"""The damped empirical-Fisher solve and the influence scores (numpy, float64).

Per layer (one block of the block-diagonal Fisher), with G [N, D] the train
gradients (may be a memmap, read in chunks):

    F = GᵀG / N,   λ = damping_scale × trace(F) / D  (the mean eigenvalue of F),
    q̃ = (F + λI)⁻¹ q,   score_i = Σ_layers ĝ_iᵀ q̃.

Primal (D×D Cholesky) when D ≤ N; else the N×N kernel (Woodbury) form
(F+λI)⁻¹ = (1/λ)[I − Gᵀ(NλI + GGᵀ)⁻¹G], the same matrix inverse. A layer with no
gradient (λ = 0) adds nothing. score = −influence on the query loss (the package's
sign convention: > 0 helps).

A query may be one vector per layer (the mean eval loss's gradient: scores [N]) or
a matrix [E, D] per layer (one row per eval pair: scores [N, E]); a matrix is
solved with one factorisation per layer, all its columns at once.
``pair_and_mean_scores`` does both with one factorisation per layer (the valuers'
per-pair matrix and their point values) and writes a large matrix to a memmap.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from bench.core.cache import full_disk, reserve, tmp_path

PAIR_SCORES_RAM_BYTES = 256 << 20      # a larger [N, E] score matrix is written to a memmap


def _factor(G, damping_scale: float, chunk: int = 2048) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """Factor F + λI once for the layer's train gradients G [N, D]; returns (solve, info) where
    ``solve(q)`` = (F + λI)⁻¹ q for q [D] or [D, E] (every column at once)."""
    import scipy.linalg as sl
    N, D = G.shape

    def zero(q):
        return np.zeros_like(q)

    if D <= N:
        Fm = np.zeros((D, D))
        for s in range(0, N, chunk):
            g = np.asarray(G[s:s + chunk], dtype=np.float64)
            Fm += g.T @ g
        Fm /= N
        lam = damping_scale * np.trace(Fm) / D
        if lam <= 0:
            return zero, {"lambda": 0.0, "form": "zero"}
        Fm[np.diag_indices(D)] += lam
        cf = sl.cho_factor(Fm)
        return (lambda q: sl.cho_solve(cf, q)), {"lambda": float(lam), "form": "primal"}
    K = np.zeros((N, N))
    for c in range(0, D, chunk):
        g = np.asarray(G[:, c:c + chunk], dtype=np.float64)
        K += g @ g.T
    lam = damping_scale * np.trace(K) / (N * D)
    if lam <= 0:
        return zero, {"lambda": 0.0, "form": "zero"}
    K[np.diag_indices(N)] += N * lam
    cf = sl.cho_factor(K)

    def woodbury(q):
        a = np.zeros((N,) + q.shape[1:])
        for c in range(0, D, chunk):
            a += np.asarray(G[:, c:c + chunk], dtype=np.float64) @ q[c:c + chunk]
        y = sl.cho_solve(cf, a)
        out = q.copy()
        for c in range(0, D, chunk):
            out[c:c + chunk] -= np.asarray(G[:, c:c + chunk], dtype=np.float64).T @ y
        return out / lam
    return woodbury, {"lambda": float(lam), "form": "dual"}


def precondition(G, q: np.ndarray, damping_scale: float, chunk: int = 2048) -> tuple[np.ndarray, dict]:
    """q̃ = (F + λI)⁻¹ q with F = GᵀG / N (G: [N, D], may be a memmap), λ = damping_scale ×
    trace(F)/D. ``q``: [D], or [D, E] (E right-hand sides, solved at once; q̃ has q's shape).
    Primal (D×D Cholesky) when D ≤ N, else the Woodbury form. All in float64."""
    q = np.asarray(q, dtype=np.float64)
    if q.ndim not in (1, 2) or q.shape[0] != G.shape[1]:
        raise ValueError(f"precondition: q has shape {q.shape}, expected ({G.shape[1]},) or ({G.shape[1]}, E)")
    solve, info = _factor(G, damping_scale, chunk)
    return solve(q), info


def _add_scores(out, G, qt: np.ndarray, chunk: int) -> None:
    for s in range(0, G.shape[0], chunk):
        out[s:s + chunk] += np.asarray(G[s:s + chunk], dtype=np.float64) @ qt


def _check_queries(qs: list, what: str) -> None:
    if len({q.shape[:-1] for q in qs}) > 1 or qs[0].ndim not in (1, 2):
        raise ValueError(f"{what}: queries must all be [D_l] or all [E, D_l], got {[q.shape for q in qs]}")


def influence_scores(train: list, queries: list, damping_scale: float, chunk: int = 4096,
                     check: Callable[[], None] | None = None, out: np.ndarray | None = None):
    """score_i = Σ_l ĝ_{l,i} · (F_l + λ_l I)⁻¹ ĝ_{l,query}; returns (scores, per-layer info).

    ``queries``: per layer a vector [D_l] (scores [N]) or a matrix [E, D_l], one query per
    row (scores [N, E], column j = the scores of row j; one factorisation per layer).
    ``out``: zeros of the scores' shape to add into (e.g. a memmap); returned as the scores.
    ``check`` (e.g. a subject's ``check_budget``) is called before each layer's solve."""
    N = train[0].shape[0]
    qs = [np.asarray(q, dtype=np.float64) for q in queries]
    _check_queries(qs, "influence_scores")
    shape = (N,) + qs[0].shape[:-1]
    if out is None:
        out = np.zeros(shape)
    elif out.shape != shape:
        raise ValueError(f"influence_scores: out has shape {out.shape}, expected {shape}")
    info = []
    for G, q in zip(train, qs):
        if check is not None:
            check()
        solve, inf = _factor(G, damping_scale)
        _add_scores(out, G, solve(q.T), chunk)                  # q.T: [D] or [D, E]
        info.append(inf)
    return out, info


def pair_and_mean_scores(train: list, pair_queries: list, mean_queries: list, damping_scale: float,
                         path: Path | None = None, check: Callable[[], None] | None = None,
                         chunk: int = 4096) -> tuple[np.ndarray, np.ndarray, list]:
    """(pair scores [N, E], mean-query scores [N], per-layer info) with one factorisation per
    layer serving the E per-pair queries ([E, D_l] per layer) and the mean query ([D_l]). The
    mean-query scores are computed exactly as ``influence_scores`` computes them from the
    vectors alone (the same numbers, bit for bit); they equal the pair scores' row means
    (linearity) up to rounding.

    The pair scores are float64 in RAM, or, past ``PAIR_SCORES_RAM_BYTES`` and with ``path``
    (a ``.npy`` file, content-addressed by the caller), a read-only memmap of a file written
    under a temp name and renamed into place."""
    N, E = train[0].shape[0], np.asarray(pair_queries[0]).shape[0]
    Ps = [np.asarray(p, dtype=np.float64) for p in pair_queries]
    ms = [np.asarray(m, dtype=np.float64) for m in mean_queries]
    _check_queries(Ps, "pair_and_mean_scores")
    if Ps[0].ndim != 2 or any(m.shape != p.shape[1:] for m, p in zip(ms, Ps)):
        raise ValueError(f"pair_and_mean_scores: pair queries [E, D_l] and mean queries [D_l] per layer, got "
                         f"{[p.shape for p in Ps]} and {[m.shape for m in ms]}")
    memmap = path is not None and N * E * 8 > PAIR_SCORES_RAM_BYTES
    tmp = tmp_path(path) if memmap else None
    try:
        if memmap:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            pair = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float64, shape=(N, E))
            reserve(tmp)                                        # a full disk: ENOSPC now, not SIGBUS
        else:
            pair = np.zeros((N, E))
        point, info = np.zeros(N), []
        for G, P, m in zip(train, Ps, ms):
            if check is not None:
                check()
            solve, inf = _factor(G, damping_scale)
            _add_scores(point, G, solve(m), chunk)              # the vector path, unchanged
            _add_scores(pair, G, solve(P.T), chunk)
            info.append(inf)
        if memmap:
            pair.flush()
            del pair
            os.replace(tmp, path)
            pair = np.load(path, mmap_mode="r")
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        full = full_disk(e, path)
        if full is not None:
            raise full from None
        raise
    return pair, point, info
