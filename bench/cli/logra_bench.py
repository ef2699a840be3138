"""LoGra vs naive per-example gradients vs a plain forward+backward: throughput, peak
memory, and accuracy against the exact influence as k grows.

    python -m bench logra-bench --model smollm2-135m            # SmolLM2-135M + LoRA (r=8, all-linear)
    python -m bench logra-bench --model tiny                    # the tiny tier (full fine-tune)
    python -m bench logra-bench --model tiny --accuracy         # + Spearman vs exact for k = 8..full

Throughput: one fresh process (spawn) loads the workload once and runs the methods
over the same batches, alternated for ``--repeats`` rounds (fairer than separate runs
on a busy machine); examples per second of each method's fastest pass. Peak memory:
each method in its own fresh process, one pass; ``peak MB`` is the largest
resident-set growth over the loaded workload (its own state, e.g. projection
matrices, included), sampled every 2 ms (glibc's mmap
threshold fixed so freed tensors leave the resident set).

  logra  hooks: Σ_t (P_out g_t)(P_in x_t)ᵀ per example and layer, k×k (random orthonormal)
  naive  torch.func vmap(grad) full per-example gradients, then a dense Gaussian
         projection per layer to ``--naive-proj-dim`` (TRAK-style; 0 = unprojected,
         the default on SmolLM2 where dense matrices over 4.9M LoRA weights need GBs)
  plain  one forward + ``loss.backward()`` (parameter gradients), nothing per example

Accuracy (tiny tier, the ``smoke`` experiment's game, grand coalition fine-tuned by
the game and cached): Spearman / Pearson of LoGra's point values against the exact
damped empirical-Fisher influence (``influence_naive``, unprojected, float64) for
each k and projection seed.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

from bench.core.ranks import spearman
from bench.core.resources import PeakRSS, peak_rss_bytes

REPO = Path(__file__).resolve().parent.parent.parent
METHODS = ("logra", "naive", "plain")


# ------------------------------------------------------------------ workload

def build_workload(cfg: dict):
    """(subject, layers, examples, reference log-probs) for ``cfg``:
    model (tiny | smollm2-135m), n_train, lora_r (0 = full fine-tune), max_length, cache_dir,
    batch_size; tiny only: spec (ModelSpec fields), task (synthetic_pref arguments)."""
    import torch
    from bench.core.models import ModelSpec, load_base
    from bench.core.task import synthetic_pref
    from bench.core.env import quiet_libraries
    from bench.core.train import clone_model
    from valuers.influence.data import encode_pairs
    from valuers.influence.layers import watched_layers
    from valuers.influence.subject import Subject, reference_logps
    quiet_libraries()
    if cfg["model"] == "tiny":
        spec = ModelSpec(**cfg.get("spec", {}))
        task = synthetic_pref(**(cfg.get("task") or dict(sources=["capitals", "tone", "reversal"],
                                                         n_train_per_source=60, n_eval_per_source=30,
                                                         n_warmup_per_source=100, seed=0)))
    elif cfg["model"] == "smollm2-135m":
        spec = ModelSpec(kind="smollm2", name="smollm2-135m", chat_template=True)
        task = synthetic_pref(sources=["arithmetic", "capitals", "safety"], n_train_per_source=60,
                              n_eval_per_source=25, n_warmup_per_source=0, seed=0)
    else:
        raise SystemExit(f"--model: unknown {cfg['model']!r}; choose tiny or smollm2-135m")
    base, tok = load_base(spec, task, cfg["cache_dir"])
    if cfg["lora_r"]:
        from peft import LoraConfig, get_peft_model
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # init_lora_weights=False: a non-zero B, as in a trained adapter (else A gets no gradient)
            model = get_peft_model(base, LoraConfig(r=cfg["lora_r"], lora_alpha=2 * cfg["lora_r"],
                                                    target_modules="all-linear", init_lora_weights=False,
                                                    task_type="CAUSAL_LM"))
        subject = Subject(model, tok, spec, 0.1, cfg["max_length"], None, kind="lora")
    else:
        subject = Subject(clone_model(base).requires_grad_(True), tok, spec, 0.1, cfg["max_length"], base)
    layers = watched_layers(subject.model)
    pairs = (task.train * (1 + cfg["n_train"] // len(task.train)))[:cfg["n_train"]]
    ex = encode_pairs(tok, spec, pairs, "dpo", cfg["max_length"])
    ref = reference_logps(subject, ex, cfg["batch_size"])
    return subject, layers, ex, ref



def _stack(n: int, batches):
    """Rows ``(indices, [b, d] array)`` from batches into one [n, d] array."""
    import numpy as np
    out = None
    for idx, flat in batches:
        if out is None:
            out = np.zeros((n, flat.shape[1]), dtype=flat.dtype)
        out[idx] = flat
    return out

def make_pass(method: str, subject, layers, ex, ref, cfg: dict):
    """A function running one pass of ``method`` over all examples."""
    import torch
    from valuers.influence.data import batches, collate, example_losses, row_logps
    from valuers.influence.hooks import GradientLogger, iter_projected
    from valuers.influence.projection import dense_projections, projection_shapes, random_projections
    bs, k = cfg["batch_size"], cfg["k"]
    if method == "logra":
        proj = random_projections(projection_shapes(layers, k, k, clip=True), seed=0)
        logger = GradientLogger(subject.model, layers, proj)

        def run():
            with logger as lg:
                return _stack(len(ex), ((idx, torch.cat([g[n] for n, _ in layers], 1).detach().cpu().numpy())
                                        for idx, g, _ in iter_projected(subject, lg, ex, ref, "dpo", bs)))
        return run
    if method == "naive":
        from valuers.influence.per_example import per_example_gradients
        P = dense_projections(layers, cfg["naive_proj_dim"] or None, seed=0)

        def run():
            return _stack(len(ex), ((idx, torch.cat([g[n] if P[n] is None else g[n] @ P[n].T
                                                     for n, _ in layers], 1).numpy())
                                    for idx, g in per_example_gradients(subject, layers, ex, ref, "dpo", bs)))
        return run
    if method == "plain":
        params = [p for p in subject.model.parameters() if p.requires_grad]

        def run():
            for idx in batches(ex, bs):
                b = collate([ex[i] for i in idx], subject.pad_id)
                example_losses(row_logps(subject.model, b), ref[idx], b, "dpo", subject.beta).sum().backward()
                for p in params:
                    p.grad = None
        return run
    raise ValueError(method)


# ------------------------------------------------------------------ measuring

def _child(job: str, methods: list, cfg: dict, q) -> None:
    """job "memory": one pass of methods[0], peak RSS growth over the loaded workload.
    job "speed": all methods on one workload, alternated for ``repeats`` rounds (on a
    shared, busy machine alternating is fairer than separate runs); the fastest pass."""
    try:
        import torch
        torch.set_num_threads(cfg.get("threads", 1))
        warnings.simplefilter("ignore")
        subject, layers, ex, ref = build_workload(cfg)
        res = {m: {"method": m, "n": len(ex), "n_layers": len(layers)} for m in methods}
        if job == "memory":           # the method's own state (e.g. projection matrices) counts
            m = methods[0]
            with PeakRSS() as mem:
                out = make_pass(m, subject, layers, ex, ref, cfg)()
            res[m].update(peak_mem_bytes=mem.delta, out_dim=None if out is None else int(out.shape[1]),
                          out_bytes=0 if out is None else int(out.nbytes),
                          maxrss_bytes=peak_rss_bytes())
        else:
            runs = {m: make_pass(m, subject, layers, ex, ref, cfg) for m in methods}
            times = {m: [] for m in methods}
            for _ in range(cfg.get("repeats", 2)):
                for m in methods:
                    t0 = time.perf_counter()
                    runs[m]()
                    times[m].append(time.perf_counter() - t0)
            for m in methods:
                res[m].update(seconds=min(times[m]), examples_per_s=len(ex) / min(times[m]), all_seconds=times[m])
        q.put(res)
    except BaseException as e:          # report, never hang the parent
        q.put({"error": f"{job} {methods}: {type(e).__name__}: {e}"})


def _spawn(job: str, methods: list, cfg: dict, timeout: float = 3600) -> dict:
    import multiprocessing as mp
    import sys
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    p = ctx.Process(target=_child, args=(job, list(methods), cfg, q))
    # a fixed mmap threshold: large tensors are mmapped and given back on free, so the
    # child's resident set follows its live tensors (glibc's adaptive threshold would
    # keep freed activations in the heap and hide later peaks)
    saved = {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    try:
        p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        res = q.get(timeout=timeout)
    finally:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    if "error" in res:
        raise RuntimeError(res["error"])
    return res


def compare(cfg: dict, methods=METHODS) -> dict:
    """{method: throughput (one process, alternated) + peak memory (a fresh process each)}
    plus the ratios LoGra/naive and LoGra/plain."""
    res = _spawn("speed", methods, cfg)
    for m in methods:
        res[m].update(_spawn("memory", [m], cfg)[m])
    ratios = {}
    for other in ("naive", "plain"):
        if "logra" in res and other in res:
            ratios[f"throughput_logra_over_{other}"] = res["logra"]["examples_per_s"] / res[other]["examples_per_s"]
            ratios[f"memory_logra_over_{other}"] = (res["logra"]["peak_mem_bytes"] /
                                                    max(1, res[other]["peak_mem_bytes"]))
    return {"methods": res, "ratios": ratios}


# ------------------------------------------------------------------ accuracy vs k

def smoke_game(cache_dir: str):
    """The ``smoke`` experiment's game (tiny tier, full fine-tune), built through Hydra."""
    from bench.harness.build import build_game, compose_config
    cfg = compose_config(["experiment=smoke", f"cache_dir={cache_dir}", "progress=false", "logger=none"])
    game, _ = build_game(cfg)
    return game


