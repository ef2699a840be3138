"""DPO fine-tuning (TRL + peft) and scoring of preference pairs.

A fine-tune returns a *stage*: the weights it changed, as a plain dict that
can be saved and re-applied (a LoRA adapter, or the full state dict when
``lora_r`` is null). ``materialize(base, stages)`` rebuilds a clean model from
the base and a chain of stages (sequential DPO merges each stage in turn).
The model object TRL trained is never reused: its ``forward`` is patched.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import tempfile
import warnings
import weakref
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from bench.core.devices import PRECISIONS, resolve_precision
from bench.core.models import ModelSpec, render_prompt, render_response
from bench.core.settings import Settings, normalised, setting


class FineTuneDiverged(RuntimeError):
    """Training produced a non-finite loss or non-finite weights."""


@dataclass(frozen=True)
class TrainSettings(Settings):
    """The ``train`` config node; every field type- and range-checked (``bench.core.settings``)."""
    prefix = "train"
    beta: float = setting(0.1, "DPO beta (strength of the pull towards the reference)", min=0, min_exclusive=True)
    lr: float = setting(5e-4, "learning rate (0 = no update)", min=0)
    epochs: float = setting(5, "passes over a coalition's data (a float: a share of the last pass)", min=0,
                            min_exclusive=True)
    batch_size: int = setting(16, "pairs per optimiser step", min=1)
    max_length: int = setting(128, "tokens of prompt + response at most (longer pairs are truncated)", min=1)
    weight_decay: float = setting(0.0, "AdamW weight decay", min=0)
    scheduler: str = setting("linear", "learning-rate schedule (a transformers SchedulerType: linear, cosine, "
                                       "constant, ...)")
    warmup_ratio: float = setting(0.0, "share of steps with linear lr warm-up, in [0, 1)", min=0, max=1,
                                  max_exclusive=True)
    lora_r: int | None = setting(8, "LoRA rank; null = full fine-tune", min=1)
    lora_alpha: int = setting(16, "LoRA alpha (the adapter is scaled by alpha / r)", min=1)
    lora_dropout: float = setting(0.0, "LoRA dropout, in [0, 1)", min=0, max=1, max_exclusive=True)
    lora_targets: str = setting("all-linear", "modules LoRA adapts (peft target_modules)")
    score_batch_size: int = setting(64, "pairs per scoring batch (does not change results)", min=1)
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass (saves activation "
                                                  "memory, costs a forward pass per step; TRL's default is on)")
    precision: str = setting("fp32", "fp32 | bf16 | auto: the fine-tune's forward and backward under bf16 "
                                     "autocast (weights, optimizer and loss stay fp32); auto = bf16 where the "
                                     "device computes it natively (a GPU with bf16, a CPU with AMX or "
                                     "AVX512-BF16), else fp32. Scoring is fp32 under every setting",
                             choices=PRECISIONS)

    def check(self) -> None:
        if self.scheduler != "linear":
            from transformers import SchedulerType
            names = [t.value for t in SchedulerType]
            if self.scheduler not in names:
                raise self.error("scheduler", f"unknown {self.scheduler!r}; choose one of {names}")

    def key(self) -> dict:
        """The fields that shape a fine-tune (``precision`` as resolved on the device:
        the game resolves ``auto`` before it keys anything)."""
        d = normalised(self)
        d.pop("score_batch_size")     # does not change results
        return d


# ------------------------------------------------------------------ stages

def _lora_config(s: TrainSettings):
    from peft import LoraConfig
    return LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                      target_modules=s.lora_targets, task_type="CAUSAL_LM")


def clone_model(model):
    """A fresh copy with the same weights on the same device (``deepcopy`` would keep
    patched forwards). Built without initialising the weights it is about to
    overwrite (random init of 135M weights costs more than copying them), then tied
    as the config says."""
    from transformers.initialization import no_init_weights
    with torch.device(next(model.parameters()).device), no_init_weights():
        new = type(model)(model.config)
    new.load_state_dict(model.state_dict())
    new.tie_weights()
    new.eval()
    return new


def apply_stage(model, stage: dict):
    """Return ``model`` with one stage's weights applied (LoRA merged in)."""
    if stage["kind"] == "full":
        model.load_state_dict(stage["state"])
        return model
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    peft_model = get_peft_model(model, LoraConfig(**stage["config"]))
    set_peft_model_state_dict(peft_model, stage["state"])
    return peft_model.merge_and_unload()


