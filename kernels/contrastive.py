"""Fused pieces of CLIP's contrastive loss in Triton: the forward statistics and the probability tiles.

logits l_ij = s <I_i, T_j> for image rows I (n, d) and text rows T (m, d) (m = n on one process; on
several ranks T is the all-gathered text and I this rank's images). The loss and its gradient
(Radford et al. 2021; symmetric cross-entropy over rows and columns, labels on the diagonal):
  L = (1 / 2N) [sum_i (r_i - l_ii) + sum_j (c_j - l_jj)],  r_i = logsumexp_j l_ij,  c_j = logsumexp_i l_ij
  G = coef * (P - 2 delta),  P_ij = exp(l_ij - r_i) + exp(l_ij - c_j),  coef = dL_out / 2N
  dI = s G T,  dT = s G^T I,  ds = sum_ij G_ij <I_i, T_j> = <I, G T>.
Only r and c (n + m floats) are kept between the passes, never an n x m matrix.

The algorithm costs four GEMM-equivalents (2 n m d FLOPs each), what the maths needs:
  1. forward, `contrastive_forward_stats` (this file): one fused kernel computes each logits tile on the
     tensor cores and folds it into online statistics in registers: the row (max, sum-exp) of its rows
     over its column range and the column (max, sum-exp) of its rows. The grid splits the columns as
     well as the rows, so 256 local rows against 32k gathered columns still launch ~2 programs per SM;
     partial statistics are merged on the host (O((n + m) * programs / tiles) floats, in row chunks
     that keep them under WORK_BYTES). Reads (BLOCK_M + BLOCK_N) * d inputs per tile (L2-resident
     re-reads of a GEMM), writes 2 n * splits + 2 m * ceil(n / BLOCK_M) floats.
  2. backward, in row chunks of the images (engine/loss.py drives the loop):
     a. `contrastive_probabilities` (this file): one fused kernel recomputes the chunk's logits tile
        by tile (GEMM-equivalent 2) and writes P - 2 delta once, in the features' dtype (a bounded
        work buffer, WORK_BYTES in engine/loss.py); the -2 on the diagonal is applied in fp32 before
        the rounding, so the positive pairs' G_ii = P_ii - 2 (small when training goes well) keeps
        its relative precision.
     b. two cuBLAS GEMMs with fp32 outputs (engine/loss.py): G T for the chunk (3) and G^T I added
        into the text gradient (4). cuBLAS is at its best there and the kernel never needs a
        (BLOCK_M x d) accumulator, so the cost stays four GEMM-equivalents whatever d is.
  Bytes on top of the GEMMs: the P chunk is written once (2 bytes per logit in bf16) and read twice.

Numerics: fp32 accumulation, fp32 statistics (merged in float64 on the host, as clipforge._C's); fp16 /
bf16 features run on the tensor cores. fp32 features are routed elsewhere by engine/ops.py; forced
here, they run 3xTF32 dots (input_precision="tf32x3": near-fp32 accuracy on the tensor cores at a third
of the TF32 rate), never exact-fp32 FMA dots. Under TRITON_INTERPRET=1 tiles are converted to fp32 right
after tl.load, because the interpreter computes bf16 incorrectly; it also truncates the fp32 -> bf16
store of P where a GPU rounds to nearest, so CPU bf16 tests of this path are pessimistic (the GPU twins
in tests/test_contrastive.py are the real check).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import TileConfig, check_kernel_device, kernel_flags, multiprocessor_count

# Masked logits: a large finite negative instead of -inf, so fully masked rows/columns give exp(0)
# (ignored by the masked stores) rather than NaN from (-inf) - (-inf). A constexpr: the JIT refuses
# plain module globals (the interpreter does not; benchmarks/compile_gate.py catches it).
_MASKED = tl.constexpr(-1.0e30)


@triton.jit
def _logits_tile(
    A, stride_am, stride_ad, B, stride_bn, stride_bd,
    offs_m, offs_n, mask_m, mask_n, dim, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # scale * A[offs_m] @ B[offs_n]^T, K loop over the feature dimension; reads (BM + BN) * d elements
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ad
    b_ptrs = B + offs_n.to(tl.int64)[:, None] * stride_bn + offs_k[None, :] * stride_bd
    for k0 in range(0, dim, BLOCK_K):
        if EVEN_K:  # d % BLOCK_K == 0 (CLIP's 512 / 768 / 1024): no mask on the K axis
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[:, None], other=0.0)
        else:
            kk = k0 + offs_k
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (kk[None, :] < dim), other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[:, None] & (kk[None, :] < dim), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ad
        b_ptrs += BLOCK_K * stride_bd
    return acc * scale


@triton.jit
def _contrastive_fwd_kernel(
    ROW_MAX, ROW_SUM, stride_rs,
    COL_MAX, COL_SUM, stride_cb,
    I, stride_im, stride_id,
    T, stride_tn, stride_td,
    n_rows, n_cols, dim, cols_per_split, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # grid (row blocks, column splits): a program owns BLOCK_M image rows and cols_per_split text columns
    # (a multiple of BLOCK_N) and walks them BLOCK_N at a time.
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    m_i = tl.full((BLOCK_M,), _MASKED, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    col_base = pid_m.to(tl.int64) * stride_cb
    start = pid_s * cols_per_split
    stop = tl.minimum(start + cols_per_split, n_cols)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_cols
        logits = _logits_tile(I, stride_im, stride_id, T, stride_tn, stride_td, offs_m, offs_n, mask_m, mask_n,
                              dim, scale, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, DOT_PRECISION)
        logits = tl.where(mask_m[:, None] & mask_n[None, :], logits, _MASKED)
        # rows: online log-sum-exp over this program's columns
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
        m_i = m_new
        # columns: this row block's (max, sum-exp), merged across row blocks on the host
        c_max = tl.max(logits, 0)
        c_sum = tl.sum(tl.exp(logits - c_max[None, :]), 0)
        tl.store(COL_MAX + col_base + offs_n, c_max, mask=mask_n)
        tl.store(COL_SUM + col_base + offs_n, c_sum, mask=mask_n)
    # max and sum separately: the host merges the splits and forms lse = max + log(sum) in float64
    row_base = pid_s.to(tl.int64) * stride_rs
    tl.store(ROW_MAX + row_base + offs_m, m_i, mask=mask_m)
    tl.store(ROW_SUM + row_base + offs_m, l_i, mask=mask_m)


@triton.jit
def _contrastive_probs_kernel(
    P, stride_pm, stride_pn,
    I, stride_im, stride_id,
    T, stride_tn, stride_td,
    ROW_HI, ROW_LO, COL_HI, COL_LO,
    n_rows, n_cols, dim, diag_offset, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # P[i, j] = exp(l_ij - r_i) + exp(l_ij - c_j) - 2 [j == i + diag_offset], one tile per program;
    # reads (BM + BN) * d inputs, writes BM * BN elements of P in its dtype.
    # (l - hi) - lo: exact near the maximum, lo restores the float64 statistic's low bits.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < n_rows
    mask_n = offs_n < n_cols
    logits = _logits_tile(I, stride_im, stride_id, T, stride_tn, stride_td, offs_m, offs_n, mask_m, mask_n,
                          dim, scale, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, DOT_PRECISION)
    r_hi = tl.load(ROW_HI + offs_m, mask=mask_m, other=0.0)
    r_lo = tl.load(ROW_LO + offs_m, mask=mask_m, other=0.0)
    c_hi = tl.load(COL_HI + offs_n, mask=mask_n, other=0.0)
    c_lo = tl.load(COL_LO + offs_n, mask=mask_n, other=0.0)
    p = tl.exp((logits - r_hi[:, None]) - r_lo[:, None]) + tl.exp((logits - c_hi[None, :]) - c_lo[None, :])
    p = tl.where(offs_n[None, :] == offs_m[:, None] + diag_offset, p - 2.0, p)
    offs = offs_m.to(tl.int64)[:, None] * stride_pm + offs_n[None, :] * stride_pn
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
# Column partials of the forward, per launch: 2 x 4 bytes x m x ceil(rows / BLOCK_M); rows are chunked
# to keep them within this bound.
WORK_BYTES = 64 * 2**20


def loss_tiles(dtype: torch.dtype) -> TileConfig:
    """Tiles of both loss kernels, one GEMM-like tile each (compile_gate.py checks every case):
    128 x 128 x 64 on 8 warps with 3 pipeline stages: ~64 FLOP per byte read at a tile (twice the
    64 x 64 tile's), a 128 x 128 fp32 accumulator in 64 registers per thread, 96 KiB of shared memory
    for the staged fp16/bf16 operands (sm80 and sm90). fp32 operands (3xTF32, forced only: each dot
    splits its operands into hi / lo halves, which costs registers) take 64 x 128 x 32 tiles."""
    if dtype == torch.float32:
        return TileConfig(64, 128, num_warps=8, num_stages=3, block_k=32)
    return TileConfig(128, 128, num_warps=8, num_stages=3, block_k=64)


def check_loss_features(image: torch.Tensor, text: torch.Tensor, op: str) -> None:
    """The dtype and layout boundary of both losses' host entry points (kernels.siglip's too), after
    their own device check; `op` ("contrastive loss", "SigLIP loss") names the loss in the sentences."""
    if image.dtype not in _SUPPORTED or text.dtype != image.dtype:
        raise TypeError(f"the Triton {op} takes float16/bfloat16 (or, forced, float32) features of one "
                        f"dtype, got {image.dtype} and {text.dtype}; float64 runs on the 'chunked' or 'cpp' backend")
    if image.dim() != 2 or text.dim() != 2 or image.shape[1] != text.shape[1]:
        raise ValueError(f"image and text features must be (rows, dim) with the same dim, got "
                         f"{tuple(image.shape)} and {tuple(text.shape)}")
    if image.stride(1) != 1 or text.stride(1) != 1:
        raise ValueError(f"the Triton {op} needs features with contiguous rows (stride 1 along dim)")


def check_tile_buffer(out: torch.Tensor, n: int, m: int) -> None:
    """The (n, m) work buffer a tile kernel writes (P here, G in kernels.siglip): contiguous rows."""
    if out.shape != (n, m) or out.stride(1) != 1:
        raise ValueError(f"out must be a ({n}, {m}) buffer with contiguous rows, got {tuple(out.shape)}")


def launch_options(t: TileConfig, dim: int, kernel, dtype: torch.dtype) -> dict:
    """The constexprs and launch options of every loss kernel (both losses) for tiles `t` at feature dim
    `dim`: 3xTF32 dots for (forced) fp32 features."""
    return dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, EVEN_K=dim % t.block_k == 0,
                num_warps=t.num_warps, num_stages=t.num_stages,
                **kernel_flags(kernel, dtype, fp32_precision="tf32x3"))


def _check(image: torch.Tensor, text: torch.Tensor) -> None:
    # the device check stays in each op module: benchmarks/compile_gate.py stands in for it there
    check_kernel_device(_contrastive_fwd_kernel, image, "contrastive loss", "chunked")
    check_loss_features(image, text, "contrastive loss")


def _column_splits(row_blocks: int, n_cols: int, block_n: int, sms: int) -> tuple[int, int]:
    """(splits, columns per split): enough programs for ~2 per SM, each walking >= 1 column tile."""
    col_tiles = triton.cdiv(n_cols, block_n)
    splits = max(1, min(col_tiles, triton.cdiv(2 * sms, row_blocks)))
    tiles_per_split = triton.cdiv(col_tiles, splits)
    return triton.cdiv(col_tiles, tiles_per_split), tiles_per_split * block_n


def _contrastive_forward(image: torch.Tensor, text: torch.Tensor, scale: float):
    """Statistics of logits = scale * image @ text^T, float64 (as clipforge._C's): (row_lse (n),
    col_max (m), col_sum (m)); col_sum = sum_i exp(l_ij - col_max_j) over these image rows (partial
    across ranks). float64 because an lse is ~ the scale (<= 100): in fp32 its absolute error 100 * 6e-8
    would become a 6e-6 relative error of every probability in the backward. The kernel's outputs
    (max and sum-exp, each exact to fp32) are merged here."""
    _check(image, text)
    n, dim = image.shape
    m = text.shape[0]
    dev = image.device
    f64 = dict(device=dev, dtype=torch.float64)
    row_lse = torch.full((n,), float("-inf"), **f64)
    col_max = torch.full((m,), float("-inf"), **f64)
    col_sum = torch.zeros(m, **f64)
    if n == 0 or m == 0:
        return row_lse, col_max, col_sum
    t = loss_tiles(image.dtype)
    options = launch_options(t, dim, _contrastive_fwd_kernel, image.dtype)
    sms = multiprocessor_count(dev)
    # row chunks keep the column partials (8 bytes x m per row block) within WORK_BYTES
    chunk = max(t.block_m, WORK_BYTES // (8 * m) * t.block_m)
    for r0 in range(0, n, chunk):
        rows = image[r0:r0 + chunk]
        nr = rows.shape[0]
        row_blocks = triton.cdiv(nr, t.block_m)
        splits, cols_per_split = _column_splits(row_blocks, m, t.block_n, sms)
        part_rmax = torch.empty(splits, nr, device=dev, dtype=torch.float32)
        part_rsum = torch.empty_like(part_rmax)
        part_cmax = torch.empty(row_blocks, m, device=dev, dtype=torch.float32)
        part_csum = torch.empty_like(part_cmax)
        _contrastive_fwd_kernel[(row_blocks, splits)](
            part_rmax, part_rsum, part_rmax.stride(0),
            part_cmax, part_csum, part_cmax.stride(0),
            rows, rows.stride(0), rows.stride(1), text, text.stride(0), text.stride(1),
            nr, m, dim, cols_per_split, float(scale), **options,
        )
        # Merge partials in place, each term rescaled to its max (a factor <= 1), so the fp32 sums keep
        # fp32's relative precision; only the (n + m)-long results go to float64.
        r_max, r_sum = _merge(part_rmax, part_rsum)
        row_lse[r0:r0 + nr] = r_max.double() + torch.log(r_sum.double())
        c_max, c_sum = _merge(part_cmax, part_csum)
        new_max = torch.maximum(col_max, c_max.double())
        col_sum = col_sum * torch.exp(col_max - new_max) + c_sum.double() * torch.exp(c_max.double() - new_max)
        col_max = new_max
    return row_lse, col_max, col_sum


def _merge(part_max: torch.Tensor, part_sum: torch.Tensor):
    """(k, L) partial (max, sum-exp) -> (L) (max, sum-exp), in place over the partials."""
    if part_max.shape[0] == 1:
        return part_max[0], part_sum[0]
    top = part_max.amax(0)
    part_sum.mul_(part_max.sub_(top).exp_())
    return top, part_sum.sum(0)


def _contrastive_probabilities(image, text, scale: float, row_hi, row_lo, col_hi, col_lo, diag_offset: int,
                               out: torch.Tensor) -> torch.Tensor:
    """out[i, j] = exp(l_ij - r_i) + exp(l_ij - c_j) - 2 [j == i + diag_offset], l = scale * image @ text^T,
    in out's dtype (the features' dtype). row_*, col_*: float32 (hi, lo) halves of the float64 lse."""
    _check(image, text)
    n, dim = image.shape
    m = text.shape[0]
    check_tile_buffer(out, n, m)
    if n == 0 or m == 0:
        return out
    t = loss_tiles(image.dtype)
    _contrastive_probs_kernel[(triton.cdiv(n, t.block_m), triton.cdiv(m, t.block_n))](
        out, out.stride(0), out.stride(1),
        image, image.stride(0), image.stride(1), text, text.stride(0), text.stride(1),
        row_hi, row_lo, col_hi, col_lo,
        n, m, dim, int(diag_offset), float(scale), **launch_options(t, dim, _contrastive_probs_kernel, image.dtype),
    )
    return out


# Host entry points for engine/loss.py's autograd function (single process and process groups), which
# drives the backward's row chunks and GEMMs; this file has no autograd function of its own.
contrastive_forward_stats = _contrastive_forward
contrastive_probabilities = _contrastive_probabilities
