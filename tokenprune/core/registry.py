"""The operator registry: operators are found by name, never by import strings from YAML.

The built-in operators register when :mod:`tokenprune` is imported (its ``__init__`` imports
:mod:`tokenprune.operators`), which any import of this module does first."""

from __future__ import annotations

import difflib
from typing import Any

from tokenprune.core.errors import ConfigError
from tokenprune.core.operator import KINDS, TokenOperator

_REGISTRY: dict[str, type[TokenOperator]] = {}


def register_operator(name: str):
    """Class decorator that registers a :class:`TokenOperator` subclass under ``name``.

    >>> @register_operator("key_norm")
    ... class KeyNormScorer(Scorer): ...
    """

    def decorator(cls: type[TokenOperator]) -> type[TokenOperator]:
        if not (isinstance(cls, type) and issubclass(cls, TokenOperator)):
            raise TypeError(f"@register_operator({name!r}) must decorate a TokenOperator subclass, got {cls!r}")
        if getattr(cls, "kind", None) not in KINDS:
            raise TypeError(f"operator {name!r} has kind {getattr(cls, 'kind', None)!r}; allowed: {', '.join(KINDS)}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"operator name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        cls.op_name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def registered_operators() -> dict[str, type[TokenOperator]]:
    """Every registered operator class by name, sorted by kind then name."""
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (KINDS.index(kv[1].kind), kv[0])))


def get_operator_class(name: Any, key: str = "op") -> type[TokenOperator]:
    """Look an operator up by name; an unknown name raises a :class:`ConfigError` with suggestions."""
    if not isinstance(name, str):
        raise ConfigError(key, f"operator name must be a string, got {name!r}")
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise ConfigError(key, f"unknown operator {name!r}; {hint}registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_operator(name: str, _key: str = "op", **params: Any) -> TokenOperator:
    """Build a registered operator from its name and parameters (validated against its schema)."""
    cls = get_operator_class(name, key=_key)
    prefix = _key.rsplit(".", 1)[0] if _key.endswith(".op") else None
    return cls(cls.parse_params(params, key=prefix), key=prefix)
