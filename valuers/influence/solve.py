"""The damped empirical-Fisher solve and the influence scores (numpy, float64).

Per layer (one block of the block-diagonal Fisher), with G [N, D] the train
gradients (may be a memmap, read in chunks):

    F = GᵀG / N,   λ = damping_scale × trace(F) / D  (the mean eigenvalue of F),
    q̃ = (F + λI)⁻¹ q,   score_i = Σ_layers ĝ_iᵀ q̃.

Primal (D×D Cholesky) when D ≤ N; else the N×N kernel (Woodbury) form
(F+λI)⁻¹ = (1/λ)[I − Gᵀ(NλI + GGᵀ)⁻¹G], the same matrix inverse. A layer with no
gradient (λ = 0) adds nothing. score = −influence on the query loss (the package's
sign convention: > 0 helps).
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def precondition(G, q: np.ndarray, damping_scale: float, chunk: int = 2048) -> tuple[np.ndarray, dict]:
    """q̃ = (F + λI)⁻¹ q with F = GᵀG / N (G: [N, D], may be a memmap), λ = damping_scale ×
    trace(F)/D. Primal (D×D Cholesky) when D ≤ N, else the Woodbury form. All in float64."""
    import scipy.linalg as sl
    N, D = G.shape
    q = np.asarray(q, dtype=np.float64)
    if D <= N:
        Fm = np.zeros((D, D))
        for s in range(0, N, chunk):
            g = np.asarray(G[s:s + chunk], dtype=np.float64)
            Fm += g.T @ g
        Fm /= N
        lam = damping_scale * np.trace(Fm) / D
        if lam <= 0:
            return np.zeros(D), {"lambda": 0.0, "form": "zero"}
        Fm[np.diag_indices(D)] += lam
        return sl.cho_solve(sl.cho_factor(Fm), q), {"lambda": float(lam), "form": "primal"}
    K, a = np.zeros((N, N)), np.zeros(N)
    for c in range(0, D, chunk):
        g = np.asarray(G[:, c:c + chunk], dtype=np.float64)
        K += g @ g.T
        a += g @ q[c:c + chunk]
    lam = damping_scale * np.trace(K) / (N * D)
    if lam <= 0:
        return np.zeros(D), {"lambda": 0.0, "form": "zero"}
    K[np.diag_indices(N)] += N * lam
    y = sl.cho_solve(sl.cho_factor(K), a)
    out = q.copy()
    for c in range(0, D, chunk):
        out[c:c + chunk] -= np.asarray(G[:, c:c + chunk], dtype=np.float64).T @ y
    return out / lam, {"lambda": float(lam), "form": "dual"}


def influence_scores(train: list, queries: list, damping_scale: float, chunk: int = 4096,
                     check: Callable[[], None] | None = None):
    """score_i = Σ_l ĝ_{l,i} · (F_l + λ_l I)⁻¹ ĝ_{l,query}; returns (scores [N], per-layer info).
    ``check`` (e.g. a subject's ``check_budget``) is called before each layer's solve."""
    N = train[0].shape[0]
    scores, info = np.zeros(N), []
    for G, q in zip(train, queries):
        if check is not None:
            check()
        qt, inf = precondition(G, q, damping_scale)
        for s in range(0, N, chunk):
            scores[s:s + chunk] += np.asarray(G[s:s + chunk], dtype=np.float64) @ qt
        info.append(inf)
    return scores, info
