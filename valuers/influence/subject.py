"""The fine-tuned model whose training data is valued, and what its loss needs.

``load_subject(game, ...)`` takes the grand-coalition model from
``game.finetuned``: a LoRA stage stays *un-merged* as a peft model (earlier stages
of a sequential chain merged into the base), so the LoRA A/B maps are the
trainable weights; a full fine-tune has every weight requiring grad. The DPO loss
uses the base π0 as reference (the peft model with its adapter disabled, or a
separate copy of the base).

Sequential game: the watched parameters are the last stage's; the loss still uses
π0 as reference. This is an approximation (the stages' references differ).

A subject built from a game carries the game's budget check: every batch loop of
this package calls ``subject.check_budget()``, so ``Budget.max_seconds`` stops a
long gradient pass (``BudgetExhausted`` propagates to the harness).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from bench.core.errors import ConfigError
from bench.core.models import resolve_device
from valuers.influence.data import batches, collate, encode_pairs, row_logps

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Subject:
    """The fine-tuned model whose training data is valued, with what its loss needs."""
    model: Any                  # peft model (LoRA stage) or plain transformers model
    tok: Any
    spec: Any                   # bench.core.models.ModelSpec
    beta: float
    max_length: int | None
    ref_model: Any = None       # separate reference; None = this peft model with its adapter disabled
    key: str = ""               # cache key of the weights (names their artefacts)
    kind: str = "full"          # lora | full
    budget_check: Callable[[], None] | None = None   # the game's ``check_budget`` (None: no budget)
    reference_key: str = ""     # what π0 is (``Finetuned.reference_key``); "" = unknown, nothing memoised

    def check_budget(self) -> None:
        """Raise ``BudgetExhausted`` once the game's time budget is spent (called between batches)."""
        if self.budget_check is not None:
            self.budget_check()

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


def load_subject(game, dtype: str = "float32", device: str | None = None) -> Subject:
    """The grand-coalition model of ``game`` (a ``GameView``), its weights live, in
    ``dtype`` (a key of ``DTYPES``) on ``device`` (see ``resolve_device``). Trains it
    through the game if it is not cached (counted and budgeted like any utility)."""
    if game.n == 0:
        raise ConfigError("game: the grand coalition has no training stage (no owners); nothing to value")
    ft = game.finetuned((1 << game.n) - 1, DTYPES[dtype], resolve_device(device or game.device))
    return Subject(ft.model, ft.tokenizer, game.model_spec, game.train.beta, game.train.max_length, ft.reference,
                   key=ft.key, kind=ft.kind, budget_check=game.check_budget, reference_key=ft.reference_key)


def grand_only(n: int) -> list[int]:
    """``models_needed`` of every influence valuer: the grand coalition's weights."""
    return [(1 << n) - 1]


def grand_coalition(game, meter, settings, where: str):
    """(subject, watched layers): the prologue every influence valuer shares. v(N) is logged
    (its fine-tune trained through the game if missing, charged to ``meter``'s "fine_tune"
    phase), then the model is loaded in ``settings.dtype`` on ``settings.device`` and its
    layers picked by ``settings.layers`` ("load_model", the valuer's own compute)."""
    from valuers.influence.layers import watched_layers
    with meter.phase("fine_tune"):            # v(N) and its weights: logged (and trained if missing) by the game
        game.ensure_weights((1 << game.n) - 1)
    with meter.phase("load_model", own_compute=True):
        subject = load_subject(game, settings.dtype, settings.device)
        layers = watched_layers(subject.model, settings.layers, where)
    return subject, layers


_REFERENCE_MEMO: dict = {}     # per process: (π0, dtype, device, batch size, examples) -> [N, rows]
_MEMO_SIZE = 16


def reference_logps(subject: Subject, examples, batch_size: int = 32) -> torch.Tensor:
    """[N, rows] Σ log π0 over response tokens (float64), for the DPO loss. π0 is the
    game's base whatever the seed or coalition, so a process computes it once per set of
    examples (every seed's influence valuers reuse it: the same bits as a fresh pass,
    which runs the same batches); subjects without a ``reference_key`` always compute."""
    if not subject.reference_key:
        return _reference_logps(subject, examples, batch_size)
    key = (subject.reference_key, str(subject.dtype), str(subject.device), batch_size, tuple(examples))
    if key not in _REFERENCE_MEMO:
        while len(_REFERENCE_MEMO) >= _MEMO_SIZE:
            _REFERENCE_MEMO.pop(next(iter(_REFERENCE_MEMO)))
        _REFERENCE_MEMO[key] = _reference_logps(subject, examples, batch_size)
    return _REFERENCE_MEMO[key].clone()


@torch.no_grad()
def _reference_logps(subject: Subject, examples, batch_size: int) -> torch.Tensor:
    out = torch.zeros((len(examples), len(examples[0])), dtype=torch.float64)   # cpu: losses move it (data.py)
    with subject.reference() as ref:
        for idx in batches(examples, batch_size):
            subject.check_budget()
            b = collate([examples[i] for i in idx], subject.pad_id, subject.device)
            lp = row_logps(ref, b).double().cpu().view(b.rows_per_example, len(idx)).T
            out[idx] = lp
    return out


def loss_inputs(subject: Subject, pairs, loss: str, ref_batch_size: int = 32):
    """(encoded examples, their reference log-probs [N, 2] or None for SFT): what the
    per-example losses of ``pairs`` need."""
    ex = encode_pairs(subject.tok, subject.spec, pairs, loss, subject.max_length)
    return ex, (reference_logps(subject, ex, ref_batch_size) if loss == "dpo" else None)
