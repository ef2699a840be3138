"""Device paths right by construction, checked on a machine without a GPU.

1. An AST guard: every tensor factory in ``bench/core`` and ``valuers/`` (``torch.tensor``,
   ``zeros``, ``ones``, ``empty``, ``full``, ``arange``, ``rand*``, ``Generator``,
   ``from_numpy``, …) names its device, or carries a ``# cpu: <why>`` comment on one of its
   lines: a CPU buffer filled and then moved, a seeded CPU generator whose draws are the
   same on every device, a CPU accumulator. A new factory without either fails here.
2. The "meta" device stands in for a GPU: mixing it with CPU tensors raises exactly as
   mixing CUDA and CPU tensors does, so a loss built from model outputs on another device
   and reference log-probs kept on the CPU is exercised here.
3. Devices this torch cannot use are refused in one line (``bench.core.devices``).
"""
from __future__ import annotations

import ast
import os

import pytest
import torch
from conftest import REPO

from bench.core import devices
from bench.core.errors import ConfigError

FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
             "randperm", "Generator", "from_numpy", "linspace", "eye"}


def factory_calls():
    """(file, line, call source) of every torch factory call without device=."""
    for folder in ("bench/core", "valuers"):
        for f in sorted((REPO / folder).rglob("*.py")):
            src = f.read_text()
            lines = src.splitlines()
            for node in ast.walk(ast.parse(src)):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in FACTORIES and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "torch" and not any(k.arg == "device" for k in node.keywords)):
                    span = lines[node.lineno - 1:node.end_lineno]
                    yield f.relative_to(REPO), node.lineno, span


def test_every_tensor_factory_names_its_device_or_says_why_it_is_cpu():
    unmarked = [f"{f}:{n}: {span[0].strip()}" for f, n, span in factory_calls()
                if not any("# cpu:" in line for line in span)]
    assert not unmarked, ("tensor factories without device= or a '# cpu: <why>' comment (on a GPU they land on "
                          "the CPU and meet CUDA tensors):\n" + "\n".join(unmarked))


def test_the_guard_finds_what_it_is_for():
    found = list(factory_calls())
    assert len(found) >= 20, "the walk reaches the collate buffers, generators and projections"
    assert any("arith_generation" in str(f) for f, _, _ in found)


def test_dpo_losses_take_cpu_reference_logps_to_the_model_device():
    from valuers.influence.data import Batch, example_losses
    B = 3
    lp = torch.zeros(2 * B, device="meta")                        # model outputs on "another device"
    ref = torch.zeros(B, 2, dtype=torch.float64)                   # reference log-probs kept on the CPU
    batch = Batch(torch.zeros(2 * B, 4, dtype=torch.long, device="meta"), None,
                  torch.zeros(2 * B, 4, dtype=torch.bool, device="meta"), B, 2)
    out = example_losses(lp, ref, batch, "dpo", 0.1)
    assert out.device.type == "meta" and out.shape == (B,)


def test_generation_draws_do_not_depend_on_the_device_of_the_logits(monkeypatch):
    """Draws come from CPU copies of the probabilities with the CPU generator: the
    sampled tokens of a coalition are a function of its seed alone."""
    from valuers.arith_generation import valuer as gen
    torch.manual_seed(0)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 11)

        def forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache, logits_to_keep):
            class Out:
                pass
            o = Out()
            o.logits, o.past_key_values = self.emb(input_ids), None
            return o

    m = Toy()
    prompts = [[1, 2, 3], [4, 5]]
    a = gen.generate_coalition([m], m, prompts, eos_id=10, pad_id=0, max_new_tokens=5,
                               generator=gen.coalition_generator(0, 1))
    b = gen.generate_coalition([m], m, prompts, eos_id=10, pad_id=0, max_new_tokens=5,
                               generator=gen.coalition_generator(0, 1))
    assert a["tokens"] == b["tokens"] and (a["logw"] == b["logw"]).all()
    ids, mask, pos = gen._left_pad(prompts, 0, torch.device("meta"))
    assert ids.device.type == mask.device.type == pos.device.type == "meta"


def test_devices_this_torch_cannot_use_are_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(devices, "visible_nvidia_gpus", lambda: 0)
    devices.check_device("cpu")
    devices.check_device("auto")
    with pytest.raises(ConfigError, match=r"game.device: 'cuda' but this torch .* CPU build"):
        devices.check_device("cuda")
    monkeypatch.setattr(devices, "visible_nvidia_gpus", lambda: 4)
    with pytest.raises(ConfigError, match="nvidia-smi lists 4 GPU"):
        devices.check_device("auto")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    devices.check_device("cuda:1")
    with pytest.raises(ConfigError, match=r"'cuda:2' but 2 GPU\(s\) are visible"):
        devices.check_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no GPU is visible"):
        devices.check_device("cuda")
    for e in ("cuda", "cuda:2"):
        try:
            devices.check_device(e)
        except ConfigError as err:
            assert "\n" not in str(err)


