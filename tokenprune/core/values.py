"""Typed values of a config, checked against a schema with errors that name the key, what was given and what is
allowed.

A schema is a mapping of key to a :class:`Spec` (or to a nested schema mapping). A value is never coerced from
another type: ``'false'`` (a string) is not a boolean, ``'3'`` is not an integer, ``true`` is not an integer.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from tokenprune.core.errors import ConfigError


def given(value: Any) -> str:
    """How an error shows a value: its repr, and what it is when that may surprise (a quoted number or boolean)."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off", "null", "none"):
        return f"{text} (a string; write it without quotes)"
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return text
        return f"{text} (a string; write the number without quotes)"
    return text


class Spec:
    """One value's type and range."""

    #: what is allowed, for messages ("a positive integer")
    allowed: str = "any value"

    def accepts(self, value: Any) -> bool:
        return True

    def check(self, value: Any, key: str) -> Any:
        if not self.accepts(value):
            raise ConfigError(key, f"must be {self.allowed}, got {given(value)}")
        return value


class Bool(Spec):
    allowed = "true or false"

    def accepts(self, value):
        return isinstance(value, bool)


class Int(Spec):
    def __init__(self, minimum: int | None = None, maximum: int | None = None):
        self.minimum, self.maximum = minimum, maximum
        if minimum == 1 and maximum is None:
            self.allowed = "a positive integer"
        elif minimum == 0 and maximum is None:
            self.allowed = "an integer >= 0"
        elif minimum is not None and maximum is not None:
            self.allowed = f"an integer in {minimum}..{maximum}"
        elif minimum is not None:
            self.allowed = f"an integer >= {minimum}"
        else:
            self.allowed = "an integer"

    def accepts(self, value):
        return (isinstance(value, int) and not isinstance(value, bool)
                and (self.minimum is None or value >= self.minimum) and (self.maximum is None or value <= self.maximum))


class Float(Spec):
    """A number (an integer is a number too); ``above``: exclusive lower bound; ``minimum``/``maximum`` inclusive."""

    def __init__(self, minimum: float | None = None, maximum: float | None = None, above: float | None = None):
        self.minimum, self.maximum, self.above = minimum, maximum, above
        parts = [f"> {above}"] if above is not None else []
        parts += [f">= {minimum}"] if minimum is not None else []
        parts += [f"<= {maximum}"] if maximum is not None else []
        self.allowed = "a number" + (f" {' and '.join(parts)}" if parts else "")

    def accepts(self, value):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            return False
        return ((self.above is None or value > self.above) and (self.minimum is None or value >= self.minimum)
                and (self.maximum is None or value <= self.maximum))


class Str(Spec):
    """A non-empty string, or one of ``choices``."""

    def __init__(self, choices: Sequence[str] | None = None):
        self.choices = tuple(choices) if choices is not None else None
        self.allowed = f"one of {', '.join(self.choices)}" if self.choices else "a non-empty string"

    def accepts(self, value):
        if not isinstance(value, str) or not value.strip():
            return False
        return self.choices is None or value in self.choices

    def check(self, value, key):
        if self.choices and isinstance(value, str) and value not in self.choices:
            close = difflib.get_close_matches(value, self.choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(key, f"{value!r}{hint}; allowed: {', '.join(self.choices)}")
        return super().check(value, key)


class Optional(Spec):
    """``spec`` or null."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.allowed = f"{spec.allowed}, or null"

    def check(self, value, key):
        return None if value is None else self.spec.check(value, key)


class OneOf(Spec):
    """The first of ``specs`` that accepts the value (each is tried; the message lists them all)."""

    def __init__(self, *specs: Spec, allowed: str | None = None):
        self.specs = specs
        self.allowed = allowed or " or ".join(s.allowed for s in specs)

    def check(self, value, key):
        for spec in self.specs:
            if spec.accepts(value):
                return spec.check(value, key)
        raise ConfigError(key, f"must be {self.allowed}, got {given(value)}")


class ListOf(Spec):
    def __init__(self, item: Spec):
        self.item = item
        self.allowed = f"a list, each {item.allowed}"

    def accepts(self, value):
        return isinstance(value, list)

    def check(self, value, key):
        super().check(value, key)
        return [self.item.check(v, f"{key}.{i}") for i, v in enumerate(value)]


class MappingOf(Spec):
    """Any mapping (checked elsewhere)."""

    allowed = "a mapping"

    def accepts(self, value):
        return isinstance(value, Mapping)


class Fields(Spec):
    """A mapping checked against its own ``schema`` (as :func:`check_schema`), for mappings inside lists
    (``models: [{name, path, ...}]``); ``required``: keys it must have."""

    def __init__(self, schema: Mapping[str, Any], required: Sequence[str] = ()):
        self.schema, self.required = schema, tuple(required)
        self.allowed = f"a mapping with keys {', '.join(schema)}"

    def accepts(self, value):
        return isinstance(value, Mapping)

    def check(self, value, key):
        super().check(value, key)
        for name in self.required:
            if name not in value:
                raise ConfigError(f"{key}.{name}", "missing; it is required here")
        return check_schema(value, self.schema, f"{key}.")


def check_schema(data: Any, schema: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``data`` (a plain mapping) checked against ``schema``; returns it with nested mappings checked. Keys the
    schema does not name are refused (with the closest allowed one); keys it names may be missing."""
    where = prefix.rstrip(".") or None
    if not isinstance(data, Mapping):
        raise ConfigError(where, f"must be a mapping with keys {', '.join(schema)}, got {given(data)}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(full, f"unknown key{hint}; allowed in {where or 'the file'}: {', '.join(schema)}")
        spec = schema[key]
        out[key] = check_schema(value, spec, f"{full}.") if isinstance(spec, Mapping) else spec.check(value, full)
    return out
