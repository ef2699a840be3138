"""Many coalitions in one pass: K LoRA adapters DPO-trained at once on one frozen base.

``dpo_train_packed`` trains the adapters of K coalitions together: each step runs
ONE forward and ONE backward over the concatenated batches of every coalition still
training, each row routed through its own coalition's adapter, and each adapter keeps
the trajectory it would have had alone in ``train.dpo_train``:

- **the same trainer**: per coalition, the ``ReadyDPOTrainer`` that ``dpo_train``
  builds (same ``_dpo_config``, ``_lora_config``, a copy of the start model, the
  coalition's ``ReadyExamples`` rows), never ``.train()``-ed. From it come the
  adapter's initial weights (TRL seeds, then peft initialises the adapter), its train
  dataloader (transformers' seedable sampler: the order of epoch ``e`` is drawn from
  ``data_seed + e``; ``set_epoch`` per epoch as ``Trainer._run_epoch`` does), its
  number of steps (``Trainer.set_initial_training_values``: ``ceil(epochs x batches
  per epoch)``, a fractional last epoch included), its optimizer
  (``Trainer.create_optimizer``: AdamW, weight-decay groups) and its learning-rate
  schedule (``Trainer.create_scheduler``, warm-up included).
- **TRL's loss**: coalition k's loss is ``trainer_k.compute_loss(view_k, inputs_k)``
  (``DPOTrainer._compute_loss``: sigmoid DPO on TRL's precomputed reference
  log-probs, exactly as in a training step), where ``view_k`` is a module whose
  forward returns coalition k's rows of the packed forward's output (TRL's fused LM
  head, ``add_fused_lm_head``: per-token log-probs without the logits), cut to the
  length of coalition k's own batch. No loss is written here.
- **routing**: one peft model holds the K adapters (``add_adapter``), and each LoRA
  layer gets ``adapter_names`` (one per row) through the pre-forward hook peft uses
  for mixed-adapter batches, so peft's ``lora.Linear.forward`` and its checks run.
  Two departures from peft, both about cost, not results: (1) peft refuses
  ``adapter_names`` in training mode (a guard in
  ``LoraModel._enable_peft_forward_hooks``, not a limit of the layer: its mixed-batch
  forward is plain differentiable indexing, gradients flow), so the hook is installed
  here directly; it stays through the backward, so a forward recomputed under
  activation checkpointing is routed the same way. (2) The rows of a coalition are
  consecutive, so each layer's ``_mixed_batch_forward`` is replaced by one that
  splits the rows into views instead of gathering and scattering them by index lists
  (``_Routing.mixed_batch_forward``: per row the same ``base(x) + lora_B(lora_A(x)) *
  scaling`` as peft's single-adapter forward). peft's version trains to the same
  adapters but its backward materialises a full-size gradient buffer per adapter and
  layer: packed training was slower than one by one with it (smoke preset, CPU).
- **one backward, per-adapter steps**: the K losses are summed and backpropagated
  once (d sum / d adapter_k = d loss_k / d adapter_k: no row of one coalition reaches
  another's adapter); then, per adapter, ``clip_grad_norm_`` over its own weights
  (``max_grad_norm``, as ``Trainer._clip_grad_norm``), its optimizer step, its
  scheduler step.
- a coalition that has run its steps drops out of later packed batches; one whose
  loss or weights go non-finite is dropped too, and returned as ``FineTuneDiverged``.

The results equal the solo runs up to float rounding, and on the CPU bit for bit
where packing pads no row further than its own batch does (checked on the tiny tier,
and on SmolLM2 for the coalitions whose rows were the longest). The packed batch is
right-padded to its longest row, and attention over a longer (masked) key length may
round differently (torch's SDPA CPU kernel does: ~5e-5 on SmolLM2's hidden states;
more rows alone change no bit). Adam turns such rounding in near-zero gradient
components into weight differences far above it (SmolLM2, 6 steps: ~1e-3 on adapter
weights of ~0.04, eval log-probs ~1e-4 apart), as much, to the printed digits, as
``dpo_train`` differs from itself when its own batches are padded further (TRL's
``pad_to_multiple_of``). With every batch padded to one length, packed and solo
adapters are bit-identical (tests/test_packed.py).
"""
from __future__ import annotations

import functools
import gc
import math
import tempfile

import torch
from accelerate.utils import convert_to_fp32

import bench.core.train as T
from bench.core.models import ModelSpec