def test_one_gpu_per_process_is_pinned_before_cuda_starts(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(devices, "visible_nvidia_gpus", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert devices.pin_one_gpu("cpu") == ("cpu", None) and "CUDA_VISIBLE_DEVICES" not in __import__("os").environ
    dev, note = devices.pin_one_gpu("cuda:2")
    import os
    assert dev == "cuda" and os.environ["CUDA_VISIBLE_DEVICES"] == "2" and "uses GPU 2 only" in note
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")           # a scheduler's allocation
    assert devices.pin_one_gpu("cuda:1")[0] == "cuda" and os.environ["CUDA_VISIBLE_DEVICES"] == "6"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")
    assert devices.pin_one_gpu("auto")[0] == "auto" and os.environ["CUDA_VISIBLE_DEVICES"] == "4"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")
    with pytest.raises(ConfigError, match=r"'cuda:3' but 3 GPU\(s\) are visible"):
        devices.pin_one_gpu("cuda:3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert devices.pin_one_gpu("cuda:0") == ("cuda", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(ConfigError, match="before the process could pin one"):
        devices.pin_one_gpu("cuda:1")


def test_gpu_hours_are_wall_time_held_and_cpu_phases_are_apart():
    from bench.core.devices import GpuMeter
    from bench.core.valuation import CostMeter

    class G:
        device_kind = "cuda"

        class usage:
            entries = {}
    meter = CostMeter(G())
    with meter.phase("shapley", own_compute=True, cpu_only=True):
        pass
    with meter.phase("scores", own_compute=True):
        __import__("time").sleep(0.01)
    c = meter.cost()
    assert c.gpus == 1 and c.gpu_hours == pytest.approx(c.wall_s / 3600) and c.cpu_only_s <= c.wall_s
    assert c.cpu_only_s < c.phases["scores"]
    G.device_kind = "cpu"
    assert CostMeter(G()).cost().gpu_hours == 0.0
    with GpuMeter("cpu") as m:                   # the CPU: no GPU held, no GPU memory
        pass
    assert m.fields() == {"gpus": 0, "gpu_hours": 0.0, "peak_gpu_mem_bytes": None}



def test_peak_gpu_memory_per_utility_and_per_valuer_across_resets(monkeypatch):
    """Each utility opens its own peak window (``reset_gpu_peak``); the valuer's meter
    still reports the largest peak of its whole span, and the largest of the utilities
    its pool workers computed (a fake CUDA allocator stands in for the GPU)."""
    import bench.core.devices as D
    from bench.core.metering import UseLog, fresh_peak_gpu
    state = {"peak": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: state["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: state.update(peak=0))
    with D.GpuMeter("cuda") as m:
        D.reset_gpu_peak()
        state["peak"] = 7 << 30                      # utility 1 peaks at 7 GiB
        assert D.gpu_peak_bytes() == 7 << 30
        D.reset_gpu_peak()
        state["peak"] = 3 << 30                      # utility 2 at 3 GiB
        assert D.gpu_peak_bytes() == 3 << 30
    log = UseLog()
    log.add(1, {"peak_gpu_mem": 9 << 30}, True)       # a worker's utility
    log.add(2, {"peak_gpu_mem": 12 << 30}, False)     # read from the cache: not this valuer's memory
    assert m.fields()["peak_gpu_mem_bytes"] == 7 << 30
    assert m.fields(fresh_peak_gpu(log))["peak_gpu_mem_bytes"] == 9 << 30


def test_precision_auto_is_bf16_only_where_the_device_computes_it(monkeypatch):
    import bench.core.devices as D
    from bench.core.errors import ConfigError
    monkeypatch.setattr(D, "_cpu_flags", lambda: {"avx2", "avx512f"})
    assert D.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(D, "_cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert D.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(D, "_cpu_flags", lambda: {"amx_bf16"})
    assert D.resolve_precision("auto", "cpu") == "bf16"
    assert D.resolve_precision("fp32", "cpu") == "fp32"
    assert D.resolve_precision("bf16", "cpu") == "bf16"      # asked for: emulated where not native
    with pytest.raises(ConfigError, match=r"^train.precision: unknown 'fp16'; choose one of"):
        D.resolve_precision("fp16", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    assert D.resolve_precision("auto", "cuda") == "fp32"
    with pytest.raises(ConfigError, match=r"^train.precision: bf16 but this GPU \(Tesla V100\) has no bf16"):
        D.resolve_precision("bf16", "cuda")


def test_precision_is_resolved_into_the_cache_key_and_the_trainer(make_game, tmp_path, monkeypatch):
    """A game keys its fine-tunes by the precision they ran in (``auto`` resolved), and
    TRL's config gets bf16 exactly when it is bf16."""
    import dataclasses

    import bench.core.devices as D
    import bench.core.train as T
    monkeypatch.setattr(D, "_cpu_flags", lambda: {"avx512_bf16"})
    tiny_game = make_game(tmp_path)
    auto = tiny_game._like(train=dataclasses.replace(tiny_game.train, precision="auto"))
    bf16 = tiny_game._like(train=dataclasses.replace(tiny_game.train, precision="bf16"))
    fp32 = tiny_game._like(train=dataclasses.replace(tiny_game.train, precision="fp32"))
    assert auto.train.precision == "bf16" and auto.key(3) == bf16.key(3) != fp32.key(3)
    monkeypatch.setattr(D, "_cpu_flags", lambda: set())
    assert tiny_game._like(train=dataclasses.replace(tiny_game.train, precision="auto")).key(3) == fp32.key(3)
    assert T._dpo_config("/tmp/x", bf16.train, 0, torch.device("cpu")).bf16 is True
    assert T._dpo_config("/tmp/x", fp32.train, 0, torch.device("cpu")).bf16 is False


def test_cuda_determinism_is_keyed_on_cuda_only(make_game, tmp_path, monkeypatch):
    """``game.deterministic`` changes what a CUDA fine-tune computes, not a CPU one: it is
    in a CUDA game's key and not in a CPU game's (so CPU caches do not split on it)."""
    tiny_game = make_game(tmp_path)
    assert tiny_game._like(deterministic=False).key(3) == tiny_game.key(3)
    import bench.core.devices as D
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda on, warn_only=False: calls.append((on, warn_only)))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    D.set_cuda_determinism(True)
    assert calls == [(True, True)] and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
