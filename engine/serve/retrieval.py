"""Retrieval evaluation (image->text and text->image recall@K) without the images x captions matrix.

A retrieval benchmark scores every caption against every image: 5k images x 25k captions (COCO's test
split) is 125M scores, 500 MB in fp32; 100k x 500k would be 200 GB. Recall@K only needs each query's K
best candidates, so `ops.chunked_topk` (the ops switch's top-k) walks the score matrix one (row chunk x column chunk) block at a time,
a GEMM and a top-k per block, merging each block's best K into the running best K of its rows. Memory
is one block plus (queries x K) indices. On CPU the loop runs in C++ (`clipforge._C.chunked_topk`);
elsewhere, or without the extension (one warning), the same loop runs here in PyTorch.

Recall follows OpenCLIP's retrieval evaluation (`reference.retrieval_recall`): a caption's query is a
hit at K when its image is among its K best images; an image's query is a hit when any of its captions
is among its K best captions (an image may have several captions).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import ops


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
    _, top_images = ops.chunked_topk(text_emb, image_emb, min(kmax, n), chunk_size=chunk_size, backend=backend)
    t2i_hit = top_images.cpu() == text_to_image[:, None]  # (M, K); at most one True per row
    # image -> text: each image's best captions; hit when any of them is one of its captions.
    _, top_texts = ops.chunked_topk(image_emb, text_emb, min(kmax, m), chunk_size=chunk_size, backend=backend)
    i2t_hit = text_to_image[top_texts.cpu()] == torch.arange(n)[:, None]  # (N, K)
    out = {}
    for k in ks:
        k = int(k)
        out[f"image_to_text_R@{k}"] = i2t_hit[:, :k].any(1).double().mean().item()
        out[f"text_to_image_R@{k}"] = t2i_hit[:, :k].any(1).double().mean().item()
    return out
