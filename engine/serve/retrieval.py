"""Retrieval evaluation (image->text and text->image recall@K) without the images x captions matrix.

A retrieval benchmark scores every caption against every image: 5k images x 25k captions (COCO's test
split) is 125M scores, 500 MB in fp32; 100k x 500k would be 200 GB. Recall@K only needs each query's K
best candidates, so `chunked_topk` walks the score matrix one (row chunk x column chunk) block at a time,
a GEMM and a top-k per block, merging each block's best K into the running best K of its rows. Memory
is one block plus (queries x K) indices. On CPU the loop runs in C++ (`clipforge._C.chunked_topk`);
elsewhere, or without the extension (one warning), the same loop runs here in PyTorch.

Recall follows OpenCLIP's retrieval evaluation (`reference.retrieval_recall`): a caption's query is a
hit at K when its image is among its K best images; an image's query is a hit when any of its captions
is among its K best captions (an image may have several captions).
"""
from __future__ import annotations

import warnings
from typing import Sequence
import torch

from .. import ops


RETRIEVAL_BACKENDS = ("auto", "cpp", "torch")
# Automatic blocks: up to 16,384 candidate columns, and as many query rows as keep one block of scores
# near 8 MB (the C++ side uses the same numbers).
_AUTO_COLS = 16384
_AUTO_BLOCK_BYTES = 8 << 20


def _auto_rows(cols: int, elem_size: int) -> int:
    rows = _AUTO_BLOCK_BYTES // max(1, cols * elem_size)
    if rows > 64:
        rows -= rows % 64  # GEMM-friendly multiple of 64
    return max(1, rows)


def _torch_chunked_topk(a: torch.Tensor, b: torch.Tensor, k: int, row_chunk: int, col_chunk: int):
    n, m = a.shape[0], b.shape[0]
    cols = min(m, col_chunk or _AUTO_COLS)
    rows = min(n, row_chunk or _auto_rows(cols, a.element_size())) if n else 1
    values = a.new_empty(n, k)
    indices = torch.empty(n, k, dtype=torch.long, device=a.device)
    for r0 in range(0, n, rows):
        a_c = a[r0 : r0 + rows]
        best_v = best_i = None
        for c0 in range(0, m, cols):
            block = a_c @ b[c0 : c0 + cols].t()  # (rows, cols): the only score storage
            v, i = block.topk(min(k, block.shape[1]), dim=1)
            i += c0
            if best_v is None:
                best_v, best_i = v, i
            else:  # merge: top-k of the 2k candidates
                cand_v, cand_i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
                best_v, pos = cand_v.topk(min(k, cand_v.shape[1]), dim=1)
                best_i = cand_i.gather(1, pos)
        values[r0 : r0 + rows] = best_v
        indices[r0 : r0 + rows] = best_i
    return values, indices


def _cpp_topk():
    ext = ops.cpp_extension()  # warns once when the extension is not built
    if ext is None:
        return None
    fn = getattr(ext, "chunked_topk", None)
    if fn is None:
        _warn_stale_extension()
    return fn


_warned_stale = False


def _warn_stale_extension():
    global _warned_stale
    if not _warned_stale:
        _warned_stale = True
        warnings.warn(
            "clipforge._C has no chunked_topk (built from older sources); retrieval uses the PyTorch "
            "chunked top-k. Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=4,
        )