def materialize(base_model, stages: list[dict]):
    model = clone_model(base_model)
    for st in stages:
        model = apply_stage(model, st)
    model.eval()
    return model


# ---------------------------------------------------------------- training

def to_dataset(pairs, tok, spec: ModelSpec):
    from datasets import Dataset
    return Dataset.from_dict({
        "prompt": [render_prompt(tok, spec, p.prompt) for p in pairs],
        "chosen": [render_response(spec, p.chosen) for p in pairs],
        "rejected": [render_response(spec, p.rejected) for p in pairs],
    })




@contextlib.contextmanager
def _quiet():
    """TRL/transformers print progress and notices per trainer; a game builds hundreds."""
    prev = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    loggers = [logging.getLogger(n) for n in ("transformers", "trl", "peft", "accelerate", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if prev is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = prev


class ReadyExamples:
    """Training pairs prepared by TRL once per game: tokenised (``prompt_ids``,
    ``chosen_ids``, ``rejected_ids``, TRL's own ``_prepare_dataset``, including its
    drop of pairs whose prompt fills ``max_length``) and, when ``reference`` is true,
    with TRL's precomputed reference log-probs (``ref_chosen_logps``,
    ``ref_rejected_logps``: TRL's ``compute_ref_log_probs`` on the start model, in
    batches of ``batch_size`` in pool order). A coalition's trainer gets its rows
    (``rows_for``) and neither re-tokenises nor runs a reference forward pass."""

    def __init__(self, dataset, contents: list[tuple]):
        self.dataset = dataset
        self.row_of = {contents[r]: i for i, r in enumerate(dataset["pool_row"])}
        self.has_reference = "ref_chosen_logps" in dataset.column_names
        self._seen = set(contents)

    def rows_for(self, pairs, reference: bool = True):
        """The prepared rows of ``pairs`` in their order (pairs TRL dropped are left out);
        without the reference columns when ``reference`` is false (another start model)."""
        rows = [self.row_of[k] for k in map(_content, pairs) if k in self.row_of]
        ds = self.dataset.select(rows)
        if not reference and self.has_reference:
            ds = ds.remove_columns(["ref_chosen_logps", "ref_rejected_logps"])
        return ds

    def covers(self, pairs) -> bool:
        """Whether every pair of ``pairs`` went through this preparation (kept or dropped)."""
        return all(k in self._seen for k in map(_content, pairs))


def _content(pair) -> tuple:
    return (pair.prompt, pair.chosen, pair.rejected)


def prepare_examples(start_model, tok, spec: ModelSpec, pairs, s: TrainSettings) -> ReadyExamples:
    """Tokenise ``pairs`` and compute their reference log-probs under ``start_model``
    once, through TRL (a throw-away trainer on a copy of the model: TRL patches the
    forward of the model it is given)."""
    unique = list({_content(p): p for p in pairs}.values())
    contents = [_content(p) for p in unique]
    dataset = to_dataset(unique, tok, spec).add_column("pool_row", list(range(len(unique))))
    with tempfile.TemporaryDirectory() as out, _quiet():
        # the reference log-probs in fp32 under every train.precision (like the scores)
        trainer = _trainer_class()(model=clone_model(start_model), ref_model=None,
                                   args=_dpo_config(out, replace(s, precision="fp32"), 0, _device(start_model)),
                                   processing_class=tok,
                                   train_dataset=dataset,
                                   peft_config=None)
        ready = ReadyExamples(trainer.train_dataset.flatten_indices(), contents)
        del trainer
    return ready


def _dpo_config(out: str, s: TrainSettings, seed: int, device: torch.device | None = None):
    """TRL's settings for one fine-tune on ``device`` (the start model's; None = cuda
    if there is one)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from trl import DPOConfig
    return DPOConfig(
        output_dir=out, beta=s.beta, learning_rate=s.lr, num_train_epochs=s.epochs,
        per_device_train_batch_size=s.batch_size, max_length=s.max_length,
        weight_decay=s.weight_decay, lr_scheduler_type=s.scheduler, warmup_steps=s.warmup_ratio,  # transformers 5: a float < 1 is a ratio
        seed=seed, data_seed=seed, use_cpu=device.type == "cpu", bf16=uses_bf16(s, device.type),
        report_to="none", save_strategy="no", gradient_checkpointing=s.gradient_checkpointing,
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        # reference log-probs once before training (one pass), not once per step
        # (epochs passes); the game hands them in ready-made (``ReadyExamples``)
        precompute_ref_log_probs=True, precompute_ref_batch_size=s.batch_size,
    )


def uses_bf16(s: TrainSettings, device_kind: str) -> bool:
    """Whether a fine-tune under ``s`` on ``device_kind`` runs under bf16 autocast."""
    return resolve_precision(s.precision, device_kind) == "bf16"


def _device(model) -> torch.device:
    return next(model.parameters()).device


_TRAINER = None
SHARED_PROMPT = True    # a fine-tune runs each pair's prompt once (``SharedPromptPolicy``); False: as TRL does


def _trainer_class():
    """``DPOTrainer`` that takes examples TRL already prepared (``ReadyExamples``) as
    they are: no second tokenisation, no second reference pass. Everything else,
    the loss included, is TRL's."""
    global _TRAINER
    if _TRAINER is not None:
        return _TRAINER
    import trl.trainer.dpo_trainer as dpo

    class ReadyDPOTrainer(dpo.DPOTrainer):
        def __init__(self, *args, **kwargs):
            ds = kwargs["train_dataset"]
            if "ref_chosen_logps" not in ds.column_names:
                super().__init__(*args, **kwargs)
                return
            # TRL hashes every weight to name the cache file of the reference pass it
            # would run; the reference log-probs are given, so that pass (and the hash:
            # ~1 s for 135M weights) never happens.
            original, dpo.hash_module = dpo.hash_module, lambda module: "given"
            try:
                super().__init__(*args, **kwargs)
            finally:
                dpo.hash_module = original

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            if "ref_chosen_logps" in dataset.column_names:
                return dataset
            return super()._precompute_ref_logps(dataset, name, batch_size)

        def _compute_loss(self, model, inputs, return_outputs):
            # the policy's forward with each pair's prompt run once (``SharedPromptPolicy``);
            # ``core.packed`` hands in a view of its packed forward instead: left as it is
            if SHARED_PROMPT and _is_model(model) and not self.use_weighting and not self.aux_loss_enabled:
                model = SharedPromptPolicy(model, inputs["completion_mask"])
            return super()._compute_loss(model, inputs, return_outputs)

    _TRAINER = ReadyDPOTrainer
    return _TRAINER


def _is_model(model) -> bool:
    from transformers import PreTrainedModel
    from peft import PeftModel
    return isinstance(model, (PreTrainedModel, PeftModel))


class SharedPromptPolicy:
    """The policy as TRL's DPO loss calls it, with each pair's prompt computed once.

    TRL's collator stacks a batch of B pairs as 2B right-padded rows, ``prompt + chosen``
    for each pair and then ``prompt + rejected``, and asks the model for the log-prob of
    every completion token (``labels``, ``fused_lm_head=True``). On a CPU TRL's fused head
    then projects every position, prompt and padding included, through the 49k-word
    output layer. Here the same log-probs come from B rows ``prompt + chosen + rejected``
    (``shared_prompt_batch``, as ``sequence_logps`` scores): the backbone sees the prompt
    once, the output layer only the completion tokens, and the answer is laid out as TRL's
    rows ([2B, L-1], zeros off the completions) with the per-token fields its metrics read.
    Gradients flow through the shared prompt to both responses: the same loss and the same
    gradients as two rows, to float rounding (tests/test_scoring.py). A batch whose two
    rows of a pair do not share the prompt TRL cut (it never happens with TRL's collator)
    is run as TRL would."""

    def __init__(self, model, completion_mask: torch.Tensor):
        self.model, self.completion = model, completion_mask

    def __call__(self, input_ids, attention_mask, labels=None, fused_lm_head=False, use_cache=False, **kwargs):
        split = None if kwargs or not fused_lm_head else self._split(input_ids, attention_mask)
        if split is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                              fused_lm_head=fused_lm_head, use_cache=use_cache, **kwargs)
        items, where = split
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        inner, head = getattr(base, base.base_model_prefix), base.get_output_embeddings()
        dev = input_ids.device
        pad = int(input_ids[0, -1]) if input_ids.shape[1] else 0     # any id: padding is masked out
        logits, targets = response_logits(inner, head, shared_prompt_batch(items, pad), dev)
        logp = torch.log_softmax(logits, -1)
        lp = logp.gather(-1, targets[:, None]).squeeze(-1)
        shape = (input_ids.shape[0], input_ids.shape[1] - 1)
        at = (where[0].to(dev), where[1].to(dev))

        def laid_out(x):
            return x.new_zeros(shape).index_put(at, x)
        with torch.no_grad():             # what TRL's metrics read (entropy, logits, top-1 accuracy)
            entropy = -(logp.exp() * logp).sum(-1)
            mean_logits, top1 = logits.mean(-1), logits.argmax(-1) == targets
        from types import SimpleNamespace
        return SimpleNamespace(log_probs=laid_out(lp), entropy=laid_out(entropy), mean_logits=laid_out(mean_logits),
                               is_top1=laid_out(top1), log_sum_sq_probs=None, aux_loss=None)

    def _split(self, input_ids, attention_mask):
        """``([(prompt, chosen, rejected) ids per pair], (row, column) of each completion
        token's log-prob in TRL's [2B, L-1] layout, in shared_prompt_batch's token order)``,
        or None when the rows do not pair up."""
        n = input_ids.shape[0]
        if n % 2:
            return None
        ids, att, comp = (t.cpu() for t in (input_ids, attention_mask, self.completion))   # cpu: a few hundred ids
        lengths, prompts = att.sum(1).tolist(), (att.bool() & ~comp.bool()).sum(1).tolist()
        items, rows, cols = [], [], []
        for b in range(n // 2):
            P = prompts[b]
            if P == 0 or prompts[n // 2 + b] != P or not torch.equal(ids[b, :P], ids[n // 2 + b, :P]):
                return None
            parts = [ids[b, :P].tolist()]
            for row in (b, n // 2 + b):
                if not comp[row, P:lengths[row]].all() or comp[row, lengths[row]:].any():
                    return None
                parts.append(ids[row, P:lengths[row]].tolist())
                rows += [row] * (lengths[row] - P)
                cols += range(P - 1, lengths[row] - 1)
            items.append(tuple(parts))
        return items, (torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long))   # cpu: moved by the caller


def dpo_stage(start_model, tok, spec: ModelSpec, pairs, s: TrainSettings, seed: int,
              examples: ReadyExamples | None = None) -> tuple[dict, dict]:
    """DPO-train from ``start_model`` (which is also the reference) on ``pairs``.

    Returns ``(stage, stats)``: the weights the stage changed and training stats.
    ``start_model`` is not modified. See ``dpo_train``.
    """
    stage, stats, _ = dpo_train(start_model, tok, spec, pairs, s, seed, examples)
    return stage, stats


def coalition_trainer(start_model, tok, spec: ModelSpec, pairs, s: TrainSettings, seed: int, out: str,
                      examples: ReadyExamples | None = None, reference_given: bool = True):
    """TRL's trainer for one fine-tune on ``pairs``: a copy of ``start_model`` (LoRA
    adapter added by TRL when ``s.lora_r`` is set), the prepared rows of ``pairs`` (or
    TRL's own preparation without ``examples``), output under ``out``. ``dpo_train``
    runs it; ``core.packed`` takes its initial adapter, data order and optimizer."""
    policy = clone_model(start_model)
    if examples is None:
        dataset = to_dataset(pairs, tok, spec)
    else:
        dataset = examples.rows_for(pairs, reference=reference_given)
    return _trainer_class()(model=policy, ref_model=None, args=_dpo_config(out, s, seed, _device(policy)),
                            processing_class=tok, train_dataset=dataset,
                            peft_config=_lora_config(s) if s.lora_r is not None else None)


def dpo_train(start_model, tok, spec: ModelSpec, pairs, s: TrainSettings, seed: int,
              examples: ReadyExamples | None = None, reference_given: bool = True):
    """DPO-train a copy of ``start_model`` (also the reference) on ``pairs`` with TRL.

    ``examples``: the pairs already prepared (``prepare_examples``); their reference
    log-probs are used when ``reference_given`` (they were computed under this
    ``start_model``), otherwise TRL computes them once before training. Without
    ``examples`` TRL tokenises and computes them itself. Returns ``(stage, stats,
    model)``: the weights the stage changed, training stats, and the trained model
    in eval mode (the adapter merged in), ready to score: the one copy of the weights
    this fine-tune makes. ``start_model`` is not modified.
    """
    with tempfile.TemporaryDirectory() as out, _quiet():
        trainer = coalition_trainer(start_model, tok, spec, pairs, s, seed, out, examples, reference_given)
        result = trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        trained = trainer.model
        if s.lora_r is not None:
            from peft import get_peft_model_state_dict
            state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(trained).items()}
            stage = {"kind": "lora", "config": _lora_config_dict(s), "state": state}
            model = trained.merge_and_unload()
        else:
            state = {k: v.detach().clone() for k, v in trained.state_dict().items()}
            stage = {"kind": "full", "state": state}
            model = trained
        del trainer, trained
    model.requires_grad_(False)
    model.eval()
    bad = [x for x in losses if not math.isfinite(x)]
    if bad or not all(torch.isfinite(v).all() for v in stage["state"].values()):
        what = "loss" if bad else "weights"
        raise FineTuneDiverged(f"non-finite {what} after {result.global_step} steps (lr={s.lr}); "
                               f"lower train.lr")
    stats = {"steps": result.global_step, "final_loss": losses[-1] if losses else None,
             "first_loss": losses[0] if losses else None}
    return stage, stats, model


def _lora_config_dict(s: TrainSettings) -> dict:
    return {"r": s.lora_r, "lora_alpha": s.lora_alpha, "lora_dropout": s.lora_dropout,
            "target_modules": s.lora_targets, "task_type": "CAUSAL_LM"}


# ----------------------------------------------------------------- scoring

_TOKENIZED = weakref.WeakKeyDictionary()   # tokenizer -> {(template?, pair content): ids}: eval pairs are scored every coalition


def tokenize_pair(tok, spec: ModelSpec, pair) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen completion ids, rejected completion ids) as TRL builds them:
    the response gets the EOS token and the completion starts where the tokenised
    prompt and prompt+response diverge. Memoised per process."""
    memo = _TOKENIZED.setdefault(tok, {})
    key = (spec.chat_template, pair.prompt, pair.chosen, pair.rejected)
    if key not in memo:
        memo[key] = _tokenize_pair(tok, spec, pair)
    p, c, r = memo[key]
    return list(p), list(c), list(r)


def _tokenize_pair(tok, spec: ModelSpec, pair) -> tuple[list[int], list[int], list[int]]:
    prompt = render_prompt(tok, spec, pair.prompt)
    p_ids = tok(prompt)["input_ids"]
    outs = []
    for resp in (pair.chosen, pair.rejected):
        full = tok(prompt + render_response(spec, resp) + tok.eos_token)["input_ids"]
        outs.append(full)
    plen = min(_common_prefix(p_ids, outs[0]), _common_prefix(p_ids, outs[1]))
    return p_ids[:plen], outs[0][plen:], outs[1][plen:]


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def token_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[id]: the log-prob of each target token (logits [..., V], ids [...])."""
    return torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def response_logps(model, ids: torch.Tensor, attn: torch.Tensor, targets: torch.Tensor,
                   logits_dtype: torch.dtype | None = None, sum_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Σ log π(token) over each row's response tokens: [R], differentiable (no ``no_grad`` here).

    ``ids``/``attn`` [R, L] right-padded rows; ``targets`` [R, L] bool, True where token t
    is a response token (predicted at position t-1). Only the response positions go
    through the output head (a large saving on big vocabularies). ``logits_dtype``
    casts the logits before the softmax, ``sum_dtype`` is the dtype the tokens are
    summed in (None = as computed). The one implementation behind ``sequence_logps``
    (scoring every utility) and the influence valuers' differentiable row log-probs.
    """
    inner = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    hidden = inner(input_ids=ids, attention_mask=attn).last_hidden_state
    rows, pos = targets.nonzero(as_tuple=True)
    logits = head(hidden[rows, pos - 1])
    if logits_dtype is not None:
        logits = logits.to(logits_dtype)
    lp = token_logps(logits, ids[rows, pos])
    dt = sum_dtype or lp.dtype
    return torch.zeros(ids.shape[0], dtype=dt, device=lp.device).index_add(0, rows, lp.to(dt))


@torch.no_grad()
def sequence_logps(model, tok, spec: ModelSpec, pairs, batch_size: int = 64,
                   max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """log π(y|x) summed over response tokens (+EOS), fp32 logits summed in fp64, for
    chosen and rejected: [n] each.

    One forward pass per pair scores both responses (``shared_prompt_batch``): the row is
    prompt + chosen + rejected, the rejected tokens attend to the prompt and to each other
    but not to the chosen ones, and their positions restart where the prompt ends, so each
    response sees exactly what it sees alone, and the prompt is computed once, not twice.
    Equal to scoring prompt + chosen and prompt + rejected as two rows to float rounding
    (tests/test_evaluate.py; fp32: a relative 1e-6 on SmolLM2's sums). ``max_length``:
    prompt + response cut to its first ``max_length`` tokens, as TRL's collator cuts
    training pairs (``keep_start``); a no-op for pairs that fit."""
    model.eval()
    items = []
    for p in pairs:
        p_ids, c_ids, r_ids = tokenize_pair(tok, spec, p)
        if max_length:                      # (p + c)[:m] and (p + r)[:m], the prompt cut once
            room = max(0, max_length - len(p_ids))
            p_ids, c_ids, r_ids = p_ids[:max_length], c_ids[:room], r_ids[:room]
        items.append((p_ids, c_ids, r_ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    dev = _device(model)
    inner = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    out = np.zeros(2 * len(items))
    order = np.argsort([sum(map(len, it)) for it in items], kind="stable")     # length-bucketed batches
    for b in range(0, len(items), batch_size):
        idx = order[b:b + batch_size]
        batch = shared_prompt_batch([items[i] for i in idx], pad)
        lp = token_logps(*response_logits(inner, head, batch, dev))
        sums = torch.zeros(2 * len(idx), dtype=torch.float64, device=dev).index_add(0, batch["slot"].to(dev),
                                                                                  lp.to(torch.float64))
        sums = sums.cpu().numpy()
        out[2 * idx], out[2 * idx + 1] = sums[0::2], sums[1::2]
    return out[0::2], out[1::2]


def response_logits(inner, head, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 logits [T, V], target ids [T]) of every response token of a
    ``shared_prompt_batch``: one backbone pass over its rows, the output layer only at the
    positions that predict a response token. Scoring and training both read it."""
    hidden = inner(input_ids=batch["ids"].to(device), attention_mask=batch["mask"].to(device),
                   position_ids=batch["positions"].to(device), use_cache=False).last_hidden_state
    rows, src, tgt = (batch[k].to(device) for k in ("rows", "src", "tgt"))
    return head(hidden[rows, src]).float(), batch["ids"].to(device)[rows, tgt]


def shared_prompt_batch(items: list[tuple[list[int], list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded rows ``prompt + chosen + rejected`` (token ids per pair) with what a
    forward pass needs to score both responses in one row (all CPU tensors):

    - ``ids`` [B, L]; ``positions`` [B, L]: 0.. through the chosen response, the rejected
      one restarting at the prompt's length;
    - ``mask`` [B, 1, L, L] bool (True = may attend): causal, minus rejected -> chosen; a
      padding row attends to itself only (no empty softmax row), no row to padding;
    - per response token: ``rows``, ``tgt`` (its column), ``src`` (the column whose hidden
      state predicts it: the one before, or for the rejected's first token the prompt's
      last), ``slot`` (2·pair for chosen, 2·pair + 1 for rejected, pair = row here).

    A response cut to nothing has no tokens and sums to 0."""
    B, L = len(items), max(sum(map(len, it)) for it in items)
    ids = torch.full((B, L), pad, dtype=torch.long)                # cpu: built here, moved by the caller
    positions = torch.zeros((B, L), dtype=torch.long)              # cpu: idem
    mask = torch.eye(L, dtype=torch.bool).repeat(B, 1, 1)          # cpu: idem
    rows, src, tgt, slot = [], [], [], []
    for row, (p, c, r) in enumerate(items):
        P, C, R = len(p), len(c), len(r)
        T = P + C + R
        ids[row, :T] = torch.tensor(p + c + r, dtype=torch.long)   # cpu: into the CPU buffer
        positions[row, :P + C] = torch.arange(P + C)               # cpu: idem
        positions[row, P + C:T] = torch.arange(P, P + R)           # cpu: idem
        m = torch.ones((T, T), dtype=torch.bool).tril()            # cpu: idem
        m[P + C:, P:P + C] = False
        mask[row, :T, :T] = m
        for start, n, k in ((P, C, 0), (P + C, R, 1)):
            for t in range(start, start + n):
                rows.append(row)
                tgt.append(t)
                src.append(P - 1 if t == start else t - 1)
                slot.append(2 * row + k)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)      # noqa: E731  # cpu: moved by the caller
    return {"ids": ids, "positions": positions, "mask": mask[:, None], "rows": as_long(rows), "src": as_long(src),
            "tgt": as_long(tgt), "slot": as_long(slot)}


def utility_metrics(lc, lr, base_lc, base_lr, beta: float) -> dict:
    """All utilities of one model on the eval pairs (the game picks one by name).

    pref_acc    share of pairs with log π(y_w|x) > log π(y_l|x) (ties 0.5): the default.
    reward_acc  share with positive implicit reward margin d = [lc-base_lc] - [lr-base_lr].
    margin      mean β·d (implicit reward margin).
    bt_loglik   mean log σ(β·d) (Bradley–Terry log-likelihood of the eval preferences).
    """
    diff = lc - lr
    d = (lc - base_lc) - (lr - base_lr)
    return {
        "pref_acc": float(np.mean((diff > 0) + 0.5 * (diff == 0))),
        "reward_acc": float(np.mean((d > 0) + 0.5 * (d == 0))),
        "margin": float(np.mean(beta * d)),
        "bt_loglik": float(np.mean(-np.logaddexp(0.0, -beta * d))),
    }

METRICS = ("pref_acc", "reward_acc", "margin", "bt_loglik")


def pair_metrics(lc, lr, base_lc, base_lr, beta: float) -> dict[str, np.ndarray]:
    """Per eval pair, the continuous utilities whose means are ``utility_metrics``'
    ``margin`` and ``bt_loglik``: the implicit reward margin β·d and log σ(β·d) (the
    targets of the per-pair LDS)."""
    d = (np.asarray(lc) - np.asarray(base_lc)) - (np.asarray(lr) - np.asarray(base_lr))
    return {"margin": beta * d, "bt_loglik": -np.logaddexp(0.0, -beta * d)}


PAIR_METRICS = ("margin", "bt_loglik")