class _Routing:
    """Which adapter each row of the current packed batch goes through: consecutive
    blocks of rows, one per coalition (``blocks``: adapter name, number of rows)."""

    def __init__(self):
        self.blocks: list[tuple[str, int]] | None = None
        self.names: list[str] | None = None

    def route(self, blocks: list[tuple[str, int]]) -> None:
        self.blocks = blocks
        self.names = [name for name, n in blocks for _ in range(n)]

    def hook(self, module, args, kwargs):
        """peft's ``_adapter_names_pre_forward_hook`` (``adapter_names`` into the LoRA
        layer's forward), without peft's training-mode guard."""
        if self.names is not None:
            kwargs["adapter_names"] = self.names
        return args, kwargs

    def mixed_batch_forward(self, layer, x, *args, adapter_names, **kwargs):
        """peft's ``lora.Linear._mixed_batch_forward`` for rows in consecutive blocks:
        the base layer on every row, then each adapter's ``lora_B(lora_A(dropout(x))) *
        scaling`` on its block (a ``split`` view, no gather), added at once: per row, the
        arithmetic of peft's single-adapter forward."""
        from peft.tuners.lora.layer import VARIANT_KWARG_KEYS
        for key in VARIANT_KWARG_KEYS:
            kwargs.pop(key, None)
        result = layer.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        pieces = x.split([n for _, n in self.blocks])
        deltas = []
        for (name, _), piece in zip(self.blocks, pieces):
            lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
            piece = layer._cast_input_dtype(piece, lora_A.weight.dtype)
            deltas.append(lora_B(lora_A(layer.lora_dropout[name](piece))) * layer.scaling[name])
        return (result + torch.cat(deltas)).to(dtype)


