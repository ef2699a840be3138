"""Settings as dataclasses, checked in one place.

A settings class lists its fields with a type, a default and a ``help`` text (the
way TRL's configs and Kronfluence's arguments do), plus optional bounds and
choices. ``Settings.__post_init__`` checks every field against its annotation
(int, float, str, bool, ``X | None``) and its metadata, and raises one
``ConfigError`` line that names the field (``<prefix>.<field>``) and what to set
instead; a subclass adds cross-field checks in ``check``.

    @dataclass(frozen=True)
    class ShedSettings(Settings):
        prefix = "valuer.shed"
        n_clusters: int = setting(10, "C, the number of K-means clusters", min=1)
        method: str = setting("removal", "removal (k passes) | exact (all 2^C)", choices=("removal", "exact"))

Build them with ``cls.of(kwargs, prefix="valuer_args.shed")`` so that an unknown key
is refused by name and every message names the setting as the user writes it.
``describe(cls)`` renders the fields as text (for ``--help`` and the README).
"""
from __future__ import annotations

import contextvars
import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass, field, fields

from bench.core.errors import ConfigError


def setting(default, help: str, *, min=None, max=None, choices=None, min_exclusive: bool = False):
    """A settings field: its default, a one-line help text, optional bounds and choices."""
    meta = {"help": help, "min": min, "max": max, "choices": tuple(choices) if choices else None,
            "min_exclusive": min_exclusive}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _kinds(annotation) -> tuple[tuple[type, ...], bool]:
    """(accepted types, None allowed) of a field annotation (strings resolved)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        kinds = tuple(a for a in args if a is not type(None))
        return tuple(typing.get_origin(k) or k for k in kinds), type(None) in args
    return (origin or annotation,), False


def _type_ok(value, kinds: tuple) -> bool:
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int) and float in kinds:
        return True
    return isinstance(value, kinds)


_PREFIX: contextvars.ContextVar[str | None] = contextvars.ContextVar("settings_prefix", default=None)

_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
          dict: "a mapping", tuple: "a list"}


@dataclass(frozen=True)
class Settings:
    """Base of every settings dataclass (see the module docstring)."""

    prefix: typing.ClassVar[str] = "settings"

    @classmethod
    def of(cls, kwargs: dict | None = None, prefix: str | None = None):
        """Settings from a mapping (a Hydra config): unknown keys refused, every field checked."""
        kwargs = dict(kwargs or {})
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        where = prefix or cls.prefix
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {unknown}; choose from {names}")
        token = _PREFIX.set(where)
        try:
            return cls(**kwargs)
        finally:
            _PREFIX.reset(token)

    @property
    def _where(self) -> str:
        return _PREFIX.get() or self.prefix

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            self._check_field(f, hints[f.name], getattr(self, f.name))
        self.check()

    def _check_field(self, f, annotation, value) -> None:
        kinds, nullable = _kinds(annotation)
        name, meta = f"{self._where}.{f.name}", f.metadata
        if value is None:
            if not nullable:
                raise ConfigError(f"{name}: null is not allowed; set a value (default {self._default(f)!r})")
            return
        if not _type_ok(value, kinds):
            want = " or ".join(_NAMES.get(k, k.__name__) for k in kinds) + (" or null" if nullable else "")
            raise ConfigError(f"{name}: {value!r} is not {want}")
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{name}: unknown {value!r}; choose one of {list(meta['choices'])}")
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
            rel = ">" if meta.get("min_exclusive") else ">="
            raise ConfigError(f"{name}: {value!r}; use a value {rel} {lo}" + (" (or null)" if nullable else ""))
        if hi is not None and value > hi:
            raise ConfigError(f"{name}: {value!r}; use a value <= {hi}")

    @staticmethod
    def _default(f):
        return f.default if f.default is not MISSING else f.default_factory()

    def check(self) -> None:
        """Cross-field checks of a subclass (raise ``self.error(field, text)``)."""

    def error(self, field_name: str, text: str) -> ConfigError:
        return ConfigError(f"{self._where}.{field_name}: {text}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def describe(cls) -> str:
    """One line per field: name, type, default, help (for --help and docs)."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in fields(cls):
        kinds, nullable = _kinds(hints[f.name])
        kind = "|".join(k.__name__ for k in kinds) + ("|null" if nullable else "")
        lines.append(f"  {cls.prefix}.{f.name} ({kind}, default {Settings._default(f)!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)
