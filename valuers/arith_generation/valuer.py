"""DPO language-model-arithmetic Shapley, generation mode: the paper's own utility.

Tamine, Sakhi & Heymann (2025) value an owner by the expected reward of text
*generated* by each coalition's policy, the policy being obtained by arithmetic
on n per-owner DPO models (see valuers/dpo_arithmetic.py for the identity). Per
token, coalition S samples from

    z_t = Σ_{i∈S} log softmax(f_i) − (|S| − 1) · log softmax(f_0)      (fp32)

f_i = logits of owner i's single-owner model (``game.trained_model(1 << i)``),
f_0 = the base's. S = ∅ samples from the base, |S| = 1
from the owner's own model. Temperature and top-p are applied to
log_softmax(z_t) *after* combining. Each model keeps its own KV cache, so a step
costs one single-token forward per model in S (plus the base when |S| ≥ 2); each
model's prompt prefill is computed once and its cache copied into every coalition.

v(S) = mean reward (valuers.arith_generation.rewards) of S's generations on ``n_prompts`` eval
prompts (stratified by source, fixed by ``seed``); exact Shapley over all 2^n
coalitions on both reward axes (the owner's 2-D "data signature"), reported in
``extras["signature"]``; ``owner_values`` = the Shapley of ``reward_axis``.

Per-token normalisation is not the sequence-level π_S ∝ exp(Σ_t z_t(y_t)): the
sampler's distribution q differs from π_S by a prompt-dependent factor. The
importance weight log w = Σ_t [z_t(y_t) − log q_t(y_t)] (= Σ_t logsumexp z_t at
temperature 1, top-p 1) corrects it up to Z_S(x), i.e. by self-normalising over
the ``n_samples`` of one prompt. Its spread is reported; ``reweight=true`` uses it
(with n_samples = 1 self-normalisation is a no-op).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch

from bench.core import shapley
from bench.core.errors import ConfigError
from bench.core.models import render_prompt
from bench.core.settings import Settings, setting
from valuers.arith_generation.rewards import AXES, reward
from valuers.base import Budget, CostMeter, Valuation
from valuers.dpo_arithmetic import check_compatible

REWARD_AXES = AXES + ("sum",)
NEG = -1.0e4        # stands in for −inf / NaN log-probabilities (finite, so sums stay finite)


# ------------------------------------------------------------------ prompts

def select_prompts(pairs, n_prompts: int, seed: int = 0) -> list:
    """``n_prompts`` pairs, stratified by source: each source's pairs in a seeded
    order, then round-robin over sources (in order of first appearance)."""
    if n_prompts < 1:
        raise ConfigError(f"valuer.dpo_arithmetic_gen.n_prompts: {n_prompts}; use a value >= 1")
    groups: dict[str, list] = {}
    for p in pairs:
        groups.setdefault(p.source, []).append(p)
    for k, (src, g) in enumerate(groups.items()):
        order = np.random.default_rng([seed, k]).permutation(len(g))
        groups[src] = [g[j] for j in order]
    out, r = [], 0
    while len(out) < min(n_prompts, len(pairs)):
        for g in groups.values():
            if r < len(g) and len(out) < n_prompts:
                out.append(g[r])
        r += 1
    return out


# ------------------------------------------------------------------ arithmetic

def combine(owner_logits: list[torch.Tensor], base_logits: torch.Tensor | None) -> torch.Tensor:
    """z = Σ_i log softmax(f_i) − (|S| − 1) log softmax(f_0), in fp32, −inf/NaN → NEG.

    ``owner_logits`` = the logits of the owners in S (empty: S = ∅, z = the base's
    log softmax). ``base_logits`` may be None when |S| = 1 (it does not enter)."""
    def lsm(f):
        return torch.nan_to_num(torch.log_softmax(f.float(), -1), nan=NEG, neginf=NEG).clamp_min(NEG)

    k = len(owner_logits)
    if k == 0:
        return lsm(base_logits)
    z = lsm(owner_logits[0])
    for f in owner_logits[1:]:
        z = z + lsm(f)
    if k > 1:
        z = z - (k - 1) * lsm(base_logits)
    return torch.nan_to_num(z, nan=NEG, neginf=NEG, posinf=-NEG)


def sampling_logprobs(z: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The sampler's log q_t: log_softmax(z) / temperature, top-p (nucleus) filtered, renormalised."""
    lp = torch.log_softmax(torch.log_softmax(z, -1) / temperature, -1)
    if top_p < 1.0:
        s, idx = lp.sort(-1, descending=True)
        p = s.exp()
        drop = (p.cumsum(-1) - p) > top_p          # mass before this token already exceeds top_p
        s = s.masked_fill(drop, float("-inf"))
        lp = torch.full_like(lp, float("-inf")).scatter(-1, idx, s)
        lp = torch.log_softmax(lp, -1)
    return lp


