"""CLIP's contrastive loss over the global batch, in O(N d) memory (DESIGN.md, "Loss").

`contrastive_loss(image_features, text_features, logit_scale, group=...)` has the arguments and the
value of OpenCLIP's `ClipLoss` (scale already exponentiated). Backends (engine/ops.py picks "auto"):
- "triton": fused kernels (clipforge.kernels.contrastive), CUDA, or CPU under TRITON_INTERPRET=1;
- "cpp":    clipforge._C, chunked GEMMs through ATen on CPU (float32/float64; half inputs are upcast);
- "torch":  the reference (engine/reference.py), which materialises the N x N logits.

With a process group of W ranks, each holding n pairs (N = W n), the loss is the single-process loss
over the concatenated batch: the text features are all-gathered, each rank computes its own n rows of
the logits chunk by chunk (so the row log-sum-exps are complete locally), the column statistics are
completed with two all-reduces over N floats (max, then the rescaled sum of exp, which also carries the
rows' part of the loss), and in backward the gathered-text gradient goes back to its owners with a
reduce-scatter (an all-reduce on gloo, which has no reduce-scatter).

Gradient convention on W ranks (the one of OpenCLIP's gather_with_grad and torch.distributed.nn's
all_gather, made for data-parallel averaging as in DDP and DeepSpeed):
- the returned loss is the global loss, the same value on every rank;
- the gradient w.r.t. this rank's image and text features is W x the gradient of the global loss
  w.r.t. them;
- the gradient w.r.t. logit_scale is the full gradient of the global loss, on every rank.
So AVERAGING parameter gradients over ranks gives exactly the single-process gradient (a trainer that
SUMS them must divide by W). It assumes every rank back-propagates the same upstream gradient (true
for loss.backward() and for a global loss scale).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from . import ops, reference

__all__ = ["ContrastiveLoss", "contrastive_loss"]


def _world(group) -> tuple[int, int]:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _check_equal_batches(n: int, device: torch.device, group, world: int) -> None:
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device), group=group)
    sizes = [int(s) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(f"clipforge.contrastive_loss needs the same local batch size on every rank, got {sizes} "
                         "across ranks; drop or pad the last partial batch so every rank holds as many pairs")


def _all_gather_rows(x: torch.Tensor, group, world: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


def _reduce_scatter_rows(x: torch.Tensor, group, world: int, rank: int) -> torch.Tensor:
    """Sum `x` (world * n, d) over ranks and return this rank's n rows."""
    n = x.shape[0] // world
    if dist.get_backend(group) == "gloo":  # gloo implements no reduce-scatter: reduce all, keep ours
        dist.all_reduce(x, group=group)
        return x[rank * n:(rank + 1) * n].clone()
    out = torch.empty(n, *x.shape[1:], dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


class _Impl:
    """Forward statistics / backward of one backend, with clipforge._C's calling convention."""

    def __init__(self, backend: str, chunk_size: int | None):
        self.backend = backend
        self.chunk = int(chunk_size or 0)
        if backend == "cpp":
            self.ext = ops.cpp_extension()
            if self.ext is None:
                raise RuntimeError("the 'cpp' contrastive backend needs clipforge._C; build it with "
                                   "`pip install --no-build-isolation -e .` or use backend='torch'")
        else:
            from .kernels import contrastive as kernel

            self.kernel = kernel

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if self.backend == "cpp":
            return dtype if dtype in (torch.float32, torch.float64) else torch.float32
        return dtype

    def forward(self, image, text, scale: float):
        if self.backend == "cpp":
            return self.ext.contrastive_forward(image, text, scale, self.chunk)
        return self.kernel.contrastive_forward_stats(image, text, scale)

    def backward(self, image, text, scale: float, row_lse, col_lse, row_offset: int, coef: float):
        if self.backend == "cpp":
            return self.ext.contrastive_backward(image, text, scale, row_lse, col_lse, row_offset, coef, self.chunk)
        return self.kernel.contrastive_backward_grads(image, text, scale, row_lse, col_lse, row_offset, coef)


def _diagonal_sum(image: torch.Tensor, text: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """sum_i <I_i, T_i> in float64, in row chunks: half features are summed in fp32 products (never in
    their own precision) and no (n, d) float copy is made at once."""
    total = torch.zeros((), dtype=torch.float64, device=image.device)
    for r0 in range(0, image.shape[0], rows):
        a, b = image[r0:r0 + rows], text[r0:r0 + rows]
        if a.dtype in (torch.float16, torch.bfloat16):
            a, b = a.float(), b.float()
        total += torch.dot(a.flatten(), b.flatten()).double()
    return total


class _ChunkedContrastiveFunction(torch.autograd.Function):
    """The global-batch loss from row/column log-sum-exps; see the module docstring for the scheme."""

    @staticmethod
    def forward(ctx, image, text, scale, impl: _Impl, group):
        world, rank = _world(group)
        n = image.shape[0]
        in_dtypes = (image.dtype, text.dtype)
        cdtype = impl.compute_dtype(image.dtype)
        image = image.detach().to(cdtype).contiguous()
        text = text.detach().to(cdtype).contiguous()
        if world > 1:
            _check_equal_batches(n, image.device, group, world)
            text_all = _all_gather_rows(text, group, world)  # (N, d)
        else:
            text_all = text
        s = float(scale)
        total = n * world
        row_lse, col_max, col_sum = impl.forward(image, text_all, s)
        # loss = (sum_i r_i + sum_j c_j - 2 sum_i l_ii) / 2N: this rank's rows carry sum r_i - 2 l_ii
        row_part = (row_lse.double().sum() - 2.0 * s * _diagonal_sum(image, text)).to(col_sum.dtype)
        if world > 1:
            local_max = col_max.clone()
            dist.all_reduce(col_max, op=dist.ReduceOp.MAX, group=group)
            col_sum = col_sum * torch.exp(local_max - col_max)
            packed = torch.cat([col_sum, row_part.reshape(1)])  # one all-reduce for both sums
            dist.all_reduce(packed, group=group)
            col_sum, row_part = packed[:-1], packed[-1]
        col_lse = col_max + torch.log(col_sum)
        loss = (row_part + col_lse.sum()) / (2 * total)
        ctx.save_for_backward(image, text_all, row_lse, col_lse)
        ctx.meta = (impl, group, world, rank, s, total, in_dtypes,
                    scale.shape if isinstance(scale, torch.Tensor) else None,
                    scale.dtype if isinstance(scale, torch.Tensor) else None)
        return loss.to(torch.float64 if image.dtype == torch.float64 else torch.float32)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        image, text_all, row_lse, col_lse = ctx.saved_tensors
        impl, group, world, rank, s, total, in_dtypes, scale_shape, scale_dtype = ctx.meta
        n = image.shape[0]
        coef = float(grad_loss) / (2 * total)
        d_image, d_text_all, d_scale = impl.backward(image, text_all, s, row_lse, col_lse, rank * n, coef)
        if world > 1:
            d_text = _reduce_scatter_rows(d_text_all, group, world, rank)
            d_scale = d_scale.reshape(1).clone()
            dist.all_reduce(d_scale, group=group)
            # data-parallel averaging convention (module docstring): features get W x their gradient
            d_image.mul_(world)  # both are fresh tensors of this backward: scale in place, no copy
            d_text.mul_(world)
        else:
            d_text = d_text_all
        d_scale = d_scale.reshape(scale_shape).to(scale_dtype) if scale_shape is not None else None
        return d_image.to(in_dtypes[0]), d_text.to(in_dtypes[1]), d_scale, None, None


def _torch_loss(image, text, scale, group):
    world, _ = _world(group)
    if world > 1:
        # all_gather from torch.distributed.nn sums the gathered copies' gradients: W x on features and
        # the full gradient on the scale, the same convention as the fused backends.
        from torch.distributed.nn.functional import all_gather

        _check_equal_batches(image.shape[0], image.device, group, world)
        image = torch.cat(all_gather(image.contiguous(), group=group))
        text = torch.cat(all_gather(text.contiguous(), group=group))
    return reference.contrastive_loss(image, text, scale)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, *,
                     group=None, backend: str = "auto", chunk_size: int | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: the value of OpenCLIP's ClipLoss, never an N x N buffer (cpp, triton).

    image_features, text_features: (n, d), this rank's pairs (row i of each is a positive pair).
    logit_scale: the exponentiated scale s (a 0-d tensor, which may require grad, or a float).
    group: a torch.distributed process group; the loss is then taken over the W ranks' concatenated
      batch (N = W n, the same n on every rank, else ValueError), and the gradients follow the
      data-parallel averaging convention of the module docstring: features get W x the gradient of the
      global loss, logit_scale the full gradient, so averaging over ranks gives the exact gradient.
    backend: "auto" (engine/ops.py: triton on CUDA, cpp on CPU), "triton", "cpp" or "torch".
    chunk_size: image rows per chunk of logits for the cpp backend (None: ~16 MiB chunks).
    Returns a 0-d loss tensor (float32; float64 for float64 features on cpp/torch).
    """
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"image and text features must both be (batch, dim) with the same shape, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    if image_features.shape[0] == 0:
        raise ValueError("the contrastive loss needs at least one (image, text) pair, got an empty batch")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows (or None), got {chunk_size}")
    name = ops.select_contrastive_backend(image_features.device, backend)
    if name == "torch":
        return _torch_loss(image_features, text_features, logit_scale, group)
    return _ChunkedContrastiveFunction.apply(image_features, text_features, logit_scale,
                                             _Impl(name, chunk_size), group)


class ContrastiveLoss(nn.Module):
    """nn.Module form of `contrastive_loss` (OpenCLIP's ClipLoss call: loss(img, txt, scale))."""

    def __init__(self, *, group=None, backend: str = "auto", chunk_size: int | None = None):
        super().__init__()
        self.group, self.backend, self.chunk_size = group, backend, chunk_size

    def forward(self, image_features, text_features, logit_scale):
        return contrastive_loss(image_features, text_features, logit_scale, group=self.group,
                                backend=self.backend, chunk_size=self.chunk_size)
