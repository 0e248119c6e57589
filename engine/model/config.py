"""Model configuration: VisionConfig, TextConfig, CLIPConfig and the preset table (`get_preset`)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..config import ConfigError, dataclass_from_dict, load_yaml


@dataclass
class VisionConfig:
    image_size: int = 224  # input resolution in pixels (a multiple of patch_size; of 32 for a ResNet)
    # an int: ViT depth; four ints: ResNet stage depths
    layers: int | tuple[int, ...] = 12
    width: int = 768  # ViT: token width; ResNet: the stem's channels (stage widths are multiples)
    patch_size: int | None = 32  # None for the modified ResNet
    heads: int | None = None  # default: width // 64 (ViT), width * 32 // 64 (ResNet attention pool)
    mlp_ratio: float = 4.0  # MLP hidden width / width (OpenCLIP's mlp_ratio)
    # FLIP (Li et al. 2023), OpenCLIP's `patch_dropout`: the fraction of patch tokens each sample drops in
    # training (class token kept, eval mode keeps all); ViT only. 0: off. See clip.VisionTransformer.
    patch_dropout: float = 0.0

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
        _ratio(f"{prefix}.mlp_ratio", self.mlp_ratio, self.width)
        p = self.patch_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ConfigError(f"config key '{prefix}.patch_dropout' is the fraction of patch tokens dropped in training "
                              f"and must lie in [0, 1) (FLIP uses 0.5 to 0.75; 0 turns it off), got {p!r}")
        if self.is_resnet:
            if p > 0:
                raise ConfigError(f"config key '{prefix}.patch_dropout' ({p}) needs a vision transformer: a ResNet "
                                  "image tower has no patch tokens to drop; set it to 0 or choose a ViT model")
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
    context_length: int = 77  # tokens per caption, start and end included (captions are truncated to it)
    vocab_size: int = 49408  # CLIP's BPE vocabulary
    width: int = 512  # the text transformer's token width
    heads: int = 8  # attention heads of the text transformer
    layers: int = 12  # residual blocks of the text transformer
    mlp_ratio: float = 4.0  # MLP hidden width / width

    def validate(self, prefix: str = "text") -> None:
        for key in ("context_length", "vocab_size", "width", "heads", "layers"):
            _positive(f"{prefix}.{key}", getattr(self, key))
        _ratio(f"{prefix}.mlp_ratio", self.mlp_ratio, self.width)


def _positive(key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"config key '{key}' must be a positive integer, got {value!r}")


def _ratio(key: str, value, width: int) -> None:
    # the MLP's hidden width is int(width * mlp_ratio), as OpenCLIP rounds it (ViT-g-14: 1408 x 4.3637 -> 6144)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or int(width * value) < 1:
        raise ConfigError(f"config key '{key}' must be a positive number (MLP width int(width * mlp_ratio)), "
                          f"got {value!r}")


@dataclass
class CLIPConfig:
    embed_dim: int = 512  # the shared embedding space's width (both projections' output)
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = True  # OpenAI's released weights; OpenCLIP's LAION weights use plain GELU
    init_logit_scale: float = math.log(1 / 0.07)  # log of the initial temperature's inverse (CLIP: 1/0.07)
    # SigLIP's learnable logit bias b (the paper's -10 with init_logit_scale log 10); None: no bias (CLIP)
    init_logit_bias: float | None = None
    attention_backend: str = "auto"  # see clipforge.ops
    grad_checkpointing: bool = False  # set by the run's model.grad_checkpointing, not here

    def __post_init__(self):
        self.vision.validate()
        self.text.validate()
        _positive("embed_dim", self.embed_dim)
        b = self.init_logit_bias
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b)):
            raise ConfigError(f"config key 'init_logit_bias' must be a finite number or null, got {b!r}")
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
    """OpenAI's ViT layouts (head width 64), named as OpenCLIP names them: GELU; NAME-quickgelu is the
    QuickGELU twin that OpenAI's own weights use."""
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionConfig(image_size=res, layers=layers, width=width, patch_size=patch, heads=width // 64),
        text=TextConfig(width=t_width, heads=t_heads, layers=t_layers),
        quick_gelu=False,
    )


