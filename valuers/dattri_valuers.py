"""TRAK and TracIn through the dattri package (``dattri.algorithm``), on the game's
grand-coalition model (``influence.subject.load_subject``).

Both score every training pair z against every eval pair e (``Valuation.pair_scores``
[N, E]); point values are the row means, owner values their sums (``owner_sums``).
Our sign everywhere: **score > 0 = z helps e** (value = −influence on the eval loss,
see ``valuers/influence``); neither dattri method needs a sign flip (below).

Per-example functions (what dattri differentiates; p = exp(−ℓ))
    ℓ   the training loss: DPO vs the base π0 (β = train.beta, reference log-probs from
        ``loss_inputs``), ℓ = −log σ(m), m the DPO margin; or SFT, the mean NLL of the
        chosen response (``train_loss``), as ``influence.data.example_losses``;
    f   TRAK's model output: f = log(p / (1 − p)) (dattri's TRAK example); for DPO f = m
        exactly, p = σ(m) the Bradley-Terry probability of the chosen response. In both
        cases ∇ℓ = −(1 − p) ∇f.

Parameters: only the watched weights are differentiated (``influence.layers``: the LoRA
A/B maps of a LoRA stage, else every trainable linear / Conv1D weight but the head),
passed to dattri as ``layer_name`` (``named_parameters`` keys of the transformers model,
LoRA layers injected); the forward is ``torch.func.functional_call`` on that model.

TracIn (``TracInAttributor``, TracInCP with one checkpoint: the grand-coalition model;
the game exposes no others)
    score(z, e) = η · ∇ℓ(z)ᵀ ∇ℓ(e),   η = ``lr`` (null: the game's ``train.lr``, the peak
    rate; the schedule's rate at the last step is not used). dattri's sign: > 0 =
    proponent (a step on z lowers e's loss) = ours. ``proj_dim`` = dattri's seeded random
    projection of both gradients; null = none (its identity projector). ``normalized`` =
    cosine (CosIn). dattri returns float32 and recomputes the eval gradients for every
    train batch (cost N + ⌈N/B⌉·E gradients), so the training pairs go in as one batch
    by default (``train_batch_size: null``; measured on quick: 8 pairs a batch took
    ~36 s of eval gradients per batch, ~11 min a seed).

TRAK (``TRAKAttributor``, one model, no ensemble)
    score(z, e) = Q_z φ_zᵀ (ΦᵀΦ + λI)⁻¹ φ_e,   φ = P ∇f / √n_params,   Q_z = 1 − p_z,
    Φ [N, k] the train rows; P dattri's seeded projection (k = ``proj_dim``; null = its
    identity projector, a D×D kernel). dattri's sign: > 0 = z raises e's output f, which
    lowers e's loss (∇ℓ_e = −(1−p_e)∇f_e) = ours; the measurement is e's margin f, not its
    loss (per eval pair a positive factor 1/(1 − p_e) apart), as in TRAK and as the
    benchmark's per-pair LDS target (the margin). λ = ``regularization`` (dattri's, added
    to ΦᵀΦ) or, null, ``damping_scale`` × trace(ΦᵀΦ)/k, the trace estimated from ≤ 8
    evenly spaced train pairs (unprojected norms; E‖Pg‖² = ‖g‖²). Differences from the
    paper's setting: one model (no ensemble over retrained models), no soft-thresholding,
    λ > 0 (here k > N is usual, ΦᵀΦ singular). Relation to ``influence_naive``
    (hessian=full): in the D > N, λ → 0 limit score = Q_z² · naive(z, e) / (N (1 − p_e)).

Budget: every batch dattri draws from our data loaders calls the game's
``check_budget`` (``BudgetExhausted`` propagates).
"""
from __future__ import annotations

import contextlib

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bench.core.errors import ConfigError
from bench.core.settings import setting
from valuers.base import Budget, CostMeter, Valuation, owner_sums
from valuers.influence.data import collate, unwrap
from valuers.influence.per_example import dpo_margin, functional_row_logps, sft_logp
from valuers.influence.settings import InfluenceSettings
from valuers.influence.subject import grand_coalition, grand_only, loss_inputs
from valuers.peers import require

