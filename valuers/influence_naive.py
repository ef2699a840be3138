"""Naive gradient influence: per-example *full* gradients with ``torch.func``.

The reference LoGra is checked against, and the baseline it is timed against.
Same model, same watched layers (weights of the trainable linear / Conv1D layers,
or the LoRA A/B maps of a peft model), same per-example loss (DPO vs the base
π0, or SFT), same query (gradient of the mean eval loss), same block-diagonal
damped empirical Fisher and the same sign (see ``valuers/influence``):

    value(z) = Σ_layers g_evalᵀ (F + λI)⁻¹ g_z,   F = (1/N) Σ g gᵀ,   λ = damping_scale × mean eig(F)

Per-example gradients: ``influence.per_example`` (``vmap(grad(...))``, each layer's
gradient flattened as [d_out, d_in]). Unprojected on a small model this is the
exact damped empirical-Fisher influence. With ``proj_dim`` each layer's flattened
gradient is multiplied by a dense seeded Gaussian matrix [proj_dim, numel]/√proj_dim
(TRAK-style; layers with numel ≤ proj_dim are kept whole). ``hessian: full`` uses
one Fisher block over all layers (concatenated) instead of one per layer. Nothing
is cached: it recomputes every gradient on every call, as the naive route does.
The game's ``check_budget`` runs between gradient batches (``Budget.max_seconds``).

Per eval pair: ``Valuation.pair_scores`` [N, E] holds the same score with each eval
pair's own loss gradient as the query (the eval pairs' per-example gradients come
from the same pass as their mean; one solve per block serves all E queries and the
mean); the point values are its row means. A matrix over 256 MB is a read-only
memmap under ``game.artefacts_dir("pair_scores")``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from bench.core.cache import content_key
from bench.core.settings import setting
from valuers.base import Budget, CostMeter, Valuation, owner_sums
from valuers.influence.per_example import per_example_gradients
from valuers.influence.projection import dense_projections
from valuers.influence.settings import InfluenceSettings
from valuers.influence.solve import pair_and_mean_scores
from valuers.influence.subject import grand_coalition, grand_only, loss_inputs

HESSIANS = ("layer", "full")


@dataclass(frozen=True)
class NaiveInfluenceSettings(InfluenceSettings):
    prefix = "valuer.influence_naive"
    proj_dim: int | None = setting(None, "null = exact (full gradients); an int = dense Gaussian projection of "
                                         "each larger layer's gradient to this size", min=1)
    hessian: str = setting("layer", "layer (one Fisher block per layer, as logra) | full (one block)",
                           choices=HESSIANS)
    chunk_size: int | None = setting(None, "vmap chunk size (bounds memory); null = the whole batch", min=1)


class NaiveInfluence:
    models_needed = staticmethod(grand_only)     # the grand coalition's weights

    def __init__(self, name: str = "influence_naive", **settings):
        self.name = name
        self.where = f"valuer.{name}"
        self.settings = NaiveInfluenceSettings.of(settings, prefix=self.where)

    def gradients(self, subject, layers, pairs, proj: dict, mean: bool = False, both: bool = False):
        """Per-example (projected) gradients [N, D_l] per layer, or (``mean``) their mean
        [D_l], or (``both``) the pair (per-example, mean) from one pass."""
        s = self.settings
        ex, ref = loss_inputs(subject, pairs, s.train_loss)
        rows, means = not mean or both, mean or both
        out, sums = {}, {}
        for idx, g in per_example_gradients(subject, layers, ex, ref, s.train_loss, s.batch_size, s.chunk_size):
            for n, v in g.items():
                v = v if proj[n] is None else v @ proj[n].T
                if means:
                    t = v.double().sum(0).cpu()
                    sums[n] = t if n not in sums else sums[n] + t
                if rows:
                    v = v.detach().cpu().numpy()
                    if n not in out:
                        out[n] = np.zeros((len(ex), v.shape[1]), dtype=v.dtype)
                    out[n][idx] = v
        per_example = [out[n] for n, _ in layers] if rows else None
        avg = [(sums[n] / len(ex)).numpy() for n, _ in layers] if means else None
        return (per_example, avg) if both else (avg if mean else per_example)

    def value(self, game, budget: Budget) -> Valuation:
        s = self.settings
        meter = CostMeter(game)
        subject, layers = grand_coalition(game, meter, s, self.where)
        with meter.phase("projection", own_compute=True):
            proj = dense_projections(layers, s.proj_dim, s.seed)
        pairs = game.flat_pairs()
        with meter.phase("train_gradients", own_compute=True):
            t0 = time.perf_counter()
            train = self.gradients(subject, layers, pairs, proj)
            train_s = time.perf_counter() - t0
        with meter.phase("query_gradient", own_compute=True):
            rows, query = self.gradients(subject, layers, game.eval, proj, both=True)
        with meter.phase("influence", own_compute=True):
            if s.hessian == "full":
                train, rows, query = [np.concatenate(train, 1)], [np.concatenate(rows, 1)], [np.concatenate(query)]
            key = content_key({"model": subject.key, "settings": asdict(s),
                               "data": content_key([asdict(p) for p in pairs]),
                               "eval": content_key([asdict(p) for p in game.eval])})[:24]
            pair, scores, info = pair_and_mean_scores(
                train, rows, query, s.damping_scale,
                path=game.artefacts_dir("pair_scores") / f"{self.name}-{key}.npy", check=subject.check_budget)
        if not np.all(np.isfinite(scores)):
            raise FloatingPointError("influence_naive: non-finite influence scores")
        return Valuation(owner_sums(scores, game.owner_sizes), point_values=scores, pair_scores=pair,
                         cost=meter.cost(), extras={
            "proj_dim": s.proj_dim, "seed": s.seed, "train_loss": s.train_loss,
            "damping_scale": s.damping_scale, "hessian": s.hessian, "model_kind": subject.kind,
            "n_layers": len(layers), "grad_dim": int(sum(a.shape[1] for a in train)),
            "grad_bytes": int(sum(a.nbytes for a in train)), "n_train": len(pairs), "n_eval": len(game.eval),
            "grad_examples_per_s": len(pairs) / train_s if train_s > 0 else None,
            "lambda_mean": float(np.mean([i["lambda"] for i in info])),
            "sign": "value = -influence on eval loss; > 0 helps"})
