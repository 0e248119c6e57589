"""OpenCLIP-shaped entry points: `create_model_and_transforms(name, pretrained=PATH)` and `get_tokenizer(name)`.

    model, train_transform, eval_transform = clipforge.create_model_and_transforms("ViT-B-32", pretrained="sd.pt")
    tokenizer = clipforge.get_tokenizer("ViT-B-32")
    image = eval_transform(Image.open("cat.jpg"))[None]          # (1, 3, 224, 224)
    text = tokenizer(["a photo of a cat"])                       # (1, 77) token ids

Names are clipforge's presets, which carry OpenCLIP's names and meanings (`list_models()`). `pretrained`
is a file (or a clipforge checkpoint folder) read without network: OpenCLIP's release tags such as
"laion2b_s34b_b79k" name downloads, which clipforge does not make.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from .clip import CLIP, create_model
from .config import get_preset
from .tokenizer import tokenize
from .transforms import CLIP_MEAN, CLIP_STD, ImageTransform


def create_model_and_transforms(
    name: str,
    pretrained: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    image_interpolation: str | None = None,
    aug_scale: Sequence[float] = (0.9, 1.0),
    **overrides,
) -> tuple[CLIP, ImageTransform, ImageTransform]:
    """(model, training transform, evaluation transform), as `open_clip.create_model_and_transforms`.

    The model is the preset `name` (random init), or the weights of `pretrained` loaded with `name` as
    their architecture (`clipforge.load(pretrained, model_name=name)`: the name's activation and heads,
    shapes checked), returned in eval mode (OpenCLIP returns train mode: call .train() to fine-tune). `overrides`
    are config fields for a fresh model (e.g. attention_backend="sdpa"). The transforms are OpenCLIP's at
    the model's image size: RandomResizedCrop(scale=aug_scale) for training (bicubic whatever
    `image_interpolation` says, as OpenCLIP's), resize + centre crop for evaluation, CLIP's mean/std unless given.
    """
    if pretrained is not None:
        path = os.fspath(pretrained)
        if not os.path.exists(path):
            known = "" if os.sep in path or "." in path else (
                f"; {path!r} looks like an OpenCLIP release tag, which names a download: clipforge reads no network, "
                "so download the file once and pass its path")
            raise FileNotFoundError(f"pretrained weights not found: {path}{known}")
        if overrides:
            raise ValueError(f"config overrides ({', '.join(sorted(overrides))}) apply to a fresh model; the weights "
                             "of `pretrained` fix the architecture (pass config= to clipforge.load instead)")
        from .weights import load

        model = load(path, model_name=name, device=device, dtype=dtype)
    else:
        model = create_model(name, **overrides)
        model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    size = model.config.vision.image_size
    mean, std = tuple(image_mean or CLIP_MEAN), tuple(image_std or CLIP_STD)
    interpolation = image_interpolation or "bicubic"
    train = ImageTransform(size, True, mean, std, "bicubic", area=tuple(aug_scale))  # OpenCLIP's crop: bicubic always
    evaluate = ImageTransform(size, False, mean, std, interpolation)
    return model, train, evaluate


class Tokenizer:
    """`get_tokenizer(name)`'s callable: texts -> LongTensor (N, context_length) at the model's context length."""

    def __init__(self, context_length: int):
        self.context_length = int(context_length)

    def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
        return tokenize(texts, context_length=context_length or self.context_length)

    def __repr__(self) -> str:
        return f"Tokenizer(context_length={self.context_length})"


def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer of preset `name` (OpenAI's BPE; the preset's context length), as `open_clip.get_tokenizer`."""
    return Tokenizer(get_preset(name).text.context_length)