PROJ_TYPES = ("normal", "rademacher")      # dattri's CPU projectors (its sjlt needs CUDA and the sjlt package)
MAX_KERNEL_DIM = 16384                     # TRAK without projection solves a D×D kernel
DAMPING_SAMPLE = 8                         # train pairs the relative TRAK damping is estimated from
SIGN = "value = -influence on eval loss; > 0 helps"


def _functions(hf, loss: str, beta: float):
    """(ℓ, f, p) per example, each ``fn(params, (ids [K, L], tmask [K, L], ref [K]))`` with
    ``params`` a dict of the model's trainable weights (``functional_call``). The forward runs
    without an attention mask on right-padded rows (causal: real positions never see padding),
    as ``influence.per_example`` does."""
    row_logps = functional_row_logps(hf)

    def row_sums(params, data):
        return row_logps(params, data[0], data[1])

    def neg_loss(params, data):                   # −ℓ = log p
        s = row_sums(params, data)
        if loss == "sft":
            return sft_logp(s, data[1])
        return F.logsigmoid(margin(params, data, s))

    def margin(params, data, s=None):             # f = log p − log(1 − p)
        if s is None:
            s = row_sums(params, data)
        if loss == "sft":
            logp = sft_logp(s, data[1])
            return logp - torch.log(-torch.expm1(logp))
        return dpo_margin(s, data[2], beta)

    def train_loss(params, data):
        return -neg_loss(params, data)

    def output(params, data):
        return margin(params, data)

    def prob(params, data):
        return torch.exp(neg_loss(params, data))
    return train_loss, output, prob


def _loader(subject, examples, ref, batch_size: int):
    """A dattri-ready DataLoader (in order) of (ids [B, K, L], tmask [B, K, L], ref [B, K]); each
    batch it hands out first calls the game's budget check."""
    from torch.utils.data import DataLoader

    def collate_fn(idx):
        subject.check_budget()
        b = collate([examples[i] for i in idx], subject.pad_id, subject.device)
        K, B = b.rows_per_example, b.n_examples
        ids = b.ids.view(K, B, -1).transpose(0, 1).contiguous()
        tm = b.targets.view(K, B, -1).transpose(0, 1).contiguous()
        r = ref[idx] if ref is not None else torch.zeros(B, K, dtype=torch.float64)   # cpu: moved below
        return ids, tm, r.to(subject.dtype).to(subject.device)
    return DataLoader(list(range(len(examples))), batch_size=batch_size, shuffle=False, collate_fn=collate_fn)


def _task(hf, loss_func, key: str):
    """A dattri ``AttributionTask`` on the already-loaded model (one checkpoint, never reloaded)."""
    from dattri.task import AttributionTask
    return AttributionTask(loss_func=loss_func, model=hf, checkpoints=[key or "grand_coalition"],
                           checkpoints_load_func=lambda model, _ckpt: model.eval())


def _projector_kwargs(proj_dim: int | None, proj_type: str, seed: int, device) -> dict:
    """Every key of dattri's projector kwargs (its attributors update a module-level default dict)."""
    return {"proj_dim": proj_dim or 1, "proj_max_batch_size": 32, "proj_seed": int(seed),
            "device": str(device), "proj_type": "identity" if proj_dim is None else proj_type}



@contextlib.contextmanager
def _quiet(module):
    """dattri draws a tqdm bar per pass (into the run's log, between the harness's lines): off."""
    bar = getattr(module, "tqdm", None)
    module.tqdm = lambda it=None, *a, **k: it
    try:
        yield
    finally:
        if bar is not None:
            module.tqdm = bar