class _RowsView(torch.nn.Module):
    """Coalition k's rows of the packed forward, as its own model would have returned
    them (``FusedCausalLMOutput``, length of coalition k's batch): the model TRL's
    ``compute_loss`` is given."""

    def __init__(self):
        super().__init__()
        self._out = self._labels = None
        self._rows, self._length = slice(0), 0

    def bind(self, out, labels, rows: slice, length: int) -> None:
        self._out, self._labels, self._rows, self._length = out, labels, rows, length

    def forward(self, input_ids=None, labels=None, fused_lm_head=False, **kwargs):
        from trl.trainer.utils import FusedCausalLMOutput
        if not fused_lm_head or self._out is None:
            raise RuntimeError("packed training: TRL asked for something other than the fused LM head's output")
        n = self._rows.stop - self._rows.start
        mine = self._labels[self._rows, :self._length]
        if tuple(input_ids.shape) != (n, self._length) or not torch.equal(labels, mine):
            raise RuntimeError("packed training: TRL's inputs are not this coalition's rows of the packed batch")
        o, cut = self._out, (self._rows, slice(0, self._length - 1))
        pick = {f: (None if getattr(o, f, None) is None else getattr(o, f)[cut])
                for f in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")}
        return FusedCausalLMOutput(loss=None, aux_loss=None, **pick)


class _Coalition:
    """One coalition's training state: its trainer (loss, data, optimizer, schedule)
    and its adapter in the packed model."""

    def __init__(self, name: str, trainer, params: list, max_steps: int, batches):
        self.name, self.trainer, self.params = name, trainer, params
        self.max_steps, self.batches = max_steps, batches
        self.view = _RowsView()
        self.steps, self.losses = 0, []
        self.error: Exception | None = None

    @property
    def active(self) -> bool:
        return self.error is None and self.steps < self.max_steps


def _epochs(dataloader, n_epochs: int, steps_per_epoch: int, max_steps: int):
    """The batches ``Trainer._run_epoch`` feeds, in order, until ``max_steps``
    (gradient accumulation 1: one batch per optimizer step)."""
    step = 0
    for epoch in range(n_epochs):
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(epoch)
        inner = getattr(getattr(dataloader, "batch_sampler", None), "batch_sampler", None)
        if hasattr(inner, "set_epoch"):
            inner.set_epoch(epoch)
        it = iter(dataloader)
        for _ in range(steps_per_epoch):
            if step >= max_steps:
                return
            yield next(it)
            step += 1


def _packed_model(start_model, s: T.TrainSettings, names: list[str]):
    """A copy of ``start_model`` with one LoRA adapter per coalition (weights set later)."""
    from peft import get_peft_model
    model = get_peft_model(T.clone_model(start_model), T._lora_config(s), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, T._lora_config(s))
    return model


def _adapter_params(model, name: str) -> list:
    """The adapter's weights in module order (the order ``dpo_train``'s model lists them)."""
    return [p for n, p in model.named_parameters() if f".{name}." in n]


def _setup(k: int, name: str, pairs, start_model, tok, s: T.TrainSettings, seed: int, examples, out: str,
           packed, all_params: list) -> _Coalition:
    """Build coalition k's trainer as ``dpo_train`` does, copy its initial adapter into
    the packed model, give it its optimizer and schedule over that adapter, and free
    the trainer's own copy of the model."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    if not examples.covers(pairs):
        raise ValueError(f"coalition {k}: pairs outside the prepared examples; prepare every coalition's pairs "
                         f"(prepare_examples) before packed training")
    if len(examples.rows_for(pairs)) == 0:
        raise ValueError(f"coalition {k}: no training pair (empty, or every prompt fills train.max_length)")
    trainer = T.coalition_trainer(start_model, tok, None, pairs, s, seed, out, examples)
    args = trainer.args
    if args.gradient_accumulation_steps != 1:
        raise ValueError("packed training: gradient accumulation is not supported (one batch per step)")
    if getattr(trainer, "aux_loss_enabled", False):
        raise ValueError("packed training: MoE load-balancing losses mix the rows of a batch; train one by one")
    # the adapter TRL initialised (seeded by TRL before peft draws it)
    init = get_peft_model_state_dict(trainer.model)
    set_peft_model_state_dict(packed, init, adapter_name=name)
    loaded = get_peft_model_state_dict(packed, adapter_name=name)
    if loaded.keys() != init.keys() or not all(torch.equal(loaded[key], init[key]) for key in init):
        raise RuntimeError(f"packed training: coalition {k}'s initial adapter did not load into the packed model")
    # data order and number of steps, as Trainer.train computes them
    dataloader = trainer.get_train_dataloader()
    n_epochs, steps_per_epoch, *_, max_steps = trainer.set_initial_training_values(args, dataloader)
    # optimizer over this adapter's weights (the only ones requiring grad while it is built), and its schedule
    params = _adapter_params(packed, name)
    mine = {id(p) for p in params}
    for p in all_params:
        p.requires_grad_(id(p) in mine)
    trainer.create_optimizer(model=packed)
    for p in all_params:
        p.requires_grad_(True)
    trainer.create_scheduler(num_training_steps=max_steps)
    run = _Coalition(name, trainer, params, max_steps,
                     _epochs(dataloader, n_epochs, steps_per_epoch, max_steps))
    # the trainer's model is now the view of its rows; its own copy of the base goes
    trainer.model = trainer.model_wrapped = run.view
    trainer.callback_handler.model = run.view
    del init, loaded
    return run


def _diverged(what: str, steps: int, s: T.TrainSettings) -> T.FineTuneDiverged:
    return T.FineTuneDiverged(f"non-finite {what} after {steps} steps (lr={s.lr}); lower train.lr")


def dpo_train_packed(start_model, tok, spec: ModelSpec, coalitions: list[list], s: T.TrainSettings, seed: int,
                     examples: T.ReadyExamples) -> list:
    """DPO-train one LoRA adapter per coalition of ``coalitions`` from ``start_model``
    (also the reference; ``examples`` carry its reference log-probs), all at once.

    Returns one entry per coalition, in order: ``(stage, stats, model)`` exactly as
    ``dpo_train`` returns them (the model: ``start_model`` with the adapter merged, in
    eval mode), or the ``FineTuneDiverged`` of a coalition whose loss or weights went
    non-finite (the others train on). ``start_model`` is not modified. LoRA only
    (``s.lora_r`` set); a ValueError for a full fine-tune, no coalition, or a coalition
    with no prepared pair.
    """
    from peft import get_peft_model_state_dict
    from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model
    if s.lora_r is None:
        raise ValueError("train.lora_r: packed training trains LoRA adapters; set train.lora_r (null = full "
                         "fine-tune, trained one coalition at a time)")
    coalitions = [list(c) for c in coalitions]
    if not coalitions:
        raise ValueError("coalitions: none given; pass at least one")
    width = max(4, len(str(len(coalitions) - 1)))
    names = [f"coalition{k:0{width}d}" for k in range(len(coalitions))]    # none a substring of another
    with tempfile.TemporaryDirectory() as out, T._quiet():
        packed = _packed_model(start_model, s, names)
        all_params = [p for name in names for p in _adapter_params(packed, name)]
        runs = [_setup(k, name, pairs, start_model, tok, s, seed, examples, out, packed, all_params)
                for k, (name, pairs) in enumerate(zip(names, coalitions))]
        gc.collect()
        first = runs[0].trainer
        # what TRL does to the model it trains (DPOTrainer.__init__, Trainer.train)
        if first.args.disable_dropout:
            disable_dropout_in_model(packed)
        outputs = ("log_probs", "entropy", "mean_logits", "is_top1") + (
            ("log_sum_sq_probs",) if first.use_weighting else ())
        add_fused_lm_head(packed.get_base_model(), outputs=outputs)
        packed.to(first.args.device)
        _checkpointing(packed, first.args)
        pad_id = first.data_collator.pad_token_id
        routing = _Routing()
        hooks = _install_routing(packed, routing)
        try:
            packed.train()
            while any(r.active for r in runs):
                _step([r for r in runs if r.active], packed, routing, pad_id, s)
        finally:
            for h in hooks:
                h.remove()
        results = []
        for r in runs:
            if r.error is not None:
                results.append(r.error)
                continue
            state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(packed, adapter_name=r.name).items()}
            if not all(torch.isfinite(v).all() for v in state.values()):
                results.append(_diverged("weights", r.steps, s))
                continue
            stage = {"kind": "lora", "config": T._lora_config_dict(s), "state": state}
            model = T.materialize(start_model, [stage])
            model.requires_grad_(False)
            model.eval()
            stats = {"steps": r.steps, "final_loss": r.losses[-1] if r.losses else None,
                     "first_loss": r.losses[0] if r.losses else None}
            results.append((stage, stats, model))
        del runs, packed
    return results


def _install_routing(model, routing: _Routing) -> list:
    """Route every LoRA layer's rows (``routing``); returns the hooks to remove."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    other = sorted({type(m).__name__ for m in layers if not isinstance(m, Linear)})
    if other:
        raise ValueError(f"train.lora_targets: packed training routes LoRA on linear layers only, not {other}")
    for m in layers:
        m._mixed_batch_forward = functools.partial(routing.mixed_batch_forward, m)
    return [m.register_forward_pre_hook(routing.hook, with_kwargs=True) for m in layers]


def _checkpointing(model, args) -> None:
    """Activation checkpointing as ``Trainer.train`` switches it on (it recomputes the
    same values: the trajectory does not change, only the memory)."""
    if not getattr(args, "activation_checkpointing", getattr(args, "gradient_checkpointing", False)):
        return
    kw = dict(getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs or {})
    every, offload = kw.pop("every_n_layers", 1), kw.pop("offload", False)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw or None, every_n_layers=every,
                                              offload=offload)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw or None)
    model.enable_input_require_grads()     # as DPOTrainer does for a peft model under checkpointing


