"""Fused CLIP contrastive loss in Triton: forward statistics and backward, no N x M buffer.

logits l_ij = s <I_i, T_j> for image rows I (n, d) and text rows T (m, d) (m = n on one process; on
several ranks T is the all-gathered text and I this rank's images). CLIP.md gives the loss and
  G = coef * (softmax_row + softmax_col - 2 delta),  dI = s G T,  dT = s G^T I,  ds = sum G_ij <I_i, T_j>.

Forward (one GEMM pass): a program owns BLOCK_M image rows and walks the text BLOCK_N at a time. The
row log-sum-exp is complete at the end of the walk (online softmax); the column (max, sum-exp) of its
BLOCK_M rows are written per row block (num_row_blocks x m floats, no atomics) and merged on the host
(and across ranks by engine/loss.py).
Backward (one kernel launched twice, no atomics, each tile recomputed from the saved statistics): a
  program owns BLOCK_M rows of A x BLOCK_DO feature columns of its output and walks B. (A, B) = (I, T)
  gives G T; (T, I), with the row and column statistics swapped, gives G^T I, since P is symmetric in
  its two roles. Each recomputes the logits tile (K loop over d) and forms P = exp(l - r_i) + exp(l - c_j). The
  diagonal term, the scale and ds are O((n + m) d) and done on the host.
  FLOPs: forward 2nmd; backward 2 * (slices + 1) * 2nmd, the recompute repeating once per feature
  slice (BLOCK_DO = 256): 5 GEMM-equivalents in all for d <= 256, 7 for d = 512, 9 for d = 768.
  A wider slice (fewer recomputes) needs a larger register accumulator: to be tuned on a GPU.
Memory traffic: forward reads I once and T once per row block; writes 2n + 2 m * n / BLOCK_M floats.

Numerics: fp32 accumulation and fp32 statistics for fp32, fp16 and bf16 features; fp32 features use
exact fp32 dots (input_precision="ieee": TF32 drifts ~1e-3 from PyTorch); P is rounded to the input
dtype before its tl.dot in fp16/bf16 (as FlashAttention does). Under TRITON_INTERPRET=1 tiles are
converted to fp32 right after tl.load because the interpreter computes bf16 incorrectly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import check_kernel_device, kernel_flags, next_power_of_2

# Masked logits: a large finite negative instead of -inf, so fully masked rows/columns give exp(0)
# (ignored by the masked stores) rather than NaN from (-inf) - (-inf).
_MASKED = -1.0e30


@triton.jit
def _logits_tile(
    A, stride_am, stride_ad, B, stride_bn, stride_bd,
    offs_m, offs_n, mask_m, mask_n, dim, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # scale * A[offs_m] @ B[offs_n]^T, K loop over the feature dimension; reads (BM + BN) * d elements
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, dim, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(A + offs_m[:, None] * stride_am + kk[None, :] * stride_ad,
                    mask=mask_m[:, None] & (kk[None, :] < dim), other=0.0)
        b = tl.load(B + offs_n[:, None] * stride_bn + kk[None, :] * stride_bd,
                    mask=mask_n[:, None] & (kk[None, :] < dim), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION)
    return acc * scale


@triton.jit
def _contrastive_fwd_kernel(
    ROW_MAX, ROW_SUM,
    COL_MAX, COL_SUM, stride_cb,
    I, stride_im, stride_id,
    T, stride_tn, stride_td,
    n_rows, n_cols, dim, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    m_i = tl.full((BLOCK_M,), _MASKED, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    col_base = pid.to(tl.int64) * stride_cb
    for n0 in range(0, n_cols, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_cols
        logits = _logits_tile(I, stride_im, stride_id, T, stride_tn, stride_td, offs_m, offs_n, mask_m, mask_n,
                              dim, scale, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION)
        logits = tl.where(mask_m[:, None] & mask_n[None, :], logits, _MASKED)
        # rows: online log-sum-exp
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
        m_i = m_new
        # columns: this row block's (max, sum-exp), merged across row blocks on the host
        c_max = tl.max(logits, 0)
        c_sum = tl.sum(tl.exp(logits - c_max[None, :]), 0)
        tl.store(COL_MAX + col_base + offs_n, c_max, mask=mask_n)
        tl.store(COL_SUM + col_base + offs_n, c_sum, mask=mask_n)
    # max and sum separately: the host forms lse = max + log(sum) in float64 (see _contrastive_forward)
    tl.store(ROW_MAX + offs_m, m_i, mask=mask_m)
    tl.store(ROW_SUM + offs_m, l_i, mask=mask_m)


@triton.jit
def _probabilities(logits, r_hi, r_lo, c_hi, c_lo, mask_m, mask_n):
    """P = softmax over the row + softmax over the column of a logits tile, from the saved log-sum-exps
    (hi + lo: (l - hi) is exact near the maximum, then lo restores the float64 statistic); 0 off the edges."""
    p = tl.exp((logits - r_hi[:, None]) - r_lo[:, None]) + tl.exp((logits - c_hi[None, :]) - c_lo[None, :])
    return tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)


@triton.jit
def _contrastive_bwd_rows_kernel(
    GT, stride_gm, stride_gd,
    I, stride_im, stride_id,
    T, stride_tn, stride_td,
    ROW_HI, ROW_LO, COL_HI, COL_LO,
    n_rows, n_cols, dim, scale, coef,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # GT[rows, dslice] = coef * sum_j P_ij T_j[dslice]   (the diagonal term is added on the host)
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mask_do = offs_do < dim
    r_hi = tl.load(ROW_HI + offs_m, mask=mask_m, other=0.0)
    r_lo = tl.load(ROW_LO + offs_m, mask=mask_m, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    for n0 in range(0, n_cols, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_cols
        logits = _logits_tile(I, stride_im, stride_id, T, stride_tn, stride_td, offs_m, offs_n, mask_m, mask_n,
                              dim, scale, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION)
        c_hi = tl.load(COL_HI + offs_n, mask=mask_n, other=0.0)
        c_lo = tl.load(COL_LO + offs_n, mask=mask_n, other=0.0)
        p = _probabilities(logits, r_hi, r_lo, c_hi, c_lo, mask_m, mask_n)
        t = tl.load(T + offs_n[:, None] * stride_tn + offs_do[None, :] * stride_td,
                    mask=mask_n[:, None] & mask_do[None, :], other=0.0)
        if UPCAST:
            t = t.to(tl.float32)
        acc += tl.dot(p.to(t.dtype), t, input_precision=DOT_PRECISION)
    offs = offs_m.to(tl.int64)[:, None] * stride_gm + offs_do[None, :] * stride_gd
    tl.store(GT + offs, acc * coef, mask=mask_m[:, None] & mask_do[None, :])


_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def _tiles(dim: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_DO, num_warps). One feature slice (no recompute) up to d = 256;
    above, 256-wide slices keep the BLOCK_M x BLOCK_DO fp32 accumulator within registers (64 x 256 on
    8 warps = 64 registers per thread). Not tuned on a GPU yet (see docs/BENCHMARKS.md)."""
    block_k = max(16, min(64, next_power_of_2(dim)))
    block_do = max(16, min(256, next_power_of_2(dim)))
    return 64, 64, block_k, block_do, 8 if block_do > 64 else 4