class _DattriValuer:
    settings_class: type
    default_name: str

    models_needed = staticmethod(grand_only)     # the grand coalition's weights

    def __init__(self, name: str | None = None, **settings):
        self.name = name or self.default_name
        self.where = f"valuer.{self.name}"
        self.settings = self.settings_class.of(settings, prefix=self.where)
        require("dattri", self.where)

    def _prepare(self, game, meter):
        s = self.settings
        subject, layers = grand_coalition(game, meter, s, self.where)
        with meter.phase("load_model", own_compute=True):
            hf = unwrap(subject.model).eval()
            names = [f"{n}.weight" for n, _ in layers]
            dim = int(sum(m.weight.numel() for _, m in layers))
        with meter.phase("reference", own_compute=True):
            ex, ref = loss_inputs(subject, game.flat_pairs(), s.train_loss)
            q_ex, q_ref = loss_inputs(subject, game.eval, s.train_loss)
        return subject, hf, names, dim, (ex, ref), (q_ex, q_ref)

    def _valuation(self, game, pair: torch.Tensor, meter, extras: dict) -> Valuation:
        pair = pair.detach().cpu().double().numpy()
        if not np.all(np.isfinite(pair)):
            raise FloatingPointError(f"{self.name}: non-finite scores (non-finite gradients?)")
        point = pair.mean(1)
        cost = meter.cost()
        return Valuation(owner_sums(point, game.owner_sizes), point_values=point, pair_scores=pair, cost=cost,
                         extras={**extras, "n_train": pair.shape[0], "n_eval": pair.shape[1], "sign": SIGN,
                                 "phase_s": dict(cost.phases)})


# ------------------------------------------------------------------ TracIn

@dataclass(frozen=True)
class TracInSettings(InfluenceSettings):
    prefix = "valuer.tracin"
    damping_scale: float = setting(0.1, "unused (TracIn has no Hessian)", min=0, min_exclusive=True)
    proj_dim: int | None = setting(None, "null = no projection (dattri's identity projector); an int = dattri's "
                                         "seeded random projection of the gradients to this size", min=1)
    proj_type: str = setting("normal", "dattri projector when proj_dim is set", choices=PROJ_TYPES)
    lr: float | None = setting(None, "learning-rate weight of the one checkpoint; null = the game's train.lr",
                               min=0, min_exclusive=True)
    normalized: bool = setting(False, "false = TracIn (dot product); true = CosIn (unit-normalised gradients)")
    train_batch_size: int | None = setting(None, "training pairs per dattri batch; dattri recomputes every eval "
                                                 "gradient once per training batch, so null = all in one batch "
                                                 "(eval gradients once; memory ~ N x grad_dim)", min=1)


