"""The one strict config loader: dataclasses from dicts and YAML files, and `--set key.sub=value` overrides.

`dataclass_from_dict` refuses an unknown key with its dotted name, so a typo in a YAML file never
silently does nothing. The model's configs are in model/config.py, the run's in train/config.py, the
data's in data/config.py; all load through here.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any



class ConfigError(ValueError):
    """A configuration key is unknown, mistyped or impossible; the message names the key."""


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def dataclass_from_dict(cls, data: dict | None, prefix: str = ""):
    """Build dataclass `cls` from a (nested) dict, refusing unknown keys by their dotted name."""
    if data is None:
        return cls()
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix or cls.__name__}' must be a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{dotted}' (known keys here: {known})")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = dataclass_from_dict(typ, value, dotted)
        else:
            kwargs[key] = _coerce(value, typ, dotted)
    return cls(**kwargs)


def _coerce(value, typ, dotted: str):
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if typ is Any or value is None:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        errors = []
        for t in args:
            if t is type(None):
                continue
            try:
                return _coerce(value, t, dotted)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{dotted}' has an invalid value {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{dotted}' must be a list, got {value!r}")
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, dotted) for v in value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{dotted}' must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{dotted}' must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # `lr: .inf` once trained to NaN weights and wrote them out
                raise ConfigError(f"config key '{dotted}' must be a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"config key '{dotted}' must be a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{dotted}' must be a string, got {value!r}")
    return value


def yaml_loader():
    """A SafeLoader that also reads exponent floats without a dot (`5e-4`) as numbers."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    # YAML 1.1 (PyYAML) reads `5e-4` as a string; YAML 1.2 and every user read it as a number.
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
            re.X,
        ),
        list("-+0123456789."),
    )
    return Loader


def load_yaml(path, *, what: str = "config file") -> dict:
    """A YAML mapping from `path` (safe loading, YAML 1.2 floats); clear errors for a missing file, bad
    YAML or a top level that is not a mapping."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.load(f, Loader=yaml_loader())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys at the top level")
    return data


# ---------------------------------------------------------------------------- YAML and overrides
def parse_value(text: str):
    """A `--set` value, read as YAML (numbers, true/false, null, [lists], {maps}, or a string)."""
    import yaml

    return yaml.load(text, Loader=yaml_loader())


def apply_override(data: dict, item: str) -> None:
    """Apply one `key.sub=value` override to the raw config dict (validated later with the rest)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key.sub=value, got {item!r}")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set has an empty key segment in {key!r}")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' is not a section, cannot set {key}")
        node = child
    node[parts[-1]] = parse_value(text)
