"""LoGra-style projected-gradient influence (Choe et al., 2024; library LogIX).

What is valued
    The game's grand-coalition model (all owners' data, fine-tuned by the game's
    own trainer and read from its cache). Every training example z gets

        value(z) = Σ_layers ĝ_evalᵀ (F + λI)⁻¹ ĝ_z

    ĝ_z     projected gradient of z's training loss: the DPO loss of the pair under
            the fine-tuned model with the base π0 as reference (β = game.train.beta),
            or (``train_loss: sft``) the mean NLL of the chosen response;
    ĝ_eval  projected gradient of the *mean* eval loss over ``game.eval`` (same loss);
    F       the empirical Fisher of the projected train gradients, one block per
            layer: F = (1/N) Σ_z ĝ_z ĝ_zᵀ;
    λ       ``damping_scale`` × the mean eigenvalue of F (= trace(F) / dim).

Sign convention
    The influence of up-weighting z on the eval loss is I(z) = −ĝ_evalᵀ (F+λI)⁻¹ ĝ_z.
    value(z) = −I(z): a **positive value means removing z would increase the eval
    loss (z helps)**; a negative value means z hurts (e.g. a flipped preference
    pair). To first order, removing z (weight 1/N) changes the eval loss by +value/N;
    values are on the loss-gradient scale, not the game's utility scale (compare ranks). An owner's value is the sum of its examples' values.
    ``Valuation.point_values`` follow ``[p for o in game.owners for p in o]``.

How (LoGra)
    For a linear layer y_t = W x_t the per-example gradient is G = Σ_t g_t x_tᵀ
    (g_t = ∂loss/∂y_t). With projections P_in (k_in × d_in) and P_out
    (k_out × d_out) the projected gradient P_out G P_inᵀ = Σ_t (P_out g_t)(P_in x_t)ᵀ
    is formed from a forward hook (P_in x_t, padding masked) and a hook on the
    layer's output gradient (P_out g_t): full per-example gradients never exist.
    The backward pass asks autograd for the gradient of the summed per-example
    losses with respect to the input embeddings only, so no weight gradient is
    computed either. Projections: ``random`` (seeded Gaussian, orthonormalised
    rows; the seed of each layer/side derives from ``seed`` and the layer name) or
    ``eigen`` (top-k eigenvectors of the layer's E[x xᵀ] and E[g gᵀ] from one extra
    pass over the training data). ``k_in``/``k_out`` per side; ``null`` = no
    projection on that side; ``clip_k`` turns k > width into k = width (a
    full-rank rotation) instead of an error.

Watched layers
    LoRA stages: the model is rebuilt *un-merged* as a peft model (earlier stages of
    a sequential chain merged into the base), so the watched layers are the LoRA A/B
    linear maps. Full fine-tunes: every trainable ``nn.Linear`` / GPT-2 ``Conv1D``
    (weight [in, out]) except the output head (tied to the input embedding on
    GPT-2). Biases are not watched. ``layers`` (a regex) narrows the set.

Logs
    Projected train gradients are written once, as memory-mapped ``.npy`` files (one
    per layer, [N, k_out·k_in]), with the projections and a ``meta.json``, under
    ``<game.cache_dir>/logra/<key>/`` — key = the grand-coalition model's cache key
    (task, data, model, trainer, game, seed, code), the projection (kind, seed, k),
    the loss and the dtype — written into a temp folder and renamed into place.
    Reruns and other queries (e.g. another damping) reuse them; logs whose
    ``meta.json`` names another model or projection are refused (ConfigError).
    The preconditioned solve runs in float64; with dim > N it uses the N×N kernel
    (Woodbury) form, which is the same matrix inverse.

Sequential game: the watched parameters are the last stage's; the loss still
uses π0 as reference. This is an approximation (the stages' references differ).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.core.errors import ConfigError
from valuers.base import Budget, CostMeter, Valuation, owner_sums  # noqa: F401 (owner_sums re-exported)

LOG_FORMAT = 1
LOSSES = ("dpo", "sft")
PROJECTIONS = ("random", "eigen")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ====================================================================== data

def encode_pairs(tok, spec, pairs, loss: str, max_length: int | None) -> list[tuple]:
    """Per pair, its rows ``((ids, first_target), ...)``: chosen and rejected (DPO) or
    chosen only (SFT), tokenised as TRL does (``bench.core.train.tokenize_pair``: response
    + EOS) and cut to ``max_length`` tokens from the start (TRL's ``keep_start``)."""
    from bench.core.train import tokenize_pair
    out = []
    for p in pairs:
        p_ids, c_ids, r_ids = tokenize_pair(tok, spec, p)
        comps = (c_ids,) if loss == "sft" else (c_ids, r_ids)
        rows = []
        for comp in comps:
            ids = list(p_ids) + list(comp)
            if max_length:
                ids = ids[:max_length]
            rows.append((tuple(ids), max(1, len(p_ids))))
        out.append(tuple(rows))
    return out


@dataclass
class Batch:
    """Rows are kind-major: chosen of examples 0..B-1, then rejected of 0..B-1."""
    ids: torch.Tensor        # [R, L] right-padded
    attn: torch.Tensor       # [R, L] 1 = real token
    targets: torch.Tensor    # [R, L] bool: token t is a response token (predicted at t-1)
    n_examples: int
    rows_per_example: int


def collate(examples, pad_id: int, device="cpu") -> Batch:
    B, K = len(examples), len(examples[0])
    rows = [ex[j] for j in range(K) for ex in examples]
    L = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), L), dtype=torch.long)
    tgt = torch.zeros((len(rows), L), dtype=torch.bool)
    for r, (seq, start) in enumerate(rows):
        ids[r, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[r, :len(seq)] = 1
        tgt[r, start:len(seq)] = True
    return Batch(ids.to(device), attn.to(device), tgt.to(device), B, K)


def batches(examples, batch_size: int):
    """Index chunks, longest first (length-bucketed; results do not depend on it)."""
    order = sorted(range(len(examples)), key=lambda i: -max(len(r[0]) for r in examples[i]))
    for b in range(0, len(order), batch_size):
        yield order[b:b + batch_size]


def unwrap(model):
    """The transformers model inside a peft wrapper (LoRA layers stay injected)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def row_logps(model, batch: Batch) -> torch.Tensor:
    """Σ log π(token) over each row's response tokens, differentiable. Only the
    response positions go through the output head (as the game scores)."""
    hf = unwrap(model)
    inner = getattr(hf, hf.base_model_prefix)
    head = hf.get_output_embeddings()
    h = inner(input_ids=batch.ids, attention_mask=batch.attn, use_cache=False).last_hidden_state
    r, t = batch.targets.nonzero(as_tuple=True)
    logits = head(h[r, t - 1])
    lp = torch.log_softmax(logits, -1).gather(1, batch.ids[r, t][:, None])[:, 0]
    return torch.zeros(batch.ids.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, r, lp)


def example_losses(lp: torch.Tensor, ref: torch.Tensor | None, batch: Batch, loss: str, beta: float):
    """Per-example training loss [B] from row log-probs [R] and reference log-probs [B, 2].

    dpo  −log σ(β[(log π(y_w) − log π0(y_w)) − (log π(y_l) − log π0(y_l))])  (TRL's sigmoid loss)
    sft  −(1/|y_w|) Σ log π(y_w tokens)
    """
    B = batch.n_examples
    if loss == "sft":
        n = batch.targets[:B].sum(1).clamp(min=1).to(lp.dtype)
        return -lp[:B] / n
    ref = ref.to(lp.dtype)
    m = (lp[:B] - ref[:, 0]) - (lp[B:2 * B] - ref[:, 1])
    return -F.logsigmoid(beta * m)


# ====================================================================== the model

@dataclass
class Subject:
    """The fine-tuned model whose training data is valued, with what its loss needs."""
    model: Any                  # peft model (LoRA stage) or plain transformers model
    tok: Any
    spec: Any                   # bench.core.models.ModelSpec
    beta: float
    max_length: int | None
    ref_model: Any = None       # separate reference; None = this peft model with its adapter disabled
    key: str = ""               # cache key of the weights
    kind: str = "full"          # lora | full

    @contextlib.contextmanager
    def reference(self):
        if self.ref_model is not None:
            yield self.ref_model
        else:
            with self.model.disable_adapter():
                yield self.model

    @property
    def dtype(self):
        return next(p for p in self.model.parameters()).dtype

    @property
    def device(self):
        return next(p for p in self.model.parameters()).device

    @property
    def pad_id(self) -> int:
        return self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id


def load_finetuned(game, dtype=torch.float32, device="cpu") -> Subject:
    """The grand-coalition model of ``game``, rebuilt from its cached stage chain."""
    from bench.core.train import clone_model, materialize
    full = (1 << game.n) - 1
    chain = game.stages(full)
    if not chain:
        raise ConfigError("game: the grand coalition has no training stage (no owners); nothing to value")
    base, tok = game.base()
    last = chain[-1]
    if last["kind"] == "lora":
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
        start = materialize(base, chain[:-1]) if len(chain) > 1 else clone_model(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(start, LoraConfig(**last["config"]))
            set_peft_model_state_dict(model, last["state"])
        ref = None if len(chain) == 1 else base
    elif last["kind"] == "full":
        model = materialize(base, chain)
        model.requires_grad_(True)
        ref = base
    else:
        raise ConfigError(f"game: unknown stage kind {last['kind']!r} (expected lora or full)")
    model.to(device=device, dtype=dtype).eval()
    if ref is not None and (dtype != torch.float32 or str(device) != "cpu"):
        ref = clone_model(ref).to(device=device, dtype=dtype).eval()
    return Subject(model, tok, game.model_spec, game.train.beta, game.train.max_length, ref,
                   key=game.key(full), kind=last["kind"])


@torch.no_grad()
def reference_logps(subject: Subject, examples, batch_size: int = 32) -> torch.Tensor:
    """[N, rows] Σ log π0 over response tokens (float64), for the DPO loss."""
    out = torch.zeros((len(examples), len(examples[0])), dtype=torch.float64)
    with subject.reference() as ref:
        for idx in batches(examples, batch_size):
            b = collate([examples[i] for i in idx], subject.pad_id, subject.device)
            lp = row_logps(ref, b).double().cpu().view(b.rows_per_example, len(idx)).T
            out[idx] = lp
    return out


def watched_layers(model, pattern: str | None = None) -> list[tuple[str, torch.nn.Module]]:
    """Trainable ``nn.Linear`` / ``Conv1D`` layers (names relative to the transformers
    model), the output head excluded; a peft model yields its LoRA A/B maps."""
    from transformers.pytorch_utils import Conv1D
    hf = unwrap(model)
    head = hf.get_output_embeddings()
    out = []
    for name, m in hf.named_modules():
        if (isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head and m.weight.requires_grad
                and (pattern is None or re.search(pattern, name))):
            out.append((name, m))
    if not out:
        what = f" matching valuer.layers={pattern!r}" if pattern else ""
        raise ConfigError(f"valuer.layers: {type(hf).__name__} has no trainable nn.Linear/Conv1D layer{what}; "
                          f"value a full or LoRA fine-tune (trainable linear weights) or widen valuer.layers")
    return out


def layer_dims(module) -> tuple[int, int]:
    """(d_out, d_in); a GPT-2 Conv1D stores its weight as [in, out]."""
    from transformers.pytorch_utils import Conv1D
    w = module.weight
    return (w.shape[1], w.shape[0]) if isinstance(module, Conv1D) else (w.shape[0], w.shape[1])


# ====================================================================== projections

def _side_k(k, d: int, clip: bool, field_name: str, layer: str):
    if k is None:
        return None
    if k > d:
        if clip:
            return d
        raise ConfigError(f"valuer.{field_name}: {k} exceeds the width {d} of layer {layer}; lower "
                          f"valuer.{field_name}, set it to null (no projection) or set valuer.clip_k=true")
    return int(k)


def projection_shapes(layers, k_in, k_out, clip: bool) -> dict:
    """name -> (k_out or None, k_in or None, d_out, d_in)."""
    shapes = {}
    for name, m in layers:
        d_out, d_in = layer_dims(m)
        shapes[name] = (_side_k(k_out, d_out, clip, "k_out", name), _side_k(k_in, d_in, clip, "k_in", name),
                        d_out, d_in)
    return shapes


def _seed_for(seed: int, name: str, side: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}/{side}".encode()).digest()[:8], "little") >> 1


def orthonormal_rows(k: int, d: int, seed: int) -> torch.Tensor:
    """[k, d], seeded Gaussian with orthonormalised rows (float64)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, k, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r))).T.contiguous()


