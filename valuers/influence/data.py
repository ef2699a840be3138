"""What the influence losses are computed on: pairs encoded into rows, padded
batches, the rows' response log-probs and the per-example training losses.

A pair becomes its rows ``((ids, first_target), ...)``: chosen and rejected (DPO) or
chosen only (SFT), tokenised as TRL does (prompt, then response + EOS) and cut to
``max_length`` tokens from the start (TRL's ``keep_start``). A batch stacks rows
kind-major (chosen of every example, then rejected), right-padded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.core.train import response_logps, tokenize_pair

LOSSES = ("dpo", "sft")


def encode_pairs(tok, spec, pairs, loss: str, max_length: int | None) -> list[tuple]:
    """Per pair, its rows ``((ids, first_target), ...)`` (see the module docstring)."""
    out = []
    for p in pairs:
        p_ids, c_ids, r_ids = tokenize_pair(tok, spec, p)
        comps = (c_ids,) if loss == "sft" else (c_ids, r_ids)
        rows = []
        for comp in comps:
            ids = list(p_ids) + list(comp)
            if max_length:
                ids = ids[:max_length]
            rows.append((tuple(ids), max(1, len(p_ids))))
        out.append(tuple(rows))
    return out


@dataclass
class Batch:
    """Rows are kind-major: chosen of examples 0..B-1, then rejected of 0..B-1."""
    ids: torch.Tensor        # [R, L] right-padded
    attn: torch.Tensor       # [R, L] 1 = real token
    targets: torch.Tensor    # [R, L] bool: token t is a response token (predicted at t-1)
    n_examples: int
    rows_per_example: int


def collate(examples, pad_id: int, device="cpu") -> Batch:
    B, K = len(examples), len(examples[0])
    rows = [ex[j] for j in range(K) for ex in examples]
    L = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)      # cpu: filled row by row, moved below
    attn = torch.zeros((len(rows), L), dtype=torch.long)            # cpu: idem
    tgt = torch.zeros((len(rows), L), dtype=torch.bool)             # cpu: idem
    for r, (seq, start) in enumerate(rows):
        ids[r, :len(seq)] = torch.tensor(seq, dtype=torch.long)     # cpu: into the CPU buffer
        attn[r, :len(seq)] = 1
        tgt[r, start:len(seq)] = True
    return Batch(ids.to(device), attn.to(device), tgt.to(device), B, K)


def batches(examples, batch_size: int):
    """Index chunks, longest first (length-bucketed; results do not depend on it)."""
    order = sorted(range(len(examples)), key=lambda i: -max(len(r[0]) for r in examples[i]))
    for b in range(0, len(order), batch_size):
        yield order[b:b + batch_size]


def unwrap(model):
    """The transformers model inside a peft wrapper (LoRA layers stay injected)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def row_logps(model, batch: Batch) -> torch.Tensor:
    """Σ log π(token) over each row's response tokens [R], differentiable, in the
    model's dtype: ``bench.core.train.response_logps``, the function that scores the
    game's utilities (only the response positions go through the output head)."""
    return response_logps(unwrap(model), batch.ids, batch.attn, batch.targets)


def example_losses(lp: torch.Tensor, ref: torch.Tensor | None, batch: Batch, loss: str, beta: float):
    """Per-example training loss [B] from row log-probs [R] and reference log-probs [B, 2].

    dpo  −log σ(β[(log π(y_w) − log π0(y_w)) − (log π(y_l) − log π0(y_l))])  (TRL's sigmoid loss)
    sft  −(1/|y_w|) Σ log π(y_w tokens)
    """
    B = batch.n_examples
    if loss == "sft":
        n = batch.targets[:B].sum(1).clamp(min=1).to(lp.dtype)
        return -lp[:B] / n
    ref = ref.to(device=lp.device, dtype=lp.dtype)      # kept on the CPU in float64 (subject.reference_logps)
    m = (lp[:B] - ref[:, 0]) - (lp[B:2 * B] - ref[:, 1])
    return -F.logsigmoid(beta * m)
