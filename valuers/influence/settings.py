"""The settings every influence valuer shares (a ``Settings`` base to extend)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from bench.core.settings import Settings, setting
from valuers.influence.data import LOSSES
from valuers.influence.subject import DTYPES


@dataclass(frozen=True)
class InfluenceSettings(Settings):
    prefix = "valuer.influence"
    seed: int = setting(0, "projection seed (each layer's projection derives from it and the layer name)")
    train_loss: str = setting("dpo", "dpo (the pair's DPO loss vs the base, beta = train.beta) | sft (mean NLL "
                                     "of the chosen response)", choices=LOSSES)
    damping_scale: float = setting(0.1, "lambda = damping_scale x the mean eigenvalue of each Fisher block",
                                   min=0, min_exclusive=True)
    batch_size: int = setting(8, "examples per gradient batch (results do not depend on it)", min=1)
    dtype: str = setting("float32", "dtype of the model and its gradients", choices=tuple(DTYPES))
    layers: str | None = setting(None, "regex on layer names to watch; null = every trainable linear layer")
    device: str | None = setting(None, "null or auto = cuda if available, else cpu; or cpu | cuda | cuda:N")

    def check(self) -> None:
        if self.device is not None and not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise self.error("device", f"unknown {self.device!r}; use null (auto), cpu, cuda or cuda:N")
        if self.layers is not None:
            try:
                re.compile(self.layers)
            except re.error as e:
                raise self.error("layers", f"{self.layers!r} is not a regular expression ({e})") from None
