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

Build them with ``cls.of(kwargs, prefix="valuer.shed")`` so that an unknown key
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


def setting(default, help: str, *, min=None, max=None, choices=None, min_exclusive: bool = False,
            max_exclusive: bool = False):
    """A settings field: its default, a one-line help text, optional bounds and choices.
    Bounds and choices apply to the value, or to each element of a ``list[...]`` field."""
    meta = {"help": help, "min": min, "max": max, "choices": tuple(choices) if choices else None,
            "min_exclusive": min_exclusive, "max_exclusive": max_exclusive}
    if default is MISSING:          # a required setting (the class needs kw_only=True if others have defaults)
        return field(metadata=meta)
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


def _element(annotation):
    """X of a ``list[X]`` (or ``list[X] | None``) annotation, else None."""
    for a in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(a) is list and typing.get_args(a):
            return typing.get_args(a)[0]
    return None


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
        where = cls.prefix if prefix is None else prefix
        if unknown:
            keys = ", ".join(f"{where}.{k}" if where else k for k in unknown)
            raise ConfigError(f"{keys}: unknown setting; choose from {names}")
        absent = [f.name for f in fields(cls) if f.name not in kwargs
                  and f.default is MISSING and f.default_factory is MISSING]
        if absent:
            key = f"{where}.{absent[0]}" if where else absent[0]
            raise ConfigError(f"{key}: missing (was it deleted with ~{key}?); set {key}=<value>")
        token = _PREFIX.set(where)
        try:
            return cls(**kwargs)
        finally:
            _PREFIX.reset(token)

    @property
    def _where(self) -> str:
        where = _PREFIX.get()
        return self.prefix if where is None else where

    def _name(self, field_name: str) -> str:
        """How the user writes a field: ``<prefix>.<field>`` (just ``<field>`` at the top level)."""
        return f"{self._where}.{field_name}" if self._where else field_name

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            self._check_field(f, hints[f.name], getattr(self, f.name))
        self.check()

    def _check_field(self, f, annotation, value) -> None:
        kinds, nullable = _kinds(annotation)
        name, meta = self._name(f.name), f.metadata
        if value is None:
            if not nullable:
                raise ConfigError(f"{name}: null is not allowed; set a value (default {self._default(f)!r})")
            return
        if not _type_ok(value, kinds):
            want = " or ".join(_NAMES.get(k, k.__name__) for k in kinds) + (" or null" if nullable else "")
            raise ConfigError(f"{name}: {value!r} is not {want}")
        elem = _element(annotation)
        if elem is not None and isinstance(value, list):
            for i, v in enumerate(value):
                self._check_value(f"{name}[{i}]", v, elem, meta, False)
            return
        self._check_value(name, value, annotation, meta, nullable)

    def _check_value(self, name: str, value, annotation, meta, nullable: bool) -> None:
        """Type (of a list element; nested lists too), choices and bounds of one value."""
        kinds, _ = _kinds(annotation)
        if not _type_ok(value, kinds):
            raise ConfigError(f"{name}: {value!r} is not " + " or ".join(_NAMES.get(k, k.__name__) for k in kinds))
        elem = _element(annotation)
        if elem is not None:
            for i, v in enumerate(value):
                self._check_value(f"{name}[{i}]", v, elem, {}, False)
            return
        null = " (or null)" if nullable else ""
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{name}: unknown {value!r}; choose one of {list(meta['choices'])}")
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
            rel = ">" if meta.get("min_exclusive") else ">="
            raise ConfigError(f"{name}: {value!r}; use a value {rel} {lo}{null}")
        if hi is not None and (value > hi or (meta.get("max_exclusive") and value == hi)):
            rel = "<" if meta.get("max_exclusive") else "<="
            raise ConfigError(f"{name}: {value!r}; use a value {rel} {hi}{null}")

    @staticmethod
    def _default(f):
        if f.default is MISSING and f.default_factory is MISSING:
            return "required"
        return f.default if f.default is not MISSING else f.default_factory()

    def check(self) -> None:
        """Cross-field checks of a subclass (raise ``self.error(field, text)``)."""

    def error(self, field_name: str, text: str) -> ConfigError:
        return ConfigError(f"{self._name(field_name)}: {text}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def normalised(settings: Settings) -> dict:
    """``asdict`` of ``settings`` with every float-typed field a float: ``epochs=5`` and
    ``epochs=5.0`` are one setting, and one cache key."""
    d = dataclasses.asdict(settings)
    hints = typing.get_type_hints(type(settings))
    for f in fields(settings):
        kinds, _ = _kinds(hints[f.name])
        v = d[f.name]
        if float in kinds and int not in kinds and isinstance(v, int) and not isinstance(v, bool):
            d[f.name] = float(v)
    return d


def describe(cls) -> str:
    """One line per field: name, type, default, help (for --help and docs)."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in fields(cls):
        kinds, nullable = _kinds(hints[f.name])
        kind = "|".join(k.__name__ for k in kinds) + ("|null" if nullable else "")
        name = f"{cls.prefix}.{f.name}" if cls.prefix else f.name
        lines.append(f"  {name} ({kind}, default {Settings._default(f)!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)
