"""Embedding API: images and texts in, L2-normalised float32 numpy arrays out.

    model = clipforge.load("ViT-B-32.pt")
    img = model.embed_images(["cat.jpg", pil_image, uint8_array], batch_size=64)   # (3, E) float32
    txt = model.embed_texts(["a photo of a cat", "a dog"])                         # (2, E) float32
    clf = model.zero_shot_classifier(["cat", "dog"], templates="imagenet")         # (2, E)
    probs = model.classify(images, clf)                                            # (N, 2), rows sum to 1

Images may be paths, encoded bytes, Pillow images, numpy arrays (raw pixels: (H, W), (H, W, 1|3|4),
uint8 or float in [0, 1]) or torch tensors. Tensors are taken as model input that is already
preprocessed: (3, R, R) or (N, 3, R, R), CLIP-normalised, exactly what `encode_image` takes. Everything
else goes through `preprocess`, the one preprocessing function: decode (EXIF orientation applied),
then OpenCLIP's evaluation transform (`clipforge.model.transforms.ImageTransform`: bicubic resize of the
shorter side to the model resolution, centre crop, RGB conversion, CLIP's mean/std), so that embeddings
and `clipforge eval` numbers equal OpenCLIP's on the same images.

Inference runs without grad, batch by batch, on the GPU when there is one (device=None: the model's
device, or CUDA when the model sits on the CPU and CUDA is available; the model is moved there), with
autocast (bf16, else fp16) for fp32 models on CUDA. Features are cast to fp32 and normalised in fp32.

`write_embeddings` streams a large input list into an .npy file through a memory map (memory is one
batch), with a progress sidecar `<out>.progress.json` that makes an interrupted run resumable: a
rerun continues after the last batch recorded there and produces the same file as one uninterrupted run.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.images import ImageReadError, load_image


# Inputs longer than this many batches get a progress bar when progress=None.
_PROGRESS_MIN_BATCHES = 8


def _pixels_or_error(item: Any, index: int, size: int):
    from ..model.transforms import ImageTransform

    try:
        return ImageTransform(size).pixels(load_image(item, index, rgb=False)), None
    except ImageReadError as exc:
        return None, str(exc)


# --------------------------------------------------------------------------------------------
# Devices, batching, progress
# --------------------------------------------------------------------------------------------

def _resolve_device(model: torch.nn.Module, device) -> torch.device:
    current = next(model.parameters()).device
    if device is None:
        device = current if current.type != "cpu" or not torch.cuda.is_available() else torch.device("cuda")
    device = torch.device(device)
    if device != current:
        model.to(device)
    return device


def _autocast(model: torch.nn.Module, device: torch.device, amp: bool):
    if amp and device.type == "cuda" and model.dtype == torch.float32:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def _progress(total_batches: int | None, progress: bool | None, desc: str):
    show = progress if progress is not None else (total_batches is not None and total_batches >= _PROGRESS_MIN_BATCHES)
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total_batches, desc=desc, unit="batch", leave=False)


@contextlib.contextmanager
def _inference(model, total_batches: int | None, progress: bool | None, desc: str):
    """Eval mode and an optional progress bar for one embedding pass; yields `tick()`, which advances
    the bar by a batch. The model's train/eval mode is restored afterwards, also on an error."""
    was_training = model.training
    model.eval()
    bar = _progress(total_batches, progress, desc)
    try:
        yield (lambda: bar.update(1)) if bar is not None else (lambda: None)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)


