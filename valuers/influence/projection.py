"""Projections of per-layer gradients, seeded per layer.

A layer's gradient G [d_out, d_in] is projected on both sides, P_out G P_inᵀ
[k_out, k_in] (LoGra), with

  random  seeded Gaussian matrices with orthonormalised rows; the seed of each
          layer and side derives from the valuer's ``seed`` and the layer name
          (``layer_seed``), so a layer's projection does not depend on the others;
  eigen   the top-k eigenvectors of the layer's E[g gᵀ] (out side) and E[x xᵀ]
          (in side), from one extra pass (``hooks.estimate_covariances``).

``k`` = None on a side = no projection there. ``clip`` turns k > width into
k = width (a full-rank rotation, which leaves the damped influence unchanged)
instead of an error. ``dense_projection`` is the TRAK-style alternative on the
flattened gradient: one dense Gaussian [d, numel] / √d per layer.
"""
from __future__ import annotations

import hashlib

import torch

from bench.core.errors import ConfigError
from valuers.influence.layers import layer_dims


def _side_k(k, d: int, clip: bool, setting: str, layer: str):
    if k is None:
        return None
    if k > d:
        if clip:
            return d
        where = setting.rpartition(".")[0]
        raise ConfigError(f"{setting}: {k} exceeds the width {d} of layer {layer}; lower "
                          f"{setting}, set it to null (no projection) or set {where}.clip_k=true")
    return int(k)


def projection_shapes(layers, k_in, k_out, clip: bool, where: str = "valuer") -> dict:
    """name -> (k_out or None, k_in or None, d_out, d_in). ``where`` names the settings
    in error messages (``<where>.k_in``)."""
    shapes = {}
    for name, m in layers:
        d_out, d_in = layer_dims(m)
        shapes[name] = (_side_k(k_out, d_out, clip, f"{where}.k_out", name),
                        _side_k(k_in, d_in, clip, f"{where}.k_in", name), d_out, d_in)
    return shapes


def layer_seed(seed: int, name: str, side: str) -> int:
    """The seed of one layer's projection on one side ("out", "in", "dense"), from the
    valuer's seed and the layer name (a 63-bit integer)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}/{side}".encode()).digest()[:8], "little") >> 1


def orthonormal_rows(k: int, d: int, seed: int) -> torch.Tensor:
    """[k, d], seeded Gaussian with orthonormalised rows (float64)."""
    g = torch.Generator().manual_seed(seed)          # cpu: the same projection on every device
    a = torch.randn(d, k, generator=g, dtype=torch.float64)   # cpu: moved by GradientLogger (hooks.py)
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r))).T.contiguous()


def random_projections(shapes: dict, seed: int) -> dict:
    """name -> (P_out [k_out, d_out] | None, P_in [k_in, d_in] | None), float64."""
    return {n: (None if ko is None else orthonormal_rows(ko, do, layer_seed(seed, n, "out")),
                None if ki is None else orthonormal_rows(ki, di, layer_seed(seed, n, "in")))
            for n, (ko, ki, do, di) in shapes.items()}


def eigen_projections(shapes: dict, covs: dict) -> dict:
    """Top-k eigenvectors (rows) of E[g gᵀ] (out side) and E[x xᵀ] (in side)."""
    def top(c, k):
        if k is None:
            return None
        w, v = torch.linalg.eigh(c.double())
        return v[:, torch.argsort(w, descending=True)[:k]].T.contiguous()
    return {n: (top(covs[n][0], ko), top(covs[n][1], ki)) for n, (ko, ki, _, _) in shapes.items()}


def dense_projection(d: int, numel: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """[d, numel] seeded Gaussian / √d (E[PᵀP] = I): a TRAK-style projection of a
    flattened gradient."""
    g = torch.Generator().manual_seed(seed)          # cpu: the same projection on every device
    return torch.randn(d, numel, generator=g, dtype=dtype) / d ** 0.5   # cpu: callers move it


def dense_projections(layers, proj_dim: int | None, seed: int) -> dict:
    """layer -> dense [proj_dim, numel] matrix (seed ``layer_seed(seed, name, "dense")``,
    the weight's dtype and device), or None where the layer is kept whole
    (``proj_dim`` None, or numel ≤ proj_dim)."""
    out = {}
    for n, m in layers:
        numel = m.weight.numel()
        out[n] = (None if proj_dim is None or numel <= proj_dim
                  else dense_projection(proj_dim, numel, layer_seed(seed, n, "dense"),
                                        m.weight.dtype).to(m.weight.device))
    return out
