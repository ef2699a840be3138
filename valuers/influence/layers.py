"""The watched layers: the weights whose gradients the influence is computed on.

LoRA stages (a peft model): the LoRA A/B linear maps. Full fine-tunes: every
trainable ``nn.Linear`` / GPT-2 ``Conv1D`` (weight [in, out]) except the output head
(tied to the input embedding on GPT-2). Biases are not watched. ``pattern`` (a regex
on layer names, relative to the transformers model) narrows the set.
"""
from __future__ import annotations

import re

import torch

from bench.core.errors import ConfigError
from valuers.influence.data import unwrap


def watched_layers(model, pattern: str | None = None, where: str = "valuer") -> list[tuple[str, torch.nn.Module]]:
    """Trainable ``nn.Linear`` / ``Conv1D`` layers (names relative to the transformers
    model), the output head excluded; a peft model yields its LoRA A/B maps.
    ``where`` names the settings in error messages (``<where>.layers``)."""
    from transformers.pytorch_utils import Conv1D
    hf = unwrap(model)
    head = hf.get_output_embeddings()
    out = []
    for name, m in hf.named_modules():
        if (isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head and m.weight.requires_grad
                and (pattern is None or re.search(pattern, name))):
            out.append((name, m))
    if not out:
        what = f" matching {where}.layers={pattern!r}" if pattern else ""
        raise ConfigError(f"{where}.layers: {type(hf).__name__} has no trainable nn.Linear/Conv1D layer{what}; "
                          f"value a full or LoRA fine-tune (trainable linear weights) or widen {where}.layers")
    return out


def layer_dims(module) -> tuple[int, int]:
    """(d_out, d_in); a GPT-2 Conv1D stores its weight as [in, out]."""
    from transformers.pytorch_utils import Conv1D
    w = module.weight
    return (w.shape[1], w.shape[0]) if isinstance(module, Conv1D) else (w.shape[0], w.shape[1])


def is_conv1d(module) -> bool:
    """A GPT-2 ``Conv1D`` (weight [in, out]: transpose it to read it as [out, in])."""
    from transformers.pytorch_utils import Conv1D
    return isinstance(module, Conv1D)