def accuracy_vs_k(cache_dir: str, ks=(8, 16, 32, 64, "full"), seeds=(0, 1, 2), damping_scale: float = 0.1,
                  projections=("random",)):
    """Rows of (projection, k, seed, spearman, pearson, log_dim, seconds) vs the exact influence
    (eigen projections are deterministic: one seed)."""
    from scipy import stats
    from valuers.base import Budget
    from valuers.influence_naive import NaiveInfluence
    from valuers.logra import LoGra
    game = smoke_game(cache_dir)
    t0 = time.perf_counter()
    exact = NaiveInfluence(dtype="float64", damping_scale=damping_scale).value(game, Budget())
    exact_s = time.perf_counter() - t0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for proj, k in [(p, k) for p in projections for k in ks]:
            kk = 10 ** 6 if k == "full" else int(k)
            for seed in (seeds if proj == "random" else seeds[:1]):
                v = LoGra(k_in=kk, k_out=kk, seed=seed, damping_scale=damping_scale, projection=proj,
                          logs_dir=f"{tmp}/{proj}-k{k}-s{seed}").value(game, Budget())
                rows.append({"projection": proj, "k": k, "seed": seed,
                             "spearman": spearman(v.point_values, exact.point_values),
                             "pearson": float(stats.pearsonr(v.point_values, exact.point_values).statistic),
                             "log_dim": v.extras["log_dim"], "seconds": v.cost.wall_s})
    return {"rows": rows, "exact_s": exact_s, "n_train": len(exact.point_values),
            "exact_grad_dim": exact.extras["grad_dim"]}