class TracIn(_DattriValuer):
    """TracInCP through dattri: score(z, e) = η ∇ℓ(z)ᵀ∇ℓ(e) on the grand-coalition model
    (module docstring: terms, sign, cost)."""
    settings_class = TracInSettings
    default_name = "tracin"

    def value(self, game, budget: Budget) -> Valuation:
        import dattri.algorithm.tracin as module
        from dattri.algorithm.tracin import TracInAttributor
        s = self.settings
        meter = CostMeter(game)
        subject, hf, names, dim, (ex, ref), (q_ex, q_ref) = self._prepare(game, meter)
        lr = float(s.lr if s.lr is not None else game.train.lr)
        loss_fn, _, _ = _functions(hf, s.train_loss, subject.beta)
        with meter.phase("tracin", own_compute=True):
            att = TracInAttributor(_task(hf, loss_fn, subject.key), weight_list=torch.tensor([lr], device=subject.device),
                                   normalized_grad=s.normalized, layer_name=names, device=str(subject.device),
                                   projector_kwargs=_projector_kwargs(s.proj_dim, s.proj_type, s.seed,
                                                                      subject.device))
            train_bs = s.train_batch_size or len(ex)
            with _quiet(module):
                pair = att.attribute(_loader(subject, ex, ref, train_bs),
                                     _loader(subject, q_ex, q_ref, s.batch_size))
        n_batches = -(-len(ex) // train_bs)
        return self._valuation(game, pair, meter, {
            "proj_dim": s.proj_dim, "proj_type": s.proj_type if s.proj_dim else "identity", "seed": s.seed,
            "lr_weight": lr, "n_checkpoints": 1, "normalized": s.normalized, "train_loss": s.train_loss,
            "model_kind": subject.kind, "n_layers": len(names), "grad_dim": dim,
            "fwd_bwd_examples": len(ex) + n_batches * len(q_ex)})


# ------------------------------------------------------------------ TRAK

@dataclass(frozen=True)
class TRAKSettings(InfluenceSettings):
    prefix = "valuer.trak"
    damping_scale: float = setting(0.1, "when regularization is null: lambda = damping_scale x the mean "
                                        "eigenvalue of Phi^T Phi (trace / k)", min=0, min_exclusive=True)
    proj_dim: int | None = setting(512, "k, dattri's seeded random projection size; null = no projection "
                                        "(identity: a D x D kernel, small models only)", min=1)
    proj_type: str = setting("normal", "dattri projector when proj_dim is set", choices=PROJ_TYPES)
    regularization: float | None = setting(None, "dattri's regularization: added to the diagonal of Phi^T Phi "
                                                 "(rows = projected gradients of f / sqrt(n_params)); null = "
                                                 "relative (damping_scale)", min=0)


class TRAK(_DattriValuer):
    """TRAK through dattri: score(z, e) = Q_z φ_zᵀ(ΦᵀΦ + λI)⁻¹φ_e on the grand-coalition
    model (module docstring: terms, sign, known differences)."""
    settings_class = TRAKSettings
    default_name = "trak"

    def _relative_regularization(self, task, names, subject, ex, ref, n_params: int, k: int) -> float:
        """damping_scale × trace(ΦᵀΦ)/k, the trace from ≤ DAMPING_SAMPLE evenly spaced train pairs."""
        idx = sorted({round(x) for x in np.linspace(0, len(ex) - 1, min(DAMPING_SAMPLE, len(ex)))})
        batch = next(iter(_loader(subject, [ex[i] for i in idx], None if ref is None else ref[idx], len(idx))))
        params, _ = task.get_param(ckpt_idx=0, layer_name=names)
        grad = task.get_grad_loss_func(in_dims=(None, 0), layer_name=names, ckpt_idx=0)
        g = torch.nan_to_num(grad(params, batch)).detach().double()
        trace = float((g ** 2).sum()) / n_params * len(ex) / len(idx)
        return self.settings.damping_scale * trace / k

    def value(self, game, budget: Budget) -> Valuation:
        import dattri.algorithm.trak as module
        from dattri.algorithm.trak import TRAKAttributor
        s = self.settings
        meter = CostMeter(game)
        subject, hf, names, dim, (ex, ref), (q_ex, q_ref) = self._prepare(game, meter)
        if s.proj_dim is None and dim > MAX_KERNEL_DIM:
            raise ConfigError(f"{self.where}.proj_dim: null (no projection) needs a {dim} x {dim} kernel (the "
                              f"watched weights' size); set {self.where}.proj_dim (e.g. 512) or narrow "
                              f"{self.where}.layers")
        _, f_fn, p_fn = _functions(hf, s.train_loss, subject.beta)
        task = _task(hf, f_fn, subject.key)
        n_params = sum(p.numel() for p in hf.parameters() if p.requires_grad)   # dattri's norm scaler, squared
        k = s.proj_dim or dim
        reg = s.regularization
        if reg is None:
            with meter.phase("damping", own_compute=True):
                reg = self._relative_regularization(task, names, subject, ex, ref, n_params, k)
        att = TRAKAttributor(task, correct_probability_func=p_fn, layer_name=names, device=str(subject.device),
                             regularization=float(reg),
                             projector_kwargs=_projector_kwargs(s.proj_dim, s.proj_type, s.seed, subject.device))
        with meter.phase("trak_cache", own_compute=True):
            t0 = time.perf_counter()
            with _quiet(module):
                att.cache(_loader(subject, ex, ref, s.batch_size))
            train_s = time.perf_counter() - t0
        with meter.phase("trak_attribute", own_compute=True):
            with _quiet(module):
                pair = att.attribute(_loader(subject, q_ex, q_ref, s.batch_size))
        return self._valuation(game, pair, meter, {
            "proj_dim": s.proj_dim, "proj_type": s.proj_type if s.proj_dim else "identity", "seed": s.seed,
            "regularization": float(reg), "regularization_relative": s.regularization is None,
            "damping_scale": s.damping_scale if s.regularization is None else None, "train_loss": s.train_loss,
            "output_function": "margin f = log(p/(1-p)), p = exp(-loss)", "n_checkpoints": 1,
            "model_kind": subject.kind, "n_layers": len(names), "grad_dim": dim, "kernel_dim": k,
            "train_examples_per_s": len(ex) / train_s if train_s > 0 else None,
            "fwd_bwd_examples": len(ex) + len(q_ex)})
