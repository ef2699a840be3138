"""Naive gradient influence: per-example *full* gradients with ``torch.func``.

The reference LoGra is checked against, and the baseline it is timed against.
Same model, same watched layers (weights of the trainable linear / Conv1D layers,
or the LoRA A/B maps of a peft model), same per-example loss (DPO vs the base
π0, or SFT), same query (gradient of the mean eval loss), same block-diagonal
damped empirical Fisher and the same sign (see ``valuers/logra.py``):

    value(z) = Σ_layers g_evalᵀ (F + λI)⁻¹ g_z,   F = (1/N) Σ g gᵀ,   λ = damping_scale × mean eig(F)

Per-example gradients come from ``vmap(grad(loss_of_one_example))`` over a batch,
with the parameters swapped in by ``functional_call``. Each layer's gradient is
flattened as [d_out, d_in] (a GPT-2 Conv1D's [in, out] weight is transposed).
Unprojected on a small model this is the exact damped empirical-Fisher influence.
With ``proj_dim`` each layer's flattened gradient is multiplied by a dense seeded
Gaussian matrix [proj_dim, numel]/√proj_dim (TRAK-style; layers with numel ≤
proj_dim are kept whole). ``hessian: full`` uses one Fisher block over all layers
(concatenated) instead of one per layer. Nothing is cached: it recomputes every
gradient on every call, as the naive route does.

The forward runs without an attention mask: rows are right-padded and attention is
causal, so real positions never see padding (vmap cannot batch the mask logic).
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.core.errors import ConfigError
from valuers.base import Budget, CostMeter, Valuation
from valuers.logra import (DTYPES, _seed_for, batches, check_common, collate, encode_pairs, influence_scores,
                           load_finetuned, owner_sums, reference_logps, resolve_device, unwrap,
                           watched_layers)

HESSIANS = ("layer", "full")


def _param_names(model, layers) -> dict:
    """layer name -> (parameter name in the transformers model, is_conv1d)."""
    from transformers.pytorch_utils import Conv1D
    return {n: (f"{n}.weight", isinstance(m, Conv1D)) for n, m in layers}


def per_example_gradients(subject, layers, examples, ref, loss: str, batch_size: int = 8,
                          chunk_size: int | None = None):
    """Yields (indices, {layer: [B, d_out·d_in]}) of per-example loss gradients."""
    from torch.func import functional_call, grad, vmap
    hf = unwrap(subject.model)
    names = _param_names(subject.model, layers)
    wanted = {p for p, _ in names.values()}
    params = {n: p.detach() for n, p in hf.named_parameters() if n in wanted}
    emb = hf.get_input_embeddings()
    beta = subject.beta

    def one(p, ids, tmask, r):                        # one example: rows [K, L]
        logits = functional_call(hf, p, (), {"inputs_embeds": emb(ids), "use_cache": False}).logits
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        s = (lp * tmask[:, 1:].to(lp.dtype)).sum(-1)
        if loss == "sft":
            return -s[0] / tmask[0].sum().clamp(min=1).to(s.dtype)
        return -F.logsigmoid(beta * ((s[0] - r[0]) - (s[1] - r[1])))

    per_ex = vmap(grad(one), in_dims=(None, 0, 0, 0), chunk_size=chunk_size)
    for idx in batches(examples, batch_size):
        b = collate([examples[i] for i in idx], subject.pad_id, subject.device)
        K, B = b.rows_per_example, b.n_examples
        ids = b.ids.view(K, B, -1).transpose(0, 1)
        tm = b.targets.view(K, B, -1).transpose(0, 1)
        r = (ref[idx] if ref is not None else torch.zeros(B, K, dtype=torch.float64)).to(subject.dtype)
        with torch.no_grad():        # torch.func.grad ignores an outer no_grad; it stops a useless outer graph
            g = per_ex(params, ids, tm, r.to(subject.device))
        out = {}
        for n, (pn, conv) in names.items():
            w = g[pn]
            out[n] = (w.transpose(1, 2) if conv else w).reshape(B, -1)
        yield idx, out


def dense_projection(d: int, numel: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, numel, generator=g, dtype=dtype) / d ** 0.5


class NaiveInfluence:
    def __init__(self, name: str = "influence_naive", proj_dim: int | None = None, seed: int = 0,
                 train_loss: str = "dpo", damping_scale: float = 0.1, batch_size: int = 8,
                 dtype: str = "float32", hessian: str = "layer", layers: str | None = None,
                 chunk_size: int | None = None, device: str | None = None):
        check_common(train_loss, damping_scale, batch_size, dtype)
        if hessian not in HESSIANS:
            raise ConfigError(f"valuer.hessian: unknown {hessian!r}; choose one of {list(HESSIANS)}")
        if proj_dim is not None and (not isinstance(proj_dim, int) or proj_dim < 1):
            raise ConfigError(f"valuer.proj_dim: {proj_dim!r} must be a positive integer or null (exact)")
        self.name, self.proj_dim, self.seed, self.train_loss = name, proj_dim, seed, train_loss
        self.damping_scale, self.batch_size, self.dtype, self.hessian = damping_scale, batch_size, dtype, hessian
        self.layers, self.chunk_size, self.device = layers, chunk_size, device

    def projections(self, layers) -> dict:
        """layer -> dense [proj_dim, numel] matrix or None (kept whole)."""
        out = {}
        for n, m in layers:
            numel = m.weight.numel()
            out[n] = (None if self.proj_dim is None or numel <= self.proj_dim
                      else dense_projection(self.proj_dim, numel, _seed_for(self.seed, n, "dense"),
                                            m.weight.dtype).to(m.weight.device))
        return out

    def gradients(self, subject, layers, pairs, proj: dict, mean: bool = False):
        """Per-example (projected) gradients [N, D_l] per layer, or their mean [D_l]."""
        ex = encode_pairs(subject.tok, subject.spec, pairs, self.train_loss, subject.max_length)
        ref = reference_logps(subject, ex) if self.train_loss == "dpo" else None
        out, sums = {}, {}
        for idx, g in per_example_gradients(subject, layers, ex, ref, self.train_loss, self.batch_size,
                                            self.chunk_size):
            for n, v in g.items():
                v = v if proj[n] is None else v @ proj[n].T
                if mean:
                    s = v.double().sum(0).cpu()
                    sums[n] = s if n not in sums else sums[n] + s
                else:
                    v = v.detach().cpu().numpy()
                    if n not in out:
                        out[n] = np.zeros((len(ex), v.shape[1]), dtype=v.dtype)
                    out[n][idx] = v
        if mean:
            return [(sums[n] / len(ex)).numpy() for n, _ in layers]
        return [out[n] for n, _ in layers]

    def value(self, game, budget: Budget) -> Valuation:
        meter = CostMeter(game)
        full = (1 << game.n) - 1
        with meter.phase("fine_tune"):
            game.record(full)
        with meter.phase("load_model", own_compute=True):
            subject = load_finetuned(game, DTYPES[self.dtype], resolve_device(self.device))
            layers = watched_layers(subject.model, self.layers)
            proj = self.projections(layers)
        pairs = [p for o in game.owners for p in o]
        with meter.phase("train_gradients", own_compute=True):
            t0 = time.perf_counter()
            train = self.gradients(subject, layers, pairs, proj)
            train_s = time.perf_counter() - t0
        with meter.phase("query_gradient", own_compute=True):
            query = self.gradients(subject, layers, game.eval, proj, mean=True)
        with meter.phase("influence", own_compute=True):
            if self.hessian == "full":
                train, query = [np.concatenate(train, 1)], [np.concatenate(query)]
            scores, info = influence_scores(train, query, self.damping_scale)
        if not np.all(np.isfinite(scores)):
            raise FloatingPointError("influence_naive: non-finite influence scores")
        return Valuation(owner_sums(scores, game.owner_sizes), point_values=scores, cost=meter.cost(), extras={
            "proj_dim": self.proj_dim, "seed": self.seed, "train_loss": self.train_loss,
            "damping_scale": self.damping_scale, "hessian": self.hessian, "model_kind": subject.kind,
            "n_layers": len(layers), "grad_dim": int(sum(a.shape[1] for a in train)),
            "grad_bytes": int(sum(a.nbytes for a in train)), "n_train": len(pairs), "n_eval": len(game.eval),
            "grad_examples_per_s": len(pairs) / train_s if train_s > 0 else None,
            "lambda_mean": float(np.mean([i["lambda"] for i in info])),
            "sign": "value = -influence on eval loss; > 0 helps"})
