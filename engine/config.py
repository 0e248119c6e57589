"""Model configuration: dataclasses, the preset table, and strict loading from dicts / YAML.

`dataclass_from_dict` is the one strict loader of the project: an unknown key is refused with its
dotted name, so a typo in a YAML file never silently does nothing.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
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


@dataclass
class VisionConfig:
    image_size: int = 224
    # an int: ViT depth; four ints: ResNet stage depths
    layers: int | tuple[int, ...] = 12
    width: int = 768
    patch_size: int | None = 32  # None for the modified ResNet
    heads: int | None = None  # default: width // 64 (ViT), width * 32 // 64 (ResNet attention pool)
    mlp_ratio: float = 4.0

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, (tuple, list))

    @property
    def num_heads(self) -> int:
        if self.heads is not None:
            return self.heads
        return self.width * 32 // 64 if self.is_resnet else self.width // 64

    def validate(self, prefix: str = "vision") -> None:
        _positive(f"{prefix}.width", self.width)
        _positive(f"{prefix}.image_size", self.image_size)
        if self.heads is not None:
            _positive(f"{prefix}.heads", self.heads)
        if self.is_resnet:
            if len(self.layers) != 4:
                raise ConfigError(f"config key '{prefix}.layers' needs 4 stage depths for a ResNet, got {self.layers}")
            for depth in self.layers:
                _positive(f"{prefix}.layers", depth)
            if self.image_size % 32:
                raise ConfigError(f"config key '{prefix}.image_size' must be a multiple of 32 for a ResNet")
        else:
            _positive(f"{prefix}.layers", self.layers)
            if not self.patch_size:
                raise ConfigError(f"config key '{prefix}.patch_size' is required for a vision transformer")
            if self.image_size % self.patch_size:
                raise ConfigError(f"config key '{prefix}.image_size' must be a multiple of patch_size")


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0

    def validate(self, prefix: str = "text") -> None:
        for key in ("context_length", "vocab_size", "width", "heads", "layers"):
            _positive(f"{prefix}.{key}", getattr(self, key))


def _positive(key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"config key '{key}' must be a positive integer, got {value!r}")


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = True  # OpenAI's released weights; OpenCLIP's LAION weights use plain GELU
    init_logit_scale: float = math.log(1 / 0.07)
    attention_backend: str = "auto"  # see clipforge.ops
    grad_checkpointing: bool = False

    def __post_init__(self):
        self.vision.validate()
        self.text.validate()
        _positive("embed_dim", self.embed_dim)
        if self.vision.is_resnet:
            self.vision.layers = tuple(self.vision.layers)

    @classmethod
    def from_dict(cls, data: dict) -> "CLIPConfig":
        return dataclass_from_dict(cls, data)

    @classmethod
    def from_yaml(cls, path) -> "CLIPConfig":
        return cls.from_dict(load_yaml(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **overrides) -> "CLIPConfig":
        data = self.to_dict()
        for key, value in overrides.items():
            if key in ("vision", "text") and isinstance(value, dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return dataclass_from_dict(CLIPConfig, data)


def _vit(embed, res, layers, width, patch, t_width, t_heads, t_layers=12):
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionConfig(image_size=res, layers=layers, width=width, patch_size=patch),
        text=TextConfig(width=t_width, heads=t_heads, layers=t_layers),
    )


def _rn(embed, res, layers, width, t_width, t_heads):
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionConfig(image_size=res, layers=tuple(layers), width=width, patch_size=None),
        text=TextConfig(width=t_width, heads=t_heads, layers=12),
    )


# CLIP.md's table. Tiny and small presets are for tests, demos and CPU benchmarks.
PRESETS: dict[str, CLIPConfig] = {
    "RN50": _rn(1024, 224, (3, 4, 6, 3), 64, 512, 8),
    "RN101": _rn(512, 224, (3, 4, 23, 3), 64, 512, 8),
    "RN50x4": _rn(640, 288, (4, 6, 10, 6), 80, 640, 10),
    "RN50x16": _rn(768, 384, (6, 8, 18, 8), 96, 768, 12),
    "RN50x64": _rn(1024, 448, (3, 15, 36, 10), 128, 1024, 16),
    "ViT-B-32": _vit(512, 224, 12, 768, 32, 512, 8),
    "ViT-B-16": _vit(512, 224, 12, 768, 16, 512, 8),
    "ViT-L-14": _vit(768, 224, 24, 1024, 14, 768, 12),
    "ViT-L-14-336": _vit(768, 336, 24, 1024, 14, 768, 12),
    # test / demo presets: 32 px images, 2 layers, width 64 (head_dim 32)
    "tiny-vit": CLIPConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=32, layers=2, width=64, patch_size=8, heads=2),
        text=TextConfig(width=64, heads=2, layers=2),
    ),
    "tiny-rn": CLIPConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=64, layers=(1, 1, 1, 1), width=16, patch_size=None, heads=4),
        text=TextConfig(width=64, heads=2, layers=2),
    ),
    # a small but not trivial model for CPU throughput runs
    "small-vit": CLIPConfig(
        embed_dim=256,
        vision=VisionConfig(image_size=64, layers=4, width=256, patch_size=8, heads=4),
        text=TextConfig(width=256, heads=4, layers=4),
    ),
}
_ALIASES = {"ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14", "ViT-L/14@336px": "ViT-L-14-336"}


def get_preset(name: str) -> CLIPConfig:
    """The config of a preset (a fresh copy). `NAME-quickgelu` / OpenAI's `ViT-B/32` spellings are understood."""
    base = _ALIASES.get(name, name)
    quick = None
    if base.endswith("-quickgelu"):
        base, quick = base[: -len("-quickgelu")], True
    if base not in PRESETS:
        raise ValueError(f"unknown model name {name!r}; known models: {', '.join(PRESETS)}")
    cfg = PRESETS[base].replace()
    if quick is not None:
        cfg.quick_gelu = quick
    return cfg
