"""DataInf (Kwon et al., 2024): influence with a closed-form inverse-Hessian
approximation built for LoRA, written here from the paper's formula.

Per watched block l (the LoRA A and B maps of every adapted module, as ``logra``
and ``influence_naive`` watch them) with the exact per-example gradients v_i of the
N training losses and the damping λ_l = ``damping_scale`` × mean_i ‖v_i‖² / D_l
(the paper's λ_l = 0.1 × (n d_l)⁻¹ Σ_i ‖v_i‖²; the mean eigenvalue of the empirical
Fisher, as in ``valuers/influence``), DataInf swaps the order of the mean and the
inverse:

    (F_l + λ_l I)⁻¹ = ((1/N) Σ_i v_i v_iᵀ + λ_l I)⁻¹
                    ≈ (1/N) Σ_i (v_i v_iᵀ + λ_l I)⁻¹
                    = (1/(N λ_l)) Σ_i [ I − v_i v_iᵀ / (λ_l + ‖v_i‖²) ]   (Sherman–Morrison)

so the preconditioned query needs only dot products (no D×D or N×N solve):

    q̃_l = (1/λ_l) [ q_l − (1/N) Σ_i v_i (v_iᵀ q_l) / (λ_l + ‖v_i‖²) ],
    value(z) = Σ_l v_{l,z}ᵀ q̃_l.

Exact when N = 1 (a rank-one F), tested against the exact damped-Fisher solve
(``influence.solve``); the error shrinks as λ grows (both sides → q/λ). q is the
gradient of the mean eval loss (point values) or of each eval pair's loss
(``pair_scores`` [N, E]); the loss is the DPO loss vs the base π0 (or SFT), and the
sign is the toolkit's: **value = −influence on the eval loss, > 0 helps**.

Differences from the paper: it values each training example by its influence on
the validation loss of a LoRA-tuned model exactly like this; it scores with the
gradient at the fine-tuned weights (so do we), and uses the same λ rule. Here the
gradients are exact per-example ``torch.func`` gradients of the watched blocks
(``influence.per_example``), so it is cheap only while the LoRA blocks are small
(DataInf's premise). Nothing is cached: like ``influence_naive`` it recomputes
the gradients on every call.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from bench.core.settings import setting
from valuers.base import Budget, CostMeter, Valuation, owner_sums
from valuers.influence.settings import InfluenceSettings
from valuers.influence.subject import grand_coalition, grand_only
from valuers.influence_naive import NaiveInfluence


@dataclass(frozen=True)
class DataInfSettings(InfluenceSettings):
    prefix = "valuer.datainf"
    chunk_size: int | None = setting(None, "vmap chunk size (bounds memory); null = the whole batch", min=1)


def datainf_precondition(G, q: np.ndarray, damping_scale: float) -> tuple[np.ndarray, dict]:
    """DataInf's q̃ ≈ (F + λI)⁻¹ q for one block: G [N, D] train gradients, q [D] or [D, E];
    λ = damping_scale × mean ‖v_i‖² / D. Float64."""
    G = np.asarray(G, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    N, D = G.shape
    norms = np.einsum("nd,nd->n", G, G)
    lam = damping_scale * norms.mean() / D
    if lam <= 0:
        return np.zeros_like(q), {"lambda": 0.0}
    c = G @ q                                        # [N] or [N, E]: v_iᵀ q
    w = 1.0 / (lam + norms)
    c = c * (w if c.ndim == 1 else w[:, None])
    return (q - G.T @ c / N) / lam, {"lambda": float(lam)}


def datainf_scores(train: list, pair_queries: list, mean_queries: list, damping_scale: float):
    """(pair scores [N, E], point scores [N], per-block info): Σ_l G_l q̃_l with q̃ from
    ``datainf_precondition``, for the per-pair queries ([E, D_l] per block) and the mean one."""
    N, E = train[0].shape[0], np.asarray(pair_queries[0]).shape[0]
    pair, point, info = np.zeros((N, E)), np.zeros(N), []
    for G, P, m in zip(train, pair_queries, mean_queries):
        G = np.asarray(G, dtype=np.float64)
        qt, inf = datainf_precondition(G, np.asarray(P, dtype=np.float64).T, damping_scale)
        mt, _ = datainf_precondition(G, m, damping_scale)
        pair += G @ qt
        point += G @ mt
        info.append(inf)
    return pair, point, info


class DataInf:
    """DataInf influence of each training pair on the grand-coalition LoRA model's eval loss."""

    models_needed = staticmethod(grand_only)     # the grand coalition's weights

    def __init__(self, name: str = "datainf", **settings):
        self.name = name
        self.where = f"valuer.{name}"
        self.settings = DataInfSettings.of(settings, prefix=self.where)
        s = self.settings                   # the exact per-example gradients of influence_naive
        self._grads = NaiveInfluence(name, proj_dim=None, seed=s.seed, train_loss=s.train_loss,
                                     damping_scale=s.damping_scale, batch_size=s.batch_size, dtype=s.dtype,
                                     layers=s.layers, device=s.device, chunk_size=s.chunk_size)

    def value(self, game, budget: Budget) -> Valuation:
        s = self.settings
        meter = CostMeter(game)
        subject, layers = grand_coalition(game, meter, s, self.where)
        proj = {n: None for n, _ in layers}
        pairs = game.flat_pairs()
        with meter.phase("train_gradients", own_compute=True):
            t0 = time.perf_counter()
            train = self._grads.gradients(subject, layers, pairs, proj)
            train_s = time.perf_counter() - t0
        with meter.phase("query_gradient", own_compute=True):
            rows, query = self._grads.gradients(subject, layers, game.eval, proj, both=True)
        with meter.phase("influence", own_compute=True):
            subject.check_budget()
            pair, scores, info = datainf_scores(train, rows, query, s.damping_scale)
        if not np.all(np.isfinite(scores)):
            raise FloatingPointError("datainf: non-finite influence scores")
        return Valuation(owner_sums(scores, game.owner_sizes), point_values=scores, pair_scores=pair,
                         cost=meter.cost(), extras={
            "seed": s.seed, "train_loss": s.train_loss, "damping_scale": s.damping_scale,
            "model_kind": subject.kind, "n_layers": len(layers),
            "grad_dim": int(sum(a.shape[1] for a in train)), "n_train": len(pairs), "n_eval": len(game.eval),
            "grad_examples_per_s": len(pairs) / train_s if train_s > 0 else None,
            "lambda_mean": float(np.mean([i["lambda"] for i in info])),
            "sign": "value = -influence on eval loss; > 0 helps"})