# ------------------------------------------------------------------ sampling

def _left_pad(prompts: list[list[int]], pad: int, device=None):
    """Left-padded ids, attention mask and positions of ``prompts``, on ``device``."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad, dtype=torch.long)      # cpu: filled row by row, moved below
    mask = torch.zeros((len(prompts), L), dtype=torch.long)         # cpu: idem
    for r, p in enumerate(prompts):
        ids[r, L - len(p):] = torch.tensor(p, dtype=torch.long)     # cpu: into the CPU buffer
        mask[r, L - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


class _Stream:
    """One model's incremental decoding state (its own KV cache)."""

    def __init__(self, model):
        self.model, self.cache = model, None

    def step(self, ids, mask, pos) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        return out.logits[:, -1, :].float()

    def start(self, ids, mask, pos, store: dict | None, batch_key) -> tuple[torch.Tensor, bool]:
        """The prompt prefill; with ``store``, computed once per (model, batch) and
        shared by every coalition (the KV cache is copied, never shared)."""
        key = (id(self.model), batch_key)
        if store is not None and key in store:
            cache, logits = store[key]
            self.cache = copy.deepcopy(cache)
            return logits, False
        logits = self.step(ids, mask, pos)
        if store is not None:
            store[key] = (copy.deepcopy(self.cache), logits)
        return logits, True


@torch.no_grad()
def generate_coalition(owner_models: list, base_model, prompts: list[list[int]], *, eos_id: int, pad_id: int,
                       max_new_tokens: int = 16, temperature: float = 1.0, top_p: float = 1.0,
                       generator: torch.Generator | None = None, prefill: dict | None = None) -> dict:
    """Sample continuations of ``prompts`` (token ids) from coalition S's per-token
    arithmetic policy. ``owner_models`` = the single-owner models of S (empty = the
    base). ``temperature == 0`` = greedy (argmax of z).

    Returns {"tokens": per row the generated ids (EOS included when reached),
    "logw": [B] importance log-weights Σ_t z_t(y_t) − log q_t(y_t), "forwards":
    model-forward rows computed (a prompt prefill counts as one row)}. ``prefill``: a
    dict the caller keeps across coalitions to compute each model's prefill once.

    Devices: ids, masks and positions live on the models' device; tokens are drawn on
    the CPU, with the CPU ``generator``, from CPU copies of the probabilities, so the
    draws are the same on every device; the bookkeeping (done, log-weights) is on the CPU."""
    models = list(owner_models) if owner_models else []
    use_base = len(models) != 1
    streams = [_Stream(m) for m in models] + ([_Stream(base_model)] if use_base else [])
    dev = next((models[0] if models else base_model).parameters()).device
    ids, mask, pos = _left_pad(prompts, pad_id, dev)
    B = len(prompts)
    batch_key = tuple(tuple(p) for p in prompts)
    started = [s.start(ids, mask, pos, prefill, batch_key) for s in streams]
    logits = [lg for lg, _ in started]
    cur = pos[:, -1].clone()
    done = torch.zeros(B, dtype=torch.bool)                          # cpu: bookkeeping
    out: list[list[int]] = [[] for _ in range(B)]
    logw = torch.zeros(B, dtype=torch.float64)                       # cpu: bookkeeping
    forwards = B * sum(fresh for _, fresh in started)
    for t in range(max_new_tokens):
        z = combine(logits[:len(models)], logits[-1] if use_base else None).float().cpu()
        if temperature == 0:
            nxt = z.argmax(-1)
            logq = torch.zeros(B)                                    # cpu: bookkeeping
        else:
            lq = sampling_logprobs(z, temperature, top_p)
            nxt = torch.multinomial(lq.exp(), 1, generator=generator)[:, 0]
            logq = lq.gather(1, nxt[:, None])[:, 0]
        live = ~done
        logw[live] += (z.gather(1, nxt[:, None])[:, 0] - logq)[live].double()
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        for r in torch.nonzero(live)[:, 0].tolist():
            out[r].append(int(nxt[r]))
        done |= nxt == eos_id
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], 1)
        cur = cur + 1
        logits = [s.step(nxt[:, None].to(dev), mask, cur[:, None]) for s in streams]
        forwards += B * len(streams)
    return {"tokens": out, "logw": logw.numpy(), "forwards": forwards}