def random_projections(shapes: dict, seed: int) -> dict:
    """name -> (P_out [k_out, d_out] | None, P_in [k_in, d_in] | None), float64."""
    return {n: (None if ko is None else orthonormal_rows(ko, do, _seed_for(seed, n, "out")),
                None if ki is None else orthonormal_rows(ki, di, _seed_for(seed, n, "in")))
            for n, (ko, ki, do, di) in shapes.items()}


def eigen_projections(shapes: dict, covs: dict) -> dict:
    """Top-k eigenvectors (rows) of E[g gᵀ] (out side) and E[x xᵀ] (in side)."""
    def top(c, k):
        if k is None:
            return None
        w, v = torch.linalg.eigh(c.double())
        return v[:, torch.argsort(w, descending=True)[:k]].T.contiguous()
    return {n: (top(covs[n][0], ko), top(covs[n][1], ki)) for n, (ko, ki, _, _) in shapes.items()}


# ====================================================================== hooks

class GradientLogger:
    """Forward hooks on the watched layers + a hook on each output's gradient.

    ``mode="grad"``: per-example projected gradients Σ_t (P_out g_t)(P_in x_t)ᵀ.
    ``mode="cov"``:  running Σ_t x_t x_tᵀ and Σ_t g_t g_tᵀ over real tokens.
    Hooks act only inside ``projected(...)`` / ``covariances(...)``.
    """

    def __init__(self, model, layers, projections: dict | None = None):
        self.model, self.layers = model, layers
        self.names = [n for n, _ in layers]
        dt, dev = self._dtype_device()
        self.proj = {n: tuple(None if p is None else p.to(device=dev, dtype=dt) for p in
                              (projections or {}).get(n, (None, None))) for n in self.names}
        self.mode = None
        self._mask = None
        self._masks: dict = {}
        self._acc: dict = {}
        self._emb = None
        self._handles = []

    def _dtype_device(self):
        p = next(iter(self.layers))[1].weight
        return p.dtype, p.device

    def __enter__(self):
        for name, m in self.layers:
            self._handles.append(m.register_forward_hook(self._fwd(name)))
        emb = unwrap(self.model).get_input_embeddings()
        self._handles.append(emb.register_forward_hook(self._emb_hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _emb_hook(self, module, inputs, out):
        if self.mode is None:
            return None
        if not out.requires_grad:            # frozen embeddings (peft): make it a grad root
            out = out.detach().requires_grad_()
        self._emb = out
        return out

    def _fwd(self, name):
        def hook(module, inputs, out):
            if self.mode is None or not out.requires_grad:
                return
            x = inputs[0].detach()
            mask = self._mask_as(x)                                 # [R, L, 1]; padding = 0
            p_out, p_in = self.proj[name]
            if self.mode == "cov":
                xf = (x * mask).reshape(-1, x.shape[-1])
                self._add(name, 1, xf.T @ xf)
                out.register_hook(lambda g, name=name: self._cov_g(name, g))
                return
            xp = (x if p_in is None else x @ p_in.T) * mask         # [R, L, k_in], masked after projecting (cheaper)
            out.register_hook(lambda g, name=name, xp=xp, p_out=p_out: self._grad(name, g, xp, p_out))
        return hook

    def _mask_as(self, t):
        m = self._masks.get(t.dtype)
        if m is None:
            m = self._masks[t.dtype] = self._mask.to(t.dtype).unsqueeze(-1)
        return m

    def _add(self, name, slot, value):
        acc = self._acc.setdefault(name, [None, None])
        acc[slot] = value if acc[slot] is None else acc[slot] + value

    def _grad(self, name, g, xp, p_out):
        g = g.detach()
        gp = (g if p_out is None else g @ p_out.T) * self._mask_as(g)   # [R, L, k_out]
        self._add(name, 0, torch.bmm(gp.transpose(1, 2), xp))      # [R, k_out, k_in]

    def _cov_g(self, name, g):
        gf = (g.detach() * self._mask_as(g)).reshape(-1, g.shape[-1])
        self._add(name, 0, gf.T @ gf)

    def _backward(self, subject, batch: Batch, ref, loss: str):
        self._acc, self._mask, self._masks, self._emb = {}, batch.attn, {}, None
        lp = row_logps(self.model, batch)
        losses = example_losses(lp, ref, batch, loss, subject.beta)
        torch.autograd.grad(losses.sum(), [self._emb])
        return losses.detach()

    def projected(self, subject, batch: Batch, ref, loss: str) -> tuple[dict, torch.Tensor]:
        """({layer: [B, k_out, k_in]}, per-example losses [B]) for one batch."""
        self.mode = "grad"
        try:
            losses = self._backward(subject, batch, ref, loss)
        finally:
            self.mode = None
        B, K = batch.n_examples, batch.rows_per_example
        out = {}
        for name in self.names:
            acc = self._acc.get(name, [None])[0]
            if acc is None:                                          # layer not on the loss's path
                ko, ki = self._k(name)
                out[name] = torch.zeros((B, ko, ki), dtype=losses.dtype, device=losses.device)
            else:
                out[name] = acc.view(K, B, *acc.shape[1:]).sum(0)
        self._acc = {}
        return out, losses

    def covariances(self, subject, batch: Batch, ref, loss: str) -> dict:
        """{layer: (Σ g gᵀ [d_out, d_out], Σ x xᵀ [d_in, d_in])} for one batch."""
        self.mode = "cov"
        try:
            self._backward(subject, batch, ref, loss)
        finally:
            self.mode = None
        acc, self._acc = self._acc, {}
        return {n: tuple(acc.get(n, [None, None])) for n in self.names}

    def _k(self, name):
        m = dict(self.layers)[name]
        d_out, d_in = layer_dims(m)
        p_out, p_in = self.proj[name]
        return (d_out if p_out is None else p_out.shape[0]), (d_in if p_in is None else p_in.shape[0])


def iter_projected(subject: Subject, logger: GradientLogger, examples, ref, loss: str, batch_size: int):
    """Yields (indices, {layer: [B, k_out·k_in] float tensor}, losses [B]) batch by batch."""
    for idx in batches(examples, batch_size):
        b = collate([examples[i] for i in idx], subject.pad_id, subject.device)
        r = None if ref is None else ref[idx]
        grads, losses = logger.projected(subject, b, r, loss)
        yield idx, {n: v.reshape(len(idx), -1) for n, v in grads.items()}, losses


def estimate_covariances(subject, layers, examples, ref, loss, batch_size) -> dict:
    """E[g gᵀ], E[x xᵀ] per layer over the real tokens of ``examples``."""
    sums, n_tok = {}, 0
    with GradientLogger(subject.model, layers) as lg:
        for idx in batches(examples, batch_size):
            b = collate([examples[i] for i in idx], subject.pad_id, subject.device)
            c = lg.covariances(subject, b, None if ref is None else ref[idx], loss)
            n_tok += int(b.attn.sum())
            for n, (gg, xx) in c.items():
                d_out, d_in = layer_dims(dict(layers)[n])
                gg = torch.zeros(d_out, d_out, dtype=torch.float64) if gg is None else gg.double().cpu()
                xx = torch.zeros(d_in, d_in, dtype=torch.float64) if xx is None else xx.double().cpu()
                s = sums.get(n)
                sums[n] = (gg, xx) if s is None else (s[0] + gg, s[1] + xx)
    return {n: (gg / max(1, n_tok), xx / max(1, n_tok)) for n, (gg, xx) in sums.items()}


# ====================================================================== Hessian + scores

def precondition(G, q: np.ndarray, damping_scale: float, chunk: int = 2048) -> tuple[np.ndarray, dict]:
    """q̃ = (F + λI)⁻¹ q with F = GᵀG / N (G: [N, D], may be a memmap), λ = damping_scale ×
    trace(F)/D. Primal (D×D Cholesky) when D ≤ N, else the Woodbury form
    (F+λI)⁻¹ = (1/λ)[I − Gᵀ(NλI + GGᵀ)⁻¹G]. All in float64."""
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


def influence_scores(train: list, queries: list, damping_scale: float, chunk: int = 4096):
    """score_i = Σ_l ĝ_{l,i} · (F_l + λ_l I)⁻¹ ĝ_{l,query}; returns (scores [N], per-layer info)."""
    N = train[0].shape[0]
    scores, info = np.zeros(N), []
    for G, q in zip(train, queries):
        qt, inf = precondition(G, q, damping_scale)
        for s in range(0, N, chunk):
            scores[s:s + chunk] += np.asarray(G[s:s + chunk], dtype=np.float64) @ qt
        info.append(inf)
    return scores, info


# ====================================================================== logs on disk

META_CHECKED = ("model_key", "data", "projection", "seed", "k_in", "k_out", "clip_k", "train_loss",
                "layers_filter", "dtype", "format")


@dataclass
class GradientLogs:
    path: Path
    meta: dict
    arrays: list            # per layer, np.memmap [N, D]
    projections: dict       # name -> (P_out, P_in)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays))

    @staticmethod
    def open(path: Path, expected: dict) -> "GradientLogs | None":
        """The finished logs at ``path``, or None if absent. Logs written for another
        model, data or projection are refused with a ConfigError."""
        path = Path(path)
        if not path.exists():
            return None
        if not (path / "COMPLETE").exists() or not (path / "meta.json").exists():
            raise ConfigError(f"valuer.logs_dir: {path} exists but holds no finished LoGra logs; "
                              f"delete it or point valuer.logs_dir elsewhere")
        meta = json.loads((path / "meta.json").read_text())
        for f in META_CHECKED:
            if meta.get(f) != expected.get(f):
                what = {"model_key": "another model (grand-coalition weights)", "data": "other training data",
                        "seed": "another projection seed"}.get(f, f"another {f}")
                raise ConfigError(f"valuer.logs_dir: logs in {path} were written for {what} "
                                  f"({f}={meta.get(f)!r}, expected {expected.get(f)!r}); delete them or "
                                  f"point valuer.logs_dir elsewhere")
        arrays = [np.load(path / f"layer_{i:04d}.npy", mmap_mode="r") for i in range(len(meta["layers"]))]
        with np.load(path / "projections.npz") as z:
            proj = {n: tuple(torch.from_numpy(z[f"{i}_{s}"]) if f"{i}_{s}" in z else None for s in ("out", "in"))
                    for i, n in enumerate(meta["layers"])}
        return GradientLogs(path, meta, arrays, proj)

    def query(self) -> dict | None:
        p = self.path / "query.npz"
        if not p.exists():
            return None
        try:
            with np.load(p) as z:
                return {"vectors": [z[f"q_{i}"] for i in range(len(self.arrays))],
                        "eval_loss": float(z["eval_loss"]), "n_eval": int(z["n_eval"])}
        except Exception:        # a torn file from another tool reads as missing
            return None

    def save_query(self, vectors, eval_loss: float, n_eval: int) -> None:
        import io
        from bench.core.cache import atomic_write_bytes
        buf = io.BytesIO()
        np.savez(buf, eval_loss=eval_loss, n_eval=n_eval, **{f"q_{i}": v for i, v in enumerate(vectors)})
        atomic_write_bytes(self.path / "query.npz", buf.getvalue())


def write_logs(path: Path, meta: dict, subject: Subject, logger: GradientLogger, examples, ref, loss: str,
               batch_size: int, np_dtype) -> dict:
    """Stream projected train gradients into memmaps in a temp folder, then rename it
    into place (atomic: a crash leaves no half-written logs). Returns timing stats."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    N = len(examples)
    try:
        mms = []
        for i, n in enumerate(logger.names):
            ko, ki = logger._k(n)
            mms.append(np.lib.format.open_memmap(tmp / f"layer_{i:04d}.npy", mode="w+", dtype=np_dtype,
                                                 shape=(N, ko * ki)))
        t0 = time.perf_counter()
        for idx, grads, _ in iter_projected(subject, logger, examples, ref, loss, batch_size):
            for mm, n in zip(mms, logger.names):
                mm[idx] = grads[n].detach().cpu().numpy().astype(np_dtype, copy=False)
        log_s = time.perf_counter() - t0
        for mm in mms:
            mm.flush()
        del mms
        np.savez(tmp / "projections.npz", **{f"{i}_{s}": p.double().cpu().numpy()
                                              for i, n in enumerate(logger.names)
                                              for s, p in zip(("out", "in"), logger.proj[n]) if p is not None})
        (tmp / "meta.json").write_text(json.dumps({**meta, "n": N}, indent=1))
        (tmp / "COMPLETE").write_text("ok")
        try:
            os.rename(tmp, path)
        except OSError:          # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"log_s": log_s, "examples_per_s": N / log_s if log_s > 0 else float("inf")}


def query_vectors(subject: Subject, logger: GradientLogger, pairs, loss: str, batch_size: int):
    """Projected gradient of the mean eval loss (per layer, flattened) and that loss."""
    ex = encode_pairs(subject.tok, subject.spec, pairs, loss, subject.max_length)
    ref = reference_logps(subject, ex, max(batch_size, 16)) if loss == "dpo" else None
    sums, tot = {}, 0.0
    for idx, grads, losses in iter_projected(subject, logger, ex, ref, loss, batch_size):
        tot += float(losses.double().sum())
        for n, g in grads.items():
            s = g.double().sum(0).cpu()
            sums[n] = s if n not in sums else sums[n] + s
    M = len(ex)
    return [(sums[n] / M).numpy() for n in logger.names], tot / M


def check_common(train_loss, damping_scale, batch_size, dtype):
    if train_loss not in LOSSES:
        raise ConfigError(f"valuer.train_loss: unknown {train_loss!r}; choose one of {list(LOSSES)}")
    if not damping_scale > 0:
        raise ConfigError(f"valuer.damping_scale: {damping_scale} must be > 0 (default 0.1)")
    if batch_size < 1:
        raise ConfigError(f"valuer.batch_size: {batch_size} must be >= 1")
    if dtype not in DTYPES:
        raise ConfigError(f"valuer.dtype: unknown {dtype!r}; choose one of {list(DTYPES)}")


def resolve_device(device):
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ====================================================================== the valuer

class LoGra:
    """Projected-gradient influence of each training example on the eval loss of the
    grand-coalition model. See the module docstring for the formula and sign."""

    def __init__(self, name: str = "logra", projection: str = "random", k_in: int | None = 16,
                 k_out: int | None = 16, seed: int = 0, train_loss: str = "dpo", damping_scale: float = 0.1,
                 batch_size: int = 8, dtype: str = "float32", clip_k: bool = True, layers: str | None = None,
                 logs_dir: str | None = None, device: str | None = None):
        if projection not in PROJECTIONS:
            raise ConfigError(f"valuer.projection: unknown {projection!r}; choose one of {list(PROJECTIONS)}")
        for f, k in (("k_in", k_in), ("k_out", k_out)):
            if k is not None and (not isinstance(k, int) or k < 1):
                raise ConfigError(f"valuer.{f}: {k!r} must be a positive integer or null (no projection)")
        check_common(train_loss, damping_scale, batch_size, dtype)
        self.name, self.projection, self.k_in, self.k_out, self.seed = name, projection, k_in, k_out, seed
        self.train_loss, self.damping_scale, self.batch_size = train_loss, damping_scale, batch_size
        self.dtype, self.clip_k, self.layers, self.logs_dir, self.device = dtype, clip_k, layers, logs_dir, device

    def meta(self, model_key: str, data_fp: str) -> dict:
        return {"format": LOG_FORMAT, "model_key": model_key, "data": data_fp, "projection": self.projection,
                "seed": self.seed, "k_in": self.k_in, "k_out": self.k_out, "clip_k": self.clip_k,
                "train_loss": self.train_loss, "layers_filter": self.layers, "dtype": self.dtype}

    def default_logs_dir(self, cache_dir, meta: dict) -> Path:
        from bench.core.cache import content_key
        return Path(cache_dir) / "logra" / content_key(meta)[:24]

    def value(self, game, budget: Budget) -> Valuation:
        from bench.core.cache import content_key
        meter = CostMeter(game)
        full = (1 << game.n) - 1
        with meter.phase("fine_tune"):
            game.record(full)                      # v(N): logged (and trained if missing) by the game
        with meter.phase("load_model", own_compute=True):
            subject = load_finetuned(game, DTYPES[self.dtype], resolve_device(self.device))
            layers = watched_layers(subject.model, self.layers)
            shapes = projection_shapes(layers, self.k_in, self.k_out, self.clip_k)
        pairs = [p for o in game.owners for p in o]
        meta = self.meta(subject.key, content_key([asdict(p) for p in pairs]))
        path = Path(self.logs_dir) if self.logs_dir else self.default_logs_dir(game.cache_dir, meta)
        logs = GradientLogs.open(path, meta)
        reused, stats, passes = logs is not None, {}, 0
        if logs is None:
            with meter.phase("reference", own_compute=True):
                ex = encode_pairs(subject.tok, subject.spec, pairs, self.train_loss, subject.max_length)
                ref = reference_logps(subject, ex) if self.train_loss == "dpo" else None
            if self.projection == "random":
                proj = random_projections(shapes, self.seed)
            else:
                with meter.phase("eigen", own_compute=True):
                    covs = estimate_covariances(subject, layers, ex, ref, self.train_loss, self.batch_size)
                    proj = eigen_projections(shapes, covs)
                passes += len(ex)
            meta_w = {**meta, "layers": [n for n, _ in layers], "dims": [list(shapes[n][:2]) for n, _ in layers]}
            with meter.phase("log_train", own_compute=True):
                with GradientLogger(subject.model, layers, proj) as lg:
                    stats = write_logs(path, meta_w, subject, lg, ex, ref, self.train_loss, self.batch_size,
                                       np.float64 if self.dtype == "float64" else np.float32)
            passes += len(ex)
            logs = GradientLogs.open(path, meta)
        by_name = dict(layers)
        if [n for n in logs.meta["layers"] if n not in by_name]:
            raise ConfigError(f"valuer.logs_dir: logs in {path} watch layers this model does not have "
                              f"(e.g. {[n for n in logs.meta['layers'] if n not in by_name][0]}); delete them")
        q = logs.query()
        if q is None:
            with meter.phase("log_query", own_compute=True):
                with GradientLogger(subject.model, [(n, by_name[n]) for n in logs.meta["layers"]],
                                    logs.projections) as lg:
                    vecs, eval_loss = query_vectors(subject, lg, game.eval, self.train_loss, self.batch_size)
                logs.save_query(vecs, eval_loss, len(game.eval))
                q = {"vectors": vecs, "eval_loss": eval_loss, "n_eval": len(game.eval)}
                passes += len(game.eval)
        with meter.phase("influence", own_compute=True):
            scores, info = influence_scores(logs.arrays, q["vectors"], self.damping_scale)
        if not np.all(np.isfinite(scores)):
            raise FloatingPointError("logra: non-finite influence scores (non-finite gradients?)")
        point = scores                              # value = −influence on the eval loss (see docstring)
        lams = [i["lambda"] for i in info]
        return Valuation(owner_sums(point, game.owner_sizes), point_values=point, cost=meter.cost(), extras={
            "projection": self.projection, "k_in": self.k_in, "k_out": self.k_out, "clip_k": self.clip_k,
            "seed": self.seed, "train_loss": self.train_loss, "damping_scale": self.damping_scale,
            "model_kind": subject.kind, "n_layers": len(logs.arrays),
            "log_dim": int(sum(a.shape[1] for a in logs.arrays)), "log_bytes": logs.nbytes,
            "logs_dir": str(path), "logs_reused": reused, "n_train": len(pairs), "n_eval": q["n_eval"],
            "eval_loss": q["eval_loss"], "log_examples_per_s": stats.get("examples_per_s"),
            "fwd_bwd_examples": passes, "lambda_mean": float(np.mean(lams)),
            "hessian_forms": {f: sum(i["form"] == f for i in info) for f in ("primal", "dual", "zero")},
            "sign": "value = -influence on eval loss; > 0 helps"})
