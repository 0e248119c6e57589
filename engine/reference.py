"""PyTorch references for every op: the one place tests and benchmarks compare against.

They are written for clarity, not speed: plain matmuls and softmax, materialising what they need.
Pass float64 tensors to use them as the ground truth of a test.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention(q, k, v, *, causal: bool = False, softmax_scale: float | None = None):
    """softmax(q kᵀ · scale [+ causal mask]) v.  q, k, v: (batch, heads, seq, head_dim)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, Sq, Sk)
    if causal:
        sq, sk = scores.shape[-2:]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def contrastive_loss(image_features, text_features, logit_scale):
    """Symmetric InfoNCE of CLIP (same value as OpenCLIP's ClipLoss; `logit_scale` already exponentiated).

    logits = s · I Tᵀ (N×N), loss = ½ (CE(rows) + CE(columns)) with labels 0..N-1.
    """
    logits = logit_scale * image_features @ text_features.t()  # (N, N)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def siglip_loss(image_features, text_features, logit_scale, logit_bias):
    """SigLIP's sigmoid loss (Zhai et al. 2023; OpenCLIP's SigLipLoss on one process; `logit_scale` already
    exponentiated): logits = t · I Tᵀ + b (N×N), labels z = 2·eye - 1, loss = -Σ log σ(z · logits) / N."""
    logits = logit_scale * image_features @ text_features.t() + logit_bias  # (N, N)
    n = logits.shape[0]
    labels = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / n


def retrieval_recall(image_emb, text_emb, text_to_image, ks=(1, 5, 10)):
    """Image->text and text->image recall@K from the full (captions x images) score matrix, as OpenCLIP's
    retrieval evaluation computes it. text_to_image: (M,) image index of every caption.

    Returns {"image_to_text_R@K": float, "text_to_image_R@K": float} for each K.
    """
    scores = text_emb @ image_emb.t()  # (M, N)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(text_emb)), text_to_image] = True
    kmax = max(ks)
    # text -> image: the caption's image among the caption's top-k images (topk is sorted, so the top
    # k are the first k of the top kmax).
    t2i_hit = positive.gather(1, scores.topk(min(kmax, scores.shape[1]), dim=1).indices)  # (M, kmax)
    # image -> text: any of the image's captions among the image's top-k captions.
    scores_t = scores.t().contiguous()  # (N, M): a row-wise topk is much faster than one down columns
    i2t_hit = positive.t().gather(1, scores_t.topk(min(kmax, scores_t.shape[1]), dim=1).indices)  # (N, kmax)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = i2t_hit[:, :k].any(1).double().mean().item()
        out[f"text_to_image_R@{k}"] = t2i_hit[:, :k].any(1).double().mean().item()
    return out