def decode(tok, ids: list[int]) -> str:
    """Text of generated ids without special tokens. A tokenizer with no decoder
    (the tiny tier's character BPE) would join its tokens with spaces: concatenate."""
    special = set(tok.all_special_ids)
    ids = [i for i in ids if i not in special]
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and backend.decoder is None:
        return "".join(tok.convert_ids_to_tokens(ids))
    return tok.decode(ids, skip_special_tokens=True)


def coalition_generator(seed: int, mask: int) -> torch.Generator:
    """Each coalition's own stream of randomness, independent of the loop order."""
    return torch.Generator().manual_seed(   # cpu: draws are made on the CPU (generate_coalition)
        int(np.random.SeedSequence([seed, mask]).generate_state(1)[0]))


def self_normalised(values: np.ndarray, logw: np.ndarray, groups: np.ndarray) -> float:
    """Mean over prompts of the self-normalised importance-weighted mean of its samples."""
    out = []
    for g in np.unique(groups):
        lw = logw[groups == g]
        w = np.exp(lw - lw.max())
        out.append(float(np.sum(w * values[groups == g]) / w.sum()))
    return float(np.mean(out))


def _logw_stats(logw: np.ndarray, groups: np.ndarray) -> dict:
    within, ess = [], []
    for g in np.unique(groups):
        lw = logw[groups == g]
        w = np.exp(lw - lw.max())
        within.append(float(lw.std()))
        ess.append(float(w.sum() ** 2 / (w ** 2).sum() / len(lw)))
    return {"mean": float(logw.mean()), "std": float(logw.std()), "min": float(logw.min()),
            "max": float(logw.max()), "within_prompt_std": float(np.mean(within)),
            "ess_frac": float(np.mean(ess))}


# ------------------------------------------------------------------ valuer

@dataclass(frozen=True)
class GenerationSettings(Settings):
    prefix = "valuer.dpo_arithmetic_gen"
    n_prompts: int = setting(20, "eval prompts, stratified by source, chosen by `seed`", min=1)
    max_new_tokens: int = setting(16, "tokens generated per sample at most", min=1)
    temperature: float = setting(1.0, "sampling temperature on the combined log-probs; 0 = greedy (argmax of z)",
                                 min=0)
    top_p: float = setting(1.0, "nucleus (top-p) filter of the sampler, in (0, 1]; 1 = off", min=0,
                           min_exclusive=True, max=1)
    n_samples: int = setting(1, "samples per prompt", min=1)
    seed: int = setting(0, "prompt choice and each coalition's sampling stream", min=0)
    reward_axis: str = setting("sum", "the reward axis reported as owner_values: helpful | harmless | sum",
                               choices=REWARD_AXES)
    reweight: bool = setting(False, "self-normalised importance weights per prompt (needs n_samples > 1)")
    batch_size: int | None = setting(None, "rows per generation batch; null = all prompts at once", min=1)
    n_examples: int = setting(3, "generated texts kept in extras per reported coalition", min=0)

    def check(self) -> None:
        if self.reweight and self.n_samples < 2:
            raise self.error("reweight", "true needs n_samples >= 2 (self-normalising one sample per prompt "
                                         "is a no-op); raise n_samples or set reweight=false")


