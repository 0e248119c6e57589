"""SigLIP's sigmoid loss over the global batch, in O(N d) memory.

`siglip_loss(image_features, text_features, logit_scale, logit_bias, group=...)` (Zhai et al. 2023):
    s_ij = t <x_i, y_j> + b,   z_ij = +1 if i = j else -1,   L = -(1/N) sum_i sum_j log sigmoid(z_ij s_ij)
over the global batch of N pairs: every image against every caption on every rank. t is the
exponentiated scale, b the bias (both may require grad). The derivation, the gradients
(G = dL_out / N (sigmoid(s) - delta), dX = t G Y, dY = t G^T X, dt = <X, G Y>, db = sum G) and the
numerics are in kernels/siglip.py's docstring.

One pass, three GEMM-equivalents. G depends on its own logit only (the softmax loss's G needs column
statistics that only a complete first pass gives), so the value and all four gradients come out of
one walk over the logits: one GEMM-equivalent for the logits (fused with the softplus sums and G),
two for G Y and G^T X. The gradients are linear in dL_out, so the autograd function computes them
(with dL_out = 1) in its FORWARD whenever one will be wanted (grad mode on and an input requiring
grad), keeps the O(N d) results instead of the features, and its backward only multiplies them by
dL_out, in place, and hands them out (no second copy: at N = 8192, d = 512 on CPU the loss's peak is
one chunk of logits plus the gradients themselves). A recompute design (value in forward, G again in
backward) would cost four. A call that wants no gradient (no_grad, inference) runs the value alone:
one GEMM-equivalent. The prices: a loss computed with grad mode on and never back-propagated pays for
its gradients, and a second backward through one loss (retain_graph=True) is refused with a sentence.

Backends (engine/ops.py picks "auto", with the softmax loss's rule):
- "triton":  fp16 / bf16 features on CUDA sm80+ (or CPU under TRITON_INTERPRET=1): a fused Triton
             gradient-tile kernel (logits tile -> G, its row sums and the softplus sums) around two
             cuBLAS GEMMs per row chunk; a fused value-only kernel;
- "chunked": the same row-chunked algorithm in PyTorch GEMMs on any device (V100, fp32 / float64 on
             a GPU);
- "cpp":     clipforge._C (csrc/siglip.cpp), chunked ATen GEMMs and one vectorised pass per logit on
             CPU (float32 / float64; half inputs are upcast);
- "torch":   the reference (engine/reference.py), which materialises the N x N logits.
The row loop of triton / chunked (row chunks of G within engine/loss.py's WORK_BYTES, two GEMMs per
chunk with fp32 results) is engine/loss.py's own, shared with the softmax loss's backward.

Across W ranks (n pairs each, N = W n): the softmax loss's scheme and gradient convention. The text
features are all-gathered, each rank sums its own n rows against all N captions (the pair of local
row i is global column rank * n + i); the image gradient is complete locally, the gathered-text
gradient goes back to its owners by reduce-scatter (an all-reduce on gloo), and one all-reduce of
three float64 scalars completes the loss, dt and db. Convention (engine/loss.py's):
- the returned loss is the global loss, the same on every rank;
- this rank's image and text features get W x the global loss's gradient w.r.t. them;
- logit_scale and logit_bias get the full gradient of the global loss, on every rank.
So averaging gradients over ranks (DDP, DeepSpeed) gives exactly the single-process gradient.

OpenCLIP's SigLipLoss (open_clip 3.3.0, loss.py) computes, on rank r of W (its `rank`, `world_size`):
    loss_r = -(1/n) sum_{i on r} sum_{j, all ranks} log sigmoid(z_ij s_ij)
(its `_loss` divides by the LOCAL batch size n, and each neighbour exchange adds the rank's images
against another rank's captions, negatives only). On one process (n = N) that is exactly L above,
which is what the parity tests check. On W ranks it is this rank's rows only, scaled to a per-row
mean: loss_r = W x (rank r's share of L), so mean_r loss_r = L, but loss_r itself differs from rank
to rank and from L. Its gradients: the exchanges carry gradients back to the captions' owners, so
this rank's image and text features get d(sum_r' loss_r') / d(them) = W x dL/d(them), the same as
here; its t and b get d loss_r / dt = W x (rank r's share of dL/dt), whose mean over ranks is dL/dt
(here: dL/dt on every rank). The difference is the reported value and the per-rank t / b gradients
before averaging; averaged (or summed) over ranks, every gradient is the same in both.
tests/test_siglip_distributed.py checks both statements on gloo ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import ops, reference
from .loss import (
    _Impl, _accumulation_dtype, _all_gather_rows, _backend as _loss_backend, _chunked_backward, _mm,
    _reduce_scatter_rows, _world,
)

__all__ = ["SigLipLoss", "siglip_loss", "siglip_loss_and_grads"]


def _pairs(rows: int, cols: int, diag_offset: int, device):
    """(row, column) indices of the positive pairs inside a (rows, cols) block: (i, i + diag_offset)."""
    i = torch.arange(rows, device=device)
    keep = i + diag_offset < cols
    return i[keep], i[keep] + diag_offset


def _chunked_logits(image, text, scale: float, bias: float):
    return _mm(image, text.t()).mul_(scale).add_(bias)  # (r, m), fp32 from half operands (float64 for float64)


def _chunked_forward_sum(image, text, scale: float, bias: float, diag_offset: int, rows: int) -> torch.Tensor:
    """The PyTorch twin of kernels.siglip.siglip_forward_sum, `rows` image rows at a time."""
    total = torch.zeros((), device=image.device, dtype=torch.float64)
    for r0 in range(0, image.shape[0], rows):
        s = _chunked_logits(image[r0:r0 + rows], text, scale, bias)
        pi, pj = _pairs(s.shape[0], s.shape[1], diag_offset + r0, s.device)
        s[pi, pj] = -s[pi, pj]  # softplus(-z s): the pairs' sign folded into the argument
        total += F.softplus(s).sum(dtype=torch.float64)
    return total


def _chunked_gradient_tiles(image, text, scale: float, bias: float, diag_offset: int, out):
    """The PyTorch twin of kernels.siglip.siglip_gradient_tiles (same arguments and results)."""
    x = _chunked_logits(image, text, scale, bias)
    pi, pj = _pairs(x.shape[0], x.shape[1], diag_offset, x.device)
    x[pi, pj] = -x[pi, pj]  # -z s
    loss = F.softplus(x).sum(dtype=torch.float64)
    g = x.sigmoid_()
    g[pi, pj] = -g[pi, pj]  # the pair: -sigmoid(-s), never sigmoid(s) - 1
    return out.copy_(g), g.sum(dtype=torch.float64), loss


class _SigLipImpl(_Impl):
    """The sum over this rank's rows, alone or with its gradients, per backend: "cpp" (clipforge._C),
    "triton" (kernels.siglip's fused tiles) and "chunked" (PyTorch). triton and chunked run
    engine/loss.py's row-chunked backward loop with the gradient tiles in place of the softmax's
    probabilities; the compute dtype and the row chunks are the softmax loss's (loss._Impl)."""

    def __init__(self, backend: str, chunk_size: int | None):
        """backend: as resolved by ops.select_siglip_backend (which refuses what cannot run)."""
        self.backend = backend
        self.chunk = chunk_size
        self.module = ops.siglip_kernels(backend)  # clipforge._C, kernels.siglip or None

    def forward(self, image, text, scale: float, bias: float, row_offset: int) -> torch.Tensor:
        """sum_ij softplus(-z_ij s_ij) over these image rows, a 0-d float64 tensor (one GEMM-equivalent)."""
        if self.backend == "cpp":
            return self.module.siglip_forward(image, text, scale, bias, row_offset, int(self.chunk or 0))
        if self.backend == "triton":
            return self.module.siglip_forward_sum(image, text, scale, bias, row_offset)
        return _chunked_forward_sum(image, text, scale, bias, row_offset, self._rows(image, text))

    def forward_backward(self, image, text, scale: float, bias: float, row_offset: int, coef: float):
        """(the sum, d_image, d_text (this block's part), d_scale, d_bias) of coef x the sum, in one pass of
        three GEMM-equivalents; the sum and the scalars are 0-d float64."""
        if self.backend == "cpp":
            return self.module.siglip_forward_backward(image, text, scale, bias, row_offset, coef,
                                                       int(self.chunk or 0))
        fill = self.module.siglip_gradient_tiles if self.backend == "triton" else _chunked_gradient_tiles
        g_sums, loss_sums = [], []

        def gradient_tiles(chunk, text, scale, _row_hi, _row_lo, _col_hi, _col_lo, diag_offset, out):
            g, g_sum, loss_sum = fill(chunk, text, scale, bias, diag_offset, out)
            g_sums.append(g_sum)
            loss_sums.append(loss_sum)
            return g

        # loss._chunked_backward's calling convention passes the softmax's statistics; this loss has none
        f64 = dict(device=image.device, dtype=torch.float64)
        none_n, none_m = torch.zeros(image.shape[0], **f64), torch.zeros(text.shape[0], **f64)
        d_image, d_text, d_scale = _chunked_backward(image, text, scale, none_n, none_m, row_offset, coef,
                                                     self._rows(image, text), gradient_tiles)
        return torch.stack(loss_sums).sum(), d_image, d_text, d_scale, torch.stack(g_sums).sum() * coef


def _gather_text(text, group):
    world, rank = _world(group)
    return (_all_gather_rows(text, group, world) if world > 1 else text), world, rank  # (N, d)


def _global_value(image, text, t: float, b: float, impl: _SigLipImpl, group) -> torch.Tensor:
    """The loss over the global batch (0-d float64), no gradient: one GEMM-equivalent."""
    text_all, world, rank = _gather_text(text, group)
    n = image.shape[0]
    total = impl.forward(image, text_all, t, b, rank * n).double().reshape(1)
    if world > 1:
        total = total.clone()
        dist.all_reduce(total, group=group)
    return total[0] / (n * world)


def _global_loss_and_grads(image, text, t: float, b: float, impl: _SigLipImpl, group, grad_loss: float = 1.0):
    """(loss, d_image, d_text, d_scale, d_bias) over the global batch, gradients of grad_loss x the loss:
    features in the accumulation dtype, the rest 0-d float64, with the data-parallel convention of the
    module docstring (W x for this rank's features, full for t and b)."""
    text_all, world, rank = _gather_text(text, group)
    n = image.shape[0]
    total, d_image, d_text_all, d_scale, d_bias = impl.forward_backward(image, text_all, t, b, rank * n,
                                                                        grad_loss / (n * world))
    scalars = torch.stack([x.double().reshape(()) for x in (total, d_scale, d_bias)])
    if world > 1:
        d_text = _reduce_scatter_rows(d_text_all, group, world, rank)
        dist.all_reduce(scalars, group=group)  # loss, dt and db in one collective
        d_image.mul_(world)  # fresh tensors of this call: scale in place, no copy
        d_text.mul_(world)
    else:
        d_text = d_text_all
    return scalars[0] / (n * world), d_image, d_text, scalars[1], scalars[2]


def _like(x):
    """(shape, dtype, device) of a tensor argument (t and b may live on the CPU beside CUDA features),
    None for a Python number (which gets no gradient)."""
    return (x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else None


def _grad_as(grad: torch.Tensor, like):
    return grad.reshape(like[0]).to(dtype=like[1], device=like[2]) if like is not None else None


class _SigLipFunction(torch.autograd.Function):
    """The global-batch sigmoid loss; the gradients are computed in forward when wanted (module docstring)."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, impl: _SigLipImpl, group, with_grads: bool):
        in_dtypes = (image.dtype, text.dtype)
        image, text = impl.prepare(image, text)
        t, b = float(scale), float(bias)
        acc = _accumulation_dtype(image.dtype)
        if not with_grads:
            return _global_value(image, text, t, b, impl, group).to(acc)
        loss, *grads = _global_loss_and_grads(image, text, t, b, impl, group)
        # kept as an attribute, not saved tensors: the backward hands these very tensors out (scaled in
        # place), so autograd can take them without a second O(N d) copy; the features are not kept
        ctx.grads = grads
        ctx.meta = (in_dtypes, _like(scale), _like(bias))
        return loss.to(acc)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("clipforge.siglip_loss computes its gradients in the forward pass and hands them "
                               "out in the first backward, so a second backward through the same loss "
                               "(retain_graph=True) is not supported; call siglip_loss again for another one")
        (d_image, d_text, d_scale, d_bias), ctx.grads = ctx.grads, None
        in_dtypes, scale_like, bias_like = ctx.meta
        g = float(grad_loss)  # the gradients of g x the loss: linear in g
        if g != 1.0:
            d_image.mul_(g)
            d_text.mul_(g)
        return (d_image.to(in_dtypes[0]), d_text.to(in_dtypes[1]), _grad_as(d_scale * g, scale_like),
                _grad_as(d_bias * g, bias_like), None, None, None)


def _torch_loss(image, text, scale, bias, group):
    world, _ = _world(group)
    if world > 1:
        # all_gather from torch.distributed.nn sums the gathered copies' gradients: W x on features, the
        # full gradient on t and b, the fused backends' convention.
        from torch.distributed.nn.functional import all_gather

        image = torch.cat(all_gather(image.contiguous(), group=group))
        text = torch.cat(all_gather(text.contiguous(), group=group))
    return reference.siglip_loss(image, text, scale, bias)


def _backend(image_features, text_features, backend: str, chunk_size, group) -> str:
    """Check the arguments of a loss call (across the group's ranks too) and resolve its backend:
    engine/loss.py's check, with this loss's backend rule and name."""
    return _loss_backend(image_features, text_features, backend, chunk_size, group,
                         select=ops.select_siglip_backend, op="siglip_loss", title="SigLIP loss")


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias, *,
                group=None, backend: str = "auto", chunk_size: int | None = None) -> torch.Tensor:
    """SigLIP's sigmoid loss over the global batch: OpenCLIP's SigLipLoss value on one process, never an
    N x N buffer (but "torch").

    image_features, text_features: (n, d), this rank's pairs (row i of each is a positive pair),
      L2-normalised as the model returns them.
    logit_scale: t, the exponentiated scale; logit_bias: b. Each a 0-d tensor (which may require grad)
      or a float.
    group: a torch.distributed process group; the loss is then taken over the W ranks' concatenated
      batch (N = W n; the same n, d, dtype and backend kind on every rank, else ValueError on all
      ranks), with the data-parallel convention of the module docstring: features get W x the
      gradient of the global loss, t and b the full gradient, so averaging over ranks gives the exact
      gradient. (OpenCLIP's SigLipLoss returns a per-rank value there; see the module docstring.)
    backend: "auto" (engine/ops.py's table: triton for fp16 / bf16 on CUDA sm80+, chunked for other
      CUDA cases, cpp on CPU), "triton", "chunked", "cpp" or "torch".
    chunk_size: image rows per chunk of logits (None: cpp ~16 MiB chunks; triton / chunked as many rows
      as keep the work buffer within engine/loss.py's WORK_BYTES = 256 MiB).
    Returns a 0-d loss tensor (float32; float64 for float64 features on cpp / chunked / torch). With
    grad mode on and an input requiring grad, the gradients are computed here, in one pass with the
    value (three GEMM-equivalents in all; the backward only scales them); otherwise the value alone.
    """
    name = _backend(image_features, text_features, backend, chunk_size, group)
    if name == "torch":
        return _torch_loss(image_features, text_features, logit_scale, logit_bias, group)
    # inside Function.forward grad mode is always off and needs_input_grad ignores it: decide here
    with_grads = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in (image_features, text_features, logit_scale, logit_bias))
    return _SigLipFunction.apply(image_features, text_features, logit_scale, logit_bias,
                                 _SigLipImpl(name, chunk_size), group, with_grads)


def siglip_loss_and_grads(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias, *,
                          group=None, backend: str = "auto", chunk_size: int | None = None):
    """The loss and its gradients in one call, without autograd: (loss, d_image, d_text, d_scale, d_bias).

    Arguments, value and gradient convention as `siglip_loss`, the same single pass of three
    GEMM-equivalents; the feature gradients come back in the accumulation dtype (fp32 for fp16 / bf16 features, float64 for float64), as
    loss.contrastive_loss_and_grads returns them for gradient caching; d_scale and d_bias are 0-d
    float32 tensors (the gradients w.r.t. t and b).
    """
    name = _backend(image_features, text_features, backend, chunk_size, group)
    acc = _accumulation_dtype(image_features.dtype)
    if name == "torch":
        leaves = [x.detach().requires_grad_(True) for x in (image_features, text_features)]
        scalars = [torch.as_tensor(v, dtype=torch.float32, device=image_features.device).detach().requires_grad_(True)
                   for v in (logit_scale, logit_bias)]
        loss = _torch_loss(*leaves, *scalars, group)
        grads = torch.autograd.grad(loss, (*leaves, *scalars))
        return loss.detach(), grads[0].to(acc), grads[1].to(acc), grads[2].reshape(()), grads[3].reshape(())
    impl = _SigLipImpl(name, chunk_size)
    image, text = impl.prepare(image_features, text_features)
    loss, d_image, d_text, d_scale, d_bias = _global_loss_and_grads(image, text, float(logit_scale),
                                                                    float(logit_bias), impl, group)
    return loss.to(acc), d_image, d_text, d_scale.to(torch.float32), d_bias.to(torch.float32)


class SigLipLoss(nn.Module):
    """nn.Module form of `siglip_loss` (OpenCLIP's SigLipLoss call: loss(img, txt, scale, bias))."""

    def __init__(self, *, group=None, backend: str = "auto", chunk_size: int | None = None):
        super().__init__()
        self.group, self.backend, self.chunk_size = group, backend, chunk_size

    def forward(self, image_features, text_features, logit_scale, logit_bias):
        return siglip_loss(image_features, text_features, logit_scale, logit_bias, group=self.group,
                           backend=self.backend, chunk_size=self.chunk_size)
