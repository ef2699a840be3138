"""LoGra-style projected-gradient influence (Choe et al., 2024; library LogIX).

Every training example z of the game's grand-coalition model gets

    value(z) = Σ_layers ĝ_evalᵀ (F + λI)⁻¹ ĝ_z

with ĝ the *projected* gradients of the training loss (DPO vs the base π0, or SFT),
F the per-layer empirical Fisher of the projected train gradients and λ =
``damping_scale`` × its mean eigenvalue: the influence of ``valuers/influence``
(whose docstring holds the terms and the **sign convention: value = −influence on
the eval loss, > 0 helps**). Owner value = the sum of its examples' values.

Per eval pair: ``Valuation.pair_scores`` [N, E] holds the same score with the
gradient of each eval pair's loss as the query (one solve per layer serves all E
queries and the mean one); the point values are its row means. A matrix over
256 MB is a read-only memmap under ``game.artefacts_dir("pair_scores")``.

How (LoGra)
    Per watched layer (``influence.layers``: the LoRA A/B maps of a LoRA stage,
    else every trainable linear layer but the head), the projected gradient
    P_out G P_inᵀ = Σ_t (P_out g_t)(P_in x_t)ᵀ is formed from hooks
    (``influence.hooks``): full per-example gradients never exist. Projections
    (``influence.projection``): ``random`` (seeded, orthonormal rows, per layer)
    or ``eigen`` (top-k eigenvectors of E[x xᵀ], E[g gᵀ], one extra pass);
    ``k_in``/``k_out`` per side, ``null`` = none; ``clip_k`` turns k > width into
    a full-rank rotation instead of an error.

Logs
    Projected train gradients are written once, memory-mapped
    (``influence.logs``), under ``game.artefacts_dir("logra")/<key>/`` — key = the
    grand-coalition model's cache key (task, data, model, trainer, game, seed,
    code), the projection (kind, seed, k), the loss and the dtype — or
    ``logs_dir``. The query (mean and per-eval-pair projected eval gradients) is
    cached beside them; logs cached without the per-pair rows get them computed
    once and saved. Reruns and other queries (e.g. another damping) reuse them; logs
    for another model or projection are refused. The solve (``influence.solve``)
    runs in float64.

Budget: the game's ``check_budget`` runs between batches of every gradient pass
and between the layers' solves, so ``Budget.max_seconds`` stops the valuer
(``BudgetExhausted``; half-written logs are removed).

Sequential game: the watched parameters are the last stage's; the loss still
uses π0 as reference. This is an approximation (the stages' references differ).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.core.cache import build_lock, content_key
from bench.core.errors import ConfigError
from bench.core.settings import setting
from valuers.base import Budget, CostMeter, Valuation, owner_sums
from valuers.influence.hooks import GradientLogger, estimate_covariances, pair_query_vectors
from valuers.influence.logs import LOG_FORMAT, GradientLogs, write_logs
from valuers.influence.projection import eigen_projections, projection_shapes, random_projections
from valuers.influence.settings import InfluenceSettings
from valuers.influence.solve import pair_and_mean_scores
from valuers.influence.subject import grand_coalition, grand_only, loss_inputs

PROJECTIONS = ("random", "eigen")


@dataclass(frozen=True)
class LoGraSettings(InfluenceSettings):
    prefix = "valuer.logra"
    projection: str = setting("random", "random (seeded Gaussian, orthonormal rows) | eigen (top-k of E[xx^T], "
                                        "E[gg^T])", choices=PROJECTIONS)
    k_in: int | None = setting(16, "projected input width per layer; null = no projection on that side", min=1)
    k_out: int | None = setting(16, "projected output-gradient width per layer; null = no projection", min=1)
    clip_k: bool = setting(True, "k > a layer's width -> k = width (a full-rank rotation); false = an error")
    logs_dir: str | None = setting(None, "folder of the gradient logs; null = content-addressed under the "
                                         "game's artefacts (<cache_dir>/logra/<key>)")


class LoGra:
    """Projected-gradient influence of each training example on the eval loss of the
    grand-coalition model. See the module docstring for the formula and sign."""

    models_needed = staticmethod(grand_only)     # the grand coalition's weights

    def __init__(self, name: str = "logra", **settings):
        self.name = name
        self.where = f"valuer.{name}"
        self.settings = LoGraSettings.of(settings, prefix=self.where)

    def meta(self, model_key: str, data_fp: str) -> dict:
        s = self.settings
        return {"format": LOG_FORMAT, "model_key": model_key, "data": data_fp, "projection": s.projection,
                "seed": s.seed, "k_in": s.k_in, "k_out": s.k_out, "clip_k": s.clip_k,
                "train_loss": s.train_loss, "layers_filter": s.layers, "dtype": s.dtype}

    def value(self, game, budget: Budget) -> Valuation:
        s, where = self.settings, self.where
        meter = CostMeter(game)
        subject, layers = grand_coalition(game, meter, s, where)
        shapes = projection_shapes(layers, s.k_in, s.k_out, s.clip_k, where)
        pairs = game.flat_pairs()
        meta = self.meta(subject.key, content_key([asdict(p) for p in pairs]))
        path = Path(s.logs_dir) if s.logs_dir else game.artefacts_dir("logra") / content_key(meta)[:24]
        logs = GradientLogs.open(path, meta, where)
        reused, stats, passes = logs is not None, {}, 0
        if logs is None:
            with build_lock(path):             # one process logs; the others wait and read its logs
                logs = GradientLogs.open(path, meta, where)
                reused = logs is not None
                if logs is None:
                    with meter.phase("reference", own_compute=True):
                        ex, ref = loss_inputs(subject, pairs, s.train_loss)
                    if s.projection == "random":
                        proj = random_projections(shapes, s.seed)
                    else:
                        with meter.phase("eigen", own_compute=True):
                            covs = estimate_covariances(subject, layers, ex, ref, s.train_loss, s.batch_size)
                            proj = eigen_projections(shapes, covs)
                        passes += len(ex)
                    meta_w = {**meta, "layers": [n for n, _ in layers], "dims": [list(shapes[n][:2]) for n, _ in layers]}
                    with meter.phase("log_train", own_compute=True):
                        with GradientLogger(subject.model, layers, proj) as lg:
                            stats = write_logs(path, meta_w, subject, lg, ex, ref, s.train_loss, s.batch_size,
                                               np.float64 if s.dtype == "float64" else np.float32)
                    passes += len(ex)
                    logs = GradientLogs.open(path, meta, where)
                    if logs is None:
                        raise RuntimeError(f"{where}: the gradient logs just written to {path} cannot be read back")
        by_name = dict(layers)
        missing = [n for n in logs.meta["layers"] if n not in by_name]
        if missing:
            raise ConfigError(f"{where}.logs_dir: logs in {path} watch layers this model does not have "
                              f"(e.g. {missing[0]}); delete them")
        E = len(game.eval)
        q = logs.query()
        stale = lambda q: q is None or q["pair_vectors"] is None or q["n_eval"] != E   # noqa: E731
        if stale(q):
            with build_lock(path / "query.npz"), meter.phase("log_query", own_compute=True):
                old, q = q, logs.query()                 # written by another process while we waited?
                if stale(q):
                    with GradientLogger(subject.model, [(n, by_name[n]) for n in logs.meta["layers"]],
                                        logs.projections) as lg:
                        rows, vecs, eval_loss = pair_query_vectors(subject, lg, game.eval, s.train_loss,
                                                                   s.batch_size)
                    if old is not None and old["n_eval"] == E:   # logs from before the per-pair rows: keep their mean
                        vecs, eval_loss = old["vectors"], old["eval_loss"]
                    logs.save_query(vecs, eval_loss, E, rows)
                    q = {"vectors": vecs, "pair_vectors": rows, "eval_loss": eval_loss, "n_eval": E}
                    passes += E
        with meter.phase("influence", own_compute=True):
            key = content_key({**meta, "damping_scale": s.damping_scale,
                               "eval": content_key([asdict(p) for p in game.eval])})[:24]
            pair, scores, info = pair_and_mean_scores(
                logs.arrays, q["pair_vectors"], q["vectors"], s.damping_scale,
                path=game.artefacts_dir("pair_scores") / f"{self.name}-{key}.npy", check=subject.check_budget)
        if not np.all(np.isfinite(scores)):
            raise FloatingPointError("logra: non-finite influence scores (non-finite gradients?)")
        point = scores                              # value = −influence on the eval loss (see docstring)
        lams = [i["lambda"] for i in info]
        return Valuation(owner_sums(point, game.owner_sizes), point_values=point, pair_scores=pair,
                         cost=meter.cost(), extras={
            "projection": s.projection, "k_in": s.k_in, "k_out": s.k_out, "clip_k": s.clip_k,
            "seed": s.seed, "train_loss": s.train_loss, "damping_scale": s.damping_scale,
            "model_kind": subject.kind, "n_layers": len(logs.arrays),
            "log_dim": int(sum(a.shape[1] for a in logs.arrays)), "log_bytes": logs.nbytes,
            "logs_dir": str(path), "logs_reused": reused, "n_train": len(pairs), "n_eval": q["n_eval"],
            "eval_loss": q["eval_loss"], "log_examples_per_s": stats.get("examples_per_s"),
            "fwd_bwd_examples": passes, "lambda_mean": float(np.mean(lams)),
            "hessian_forms": {f: sum(i["form"] == f for i in info) for f in ("primal", "dual", "zero")},
            "sign": "value = -influence on eval loss; > 0 helps"})
