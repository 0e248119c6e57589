"""Fused pieces of SigLIP's sigmoid loss in Triton: the forward sum and the gradient tiles.

SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", eq. 1). Image rows X (n, d)
and text rows Y (m, d), L2-normalised; t the exponentiated learnable scale, b the learnable bias:
  s_ij = t <x_i, y_j> + b,   z_ij = +1 if j = i + diag_offset (the pair) else -1,
  L = -(1 / N) sum_ij log sigmoid(z_ij s_ij) = (1 / N) sum_ij softplus(-z_ij s_ij)
over the global batch of N pairs (m = n = N on one process; on W ranks X is this rank's n images, Y
the N gathered captions and diag_offset = rank * n). OpenCLIP's SigLipLoss has this value on one
process; engine/siglip_loss.py states how its per-rank value differs on several.

Gradient. d softplus(-z s) / ds = -z sigmoid(-z s): sigmoid(s) for a negative (z = -1) and
-sigmoid(-s) = sigmoid(s) - 1 for the pair (z = +1), so with coef = dL_out / N
  G_ij = dL / ds_ij = coef (sigmoid(s_ij) - delta_ij)
  dX = t G Y,   dY = t G^T X                    (ds_ij / dx_i = t y_j, ds_ij / dy_j = t x_i)
  dL/dt = sum_ij G_ij <x_i, y_j> = <X, G Y>     (ds_ij / dt = <x_i, y_j>)
  dL/db = sum_ij G_ij                           (ds_ij / db = 1)
Every term depends on its own logit only: unlike the softmax loss, whose G needs the column
log-sum-exps that only a complete first pass gives, G here is known as soon as its logits tile is, so
the value and all four gradients come out of ONE pass over the logits, and they scale linearly with
dL_out. Three GEMM-equivalents (2 n m d FLOPs each) for loss and gradients, one for the value alone:
  1. `siglip_gradient_tiles` (this file): one fused kernel computes each logits tile on the tensor
     cores (GEMM-equivalent 1), writes G / coef = sigmoid(s) - delta once in the features' dtype (the
     bounded work buffer of engine/loss.py's row chunks), and per-tile fp32 row sums of G (for dL/db,
     from the unrounded values) and of softplus(-z s) (the loss), summed in float64 on the host;
  2. two cuBLAS GEMMs with fp32 outputs per row chunk (engine/loss.py's row loop, driven by
     engine/siglip_loss.py): G Y for the chunk (2), from which dL/dt = <X, G Y>, and G^T X added into
     the text gradient (3).
  engine/siglip_loss.py runs this in the autograd function's forward when a gradient will be wanted
  (its backward multiplies by dL_out and nothing else), and in siglip_loss_and_grads.
  `siglip_forward_sum` (this file) is the value alone (no gradient wanted: evaluation): a fused kernel
  adds softplus(-z s) of each logits tile into per-row fp32 sums over its range of columns; the grid
  splits the columns as well as the rows (~2 programs per SM, as the softmax forward), and the
  (splits, n) partials are summed in float64 on the host. Reads (BLOCK_M + BLOCK_N) * d inputs per
  tile, writes n * splits floats.
  Bytes on top of the GEMMs: the G chunk written once and read twice (2 bytes per logit in bf16), and
  2 n m / BLOCK_N floats of row sums.

Numerics (fp32 in registers; fp16 / bf16 operands on the tensor cores with an fp32 accumulator):
- softplus(x) = max(x, 0) + log1p(exp(-|x|)), with log1p(u) = 2 atanh(u / (2 + u)) summed as its odd
  series: u is in (0, 1], so q = u / (2 + u) <= 1/3 and eight terms leave a relative error below 2e-9.
  log(1 + u) would lose u's digits below fp32's 6e-8: at b = -10 a well-separated negative has
  u ~ 5e-5, whose log(1 + u) would be ~1e-3 wrong, relatively, and such terms are most of the sum.
- sigmoid(x) from e = exp(-|x|): 1 / (1 + e) for x >= 0, e / (1 + e) for x < 0, relatively exact on
  both tails. The pair's terms are taken with z folded into the argument (softplus(-s), -sigmoid(-s)),
  never as softplus(s) - s or sigmoid(s) - 1, which lose everything to cancellation once s >> 1.
- Masked (padding) rows and columns are zeroed before the sums, never stored.
- fp32 features are routed elsewhere by engine/ops.py; forced here they run 3xTF32 dots, as the
  softmax loss's kernels do. Under TRITON_INTERPRET=1 tiles are converted to fp32 after tl.load (the
  interpreter computes bf16 incorrectly) and its fp32 -> bf16 store of G truncates where a GPU rounds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .contrastive import (
    _column_splits, _logits_tile, check_loss_features, check_tile_buffer, launch_options, loss_tiles,
)
from .utils import check_kernel_device, multiprocessor_count


@triton.jit
def _softplus(x):
    return _softplus_of(x, tl.exp(-tl.abs(x)))


@triton.jit
def _softplus_of(x, u):
    # max(x, 0) + log1p(u), u = exp(-|x|) in (0, 1]; log1p(u) = 2 q (1 + q^2/3 + ... + q^14/15), q = u / (2 + u)
    q = u / (2.0 + u)
    q2 = q * q
    p = 0.0666666667 * q2 + 0.0769230769  # 1/15, 1/13
    p = p * q2 + 0.0909090909  # 1/11
    p = p * q2 + 0.1111111111  # 1/9
    p = p * q2 + 0.1428571429  # 1/7
    p = p * q2 + 0.2
    p = p * q2 + 0.3333333333
    p = p * q2 + 1.0
    return tl.maximum(x, 0.0) + 2.0 * q * p


@triton.jit
def _siglip_fwd_kernel(
    ROW_PART, stride_rs,
    I, stride_im, stride_id,
    T, stride_tn, stride_td,
    n_rows, n_cols, dim, cols_per_split, diag_offset, scale, bias,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # grid (row blocks, column splits): a program owns BLOCK_M image rows and cols_per_split text columns
    # (a multiple of BLOCK_N), walks them BLOCK_N at a time and writes BLOCK_M fp32 row sums.
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    start = pid_s * cols_per_split
    stop = tl.minimum(start + cols_per_split, n_cols)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_cols
        s = _logits_tile(I, stride_im, stride_id, T, stride_tn, stride_td, offs_m, offs_n, mask_m, mask_n,
                         dim, scale, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, DOT_PRECISION) + bias
        pair = offs_n[None, :] == offs_m[:, None] + diag_offset
        term = _softplus(tl.where(pair, -s, s))  # softplus(-z s)
        acc += tl.sum(tl.where(mask_m[:, None] & mask_n[None, :], term, 0.0), 1)
    tl.store(ROW_PART + pid_s.to(tl.int64) * stride_rs + offs_m, acc, mask=mask_m)


@triton.jit
def _siglip_grad_kernel(
    G, stride_gm, stride_gn,
    G_SUM, LOSS_SUM, stride_rs,
    I, stride_im, stride_id,
    T, stride_tn, stride_td,
    n_rows, n_cols, dim, diag_offset, scale, bias,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # G[i, j] = sigmoid(s_ij) - [j == i + diag_offset], one tile per program; reads (BM + BN) * d inputs,
    # writes BM * BN elements of G in its dtype and the tile's fp32 row sums of G (unrounded) and of
    # softplus(-z s). sigmoid(x) and softplus(x) share e = exp(-|x|).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < n_rows
    mask_n = offs_n < n_cols
    s = _logits_tile(I, stride_im, stride_id, T, stride_tn, stride_td, offs_m, offs_n, mask_m, mask_n,
                     dim, scale, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, DOT_PRECISION) + bias
    pair = offs_n[None, :] == offs_m[:, None] + diag_offset
    x = tl.where(pair, -s, s)  # -z s
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    sig = tl.where(x >= 0, r, e * r)
    g = tl.where(pair, -sig, sig)  # the pair: -sigmoid(-s), never sigmoid(s) - 1
    mask = mask_m[:, None] & mask_n[None, :]
    offs = offs_m.to(tl.int64)[:, None] * stride_gm + offs_n[None, :] * stride_gn
    tl.store(G + offs, g.to(G.dtype.element_ty), mask=mask)
    sums = pid_n.to(tl.int64) * stride_rs + offs_m
    tl.store(G_SUM + sums, tl.sum(tl.where(mask, g, 0.0), 1), mask=mask_m)
    tl.store(LOSS_SUM + sums, tl.sum(tl.where(mask, _softplus_of(x, e), 0.0), 1), mask=mask_m)


def _check(image: torch.Tensor, text: torch.Tensor) -> None:
    # the device check stays in each op module: benchmarks/compile_gate.py stands in for it there
    check_kernel_device(_siglip_fwd_kernel, image, "SigLIP loss", "chunked")
    check_loss_features(image, text, "SigLIP loss")


def _siglip_forward(image: torch.Tensor, text: torch.Tensor, scale: float, bias: float,
                    diag_offset: int = 0) -> torch.Tensor:
    """sum_ij softplus(-z_ij s_ij) over these image rows and every text row, s = scale * image @ text^T
    + bias, z = +1 on (i, i + diag_offset): a 0-d float64 tensor (the loss times N, partial across ranks)."""
    _check(image, text)
    n, dim = image.shape
    m = text.shape[0]
    if n == 0 or m == 0:
        return torch.zeros((), device=image.device, dtype=torch.float64)
    t = loss_tiles(image.dtype)
    row_blocks = triton.cdiv(n, t.block_m)
    splits, cols_per_split = _column_splits(row_blocks, m, t.block_n, multiprocessor_count(image.device))
    part = torch.empty(splits, n, device=image.device, dtype=torch.float32)  # n * splits floats: no row chunks
    _siglip_fwd_kernel[(row_blocks, splits)](
        part, part.stride(0),
        image, image.stride(0), image.stride(1), text, text.stride(0), text.stride(1),
        n, m, dim, cols_per_split, int(diag_offset), float(scale), float(bias),
        **launch_options(t, dim, _siglip_fwd_kernel, image.dtype),
    )
    return part.sum(dtype=torch.float64)


def _siglip_gradient_tiles(image: torch.Tensor, text: torch.Tensor, scale: float, bias: float, diag_offset: int,
                           out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out[i, j] = sigmoid(s_ij) - [j == i + diag_offset] (G / coef) in out's dtype, s = scale * image @
    text^T + bias. Returns (out, the sum of G's elements, sum_ij softplus(-z_ij s_ij)), the sums 0-d
    float64 tensors from the fp32 values."""
    _check(image, text)
    n, dim = image.shape
    m = text.shape[0]
    check_tile_buffer(out, n, m)
    if n == 0 or m == 0:
        zero = torch.zeros((), device=image.device, dtype=torch.float64)
        return out, zero, zero.clone()
    t = loss_tiles(image.dtype)
    col_tiles = triton.cdiv(m, t.block_n)
    sums = torch.empty(2, col_tiles, n, device=image.device, dtype=torch.float32)  # 2 n m / BLOCK_N floats
    _siglip_grad_kernel[(triton.cdiv(n, t.block_m), col_tiles)](
        out, out.stride(0), out.stride(1), sums[0], sums[1], sums.stride(1),
        image, image.stride(0), image.stride(1), text, text.stride(0), text.stride(1),
        n, m, dim, int(diag_offset), float(scale), float(bias),
        **launch_options(t, dim, _siglip_grad_kernel, image.dtype),
    )
    totals = sums.sum(dim=(1, 2), dtype=torch.float64)
    return out, totals[0], totals[1]


# Host entry points for engine/siglip_loss.py's autograd function, which drives the row chunks and GEMMs of
# the loss-and-gradients pass (engine/loss.py's row loop); this file has no autograd function of its own.
siglip_forward_sum = _siglip_forward
siglip_gradient_tiles = _siglip_gradient_tiles