def _check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def _as_image_list(images) -> Iterable[Any]:
    """Normalise the `images` argument: one image, a sequence / iterable of images, or a batch tensor/array."""
    from PIL import Image

    if isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image)):
        return [images]
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            return [images]
        if images.dim() == 4:
            return images  # iterating yields (3, R, R) rows
        raise ValueError(f"an image tensor must be (3, R, R) or (N, 3, R, R), got shape {tuple(images.shape)}")
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return images
        if images.ndim in (2, 3):
            return [images]
        raise ValueError(f"a numpy image batch must be (N, H, W[, C]) or a single (H, W[, C]) image, got {images.shape}")
    if isinstance(images, dict):
        raise TypeError("images must be a sequence or iterable of images, not a dict")
    return images


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def iter_image_batches(model, images, batch_size: int = 64, *, on_error: str = "raise", workers: int | None = None,
                       start: int = 0) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
    """Preprocessed batches of `images`: (input indices kept, float32 (B, 3, R, R) or None, [(index, reason)] skipped).

    Every batch covers `batch_size` consecutive inputs (the last may be shorter), whatever is skipped,
    so batch b always covers inputs [start + b*batch_size, ...): resumable runs depend on this.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    size = model.image_size
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        offset = start
        for chunk in _chunks(images, batch_size):
            kept, skipped = [], []
            pending = []
            for j, item in enumerate(chunk):
                i = offset + j
                if isinstance(item, torch.Tensor):
                    if item.dim() != 3 or tuple(item.shape) != (3, size, size):
                        raise ValueError(f"image {i} is a tensor of shape {tuple(item.shape)}; tensors are taken as "
                                         f"preprocessed model input and must be (3, {size}, {size})")
                    pending.append((i, None, item.float()))
                elif pool is not None:
                    pending.append((i, pool.submit(_pixels_or_error, item, i, size), None))
                else:
                    pending.append((i, None, _pixels_or_error(item, i, size)))
            uint8, tensors = [], []
            for i, fut, value in pending:
                value = fut.result() if fut is not None else value
                if isinstance(value, torch.Tensor):
                    kept.append(i)
                    tensors.append((len(kept) - 1, value))
                    continue
                pixels, error = value
                if error is not None:
                    if on_error == "raise":
                        raise ImageReadError(error)
                    skipped.append((i, error))
                    continue
                kept.append(i)
                uint8.append((len(kept) - 1, pixels))
            batch = None
            if kept:
                from ..model.transforms import normalize_uint8

                batch = torch.empty(len(kept), 3, size, size)
                if uint8:
                    batch[[p for p, _ in uint8]] = normalize_uint8(torch.from_numpy(np.stack([a for _, a in uint8])))
                for p, t in tensors:
                    batch[p] = t
            yield kept, batch, skipped
            offset += len(chunk)
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class NonFiniteOutputError(ValueError):
    """The model gave NaN or infinite embeddings: nothing of them is returned or written."""


def _finite(emb: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(emb).all():
        rows = int((~np.isfinite(emb)).any(axis=1).sum())
        raise NonFiniteOutputError(
            f"the model gave non-finite embeddings for {rows} of {len(emb)} {what} in a batch; its weights or "
            "the inputs are broken (for fp16 on a GPU, try amp=False / --no-amp); nothing was written for them")
    return emb


def _encode_images(model, batch: torch.Tensor, device: torch.device, amp: bool) -> np.ndarray:
    with torch.no_grad(), _autocast(model, device, amp):
        feats = model.encode_image(batch.to(device, non_blocking=True))
    return _finite(F.normalize(feats.float(), dim=-1).cpu().numpy(), "images")


def _tokenize(model, texts: Sequence[str]) -> torch.Tensor:
    from ..model.tokenizer import tokenize

    return tokenize(list(texts), context_length=model.context_length)


def _encode_texts(model, texts: Sequence[str], device: torch.device, amp: bool) -> np.ndarray:
    tokens = _tokenize(model, texts)
    with torch.no_grad(), _autocast(model, device, amp):
        feats = model.encode_text(tokens.to(device, non_blocking=True))
    return _finite(F.normalize(feats.float(), dim=-1).cpu().numpy(), "texts")


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("embed_texts got an empty list of texts; pass at least one string")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text {i} is a {type(t).__name__}, not a str")
    return texts


def _len(x) -> int | None:
    try:
        return len(x)
    except TypeError:
        return None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def embed_images(model, images, batch_size: int = 64, *, device=None, amp: bool = True, progress: bool | None = None,
                 on_error: str = "raise", return_skipped: bool = False, workers: int | None = None):
    """L2-normalised float32 embeddings (N, E) of `images` (see the module doc for the accepted types).

    on_error: "raise" (ImageReadError naming the first unreadable image) or "skip" (unreadable images are
    left out of the result and reported in a warning; with return_skipped=True the result is
    (embeddings, [(input index, reason), ...])). progress: None shows a bar from 8 batches on.
    """
    batch_size = _check_batch_size(batch_size)
    items = _as_image_list(images)
    n = _len(items)
    dev = _resolve_device(model, device)
    out, skipped = _Rows(n, model.config.embed_dim), []
    with _inference(model, None if n is None else -(-n // batch_size), progress, "embed images") as tick:
        for kept, batch, skip in iter_image_batches(model, items, batch_size, on_error=on_error, workers=workers):
            skipped.extend(skip)
            if kept:
                out.add(_encode_images(model, batch, dev, amp))
            tick()
    if n == 0 or (n is None and not out.rows and not skipped):
        raise ValueError("embed_images got no images; pass at least one")
    emb = out.result()
    if skipped and not return_skipped:
        _warn_skipped(skipped)
    return (emb, skipped) if return_skipped else emb


class _Rows:
    """The (N, E) float32 result of a pass, filled batch by batch. With N known it is allocated once:
    keeping every batch's small array and concatenating at the end interleaved long-lived blocks with
    each batch's large transient ones, and glibc could not reuse the holes (RSS grew ~4.5 KB per image
    beyond the result: 60k images 392 -> 793 MB; malloc_trim gave it back, so it was fragmentation)."""

    def __init__(self, n: int | None, width: int):
        self.rows, self.width = 0, width
        self.buf = np.empty((n, width), np.float32) if n is not None else None
        self.parts: list[np.ndarray] = []

    def add(self, emb: np.ndarray) -> None:
        if self.buf is not None:
            self.buf[self.rows:self.rows + len(emb)] = emb
        else:
            self.parts.append(emb)
        self.rows += len(emb)

    def result(self) -> np.ndarray:
        if self.buf is None:
            return np.concatenate(self.parts) if self.parts else np.zeros((0, self.width), np.float32)
        return self.buf if self.rows == len(self.buf) else self.buf[:self.rows].copy()  # rows skipped


def _warn_skipped(skipped: list) -> None:
    """The warning of embed_images / classify (on_error="skip") for images left out of their result,
    reported at the first caller outside clipforge (however many of its functions and methods lie between)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # clipforge/, all of it
    frame, level = sys._getframe(0), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    shown = "; ".join(r for _, r in skipped[:3])
    warnings.warn(f"skipped {len(skipped)} unreadable image(s), not in the result: {shown}"
                  + (" ..." if len(skipped) > 3 else ""), RuntimeWarning, stacklevel=level)