class DPOArithmeticGeneration:
    @staticmethod
    def models_needed(n: int) -> list[int]:
        """The single-owner models it samples from."""
        return [1 << i for i in range(n)]

    def __init__(self, name: str = "dpo_arithmetic_gen", **settings):
        self.name = name
        self.settings = s = GenerationSettings.of(settings, prefix=f"valuer.{name}")
        self.n_prompts, self.max_new_tokens = s.n_prompts, s.max_new_tokens
        self.temperature, self.top_p, self.n_samples, self.seed = s.temperature, s.top_p, s.n_samples, s.seed
        self.reward_axis, self.reweight, self.batch_size = s.reward_axis, s.reweight, s.batch_size
        self.n_examples = s.n_examples

    # -- pieces, usable on their own
    def owner_models(self, game) -> list:
        """The n single-owner models, materialised once each."""
        expected = game.stage_meta()
        models = []
        for i in range(game.n):
            check_compatible(game.coalition_meta(1 << i), expected, i)
            models.append(game.trained_model(1 << i))
        return models

    def prompt_ids(self, game, pairs) -> list[list[int]]:
        _, tok = game.base()
        return [tok(render_prompt(tok, game.model_spec, p.prompt))["input_ids"] for p in pairs]

    def generate(self, base, owners: list, tok, prompts: list[list[int]], mask: int,
                 prefill: dict | None = None) -> dict:
        """All generations of coalition ``mask`` (rows = prompts × n_samples, prompt-major)."""
        n = len(owners)
        rows = [p for p in prompts for _ in range(self.n_samples)]
        g = coalition_generator(self.seed, mask)
        bs = self.batch_size or len(rows)
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        toks, logw, fwd = [], [], 0
        for b in range(0, len(rows), bs):
            r = generate_coalition([owners[i] for i in shapley.members(mask, n)], base, rows[b:b + bs],
                                   eos_id=eos, pad_id=pad, max_new_tokens=self.max_new_tokens,
                                   temperature=self.temperature, top_p=self.top_p, generator=g,
                                   prefill=prefill)
            toks += r["tokens"]
            logw.append(r["logw"])
            fwd += r["forwards"]
        return {"tokens": toks, "logw": np.concatenate(logw), "forwards": fwd}

    def value(self, game, budget: Budget) -> Valuation:
        meter = CostMeter(game)
        n, singles = game.n, [1 << i for i in range(game.n)]
        with meter.phase("owner_fine_tunes"):       # the game's log carries their compute
            game.prefetch(singles)
            for m in singles:
                game.ensure_weights(m)
        with meter.phase("materialize", own_compute=True):
            base, tok = game.base()
            base.eval()
            owners = self.owner_models(game)
        pairs = select_prompts(game.eval, self.n_prompts, self.seed)
        prompts = self.prompt_ids(game, pairs)
        groups = np.repeat(np.arange(len(pairs)), self.n_samples)
        row_pairs = [pairs[j] for j in groups]
        sources = sorted({p.source for p in pairs})
        tables = {a: np.zeros(2 ** n) for a in REWARD_AXES}
        by_source = {a: {s: np.zeros(2 ** n) for s in sources} for a in AXES}
        importance, examples = [], {}
        n_tokens = n_forwards = 0
        t0 = time.perf_counter()
        prefill: dict = {}      # each model's prompt prefill, shared by all coalitions
        with meter.phase("generation", own_compute=True):
            for mask in range(2 ** n):
                gen = self.generate(base, owners, tok, prompts, mask, prefill)
                texts = [decode(tok, t) for t in gen["tokens"]]
                n_tokens += sum(len(t) for t in gen["tokens"])
                n_forwards += gen["forwards"]
                r = {a: np.array([reward(p, x)[a] for p, x in zip(row_pairs, texts)]) for a in AXES}
                r["sum"] = r["helpful"] + r["harmless"]
                for a in REWARD_AXES:
                    tables[a][mask] = (self_normalised(r[a], gen["logw"], groups) if self.reweight
                                       else float(r[a].mean()))
                for a in AXES:
                    for s in sources:
                        sel = np.array([p.source == s for p in row_pairs])
                        by_source[a][s][mask] = float(r[a][sel].mean())
                importance.append(_logw_stats(gen["logw"], groups))
                if mask == 0 or mask in singles or mask == 2 ** n - 1:
                    examples[str(mask)] = [{"prompt": p.prompt, "text": x}
                                           for p, x in zip(row_pairs, texts)][:self.n_examples]
        gen_s = time.perf_counter() - t0
        with meter.phase("shapley", own_compute=True, cpu_only=True):
            phis = {}
            for a in REWARD_AXES:
                phis[a] = shapley.exact_shapley(tables[a])
                shapley.check_efficiency(phis[a], tables[a], atol=1e-9)
        table = tables[self.reward_axis]
        del owners, prefill
        return Valuation(phis[self.reward_axis], cost=meter.cost(), extras={
            "utility": "expected_reward_of_generations",
            "reward_axis": self.reward_axis,
            "signature": {a: phis[a].tolist() for a in AXES},
            # not "table": these are reward utilities, not the game's metric, so the
            # harness must not score them against the retraining table
            "tables": {a: t.tolist() for a, t in tables.items()},
            "tables_by_source": {a: {s: t.tolist() for s, t in d.items()} for a, d in by_source.items()},
            "banzhaf": shapley.banzhaf(table).tolist(), "loo": shapley.leave_one_out(table).tolist(),
            "generation": {"seconds": gen_s, "tokens": int(n_tokens), "model_token_forwards": int(n_forwards),
                           "n_coalitions": 2 ** n, "n_prompts": len(pairs), "n_samples": self.n_samples,
                           "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                           "top_p": self.top_p, "seed": self.seed, "prompt_ids": [p.id for p in pairs],
                           "sources": {s: sum(p.source == s for p in pairs) for s in sources}},
            "importance": {"reweighted": self.reweight, "per_coalition": importance,
                           "note": "log w = Σ_t z_t(y_t) − log q_t(y_t); 0 for |S| ≤ 1 at temperature 1"},
            "examples": examples,
        })
