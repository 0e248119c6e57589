"""Image preprocessing with OpenCLIP's semantics: the model's input contract, beside the tokenizer.

    transform = clipforge.image_transform(224, is_train=False)    # or create_model_and_transforms(...)
    x = transform(Image.open("cat.jpg"))                            # float32 (3, 224, 224), CLIP-normalised

Evaluation (`is_train=False`) is `open_clip.image_transform(size, is_train=False)` step for step, on
Pillow alone: resize the shorter side to `size` (the longer to `int(size * long / short)`, torchvision's
truncation), centre crop with torchvision's offsets (`round()` of half the excess: Python rounds half
to even), both in the image's own mode, then `convert("RGB")`, scale to [0, 1] and normalise. So
RGBA loses its alpha channel as in OpenCLIP (no compositing), CMYK and palette images are resized in
their mode and converted after. One deliberate difference: 16-bit and float images ("I;16", "I", "F")
are scaled to 8 bits first (Pillow's convert("RGB"), which OpenCLIP calls, saturates them at 255).
The decoders of clipforge.data apply EXIF orientation when they read a file; this transform works on
the image it is given, like OpenCLIP's.

Training (`is_train=True`) is OpenCLIP's `RandomResizedCrop(size, scale=area, ratio)`: the crop box is
drawn exactly as torchvision's `RandomResizedCrop.get_params` draws it, from torch's global RNG by
default (same seed, same box as OpenCLIP) or from a NumPy generator (the data loaders, whose draws
are reproducible per sample), then cropped and resized with the interpolation (bicubic by default:
OpenCLIP's training crop is always bicubic), converted to RGB and normalised.

The loaders' evaluation geometry (clipforge.data.images.pil_transform, train=False) is DALI's instead:
the longer side and the crop offset round half up, so that the Pillow and DALI loaders agree; it can
differ from this transform by a one-pixel shift on some image sizes (docs/DESIGN.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

# CLIP's normalisation: the statistics of the OpenAI training images (OpenCLIP's OPENAI_DATASET_MEAN/STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS = ("bicubic", "bilinear")
RESIZE_MODES = ("shortest", "squash")
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def resample_filter(interpolation: str):
    from PIL import Image

    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    return Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR


def shortest_side_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop left, crop top) of torchvision's Resize(size) + CenterCrop(size)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    nw, nh = (size, new_long) if width <= height else (new_long, size)
    return nw, nh, int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator | None = None, area=(0.9, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params as (left, top, right, bottom) in pixels: the same draws
    in the same order, from torch's global RNG when `rng` is None (then the same boxes as torchvision
    under the same seed), else from the NumPy generator."""
    total = width * height
    if rng is None:
        log_ratio = torch.log(torch.tensor(ratio))

        def draw_area():
            return total * torch.empty(1).uniform_(area[0], area[1]).item()

        def draw_aspect():
            return torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()

        def randint(hi):  # in [0, hi)
            return int(torch.randint(0, hi, size=(1,)).item())
    else:
        lo_r, hi_r = math.log(ratio[0]), math.log(ratio[1])

        def draw_area():
            return total * rng.uniform(area[0], area[1])

        def draw_aspect():
            return math.exp(rng.uniform(lo_r, hi_r))

        def randint(hi):
            return int(rng.integers(0, hi))
    for _ in range(10):
        target = draw_area()
        aspect = draw_aspect()
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = randint(height - h + 1)
            left = randint(width - w + 1)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def eight_bit(im):
    """16-bit and float Pillow images -> 8-bit "L" by scaling (Pillow's own conversion saturates at 255)."""
    from PIL import Image

    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im)
        return Image.fromarray((np.clip(arr, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8), "L")
    if im.mode == "F":
        arr = np.asarray(im)
        hi = float(arr.max()) if arr.size else 1.0
        scale = 255.0 if hi <= 1.0 else (255.0 / 65535.0 if hi > 255.0 else 1.0)
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L")
    return im


def normalize_uint8(batch: torch.Tensor, mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W): scaled to [0, 1], then (x - mean) / std."""
    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    return x.sub_(torch.tensor(mean).view(1, 3, 1, 1)).div_(torch.tensor(std).view(1, 3, 1, 1))


@dataclass(frozen=True)
class ImageTransform:
    """A per-image callable: Pillow image (any mode) -> float32 (3, size, size). See the module docstring."""

    size: int
    is_train: bool = False
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    area: tuple = (0.9, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"image size must be a positive integer, got {self.size!r}")
        resample_filter(self.interpolation)
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r} "
                             "(OpenCLIP's 'longest', a letterbox, is not offered)")
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3 or (name == "std" and min(value) <= 0):
                raise ValueError(f"{name} must be three numbers{' above 0' if name == 'std' else ''}, got {value}")
            object.__setattr__(self, name, value)
        lo, hi = self.area
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"area must be a range within (0, 1], got {self.area}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must be an increasing range above 0, got {self.ratio}")

    def pixels(self, im: Any, rng: np.random.Generator | None = None) -> np.ndarray:
        """The geometry and RGB conversion only: uint8 (size, size, 3)."""
        from PIL import Image

        if not isinstance(im, Image.Image):
            raise TypeError(f"the image transform takes a Pillow image, got {type(im).__name__} "
                            "(clipforge.data.images.load_image reads paths, bytes and arrays)")
        im = eight_bit(im)
        S, resample = self.size, resample_filter(self.interpolation)
        w, h = im.size
        if self.is_train:
            im = im.crop(random_resized_crop_box(w, h, rng, self.area, self.ratio)).resize((S, S), resample)
        elif self.resize_mode == "squash":
            im = im.resize((S, S), resample)
        else:
            nw, nh, left, top = shortest_side_geometry(w, h, S)
            im = im.resize((nw, nh), resample).crop((left, top, left + S, top + S))
        return np.array(im.convert("RGB"), dtype=np.uint8)

    def __call__(self, im: Any, rng: np.random.Generator | None = None) -> torch.Tensor:
        return normalize_uint8(torch.from_numpy(self.pixels(im, rng))[None], self.mean, self.std)[0]


def image_transform(image_size: int, is_train: bool, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None, resize_mode: str | None = None,
                    interpolation: str | None = None, scale: Sequence[float] = (0.9, 1.0),
                    ratio: Sequence[float] = (3 / 4, 4 / 3)) -> ImageTransform:
    """OpenCLIP's `image_transform` (its arguments and defaults; `scale` is its aug_cfg's)."""
    return ImageTransform(int(image_size), bool(is_train), tuple(mean or CLIP_MEAN), tuple(std or CLIP_STD),
                          interpolation or "bicubic", resize_mode or "shortest", tuple(scale), tuple(ratio))