def _check(image: torch.Tensor, text: torch.Tensor) -> None:
    check_kernel_device(_contrastive_fwd_kernel, image, "contrastive loss")
    if image.dtype not in _SUPPORTED or text.dtype != image.dtype:
        raise TypeError(f"the Triton contrastive loss takes float32/float16/bfloat16 features of one dtype, "
                        f"got {image.dtype} and {text.dtype}")
    if image.dim() != 2 or text.dim() != 2 or image.shape[1] != text.shape[1]:
        raise ValueError(f"image and text features must be (rows, dim) with the same dim, got "
                         f"{tuple(image.shape)} and {tuple(text.shape)}")


def _contrastive_forward(image: torch.Tensor, text: torch.Tensor, scale: float):
    """Statistics of logits = scale * image @ text^T, float64 (as clipforge._C's): (row_lse (n),
    col_max (m), col_sum (m)); col_sum = sum_i exp(l_ij - col_max_j) over these image rows (partial
    across ranks). float64 because an lse is ~ the scale (<= 100): in fp32 its absolute error 100 * 6e-8
    would become a 6e-6 relative error of every probability in the backward. The kernel's outputs
    (max and sum-exp, each exact to fp32) are combined here, O(n + m * n / BLOCK_M) memory."""
    _check(image, text)
    n, dim = image.shape
    m = text.shape[0]
    bm, bn, bk, _, warps = _tiles(dim)
    f64 = dict(device=image.device, dtype=torch.float64)
    if n == 0 or m == 0:
        return torch.full((n,), float("-inf"), **f64), torch.full((m,), float("-inf"), **f64), torch.zeros(m, **f64)
    row_max = torch.empty(n, device=image.device, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    blocks = triton.cdiv(n, bm)
    part_max = torch.empty(blocks, m, device=image.device, dtype=torch.float32)  # per row block
    part_sum = torch.empty_like(part_max)
    _contrastive_fwd_kernel[(blocks,)](
        row_max, row_sum, part_max, part_sum, part_max.stride(0),
        image, image.stride(0), image.stride(1), text, text.stride(0), text.stride(1),
        n, m, dim, float(scale),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, **kernel_flags(_contrastive_fwd_kernel, image.dtype),
    )
    row_lse = row_max.double() + torch.log(row_sum.double())
    # Merge the row blocks, (blocks, m) -> (m), in place: float64 copies of the partials would take
    # 5 x 8 x m x n / BLOCK_M bytes (0.7 GB at n = m = 32k). Each term is rescaled to its column's max
    # (a factor <= 1), so the fp32 sum keeps fp32's relative precision; only the result goes to float64.
    col_max = part_max.amax(0)
    part_sum.mul_(part_max.sub_(col_max).exp_())
    return row_lse, col_max.double(), part_sum.sum(0).double()


def _split(x: torch.Tensor):
    """float64 -> (hi, lo) float32 with hi + lo ~ x: (l - hi) - lo keeps float64's precision where l ~ hi."""
    hi = x.float()
    return hi, (x - hi.double()).float()


def _contrastive_backward(image, text, scale: float, row_lse, col_lse, row_offset: int, coef: float):
    """(d_image, d_text, d_scale) of coef * [sum P - 2 sum_i l_{i, row_offset+i}] (see the module doc):
    row_lse, col_lse: float64. d_text is this image block's contribution only; all fp32."""
    _check(image, text)
    n, dim = image.shape
    m = text.shape[0]
    bm, bn, bk, bdo, warps = _tiles(dim)
    gt = torch.empty(n, dim, device=image.device, dtype=torch.float32)   # G T  (n, d)
    gti = torch.empty(m, dim, device=image.device, dtype=torch.float32)  # G^T I (m, d)
    if n and m:
        flags = kernel_flags(_contrastive_bwd_rows_kernel, image.dtype)
        row_stats, col_stats = _split(row_lse), _split(col_lse)

        def reduce_rows(out, a, b, a_stats, b_stats, block_a, block_b):
            # out[i] = coef * sum_j P_ij b_j over the rows i of `a`. P is symmetric in its two roles (row
            # and column softmax), so with text as `a` this is G^T I: one kernel serves both products.
            _contrastive_bwd_rows_kernel[(triton.cdiv(a.shape[0], block_a), triton.cdiv(dim, bdo))](
                out, out.stride(0), out.stride(1), a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1),
                *a_stats, *b_stats, a.shape[0], b.shape[0], dim, float(scale), float(coef),
                BLOCK_M=block_a, BLOCK_N=block_b, BLOCK_K=bk, BLOCK_DO=bdo, num_warps=warps, **flags)

        reduce_rows(gt, image, text, row_stats, col_stats, bm, bn)   # G T
        reduce_rows(gti, text, image, col_stats, row_stats, bn, bm)  # G^T I
    else:
        gt.zero_()
        gti.zero_()
    image32, text_diag32 = image.float(), text[row_offset:row_offset + n].float()
    gt.sub_(text_diag32, alpha=2.0 * coef)        # G T with the -2 coef delta term
    d_scale = torch.dot(image32.flatten(), gt.flatten())  # sum_ij G_ij <I_i, T_j>
    d_image = gt.mul_(scale)
    d_text = gti.mul_(scale)
    d_text[row_offset:row_offset + n].sub_(image32, alpha=2.0 * coef * scale)
    return d_image, d_text, d_scale


# Host entry points with the same signature as clipforge._C's: engine/loss.py's autograd function (single
# process and process groups) drives either; this file has no autograd function of its own.
contrastive_forward_stats = _contrastive_forward
contrastive_backward_grads = _contrastive_backward