def chunked_topk(a: torch.Tensor, b: torch.Tensor, k: int, *, chunk_size: int | None = None,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest scores of every row of a @ bᵀ, never holding more than one block of it.

    a: (n, d) queries, b: (m, d) candidates, 1 <= k <= m. Returns (values (n, k), indices (n, k) int64),
    best first. chunk_size: side of the (queries x candidates) block scored at once (None = automatic,
    about 8 MB). backend: "cpp" (CPU float32/float64 through clipforge._C), "torch", or "auto" (cpp for
    CPU tensors when the extension is built, torch otherwise).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"chunked_topk needs a (n, d) and b (m, d) with the same d, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not 1 <= k <= b.shape[0]:
        raise ValueError(f"k must be in [1, {b.shape[0]}] (the number of candidates), got {k}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows/columns (or None), got {chunk_size}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device, got {a.device} and {b.device}")
    if backend not in RETRIEVAL_BACKENDS:
        raise ValueError(f"unknown retrieval backend {backend!r}; choose one of {', '.join(RETRIEVAL_BACKENDS)}")
    if a.dtype != b.dtype:
        dtype = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dtype), b.to(dtype)
    side = chunk_size or 0
    with torch.no_grad():
        if backend != "torch" and a.device.type == "cpu":
            fn = _cpp_topk()
            if fn is not None:
                if a.dtype not in (torch.float32, torch.float64):  # fp16/bf16 GEMMs on CPU are slow anyway
                    a, b = a.float(), b.float()
                return fn(a.contiguous(), b.contiguous(), k, side, side)
            if backend == "cpp":
                raise RuntimeError("backend='cpp' needs clipforge._C.chunked_topk; build the extension or use backend='torch'")
        elif backend == "cpp":
            raise ValueError(f"backend='cpp' runs on CPU tensors only, got tensors on {a.device}")
        return _torch_chunked_topk(a, b, k, side, side)


def recall_at_k(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                ks: Sequence[int] = (1, 5, 10), chunk_size: int | None = None, backend: str = "auto") -> dict[str, float]:
    """Image->text and text->image recall@K with chunked top-k (no N x M score matrix).

    image_emb: (N, d), text_emb: (M, d) (normalise them first for cosine similarity);
    text_to_image: (M,) int64, the image of each caption (every image needs at least one caption).
    Returns {"image_to_text_R@K": float, "text_to_image_R@K": float} for each K in ks, the same
    numbers as `reference.retrieval_recall`. K larger than the candidate count counts every candidate.
    """
    n, m = image_emb.shape[0], text_emb.shape[0]
    if image_emb.dim() != 2 or text_emb.dim() != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"image_emb (N, d) and text_emb (M, d) must share d, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if n == 0 or m == 0:
        raise ValueError(f"recall needs at least one image and one caption, got {n} images and {m} captions")
    if text_to_image.shape != (m,) or text_to_image.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"text_to_image must be an integer tensor of shape ({m},) (one image index per caption), "
                         f"got {text_to_image.dtype} of shape {tuple(text_to_image.shape)}")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    text_to_image = text_to_image.to(device="cpu", dtype=torch.long)
    lo, hi = int(text_to_image.min()), int(text_to_image.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"text_to_image holds image index {lo if lo < 0 else hi}, outside [0, {n}) for {n} images")
    captions_per_image = torch.bincount(text_to_image, minlength=n)
    if (captions_per_image == 0).any():
        first = int((captions_per_image == 0).nonzero()[0])
        raise ValueError(f"image {first} has no caption in text_to_image; image->text recall is undefined for it")

    kmax = max(int(k) for k in ks)
    # text -> image: each caption's best images; hit when its own image is among the first K.
    _, top_images = chunked_topk(text_emb, image_emb, min(kmax, n), chunk_size=chunk_size, backend=backend)
    t2i_hit = top_images.cpu() == text_to_image[:, None]  # (M, K); at most one True per row
    # image -> text: each image's best captions; hit when any of them is one of its captions.
    _, top_texts = chunked_topk(image_emb, text_emb, min(kmax, m), chunk_size=chunk_size, backend=backend)
    i2t_hit = text_to_image[top_texts.cpu()] == torch.arange(n)[:, None]  # (N, K)
    out = {}
    for k in ks:
        k = int(k)
        out[f"image_to_text_R@{k}"] = i2t_hit[:, :k].any(1).double().mean().item()
        out[f"text_to_image_R@{k}"] = t2i_hit[:, :k].any(1).double().mean().item()
    return out