# ------------------------------------------------------------------ CLI

def _mb(b) -> str:
    return f"{b / 2 ** 20:8.1f}"


def format_compare(out: dict, cfg: dict) -> str:
    lines = [f"model={cfg['model']} lora_r={cfg['lora_r']} n_train={cfg['n_train']} batch={cfg['batch_size']} "
             f"k={cfg['k']} naive_proj_dim={cfg['naive_proj_dim']} max_length={cfg['max_length']} "
             f"threads={cfg['threads']}",
             f"{'method':8s} {'ex/s':>9s} {'pass s':>8s} {'peak MB':>8s} {'out dim':>9s} {'out MB':>8s}"]
    for m, r in out["methods"].items():
        lines.append(f"{m:8s} {r['examples_per_s']:9.2f} {r['seconds']:8.2f} {_mb(r['peak_mem_bytes'])} "
                     f"{str(r['out_dim']):>9s} {_mb(r['out_bytes'])}")
    for k, v in out["ratios"].items():
        lines.append(f"{k:34s} {v:8.2f}")
    return "\n".join(lines)


def format_accuracy(acc: dict) -> str:
    import numpy as np
    lines = [f"accuracy vs exact influence (tiny tier, smoke game, N={acc['n_train']}, exact grad dim "
             f"{acc['exact_grad_dim']}, exact took {acc['exact_s']:.1f} s)",
             f"{'proj':>6s} {'k':>5s} {'log dim':>8s} {'spearman mean ± sd':>20s} {'pearson mean':>13s}  per seed"]
    by = {}
    for r in acc["rows"]:
        by.setdefault((r["projection"], r["k"]), []).append(r)
    for (proj, k), rs in by.items():
        sp = np.array([r["spearman"] for r in rs])
        pe = np.array([r["pearson"] for r in rs])
        lines.append(f"{proj:>6s} {str(k):>5s} {rs[0]['log_dim']:8d} {sp.mean():11.4f} ± {sp.std():.4f} {pe.mean():13.4f}  "
                     + " ".join(f"{x:.3f}" for x in sp))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench logra-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", choices=["tiny", "smollm2-135m"])
    p.add_argument("--n-train", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--k", type=int, default=16, help="LoGra k per side")
    p.add_argument("--naive-proj-dim", type=int, default=None,
                   help="naive: dense projection per layer to this dim (0 = unprojected; default k*k on "
                        "tiny, 0 on smollm2: a dense matrix over 4.9M LoRA weights would need ~5 GB at k=16)")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default 8 for smollm2, 0 = full FT for tiny)")
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--cache-dir", default=str(REPO / "results" / "cache"))
    p.add_argument("--accuracy", action="store_true", help="also: Spearman vs exact for k = 8..full (tiny tier)")
    p.add_argument("--no-speed", action="store_true", help="skip the throughput/memory table")
    p.add_argument("--ks", default="8,16,32,64,full")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--projections", default="random", help="random,eigen")
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    lora_r = a.lora_r if a.lora_r is not None else (8 if a.model == "smollm2-135m" else 0)
    cfg = {"model": a.model, "n_train": a.n_train, "batch_size": a.batch_size, "k": a.k, "lora_r": lora_r,
           "naive_proj_dim": (a.k * a.k if a.model == "tiny" else 0) if a.naive_proj_dim is None else a.naive_proj_dim,
           "max_length": a.max_length, "repeats": a.repeats, "threads": a.threads, "cache_dir": a.cache_dir}
    if a.model == "tiny":
        cfg["spec"] = {}                     # conf/model/tiny defaults: 2 layers, 128 wide
    if not a.no_speed:
        out = compare(cfg, [m for m in a.methods.split(",") if m])
        print(format_compare(out, cfg), flush=True)
    if a.accuracy:
        ks = [k if k == "full" else int(k) for k in a.ks.split(",")]
        print(format_accuracy(accuracy_vs_k(a.cache_dir, ks, tuple(range(a.seeds)),
                                                     projections=tuple(a.projections.split(",")))), flush=True)


if __name__ == "__main__":
    main()
