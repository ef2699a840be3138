"""Projected per-example gradients from hooks, without per-example gradients (LoGra).

For a linear layer y_t = W x_t the per-example gradient is G = Σ_t g_t x_tᵀ
(g_t = ∂loss/∂y_t). With projections P_in (k_in × d_in) and P_out (k_out × d_out)
the projected gradient P_out G P_inᵀ = Σ_t (P_out g_t)(P_in x_t)ᵀ is formed from a
forward hook (P_in x_t, padding masked) and a hook on the layer's output gradient
(P_out g_t): full per-example gradients never exist. The backward pass asks
autograd for the gradient of the summed per-example losses with respect to the
input embeddings only, so no weight gradient is computed either. Rows of the same
example (chosen, rejected) are summed into the example's gradient.

The same hooks also accumulate Σ_t x_t x_tᵀ and Σ_t g_t g_tᵀ over real tokens (the
covariances the eigen projections are read from).
"""
from __future__ import annotations

import numpy as np
import torch

from valuers.influence.data import Batch, batches, collate, example_losses, row_logps, unwrap
from valuers.influence.layers import layer_dims
from valuers.influence.subject import Subject, loss_inputs


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
                ko, ki = self.k(name)
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

    def k(self, name) -> tuple[int, int]:
        """(k_out, k_in) of a layer's projected gradient (the width where a side is unprojected)."""
        m = dict(self.layers)[name]
        d_out, d_in = layer_dims(m)
        p_out, p_in = self.proj[name]
        return (d_out if p_out is None else p_out.shape[0]), (d_in if p_in is None else p_in.shape[0])


def iter_projected(subject: Subject, logger: GradientLogger, examples, ref, loss: str, batch_size: int):
    """Yields (indices, {layer: [B, k_out·k_in] float tensor}, losses [B]) batch by batch."""
    for idx in batches(examples, batch_size):
        subject.check_budget()
        b = collate([examples[i] for i in idx], subject.pad_id, subject.device)
        r = None if ref is None else ref[idx]
        grads, losses = logger.projected(subject, b, r, loss)
        yield idx, {n: v.reshape(len(idx), -1) for n, v in grads.items()}, losses


def estimate_covariances(subject: Subject, layers, examples, ref, loss, batch_size) -> dict:
    """E[g gᵀ], E[x xᵀ] per layer over the real tokens of ``examples``."""
    sums, n_tok = {}, 0
    with GradientLogger(subject.model, layers) as lg:
        for idx in batches(examples, batch_size):
            subject.check_budget()
            b = collate([examples[i] for i in idx], subject.pad_id, subject.device)
            c = lg.covariances(subject, b, None if ref is None else ref[idx], loss)
            n_tok += int(b.attn.sum())
            for n, (gg, xx) in c.items():
                d_out, d_in = layer_dims(dict(layers)[n])
                gg = torch.zeros(d_out, d_out, dtype=torch.float64) if gg is None else gg.double().cpu()  # cpu: sum
                xx = torch.zeros(d_in, d_in, dtype=torch.float64) if xx is None else xx.double().cpu()    # cpu: sum
                s = sums.get(n)
                sums[n] = (gg, xx) if s is None else (s[0] + gg, s[1] + xx)
    return {n: (gg / max(1, n_tok), xx / max(1, n_tok)) for n, (gg, xx) in sums.items()}


def query_vectors(subject: Subject, logger: GradientLogger, pairs, loss: str, batch_size: int):
    """Projected gradient of the mean loss over ``pairs`` (per layer, flattened,
    float64 numpy) and that mean loss: the query side of the influence."""
    means, _, loss_mean = _query_pass(subject, logger, pairs, loss, batch_size, per_pair=False)
    return means, loss_mean


def pair_query_vectors(subject: Subject, logger: GradientLogger, pairs, loss: str, batch_size: int):
    """(per layer [E, D] the projected gradient of each pair's loss, one row per pair of
    ``pairs``; per layer [D] the mean-loss gradient exactly as ``query_vectors`` returns
    it; the mean loss), float64 numpy, from the same single pass. The rows average to the
    mean vector (up to summation order)."""
    means, rows, loss_mean = _query_pass(subject, logger, pairs, loss, batch_size, per_pair=True)
    return rows, means, loss_mean


def _query_pass(subject, logger, pairs, loss, batch_size, per_pair: bool):
    ex, ref = loss_inputs(subject, pairs, loss, max(batch_size, 16))
    M = len(ex)
    sums, rows, tot = {}, {}, 0.0
    for idx, grads, losses in iter_projected(subject, logger, ex, ref, loss, batch_size):
        tot += float(losses.double().sum())
        for n, g in grads.items():
            s = g.double().sum(0).cpu()                  # the mean path, as it always was
            sums[n] = s if n not in sums else sums[n] + s
            if per_pair:
                if n not in rows:
                    rows[n] = np.zeros((M, g.shape[1]))
                rows[n][idx] = g.double().cpu().numpy()
    means = [(sums[n] / M).numpy() for n in logger.names]
    return means, ([rows[n] for n in logger.names] if per_pair else None), tot / M
