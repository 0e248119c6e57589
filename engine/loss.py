"""CLIP's contrastive loss over the global batch, in O(N d) memory.

`contrastive_loss(image_features, text_features, logit_scale, group=...)` has the arguments and the
value of OpenCLIP's `ClipLoss` (scale already exponentiated). Backends (engine/ops.py picks "auto"):
- "triton":  fp16 / bf16 features on CUDA sm80+ (or CPU under TRITON_INTERPRET=1): fused Triton tiles
             for the forward statistics and the backward's probabilities (clipforge.kernels.contrastive)
             around two cuBLAS GEMMs per row chunk: four GEMM-equivalents in all, at any d;
- "chunked": the same row-chunked algorithm in PyTorch GEMMs on any device (V100, fp32 and float64
             features on a GPU; fp16 operands with fp32 results on the tensor cores);
- "cpp":     clipforge._C, chunked GEMMs through ATen on CPU (float32/float64; half inputs are upcast);
- "torch":   the reference (engine/reference.py), which materialises the N x N logits.
Memory: O(N d) plus a work buffer of WORK_BYTES (one row chunk of the logits' probabilities; see there).

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

__all__ = ["ContrastiveLoss", "contrastive_loss", "contrastive_loss_and_grads"]


def _world(group) -> tuple[int, int]:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # codes of the cross-rank check


def _check_ranks_agree(features: torch.Tensor, backend: str, group, op: str = "contrastive_loss") -> None:
    """One all_gather of (local batch, feature dim, dtype, collective pattern) before the loss's own
    collectives: ranks that disagree all raise a ValueError naming them and their values, instead of
    mismatched collectives (gloo aborts the process; buffers of equal bytes would silently mix).
    `op`: the loss's name in clipforge, for the sentence."""
    world, _ = _world(group)
    code = _DTYPES.index(features.dtype) if features.dtype in _DTYPES else len(_DTYPES)
    mine = torch.tensor([features.shape[0], features.shape[1], code, backend == "torch"], dtype=torch.long,
                        device=features.device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    rows = [tuple(int(v) for v in p) for p in parts]
    if len(set(rows)) == 1:
        return
    what = [name for i, name in enumerate(("local batch sizes", "feature dims", "dtypes", "backends"))
            if len({row[i] for row in rows}) > 1]
    ranks: dict[tuple, list[int]] = {}
    for r, row in enumerate(rows):
        ranks.setdefault(row, []).append(r)

    def show(row):
        n, d, c, torch_path = row
        dtype = str(_DTYPES[c]).replace("torch.", "") if c < len(_DTYPES) else "another dtype"
        backend = f" (backend {'torch' if torch_path else 'cpp/chunked/triton'})" if "backends" in what else ""
        return f"{n} x {d} {dtype}{backend}"

    seen = "; ".join(f"{show(row)} on rank{'s' * (len(rs) > 1)} {', '.join(map(str, rs))}" for row, rs in ranks.items())
    hint = ("drop or pad the last partial batch so every rank holds as many pairs" if what == ["local batch sizes"]
            else "every rank must run the same model, precision and loss backend (the same run config)")
    raise ValueError(f"clipforge.{op} needs the same local batch size, feature dim, dtype and backend on "
                     f"every rank, but their {' and '.join(what)} differ: {seen}; {hint}")


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


# The work buffer: one row chunk of the backward's P (and the chunked backend's fp32 logits) stays within
# WORK_BYTES (4096 rows x 32768 columns in bf16), except that a chunk never has fewer than MIN_ROWS rows
# (with several chunks each adds an (m, d) fp32 product into the text gradient: MIN_ROWS amortises that
# traffic, ~250 / rows of the GEMM time on an H200, so P may pass WORK_BYTES beyond ~128k gathered
# columns). The (m, d) fp32 product itself is O(N d), the size of the text gradient the loss returns.
WORK_BYTES = 256 * 2**20
MIN_ROWS = 1024
_ROW_ALIGN = 128  # the Triton tiles' BLOCK_M: chunks of whole row blocks


def _rows_per_chunk(n: int, m: int, bytes_per_row: int, chunk_size: int | None) -> int:
    """Image rows per chunk of the n x m logits: `chunk_size` if given, else all n rows when their
    buffers (bytes_per_row each) fit WORK_BYTES, else the most whole row blocks that do, at least MIN_ROWS."""
    if chunk_size:
        return chunk_size
    if n * bytes_per_row <= WORK_BYTES:
        return max(n, 1)
    return max(MIN_ROWS, WORK_BYTES // bytes_per_row // _ROW_ALIGN * _ROW_ALIGN)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b with fp32 accumulation AND an fp32 result for fp16 / bf16 operands (float64 for float64).
    On CUDA (and meta) that is one cuBLAS GEMM (`torch.mm(..., out_dtype=torch.float32)`, tensor cores);
    the CPU has no such kernel, so there the half operands are converted first: exact products, fp32
    sums, the same numbers (only CPU tests and interpreter runs take that path)."""
    acc = _accumulation_dtype(a.dtype)
    if a.dtype == acc:
        return torch.mm(a, b, out=out)
    if a.device.type in ("cuda", "meta"):
        return torch.mm(a, b, out_dtype=acc, out=out) if out is not None else torch.mm(a, b, out_dtype=acc)
    return torch.mm(a.to(acc), b.to(acc), out=out)


def _split(x: torch.Tensor):
    """float64 -> (hi, lo) float32 with hi + lo ~ x: (l - hi) - lo keeps float64's precision where l ~ hi."""
    hi = x.float()
    return hi, (x - hi.double()).float()


def _chunked_forward_stats(image, text, scale: float, rows: int):
    """(row_lse, col_max, col_sum), float64, of logits = scale * image @ text^T, `rows` image rows at a
    time: one GEMM per chunk (fp32 logits from fp16 / bf16 operands), fp32 statistics merged in float64."""
    n, m = image.shape[0], text.shape[0]
    f64 = dict(device=image.device, dtype=torch.float64)
    row_lse = torch.empty(n, **f64)
    col_max = torch.full((m,), float("-inf"), **f64)
    col_sum = torch.zeros(m, **f64)
    for r0 in range(0, n, rows):
        logits = _mm(image[r0:r0 + rows], text.t()).mul_(scale)  # (r, m)
        r_max = logits.amax(1, keepdim=True)
        r_sum = (logits - r_max).exp_().sum(1)  # the second and last (r, m) buffer
        row_lse[r0:r0 + rows] = r_max.squeeze(1).double() + torch.log(r_sum.double())
        c_max = logits.amax(0)
        c_sum = logits.sub_(c_max).exp_().sum(0).double()
        c_max = c_max.double()
        new_max = torch.maximum(col_max, c_max)
        col_sum = col_sum * torch.exp(col_max - new_max) + c_sum * torch.exp(c_max - new_max)
        col_max = new_max
    return row_lse, col_max, col_sum


def _chunked_probabilities(image, text, scale: float, row_hi, row_lo, col_hi, col_lo, diag_offset: int, out):
    """The PyTorch twin of kernels.contrastive.contrastive_probabilities (same arguments and result)."""
    logits = _mm(image, text.t()).mul_(scale)  # (r, m)
    row_part = logits.sub(row_hi[:, None]).sub_(row_lo[:, None]).exp_()
    p = logits.sub_(col_hi.to(logits.dtype)).sub_(col_lo.to(logits.dtype)).exp_().add_(row_part)
    del row_part
    i = torch.arange(p.shape[0], device=p.device)
    keep = i + diag_offset < p.shape[1]
    p[i[keep], i[keep] + diag_offset] -= 2.0
    return out.copy_(p)


def _chunked_backward(image, text, scale: float, row_lse, col_lse, row_offset: int, coef: float, rows: int,
                      probabilities):
    """(d_image, d_text, d_scale) of coef * [sum P - 2 sum_i l_{i, row_offset+i}] (module docstring of
    kernels/contrastive.py), `rows` image rows at a time: `probabilities` writes the chunk's P - 2 delta
    (G / coef) in the features' dtype (the recompute: GEMM-equivalent 2), then two GEMMs with fp32
    results, G T for the chunk (3) and G^T I added into the text gradient (4). d_text is this image
    block's contribution only (partial across ranks)."""
    n, d = image.shape
    m = text.shape[0]
    acc = _accumulation_dtype(image.dtype)
    gt = torch.empty(n, d, device=image.device, dtype=acc)   # G T  (n, d)
    gti = torch.empty(m, d, device=image.device, dtype=acc)  # G^T I (m, d)
    if n and m:
        row_hi, row_lo = _split(row_lse)
        col_hi, col_lo = _split(col_lse)
        if image.dtype == torch.float64:  # float64 features: keep the statistics whole
            row_hi, row_lo, col_hi, col_lo = row_lse, torch.zeros_like(row_lse), col_lse, torch.zeros_like(col_lse)
        buf = torch.empty(min(rows, n), m, device=image.device, dtype=image.dtype)
        several_half = n > rows and image.dtype != acc
        part = torch.empty(m, d, device=image.device, dtype=acc) if several_half else None
        for r0 in range(0, n, rows):
            chunk = image[r0:r0 + rows]
            r = chunk.shape[0]
            p = probabilities(chunk, text, scale, row_hi[r0:r0 + r], row_lo[r0:r0 + r], col_hi, col_lo,
                              row_offset + r0, buf[:r])
            _mm(p, text, out=gt[r0:r0 + r])         # G T rows of this chunk
            if r0 == 0:
                _mm(p.t(), chunk, out=gti)          # G^T I: the first chunk writes it
            elif part is None:
                gti.addmm_(p.t(), chunk)            # fp32 / float64 operands: accumulate in the GEMM
            else:  # half operands: addmm's out_dtype form wants its summand in the operands' dtype (some
                gti.add_(_mm(p.t(), chunk, out=part))  # torch versions), so an fp32 product, then a sum
    else:
        gt.zero_()
        gti.zero_()
    gt.mul_(coef)
    gti.mul_(coef)
    d_scale = _dot_rows(image, gt)           # sum_ij G_ij <I_i, T_j> = <I, G T>
    return gt.mul_(scale), gti.mul_(scale), d_scale


def _dot_rows(a: torch.Tensor, b: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """sum_ij a_ij b_ij in float64, in row chunks: half operands are multiplied in fp32 (never in their own
    precision) and no full converted copy of either is made."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for r0 in range(0, a.shape[0], rows):
        total += torch.dot(a[r0:r0 + rows].to(dtype).flatten(), b[r0:r0 + rows].to(dtype).flatten()).double()
    return total


class _Impl:
    """Forward statistics / backward of one backend, with clipforge._C's calling convention:
    "cpp" (clipforge._C), "triton" (kernels.contrastive's fused tiles + cuBLAS GEMMs) and "chunked"
    (PyTorch GEMMs on any device) share the row-chunked backward above; cpp has its own in C++."""

    def __init__(self, backend: str, chunk_size: int | None):
        """backend: as resolved by ops.select_contrastive_backend (which refuses what cannot run)."""
        self.backend = backend
        self.chunk = chunk_size
        self.module = ops.contrastive_kernels(backend)  # clipforge._C, kernels.contrastive or None

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if self.backend == "cpp":
            return dtype if dtype in (torch.float32, torch.float64) else torch.float32
        return dtype

    def prepare(self, image, text):
        """Detached, contiguous features in this backend's compute dtype (both take image's)."""
        cdtype = self.compute_dtype(image.dtype)
        return image.detach().to(cdtype).contiguous(), text.detach().to(cdtype).contiguous()

    def _rows(self, image, text) -> int:
        n, m = image.shape[0], text.shape[0]
        size = image.element_size()
        # triton: the P chunk only; chunked: P plus two fp32 (float64) (r, m) temporaries
        per_row = m * size if self.backend == "triton" else m * (size + 2 * _accumulation_dtype(image.dtype).itemsize)
        return _rows_per_chunk(n, m, per_row, self.chunk)

    def forward(self, image, text, scale: float):
        if self.backend == "cpp":
            return self.module.contrastive_forward(image, text, scale, int(self.chunk or 0))
        if self.backend == "triton":
            return self.module.contrastive_forward_stats(image, text, scale)
        return _chunked_forward_stats(image, text, scale, self._rows(image, text))

    def backward(self, image, text, scale: float, row_lse, col_lse, row_offset: int, coef: float):
        if self.backend == "cpp":
            return self.module.contrastive_backward(image, text, scale, row_lse, col_lse, row_offset, coef,
                                                 int(self.chunk or 0))
        probabilities = self.module.contrastive_probabilities if self.backend == "triton" else _chunked_probabilities
        return _chunked_backward(image, text, scale, row_lse, col_lse, row_offset, coef, self._rows(image, text),
                                 probabilities)


def _global_forward(image, text, s: float, impl: _Impl, group):
    """The loss over the global batch from this rank's features (already in the compute dtype):
    (loss (0-d, float64), gathered text, row_lse, col_lse), the last three what the backward needs."""
    world, rank = _world(group)
    n = image.shape[0]
    if world > 1:
        text_all = _all_gather_rows(text, group, world)  # (N, d)
    else:
        text_all = text
    row_lse, col_max, col_sum = impl.forward(image, text_all, s)
    # loss = (sum_i r_i + sum_j c_j - 2 sum_i l_ii) / 2N: this rank's rows carry sum r_i - 2 l_ii
    row_part = (row_lse.double().sum() - 2.0 * s * _dot_rows(image, text)).to(col_sum.dtype)
    if world > 1:
        local_max = col_max.clone()
        dist.all_reduce(col_max, op=dist.ReduceOp.MAX, group=group)
        col_sum = col_sum * torch.exp(local_max - col_max)
        packed = torch.cat([col_sum, row_part.reshape(1)])  # one all-reduce for both sums
        dist.all_reduce(packed, group=group)
        col_sum, row_part = packed[:-1], packed[-1]
    col_lse = col_max + torch.log(col_sum)
    loss = (row_part + col_lse.sum()) / (2 * n * world)
    return loss, text_all, row_lse, col_lse


def _global_backward(image, text_all, row_lse, col_lse, s: float, impl: _Impl, group, grad_loss: float):
    """(d_image, d_text, d_scale) in the accumulation dtype (fp32; float64 for float64), with the
    data-parallel convention of the module docstring."""
    world, rank = _world(group)
    n = image.shape[0]
    coef = grad_loss / (2 * n * world)
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
    return d_image, d_text, d_scale.reshape(())


class _ChunkedContrastiveFunction(torch.autograd.Function):
    """The global-batch loss from row/column log-sum-exps; see the module docstring for the scheme."""

    @staticmethod
    def forward(ctx, image, text, scale, impl: _Impl, group):
        in_dtypes = (image.dtype, text.dtype)
        image, text = impl.prepare(image, text)
        s = float(scale)
        loss, text_all, row_lse, col_lse = _global_forward(image, text, s, impl, group)
        ctx.save_for_backward(image, text_all, row_lse, col_lse)
        ctx.meta = (impl, group, s, in_dtypes,
                    scale.shape if isinstance(scale, torch.Tensor) else None,
                    scale.dtype if isinstance(scale, torch.Tensor) else None)
        return loss.to(_accumulation_dtype(image.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        image, text_all, row_lse, col_lse = ctx.saved_tensors
        impl, group, s, in_dtypes, scale_shape, scale_dtype = ctx.meta
        d_image, d_text, d_scale = _global_backward(image, text_all, row_lse, col_lse, s, impl, group,
                                                    float(grad_loss))
        d_scale = d_scale.reshape(scale_shape).to(scale_dtype) if scale_shape is not None else None
        return d_image.to(in_dtypes[0]), d_text.to(in_dtypes[1]), d_scale, None, None


def _torch_loss(image, text, scale, group):
    world, _ = _world(group)
    if world > 1:
        # all_gather from torch.distributed.nn sums the gathered copies' gradients: W x on features and
        # the full gradient on the scale, the same convention as the fused backends.
        from torch.distributed.nn.functional import all_gather

        image = torch.cat(all_gather(image.contiguous(), group=group))
        text = torch.cat(all_gather(text.contiguous(), group=group))
    return reference.contrastive_loss(image, text, scale)


def _backend(image_features, text_features, backend: str, chunk_size, group, *, select=None,
             op: str = "contrastive_loss", title: str = "contrastive loss") -> str:
    """Check the arguments of a loss call (across the group's ranks too) and resolve its backend.
    Both losses' check: `select` resolves the backend (None: ops.select_contrastive_backend), `op` and
    `title` name the loss in the sentences (engine/siglip_loss.py passes its own)."""
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"image and text features must both be (batch, dim) with the same shape, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows (or None), got {chunk_size}")
    name = (select or ops.select_contrastive_backend)(image_features.device, backend, dtype=image_features.dtype)
    if _world(group)[0] > 1:
        _check_ranks_agree(image_features, name, group, op)  # first: one rank's empty batch fails every rank
    if image_features.shape[0] == 0:
        raise ValueError(f"the {title} needs at least one (image, text) pair, got an empty batch")
    return name


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, *,
                     group=None, backend: str = "auto", chunk_size: int | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: the value of OpenCLIP's ClipLoss, never an N x N buffer (but "torch").

    image_features, text_features: (n, d), this rank's pairs (row i of each is a positive pair).
    logit_scale: the exponentiated scale s (a 0-d tensor, which may require grad, or a float).
    group: a torch.distributed process group; the loss is then taken over the W ranks' concatenated
      batch (N = W n; the same n, d, dtype and backend kind on every rank, else ValueError on all
      ranks), and the gradients follow the data-parallel averaging convention of the module
      docstring: features get W x the gradient of the global loss, logit_scale the full gradient, so
      averaging over ranks gives the exact gradient.
    backend: "auto" (engine/ops.py's table: triton for fp16 / bf16 on CUDA sm80+, chunked for other
      CUDA cases, cpp on CPU), "triton", "chunked", "cpp" or "torch".
    chunk_size: image rows per chunk of logits (None: cpp ~16 MiB chunks; triton / chunked as many rows
      as keep the work buffer within WORK_BYTES = 256 MiB).
    Returns a 0-d loss tensor (float32; float64 for float64 features on cpp / chunked / torch).
    """
    name = _backend(image_features, text_features, backend, chunk_size, group)
    if name == "torch":
        return _torch_loss(image_features, text_features, logit_scale, group)
    return _ChunkedContrastiveFunction.apply(image_features, text_features, logit_scale,
                                             _Impl(name, chunk_size), group)


def contrastive_loss_and_grads(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, *,
                               group=None, backend: str = "auto", chunk_size: int | None = None):
    """The loss and its gradients in one call, without autograd: (loss, d_image, d_text, d_scale).

    Arguments, value and gradient convention as `contrastive_loss` (W x the global gradient for this
    rank's features, the full one for the scale), but the feature gradients come back in the
    accumulation dtype (fp32 for fp16 / bf16 features; float64 for float64) instead of the features'
    own: gradient caching stores them, and in fp16 each, ~ s / 2N of an O(1) value (1e-5 at N = 32k),
    would sit in the subnormals. d_scale: a 0-d tensor (the gradient w.r.t. the exponentiated scale).
    """
    name = _backend(image_features, text_features, backend, chunk_size, group)
    if name == "torch":
        leaves = [x.detach().requires_grad_(True) for x in (image_features, text_features)]
        s = torch.as_tensor(logit_scale, dtype=torch.float32, device=image_features.device).detach().requires_grad_(True)
        loss = _torch_loss(*leaves, s, group)
        grads = torch.autograd.grad(loss, (*leaves, s))
        acc = _accumulation_dtype(image_features.dtype)
        return loss.detach(), grads[0].to(acc), grads[1].to(acc), grads[2].reshape(())
    impl = _Impl(name, chunk_size)
    image, text = impl.prepare(image_features, text_features)
    s = float(logit_scale)
    loss, text_all, row_lse, col_lse = _global_forward(image, text, s, impl, group)
    d_image, d_text, d_scale = _global_backward(image, text_all, row_lse, col_lse, s, impl, group, 1.0)
    return loss.to(_accumulation_dtype(image.dtype)), d_image, d_text, d_scale.to(torch.float32)


class ContrastiveLoss(nn.Module):
    """nn.Module form of `contrastive_loss` (OpenCLIP's ClipLoss call: loss(img, txt, scale))."""

    def __init__(self, *, group=None, backend: str = "auto", chunk_size: int | None = None):
        super().__init__()
        self.group, self.backend, self.chunk_size = group, backend, chunk_size

    def forward(self, image_features, text_features, logit_scale):
        return contrastive_loss(image_features, text_features, logit_scale, group=self.group,
                                backend=self.backend, chunk_size=self.chunk_size)
