"""EK-FAC influence through Kronfluence (Grosse et al., 2023; George et al., 2018).

Every training example z of the game's grand-coalition model gets, per eval pair e,

    score(z, e) = Σ_layers g_eᵀ (Ĥ + λI)⁻¹ g_z

with g the gradients of the loss of the ``valuers/influence`` toolkit (the pair's
DPO loss vs the base π0, β = train.beta, reference log-probs precomputed; or the
SFT mean NLL of the chosen response) on the watched layers, and Ĥ one block per
layer, fitted by Kronfluence with ``strategy``:

    ekfac     Q (Λ) Qᵀ, Q = Q_A ⊗ Q_G the eigenvectors of the K-FAC factors
              A = E_tok[x xᵀ], G = E_tok[g_out g_outᵀ], Λ = E_z[(Qᵀ g_z)²] (per example);
    kfac      A ⊗ G (token-level factors: its scale is not the per-example Fisher's);
    diagonal  diag(E_z[g_z²]);
    identity  I (plain gradient dot products; λ plays no part).

λ (``damping``): null = Kronfluence's heuristic, 0.1 × the mean of each layer's
eigenvalues (the toolkit's ``damping_scale`` = 0.1 rule; other scales are refused);
a number = that absolute λ for every layer. ``fisher: sampled`` (Kronfluence's and
the paper's default, the true Fisher) fits Ĥ on labels drawn from the model: the DPO
pair's preference from its Bradley-Terry probability σ(β·margin), SFT tokens from
the model (seeded by ``seed``); ``empirical`` uses the data's labels, like ``logra``.

Sign: Kronfluence's pairwise score is g_eᵀ(Ĥ+λI)⁻¹g_z, the *decrease* of the eval
loss when z is up-weighted, i.e. −influence on the eval loss: it is our value as
is (> 0 helps; see ``valuers/influence``). ``pair_scores`` [N, E] = Kronfluence's
[E, N] transposed; point values = its row means (= the mean eval loss as the query,
by linearity); owner values = sums over the owner's examples.

Per example, not per row: a DPO pair is two rows (chosen, rejected) of a batch;
the task sums the two rows' per-sample gradients (Kronfluence's per-sample-gradient
post-processing), so Λ, the queries and the scores are per pair.

Layers: the watched layers (``influence.layers``: the LoRA A/B maps of a LoRA stage,
else every trainable linear layer but the head). Kronfluence tracks ``nn.Linear``;
GPT-2's ``Conv1D`` (the tiny tier's full fine-tune) is registered with Kronfluence
as a linear layer (its statistics are the same; its weight is stored transposed).
A layer's bias, where it has one (GPT-2 Conv1D; not LoRA, not SmolLM2), is tracked
with its weight, as Kronfluence does; ``logra`` / ``influence_naive`` watch weights only.

Cache: factors under ``game.artefacts_dir("ekfac")/<key>/`` (key = the model's cache
key, data fingerprint, strategy, fisher, seed, loss, layers, dtype); Kronfluence
writes them into a temp folder (``cache.atomic_folder``) renamed into place once
finished. The pair scores go beside them (``scores/<key>.npy``, key adding the eval
set and λ), written under a temp name and renamed (``cache.atomic_write``). A rerun
reuses both; another λ or eval set reuses the factors.

Budget: the game's ``check_budget`` runs before every batch Kronfluence asks a loss
for and between the factor and score phases (``BudgetExhausted`` removes half-written
folders). Sequential game: the last stage's weights, π0 as reference (approximation).
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.core.cache import (atomic_folder, atomic_write, atomic_write_bytes, build_lock, content_key, reusable,
                              tmp_path)
from bench.core.settings import setting
from valuers.base import Budget, CostMeter, Valuation, owner_sums
from valuers.influence.data import Batch, collate, example_losses, row_logps, unwrap
from valuers.influence.settings import InfluenceSettings
from valuers.influence.solve import PAIR_SCORES_RAM_BYTES
from valuers.influence.subject import grand_coalition, grand_only, loss_inputs
from valuers.peers import require

STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")
FISHERS = ("sampled", "empirical")
CACHE_FORMAT = 1
SIGN = "value = -influence on eval loss (= Kronfluence's score as is); > 0 helps"
HEURISTIC = 0.1            # kronfluence.utils.constants.HEURISTIC_DAMPING_SCALE


@dataclass(frozen=True)
class EKFACSettings(InfluenceSettings):
    prefix = "valuer.ekfac"
    strategy: str = setting("ekfac", "Hessian approximation: ekfac | kfac | diagonal | identity (no "
                                     "preconditioning)", choices=STRATEGIES)
    damping: float | None = setting(None, "lambda: null = Kronfluence's heuristic, 0.1 x the mean eigenvalue of "
                                          "each layer; a number = that absolute lambda", min=0, min_exclusive=True)
    fisher: str = setting("sampled", "sampled (the true Fisher: labels drawn from the model, seeded by seed) | "
                                     "empirical (the data's labels)", choices=FISHERS)

    def check(self) -> None:
        super().check()
        if self.damping_scale != HEURISTIC:
            raise self.error("damping_scale", f"{self.damping_scale!r}: Kronfluence's heuristic damping is fixed "
                                              f"at {HEURISTIC} x the mean eigenvalue; leave it at {HEURISTIC} and "
                                              f"set damping (an absolute lambda) instead")


def _register_conv1d() -> None:
    """Let Kronfluence track GPT-2's Conv1D (y = x W + b, W [in, out]) as a linear layer:
    its per-token activations and output gradients are a Linear's, so Kronfluence's
    linear statistics apply unchanged (gradients come out as [out, in(+1 bias)])."""
    from kronfluence.module.linear import TrackedLinear
    from kronfluence.module.tracked_module import TrackedModule
    from transformers.pytorch_utils import Conv1D
    if Conv1D in TrackedModule.SUPPORTED_MODULES:
        return

    class TrackedConv1D(TrackedLinear, module_type=Conv1D):   # registers itself with Kronfluence
        @property
        def in_features(self) -> int:
            return self.original_module.weight.shape[0]

        @property
        def out_features(self) -> int:
            return self.original_module.weight.shape[1]


def _pair_task(subject, names: list[str], loss: str, seed: int):
    """A Kronfluence ``Task`` on batches of encoded pairs (see ``_loader_kwargs``)."""
    from kronfluence.task import Task

    class PairTask(Task):
        enable_post_process_per_sample_gradient = True      # rows -> pairs

        def __init__(self):
            self.rows = 1 if loss == "sft" else 2
            self.seed, self._gen = seed, None

        def reseed(self) -> None:
            self._gen = None

        def gen(self) -> torch.Generator:
            """A CPU generator: draws are made from CPU copies of the probabilities, so
            they are the same on every device."""
            if self._gen is None:
                self._gen = torch.Generator(device="cpu").manual_seed(self.seed)
            return self._gen

        def batch(self, b: dict) -> Batch:
            return Batch(b["ids"], b["attn"], b["targets"], b["index"].shape[0], self.rows)

        def losses(self, b: dict, model, sample: bool = False) -> torch.Tensor:
            subject.check_budget()
            bt, ref = self.batch(b), b.get("ref")
            if sample and loss == "sft":
                return self.sampled_sft(bt, model)
            lp = row_logps(model, bt)
            if not sample:
                return example_losses(lp, ref, bt, loss, subject.beta)
            B = bt.n_examples                   # dpo: the preference drawn from σ(β·margin)
            ref = ref.to(device=lp.device, dtype=lp.dtype)
            z = subject.beta * ((lp[:B] - ref[:, 0]) - (lp[B:2 * B] - ref[:, 1]))
            with torch.no_grad():
                y = torch.bernoulli(torch.sigmoid(z.detach()).cpu(), generator=self.gen()).to(z.device)
            return -F.logsigmoid((2 * y - 1) * z)

        def sampled_sft(self, bt: Batch, model) -> torch.Tensor:
            """Mean NLL of response tokens drawn from the model (inputs stay the data's)."""
            hf = unwrap(model)
            hidden = getattr(hf, hf.base_model_prefix)(input_ids=bt.ids, attention_mask=bt.attn).last_hidden_state
            rows, pos = bt.targets.nonzero(as_tuple=True)
            logp = torch.log_softmax(hf.get_output_embeddings()(hidden[rows, pos - 1]), -1)
            with torch.no_grad():
                y = torch.multinomial(logp.detach().exp().float().cpu(), 1, generator=self.gen()).to(logp.device)
            lp = logp.gather(-1, y).squeeze(-1)
            s = torch.zeros(bt.ids.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)
            B = bt.n_examples
            return -s[:B] / bt.targets[:B].sum(1).clamp(min=1).to(s.dtype)

        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            return self.losses(batch, model, sample).sum()

        def compute_measurement(self, batch, model) -> torch.Tensor:
            return self.losses(batch, model).sum()

        def get_influence_tracked_modules(self):
            return list(names)

        def get_attention_mask(self, batch):
            return batch["attn"]

        def post_process_per_sample_gradient(self, module_name, gradient):
            # rows are kind-major (chosen of every pair, then rejected): sum a pair's rows
            return gradient if self.rows == 1 else gradient.reshape(self.rows, -1, *gradient.shape[1:]).sum(0)

    return PairTask()


def _dataset(examples, ref) -> list:
    return [(i, ex, None if ref is None else ref[i]) for i, ex in enumerate(examples)]


def _loader_kwargs(pad_id: int):
    from kronfluence.utils.dataset import DataLoaderKwargs

    def collate_fn(items):
        b = collate([ex for _, ex, _ in items], pad_id)
        out = {"index": torch.tensor([i for i, _, _ in items]),    # cpu: Kronfluence moves the batch
               "ids": b.ids, "attn": b.attn, "targets": b.targets}
        if items[0][2] is not None:
            out["ref"] = torch.stack([r for _, _, r in items])
        return out
    return DataLoaderKwargs(collate_fn=collate_fn)


@contextlib.contextmanager
def _on(device: torch.device):
    with (torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()):
        yield


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class EKFAC:
    """EK-FAC (or K-FAC / diagonal / identity) influence of each training example on
    each eval pair's loss, via Kronfluence. See the module docstring."""

    models_needed = staticmethod(grand_only)     # the grand coalition's weights

    def __init__(self, name: str = "ekfac", **settings):
        self.name = name
        self.where = f"valuer.{name}"
        self.settings = EKFACSettings.of(settings, prefix=self.where)
        require("kronfluence", self.where)

    def factor_meta(self, model_key: str, data_fp: str) -> dict:
        s = self.settings
        return {"format": CACHE_FORMAT, "model_key": model_key, "data": data_fp, "strategy": s.strategy,
                "fisher": s.fisher, "seed": s.seed, "train_loss": s.train_loss, "layers_filter": s.layers,
                "dtype": s.dtype}

    def _arguments(self):
        from kronfluence.arguments import FactorArguments, ScoreArguments
        s = self.settings
        dt = torch.float64 if s.dtype == "float64" else torch.float32
        fa = FactorArguments(strategy=s.strategy, use_empirical_fisher=s.fisher == "empirical",
                             covariance_max_examples=None, lambda_max_examples=None,
                             activation_covariance_dtype=dt, gradient_covariance_dtype=dt,
                             per_sample_gradient_dtype=dt, lambda_dtype=dt)
        sa = ScoreArguments(damping_factor=s.damping, per_sample_gradient_dtype=dt, precondition_dtype=dt,
                            score_dtype=dt)
        return fa, sa

    @staticmethod
    def _analyzer(output_dir: Path, model, task, device: torch.device):
        from kronfluence.analyzer import Analyzer
        from kronfluence.utils.state import State
        State._reset_state()        # Kronfluence's device is a process-wide singleton: set it for this model
        return Analyzer(analysis_name="kronfluence", model=model, task=task, cpu=device.type != "cuda",
                        log_level=logging.WARNING, disable_tqdm=True, output_dir=str(output_dir))

    def value(self, game, budget: Budget) -> Valuation:
        s, where = self.settings, self.where
        meter = CostMeter(game)
        subject, layers = grand_coalition(game, meter, s, where)
        pairs, E = game.flat_pairs(), len(game.eval)
        meta = self.factor_meta(subject.key, content_key([asdict(p) for p in pairs]))
        fkey = content_key(meta)[:24]
        root = game.artefacts_dir("ekfac")
        fdir = root / fkey
        skey = content_key({"factors": fkey, "damping": s.damping, "n_eval": E,
                            "eval": content_key([asdict(p) for p in game.eval])})[:24]
        spath = fdir / "scores" / f"{skey}.npy"
        factors_reused = reusable(fdir)          # damaged factors or scores are removed (one line) and redone
        scores_reused = factors_reused and reusable(spath.with_suffix(".json")) and reusable(spath)
        if not scores_reused:
            _register_conv1d()
            names = [n for n, _ in layers]
            with meter.phase("reference", own_compute=True):       # π0's log-probs, before any wrapping
                rb = max(s.batch_size, 16)
                train_ds = _dataset(*loss_inputs(subject, pairs, s.train_loss, rb))
                query_ds = _dataset(*loss_inputs(subject, game.eval, s.train_loss, rb))
            from kronfluence.analyzer import prepare_model
            device = subject.device
            task = _pair_task(subject, names, s.train_loss, s.seed)
            model = prepare_model(unwrap(subject.model), task)
            dl = _loader_kwargs(subject.pad_id)
            fa, sa = self._arguments()
            with _on(device):
                if not factors_reused:
                    with build_lock(fdir):                # one process fits them; the others wait and read them
                        factors_reused = reusable(fdir)
                        if not factors_reused:
                            self._fit(fdir, meta, model, task, device, train_ds, dl, fa, meter)
                subject.check_budget()
                with build_lock(spath):
                    scores_reused = reusable(spath.with_suffix(".json")) and reusable(spath)
                    if not scores_reused:
                        self._scores(fdir, spath, model, task, device, train_ds, query_ds, dl, sa, meter)
        stored = json.loads((fdir / "meta.json").read_text())
        if stored.get("model_key") != subject.key or stored.get("data") != meta["data"]:
            raise RuntimeError(f"{where}: the factor cache {fdir} is not for this model and data; delete it")
        pair = np.load(spath, mmap_mode="r" if len(pairs) * E * 8 > PAIR_SCORES_RAM_BYTES else None)
        score_meta = json.loads(spath.with_suffix(".json").read_text())
        point = np.asarray(pair).mean(1)
        if not np.all(np.isfinite(point)):
            raise FloatingPointError(f"{self.name}: non-finite influence scores (non-finite gradients or factors?)")
        return Valuation(owner_sums(point, game.owner_sizes), point_values=point, pair_scores=pair,
                         cost=meter.cost(), extras={
            "strategy": s.strategy, "fisher": s.fisher, "seed": s.seed, "train_loss": s.train_loss,
            "damping": s.damping if s.damping is not None else f"heuristic: {HEURISTIC} x mean eigenvalue per layer",
            "model_kind": subject.kind, "n_layers": len(stored["layers"]), "n_train": len(pairs), "n_eval": E,
            "factor_s": stored["factor_s"], "score_s": score_meta["score_s"],
            "factors_reused": factors_reused, "scores_reused": scores_reused, "cache_dir": str(fdir),
            "kronfluence": stored["kronfluence"], "sign": SIGN})

    def _fit(self, fdir: Path, meta: dict, model, task, device, train_ds, dl, fa, meter) -> None:
        """Fit the factors into a temp folder renamed to ``fdir`` (``atomic_folder``)."""
        import kronfluence
        s = self.settings
        with atomic_folder(fdir) as tmp:
            with meter.phase("fit_factors", own_compute=True):
                t0 = time.perf_counter()
                task.reseed()
                an = self._analyzer(tmp, model, task, device)
                an.fit_all_factors("fit", dataset=train_ds, per_device_batch_size=s.batch_size,
                                   dataloader_kwargs=dl, factor_args=fa)
                factor_s = time.perf_counter() - t0
            (tmp / "meta.json").write_text(json.dumps(
                {**meta, "kronfluence": kronfluence.__version__, "layers": task.get_influence_tracked_modules(), "factor_s": factor_s},
                indent=1))

    def _scores(self, fdir: Path, spath: Path, model, task, device, train_ds, query_ds, dl, sa, meter) -> None:
        """Pairwise scores with the factors in ``fdir``, saved to ``spath`` (.npy, [N, E])."""
        s = self.settings
        with meter.phase("scores", own_compute=True):
            t0 = time.perf_counter()
            an = self._analyzer(fdir, model, task, device)
            tmp_name = tmp_path(spath).name       # Kronfluence writes scores_<it>/
            try:
                an.compute_pairwise_scores(tmp_name, "fit", query_dataset=query_ds,
                                           train_dataset=train_ds, per_device_query_batch_size=s.batch_size,
                                           per_device_train_batch_size=s.batch_size,
                                           dataloader_kwargs=dl, score_args=sa)
                sc = an.load_pairwise_scores(tmp_name)["all_modules"]          # [E, N]
            finally:
                _rmtree(an.scores_output_dir(tmp_name))
            pair = np.ascontiguousarray(sc.double().cpu().numpy().T)            # [N, E]
            self._save_scores(spath, pair, time.perf_counter() - t0)

    @staticmethod
    def _save_scores(path: Path, pair: np.ndarray, score_s: float) -> None:
        meta = {"score_s": score_s, "shape": list(pair.shape)}
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta).encode())
        atomic_write(path, lambda f: np.save(f, pair))       # the .npy last: it marks the scores done