def embed_texts(model, texts, batch_size: int = 256, *, device=None, amp: bool = True,
                progress: bool | None = None) -> np.ndarray:
    """L2-normalised float32 embeddings (N, E) of `texts` (a string or a list of strings; long ones are truncated)."""
    batch_size = _check_batch_size(batch_size)
    texts = _check_texts(texts)
    dev = _resolve_device(model, device)
    out = _Rows(len(texts), model.config.embed_dim)
    with _inference(model, -(-len(texts) // batch_size), progress, "embed texts") as tick:
        for chunk in _chunks(texts, batch_size):
            out.add(_encode_texts(model, chunk, dev, amp))
            tick()
    return out.result()


def zero_shot_classifier(model, classnames: Sequence[str], templates="imagenet", *, batch_size: int = 256,
                         device=None, amp: bool = True, progress: bool | None = None) -> np.ndarray:
    """Prompt-ensemble class embeddings (C, E), float32, one L2-normalised row per class.

    Each class row is the mean of the normalised text embeddings of every template filled with the
    class name, normalised again (the CLIP paper's ensembling in embedding space). templates: a shipped
    set name ("imagenet" = the paper's 80, see `clipforge.serve.prompts.template_sets()`), a JSON file, or a
    list of strings each holding one "{}".
    """
    from .prompts import check_classnames, get_templates

    classnames = check_classnames(classnames)
    templates = get_templates(templates)
    batch_size = _check_batch_size(batch_size)
    dev = _resolve_device(model, device)
    sums = np.zeros((len(classnames), model.config.embed_dim), np.float64)
    prompts = ((c, t.format(name)) for c, name in enumerate(classnames) for t in templates)
    total = len(classnames) * len(templates)
    with _inference(model, -(-total // batch_size), progress, "class prompts") as tick:
        for chunk in _chunks(prompts, batch_size):
            emb = _encode_texts(model, [p for _, p in chunk], dev, amp)
            np.add.at(sums, np.array([c for c, _ in chunk]), emb)
            tick()
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return (sums / np.maximum(norms, 1e-12)).astype(np.float32)


def logit_scale(model) -> float:
    """exp(t) clamped to MAX_SCALE (100), the scale CLIP's logits use."""
    from ..model.clip import MAX_SCALE

    return float(min(model.logit_scale.detach().float().exp().item(), MAX_SCALE))


def classify(model, images, classifier: np.ndarray, batch_size: int = 64, *, device=None, amp: bool = True,
             progress: bool | None = None, on_error: str = "raise", return_skipped: bool = False):
    """Class probabilities (N, C) float32: softmax over classes of scale * cosine(image, class embedding).

    classifier: (C, E) from `zero_shot_classifier` (or any row-normalised class embeddings). With
    on_error="skip", unreadable images are left out (return_skipped=True also returns them).
    """
    emb, skipped = embed_images(model, images, batch_size, device=device, amp=amp, progress=progress,
                                on_error=on_error, return_skipped=True, workers=None)
    probs = probabilities(emb, classifier, logit_scale(model))
    if skipped and not return_skipped:
        _warn_skipped(skipped)
    return (probs, skipped) if return_skipped else probs


def probabilities(image_emb: np.ndarray, classifier: np.ndarray, scale: float) -> np.ndarray:
    """softmax(scale * image_emb @ classifierᵀ) over classes, float32 (N, C)."""
    classifier = np.asarray(classifier, dtype=np.float32)
    if classifier.ndim != 2 or classifier.shape[1] != image_emb.shape[1]:
        raise ValueError(f"classifier must be (classes, {image_emb.shape[1]}), got shape {classifier.shape}")
    logits = torch.from_numpy(image_emb) @ torch.from_numpy(classifier).t() * scale
    return torch.softmax(logits, dim=1).numpy()