def _openclip_vit(embed, res, layers, width, patch, t_width, t_heads, t_layers=12, head_width=64, mlp_ratio=4.0):
    """OpenCLIP's plain ViT (open_clip/model_configs/NAME.json): GELU, heads = width // head_width, MLP
    hidden int(width * mlp_ratio) as OpenCLIP rounds it; class-token pooling, ln_pre, ln_post, proj."""
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionConfig(image_size=res, layers=layers, width=width, patch_size=patch, heads=width // head_width,
                            mlp_ratio=mlp_ratio),
        text=TextConfig(width=t_width, heads=t_heads, layers=t_layers),
        quick_gelu=False,
    )


def _rn(embed, res, layers, width, t_width, t_heads):
    """OpenAI's modified ResNets, named as OpenCLIP names them: GELU; NAME-quickgelu for OpenAI's weights."""
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionConfig(image_size=res, layers=tuple(layers), width=width, patch_size=None),
        text=TextConfig(width=t_width, heads=t_heads, layers=12),
        quick_gelu=False,
    )


# The released models' table (docs/DESIGN.md, "CLIP facts"). Tiny and small presets are for tests, demos and CPU benchmarks.
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
    # OpenCLIP's plain-ViT family, with OpenCLIP's shapes and activation (GELU; `NAME-quickgelu` for QuickGELU)
    "ViT-S-32": _openclip_vit(384, 224, 12, 384, 32, 384, 6),
    "ViT-S-16": _openclip_vit(384, 224, 12, 384, 16, 384, 6),
    "ViT-M-32": _openclip_vit(512, 224, 12, 512, 32, 512, 8),
    "ViT-M-16": _openclip_vit(512, 224, 12, 512, 16, 512, 8),
    "ViT-B-32-256": _openclip_vit(512, 256, 12, 768, 32, 512, 8),
    "ViT-B-16-plus-240": _openclip_vit(640, 240, 12, 896, 16, 640, 10),
    "ViT-L-16": _openclip_vit(768, 224, 24, 1024, 16, 768, 12),
    "ViT-H-14": _openclip_vit(1024, 224, 32, 1280, 14, 1024, 16, t_layers=24, head_width=80),
    "ViT-H-16": _openclip_vit(1024, 224, 32, 1280, 16, 1024, 16, t_layers=24, head_width=80),
    "ViT-g-14": _openclip_vit(1024, 224, 40, 1408, 14, 1024, 16, t_layers=24, head_width=88, mlp_ratio=4.3637),
    "ViT-bigG-14": _openclip_vit(1280, 224, 48, 1664, 14, 1280, 20, t_layers=32, head_width=104, mlp_ratio=4.9231),
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
# OpenAI's spellings name OpenAI's models, which are QuickGELU
_ALIASES = {"ViT-B/32": "ViT-B-32-quickgelu", "ViT-B/16": "ViT-B-16-quickgelu", "ViT-L/14": "ViT-L-14-quickgelu",
            "ViT-L/14@336px": "ViT-L-14-336-quickgelu"}


def get_preset(name: str) -> CLIPConfig:
    """The config of a preset (a fresh copy), with OpenCLIP's names and meanings: `ViT-B-32`, `RN50`, ...
    are GELU (the activation of every LAION / DataComp release), `NAME-quickgelu` is QuickGELU (OpenAI's
    released weights); OpenAI's own spellings (`ViT-B/32`, `ViT-L/14@336px`) are their QuickGELU models.
    clipforge's test presets (tiny-vit, tiny-rn, small-vit) keep their own activation."""
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


def list_models() -> list[str]:
    """The preset names, sorted (OpenAI's `ViT-B/32` spellings and the `-quickgelu` twins not listed)."""
    return sorted(PRESETS)
