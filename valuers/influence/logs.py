"""Projected train gradients on disk: written once, memory-mapped, reused.

One ``.npy`` per watched layer ([N, k_out·k_in]), the projections
(``projections.npz``), a ``meta.json`` and a ``COMPLETE`` marker, written into a
temp folder beside the target and renamed into place (``cache.atomic_folder``: a
crash or a power loss leaves no half-written logs; if another process finished first,
its logs are kept; damaged logs are removed and rebuilt). The
folder is content-addressed by its caller (LoGra: the grand-coalition model's
cache key, the training data, the projection, the loss and the dtype). Logs whose
``meta.json`` names another model, data or projection are refused (ConfigError).
The query vectors (the eval-loss gradient) are cached beside them (``query.npz``:
``q_<layer>`` the mean eval loss's gradient [D], ``p_<layer>`` the per-eval-pair
gradients [E, D]; files written before the per-pair rows existed have no ``p_``
keys and read with ``pair_vectors: None``).
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.core.cache import atomic_folder, atomic_write_bytes, reserve, reusable
from bench.core.errors import ConfigError
from valuers.influence.hooks import GradientLogger, iter_projected
from valuers.influence.subject import Subject

LOG_FORMAT = 1
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
    def open(path: Path, expected: dict, where: str = "valuer") -> "GradientLogs | None":
        """The finished logs at ``path``, or None if absent. Damaged logs (a truncated file,
        no COMPLETE marker beside our meta.json) are removed with one printed line and read
        as absent, so they are rebuilt. Logs written for another model, data or projection,
        and a folder that is not LoGra's, are refused with a ConfigError naming
        ``<where>.logs_dir``."""
        path = Path(path)
        if not path.exists():
            return None
        if not (path / "COMPLETE").exists() and not (path / "meta.json").exists():
            raise ConfigError(f"{where}.logs_dir: {path} exists but holds no finished LoGra logs; "
                              f"delete it or point {where}.logs_dir elsewhere")
        if not reusable(path):
            return None
        meta = json.loads((path / "meta.json").read_text())
        for f in META_CHECKED:
            if meta.get(f) != expected.get(f):
                what = {"model_key": "another model (grand-coalition weights)", "data": "other training data",
                        "seed": "another projection seed"}.get(f, f"another {f}")
                raise ConfigError(f"{where}.logs_dir: logs in {path} were written for {what} "
                                  f"({f}={meta.get(f)!r}, expected {expected.get(f)!r}); delete them or "
                                  f"point {where}.logs_dir elsewhere")
        arrays = [np.load(path / f"layer_{i:04d}.npy", mmap_mode="r") for i in range(len(meta["layers"]))]
        with np.load(path / "projections.npz") as z:
            proj = {n: tuple(torch.from_numpy(z[f"{i}_{s}"])     # cpu: moved by GradientLogger (hooks.py)
                             if f"{i}_{s}" in z else None for s in ("out", "in"))
                    for i, n in enumerate(meta["layers"])}
        return GradientLogs(path, meta, arrays, proj)

    def query(self) -> dict | None:
        p = self.path / "query.npz"
        if not p.exists():
            return None
        L = len(self.arrays)
        try:
            with np.load(p) as z:
                pair = [z[f"p_{i}"] for i in range(L)] if all(f"p_{i}" in z for i in range(L)) else None
                return {"vectors": [z[f"q_{i}"] for i in range(L)], "pair_vectors": pair,
                        "eval_loss": float(z["eval_loss"]), "n_eval": int(z["n_eval"])}
        except Exception:        # a torn file from another tool reads as missing
            return None

    def save_query(self, vectors, eval_loss: float, n_eval: int, pair_vectors=None) -> None:
        """The mean query ``vectors`` ([D] per layer) and, when given, the per-eval-pair
        ``pair_vectors`` ([n_eval, D] per layer)."""
        buf = io.BytesIO()
        extra = {} if pair_vectors is None else {f"p_{i}": v for i, v in enumerate(pair_vectors)}
        np.savez(buf, eval_loss=eval_loss, n_eval=n_eval, **{f"q_{i}": v for i, v in enumerate(vectors)}, **extra)
        atomic_write_bytes(self.path / "query.npz", buf.getvalue())


def write_logs(path: Path, meta: dict, subject: Subject, logger: GradientLogger, examples, ref, loss: str,
               batch_size: int, np_dtype) -> dict:
    """Stream projected train gradients into memmaps in a temp folder, then rename it
    into place (``atomic_folder``: a crash, or ``BudgetExhausted`` between batches, leaves
    no half-written logs). Returns timing stats."""
    path = Path(path)
    N = len(examples)
    with atomic_folder(path) as tmp:
        mms = []
        for i, n in enumerate(logger.names):
            ko, ki = logger.k(n)
            mms.append(np.lib.format.open_memmap(tmp / f"layer_{i:04d}.npy", mode="w+", dtype=np_dtype,
                                                 shape=(N, ko * ki)))
            reserve(tmp / f"layer_{i:04d}.npy")     # a full disk: ENOSPC now, not SIGBUS mid-log
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
    return {"log_s": log_s, "examples_per_s": N / log_s if log_s > 0 else float("inf")}