def _right_pad(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)


def _step(active: list[_Coalition], packed, routing: _Routing, pad_id: int, s: T.TrainSettings) -> None:
    """One optimizer step of every active coalition: one packed forward, TRL's loss per
    coalition, one backward, then each adapter clipped and stepped on its own."""
    batches = [r.trainer._prepare_inputs(next(r.batches)) for r in active]
    length = max(b["input_ids"].shape[1] for b in batches)
    input_ids = torch.cat([_right_pad(b["input_ids"], length, pad_id) for b in batches])
    attention = torch.cat([_right_pad(b["attention_mask"], length, 0) for b in batches])
    completion = torch.cat([_right_pad(b["completion_mask"], length, 0) for b in batches])
    labels = input_ids.masked_fill(completion == 0, -100)      # as DPOTrainer._compute_loss builds them
    routing.route([(r.name, b["input_ids"].shape[0]) for r, b in zip(active, batches)])
    # the forward under the trainers' autocast (bf16 under train.precision=bf16), its
    # outputs back in fp32 as accelerate returns a prepared model's: the losses are fp32
    with active[0].trainer.compute_loss_context_manager(), active[0].trainer.accelerator.autocast():
        out = packed(input_ids=input_ids, attention_mask=attention, use_cache=False, labels=labels,
                     fused_lm_head=True)
    out = convert_to_fp32(out)
    losses, row = [], 0
    for r, b in zip(active, batches):
        n = b["input_ids"].shape[0]
        r.view.bind(out, labels, slice(row, row + n), b["input_ids"].shape[1])
        row += n
        with r.trainer.compute_loss_context_manager():
            loss = r.trainer.compute_loss(r.view, b)
        r.trainer._metrics["train"].clear()     # TRL's per-step metrics (a training step logs and clears them)
        losses.append(loss)
    values = torch.stack([x.detach() for x in losses]).tolist()     # one device sync
    kept = [(r, x) for r, x, v in zip(active, losses, values) if math.isfinite(v)]
    for r, v in zip(active, values):
        r.steps += 1
        if math.isfinite(v):
            r.losses.append(v)
        else:
            r.error = _diverged("loss", r.steps, s)
    if kept:
        torch.stack([x for _, x in kept]).sum().backward()
    del out, losses
    for r, _ in kept:
        args = r.trainer.args
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(r.params, args.max_grad_norm)
        r.trainer.optimizer.step()
        r.trainer.lr_scheduler.step()
        r.trainer.optimizer.zero_grad(set_to_none=True)
    for r in active:
        if r.error is not None:
            for p in r.params:
                p.grad = None
