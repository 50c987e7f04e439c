"""Reading YAML that a user hands tokenprune: UTF-8 only, safe tags only, no duplicate keys, and errors in one
line that name the file and line. Interpolation (``${...}``) is refused where a file is not the user's own run
config (:func:`refuse_interpolation`), so a shared pipeline or sweep file cannot copy environment variables
into results."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tokenprune.core.errors import ConfigError

#: ``${name:...}``: an OmegaConf resolver (``oc.env``, ``oc.decode``, ...).
_RESOLVER = re.compile(r"\$\{\s*[\w.\-]+\s*:")


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, f"a mapping key must be a scalar, got {key!r}",
                                                    key_node.start_mark) from None
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice in one mapping (the second would silently win)",
                key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _one_line(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    context = getattr(e, "context", None)
    if problem and "could not determine a constructor" in problem:
        problem = f"tag {problem.split('tag ', 1)[-1]} is not allowed (plain YAML only: no !!python tags)"
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context and context != problem else "")


def parse_yaml(text: str, what: str) -> Any:
    """``text`` parsed strictly (see module docstring); errors are :class:`ConfigError` naming ``what``."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(None, f"{what}: not valid YAML, {_one_line(e)}") from None


def read_yaml(path: str | Path, what: str = "") -> Any:
    """The YAML file ``path`` (``what``: its role, for messages), read strictly."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if path.is_dir():
        raise ConfigError(None, f"{label} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(None, f"no such {what or 'file'}: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(None, f"{label}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    return parse_yaml(text, label)


def refuse_interpolation(data: Any, where: str = "", what: str = "a pipeline", resolvers_only: bool = False) -> None:
    """Raise :class:`ConfigError` at the first string holding ``${`` (an OmegaConf interpolation or resolver);
    ``resolvers_only``: only at a resolver (``${name:...}``, such as ``oc.env``), references to keys allowed."""
    if isinstance(data, str):
        if resolvers_only and _RESOLVER.search(data):
            raise ConfigError(where or None, f"{data!r}: resolvers (${{name:...}}, such as oc.env) are not allowed; "
                                             f"{what} may refer only to its own keys, ${{key.path}}")
        if not resolvers_only and "${" in data:
            raise ConfigError(where or None, f"{data!r}: interpolation (${{...}}) is not allowed in {what}; "
                                             "write the value itself")
    elif isinstance(data, Mapping):
        for k, v in data.items():
            refuse_interpolation(v, f"{where}.{k}" if where else str(k), what, resolvers_only)
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            refuse_interpolation(v, f"{where}.{i}" if where else str(i), what, resolvers_only)
