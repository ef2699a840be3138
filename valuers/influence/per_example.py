"""Full per-example gradients with ``torch.func``: the exact reference the hooks are
checked against, and the naive route they are timed against.

Per-example gradients come from ``vmap(grad(loss_of_one_example))`` over a batch,
with the watched weights swapped in by ``functional_call``. Each layer's gradient
is flattened as [d_out, d_in] (a GPT-2 Conv1D's [in, out] weight is transposed),
so it lines up with the hooks' P_out G P_inᵀ.

The forward runs without an attention mask: rows are right-padded and attention is
causal, so real positions never see padding (vmap cannot batch the mask logic).
For the same reason the response log-probs are read densely (every position
through the head, then masked) rather than gathered at the response positions as
``bench.core.train.response_logps`` does; both use the same token log-prob
(``bench.core.train.token_logps``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.core.train import token_logps
from valuers.influence.data import batches, collate, unwrap
from valuers.influence.layers import is_conv1d
from valuers.influence.subject import Subject


def functional_row_logps(hf):
    """``row_logps(params, ids [K, L], tmask [K, L]) -> [K]``: Σ log π over each row's response
    tokens with ``params`` swapped in by ``functional_call`` (one example's K rows; no attention
    mask, see the module docstring). Shared by the ``torch.func`` routes (here and dattri's)."""
    from torch.func import functional_call
    emb = hf.get_input_embeddings()

    def row_logps(params, ids, tmask):
        logits = functional_call(hf, params, (), {"inputs_embeds": emb(ids), "use_cache": False}).logits
        lp = token_logps(logits[:, :-1], ids[:, 1:])
        return (lp * tmask[:, 1:].to(lp.dtype)).sum(-1)
    return row_logps


def sft_logp(s, tmask):
    """Mean log-prob per response token of the chosen row (−SFT loss)."""
    return s[0] / tmask[0].sum().clamp(min=1).to(s.dtype)


def dpo_margin(s, r, beta: float):
    """β·[(log π(y_w) − log π0(y_w)) − (log π(y_l) − log π0(y_l))] from row sums s and reference r."""
    return beta * ((s[0] - r[0]) - (s[1] - r[1]))


def per_example_gradients(subject: Subject, layers, examples, ref, loss: str, batch_size: int = 8,
                          chunk_size: int | None = None):
    """Yields (indices, {layer: [B, d_out·d_in]}) of per-example loss gradients."""
    from torch.func import grad, vmap
    hf = unwrap(subject.model)
    names = {n: (f"{n}.weight", is_conv1d(m)) for n, m in layers}
    wanted = {p for p, _ in names.values()}
    params = {n: p.detach() for n, p in hf.named_parameters() if n in wanted}
    beta = subject.beta
    row_logps = functional_row_logps(hf)

    def one(p, ids, tmask, r):                        # one example: rows [K, L]
        s = row_logps(p, ids, tmask)
        if loss == "sft":
            return -sft_logp(s, tmask)
        return -F.logsigmoid(dpo_margin(s, r, beta))

    per_ex = vmap(grad(one), in_dims=(None, 0, 0, 0), chunk_size=chunk_size)
    for idx in batches(examples, batch_size):
        subject.check_budget()
        b = collate([examples[i] for i in idx], subject.pad_id, subject.device)
        K, B = b.rows_per_example, b.n_examples
        ids = b.ids.view(K, B, -1).transpose(0, 1)
        tm = b.targets.view(K, B, -1).transpose(0, 1)
        r = (ref[idx] if ref is not None else torch.zeros(B, K, dtype=torch.float64)).to(subject.dtype)  # cpu: moved below
        with torch.no_grad():        # torch.func.grad ignores an outer no_grad; it stops a useless outer graph
            g = per_ex(params, ids, tm, r.to(subject.device))
        out = {}
        for n, (pn, conv) in names.items():
            w = g[pn]
            out[n] = (w.transpose(1, 2) if conv else w).reshape(B, -1)
        yield idx, out
