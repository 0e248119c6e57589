"""Image decoding and the loaders' geometry: bytes -> Pillow image (EXIF orientation applied, pixel limit
checked from the header), RGB conversion, random resized crop (training) and DALI's shorter-side resize
+ centre crop (the loaders' evaluation). The crop sampling, CLIP's mean/std and the OpenCLIP-equal
per-image transform (what the embedding API and `clipforge eval` use) live in clipforge.model.transforms,
the model's input contract; they are re-exported here."""
from __future__ import annotations

import os
import warnings
from typing import Any, Sequence

import io
import math

import numpy as np
import torch

from ..model.transforms import (CLIP_MEAN, CLIP_STD, ImageTransform, eight_bit, normalize_uint8,
                                random_resized_crop_box, resample_filter)
from .config import DEFAULT_MAX_PIXELS

__all__ = ["ImageReadError", "load_image", "preprocess", "pil_to_rgb", "pil_decode", "pil_transform", "CLIP_MEAN",
           "CLIP_STD", "normalize_uint8", "random_resized_crop_box"]


class ImageReadError(ValueError):
    """An image input could not be read or decoded; the message names it."""


# --------------------------------------------------------------------------------------------
# Preprocessing (one place)
# --------------------------------------------------------------------------------------------

def _describe(item: Any, index: int | None = None) -> str:
    where = f"image {index}" if index is not None else "image"
    if isinstance(item, (str, os.PathLike)):
        return f"{where} ({os.fspath(item)})"
    return f"{where} ({type(item).__name__})"


def _decode_error(exc: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format"
    return f"{type(exc).__name__}: {exc}"


def load_image(item: Any, index: int | None = None, rgb: bool = True):
    """A path, encoded bytes, Pillow image or numpy array -> Pillow image (EXIF orientation applied to
    files and bytes): 8-bit RGB (alpha composited over white), or with `rgb=False` in its own mode (what
    the OpenCLIP-equal transform takes: it resizes before converting)."""
    from PIL import Image

    to_rgb = pil_to_rgb if rgb else (lambda im: im)
    if isinstance(item, (str, os.PathLike)):
        from .validate import UnreadableFile, read_file

        path = item if isinstance(item, str) else os.fspath(item)
        try:  # a pipe, a device, a link out of the listed folder or a huge file: refused, never read
            data = read_file(path)
        except UnreadableFile as exc:
            raise ImageReadError(f"cannot read {_describe(item, index)}: {str(exc).split(': ', 1)[-1]}") from None
        except OSError as exc:
            raise ImageReadError(f"cannot read {_describe(item, index)}: {exc.strerror or exc}") from None
        try:
            return pil_decode(data, rgb=rgb)
        except Exception as exc:
            raise ImageReadError(f"cannot decode {_describe(item, index)}: {_decode_error(exc)}") from None
    if isinstance(item, (bytes, bytearray, memoryview)):
        try:
            return pil_decode(bytes(item), rgb=rgb)
        except Exception as exc:
            raise ImageReadError(f"cannot decode {_describe(item, index)} ({len(item)} bytes): {_decode_error(exc)}") from None
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, np.ndarray):
        arr = item
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))) or 0 in arr.shape:
            raise ImageReadError(f"{_describe(item, index)}: a numpy image must be (H, W), (H, W, 1), (H, W, 3) or "
                                 f"(H, W, 4), got shape {item.shape}")
        if arr.dtype != np.uint8:
            if not np.issubdtype(arr.dtype, np.floating):
                raise ImageReadError(f"{_describe(item, index)}: a numpy image must be uint8 or float in [0, 1], "
                                     f"got {arr.dtype}")
            if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
                raise ImageReadError(f"{_describe(item, index)}: float pixels must lie in [0, 1] "
                                     f"(got [{np.nanmin(arr):.3g}, {np.nanmax(arr):.3g}]); pass uint8 for 0-255 data")
            arr = np.rint(arr * 255.0).astype(np.uint8)
        mode = "L" if arr.ndim == 2 else ("RGB" if arr.shape[2] == 3 else "RGBA")
        return to_rgb(Image.fromarray(np.ascontiguousarray(arr), mode))
    raise ImageReadError(f"{_describe(item, index)}: unsupported image type {type(item).__name__}; pass a path, "
                         "bytes, a PIL image, a numpy array or a preprocessed tensor")


def preprocess(images: Sequence[Any], size: int) -> torch.Tensor:
    """Images (paths, bytes, PIL, numpy) -> float32 (N, 3, size, size) through the OpenCLIP-equal eval
    transform (clipforge.model.transforms). Raises ImageReadError naming the first unreadable one."""
    transform = ImageTransform(size)
    pixels = [transform.pixels(load_image(im, i, rgb=False)) for i, im in enumerate(images)]
    if not pixels:
        return torch.empty(0, 3, size, size)
    return normalize_uint8(torch.from_numpy(np.stack(pixels)))  # (N, S, S, 3) uint8 -> (N, 3, S, S)


def pil_to_rgb(im):
    """Any Pillow image -> 8-bit RGB: alpha composited over white, 16/32-bit scaled (not clipped)."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    im = eight_bit(im)  # 16-bit range to 8 bits (Pillow's own convert("L") clips at 255 instead)
    mode = im.mode
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK (Pillow undoes Adobe's inverted CMYK), YCbCr, LAB, ...


# --------------------------------------------------------------------------------------------
# Pillow decoding and the loaders' transforms (the PyTorch backend, and DALI's per-batch fallback)
# --------------------------------------------------------------------------------------------

def pil_decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, rgb: bool = True):
    """JPEG/any bytes -> RGB Pillow image (its own mode with `rgb=False`), EXIF orientation applied (as
    DALI's decoder does). An image
    of more than `max_pixels` pixels raises ValueError from its header, before anything is decoded
    (a decompression-bomb PNG of a few KB would otherwise take gigabytes)."""
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > max_pixels:
            raise ValueError(f"an image of {w}x{h} pixels is over the {max_pixels:,}-pixel limit")
        im.load()
    if im.format == "JPEG" and 0x0112 in im.getexif():
        im = ImageOps.exif_transpose(im)
    return pil_to_rgb(im) if rgb else im


def pil_transform(im, size: int, *, train: bool, rng: np.random.Generator | None = None, area=(0.9, 1.0),
                  ratio=(3 / 4, 4 / 3), interpolation: str = "bicubic") -> np.ndarray:
    """RGB image -> uint8 (size, size, 3): random resized crop (train: OpenCLIP's, the box drawn from
    `rng`) or DALI's shorter-side resize + centre crop (evaluation in the loaders)."""
    resample = resample_filter(interpolation)
    w, h = im.size
    if train:
        box = random_resized_crop_box(w, h, rng, area, ratio)
        out = im.resize((size, size), resample, box=box)
    else:
        # Same geometry as DALI's resize(resize_shorter) + crop_mirror_normalize(crop): the longer
        # side and the centre offset round half up (checked against DALI's output).
        s = size / min(w, h)
        nw, nh = max(size, math.floor(w * s + 0.5)), max(size, math.floor(h * s + 0.5))
        left, top = math.floor((nw - size) / 2 + 0.5), math.floor((nh - size) / 2 + 0.5)
        sx, sy = nw / w, nh / h
        # Resize and crop in one pass: the crop box mapped back to source pixels.
        box = (left / sx, top / sy, (left + size) / sx, (top + size) / sy)
        out = im.resize((size, size), resample, box=box)
    return np.asarray(out, dtype=np.uint8)
