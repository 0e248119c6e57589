"""Fused scaled dot-product attention in Triton, forward and backward (FlashAttention-2).

Forward (Dao, "FlashAttention-2", 2023, Algorithm 1): each program owns BLOCK_M queries and streams
the keys and values BLOCK_N at a time with an online softmax, so the (seq x seq) score matrix never
reaches memory. Only the output O and the per-row log-sum-exp L are saved.

Backward (Algorithm 2, split like the FlashAttention-2 Triton kernels, no atomics):
  1. preprocess: delta_i = sum_d dO_id * O_id                              (one pass over O and dO)
  2. dK/dV: a program owns BLOCK_N keys; for every query tile it recomputes P = exp(S - L) and
     accumulates dV += P^T dO, dS = P * (dO V^T - delta), dK += dS^T Q
  3. dQ: a program owns BLOCK_M queries; for every key tile it recomputes P and dS and accumulates
     dQ += dS K.
  Memory traffic per (batch, head): forward reads Q, K, V once per query tile and writes O and L;
  the backward reads Q, dO, L, delta once per key tile and K, V once per query tile.
  When one tile holds every query and key (CLIP's 50 and 77 tokens), a single fused kernel does
  steps 1-3 at once, computing P and dS once instead of twice.

Scores are kept in base 2: S2 = Q K^T * (softmax_scale * log2(e)), so the kernels call exp2 (one
MUFU instruction) instead of exp; L is stored in the same base-2 units (L2 = max + log2(sum)).

Numerics: dot products accumulate in fp32 and the softmax statistics are fp32. P and dS are rounded to
the input dtype before their tl.dot (as FlashAttention does) so the tensor cores run at full rate.
Under TRITON_INTERPRET=1 the loaded tiles are converted to fp32 right after tl.load, because the
interpreter computes bf16 incorrectly.

Causal masking follows the square self-attention case (query i sees keys 0..i); a causal call with
different query and key lengths is rejected rather than guessing an alignment.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .utils import (
    attention_tiles,
    check_kernel_device,
    cuda_capability,
    kernel_flags,
    next_power_of_2,
)

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)


@triton.jit
def _attention_fwd_kernel(
    O, stride_ob, stride_oh, stride_om, stride_od,
    LSE,
    Q, stride_qb, stride_qh, stride_qm, stride_qd,
    K, stride_kb, stride_kh, stride_kn, stride_kd,
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    num_heads, seqlen_q, seqlen_k, qk_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # grid: (batch * heads, cdiv(seqlen_q, BLOCK_M)); batch*heads on axis 0, whose limit is 2^31.
    pid_bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    # (batch, head) offsets in int64: batch * stride_b can pass 2^31 at large batch.
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    O += off_b * stride_ob + off_h * stride_oh
    LSE += pid_bh.to(tl.int64) * seqlen_q

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM  # all-true (and folded away) when head_dim is a power of two >= 16
    mask_m = offs_m < seqlen_q

    # read BLOCK_M x d of Q once; it stays in registers for the whole key loop
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base-2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # causal: key tiles past the last query of this tile are fully masked, skip them
    if CAUSAL:
        hi = tl.minimum(seqlen_k, start_m + BLOCK_M)
    else:
        hi = seqlen_k
    # The first key tile holds key 0, which every query row sees, so m_i is finite after one step
    # and exp2(m_i - m_new) never meets (-inf) - (-inf).
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < seqlen_k
        # read 2 x BLOCK_N x d (K and V tiles)
        k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        valid = mask_n[None, :]
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= cols[None, :])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    # write BLOCK_M x d of O and BLOCK_M floats of L
    tl.store(LSE + offs_m, m_i + tl.log2(l_i), mask=mask_m)
    tl.store(O + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, acc.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _attention_bwd_preprocess_kernel(
    DELTA,
    O, stride_ob, stride_oh, stride_om, stride_od,
    DO, stride_dob, stride_doh, stride_dom, stride_dod,
    num_heads, seqlen_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # delta_i = rowsum(dO * O) = rowsum(P * dP): the softmax-backward term shared by dK and dQ.
    # read 2 x BLOCK_M x d; write BLOCK_M floats
    pid_bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    mask_m = offs_m < seqlen_q
    mask = mask_m[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * seqlen_q + offs_m, tl.sum(o * do, 1), mask=mask_m)


@triton.jit
def _attention_bwd_dkdv_kernel(
    DK, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    DV, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    Q, stride_qb, stride_qh, stride_qm, stride_qd,
    K, stride_kb, stride_kh, stride_kn, stride_kd,
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    DO, stride_dob, stride_doh, stride_dom, stride_dod,
    LSE, DELTA,
    num_heads, seqlen_q, seqlen_k, softmax_scale, qk_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # grid: (batch * heads, cdiv(seqlen_k, BLOCK_N)); this program owns keys [start_n, start_n + BLOCK_N).
    pid_bh = tl.program_id(0)
    start_n = tl.program_id(1) * BLOCK_N
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    DK += off_b * stride_dkb + off_h * stride_dkh
    DV += off_b * stride_dvb + off_h * stride_dvh
    LSE += pid_bh.to(tl.int64) * seqlen_q
    DELTA += pid_bh.to(tl.int64) * seqlen_q

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_n = offs_n < seqlen_k
    mask_nd = mask_n[:, None] & mask_d[None, :]
    # read BLOCK_N x d of K and of V once; they stay resident for the whole query loop
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask_nd, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=mask_nd, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # causal: queries before start_n see none of these keys; start at the query tile holding start_n
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
    else:
        lo = 0
    for start_m in range(lo, seqlen_q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seqlen_q
        mask_md = mask_m[:, None] & mask_d[None, :]
        # read 2 x BLOCK_M x d (Q, dO) and 2 x BLOCK_M floats (L, delta)
        q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=mask_md, other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=mask_md, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=mask_m, other=0.0)
        # work transposed, (BLOCK_N, BLOCK_M), so dV and dK come out of tl.dot without a transpose
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.exp2(s_t - lse[None, :])
        valid = mask_m[None, :]
        if CAUSAL:
            valid = valid & (offs_m[None, :] >= offs_n[:, None])
        p_t = tl.where(valid, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    dk = dk * softmax_scale  # dS was taken w.r.t. the scaled scores
    # write 2 x BLOCK_N x d
    tl.store(DK + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _attention_bwd_dq_kernel(
    DQ, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    Q, stride_qb, stride_qh, stride_qm, stride_qd,
    K, stride_kb, stride_kh, stride_kn, stride_kd,
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    DO, stride_dob, stride_doh, stride_dom, stride_dod,
    LSE, DELTA,
    num_heads, seqlen_q, seqlen_k, softmax_scale, qk_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # grid: (batch * heads, cdiv(seqlen_q, BLOCK_M)); this program owns queries [start_m, start_m + BLOCK_M).
    pid_bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    DQ += off_b * stride_dqb + off_h * stride_dqh
    LSE += pid_bh.to(tl.int64) * seqlen_q
    DELTA += pid_bh.to(tl.int64) * seqlen_q

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_m = offs_m < seqlen_q
    mask_md = mask_m[:, None] & mask_d[None, :]
    # read 2 x BLOCK_M x d (Q, dO) and 2 x BLOCK_M floats once
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=mask_md, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=mask_md, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        hi = tl.minimum(seqlen_k, start_m + BLOCK_M)
    else:
        hi = seqlen_k
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < seqlen_k
        mask_nd = mask_n[:, None] & mask_d[None, :]
        # read 2 x BLOCK_N x d (K, V)
        k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask_nd, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=mask_nd, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        valid = mask_n[None, :]
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= cols[None, :])
        p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    dq = dq * softmax_scale
    # write BLOCK_M x d
    tl.store(DQ + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=mask_md)


@triton.jit
def _attention_bwd_fused_kernel(
    DQ, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    DK, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    DV, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    Q, stride_qb, stride_qh, stride_qm, stride_qd,
    K, stride_kb, stride_kh, stride_kn, stride_kd,
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    O, stride_ob, stride_oh, stride_om, stride_od,
    DO, stride_dob, stride_doh, stride_dom, stride_dod,
    LSE,
    num_heads, seqlen_q, seqlen_k, softmax_scale, qk_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # The whole backward of one (batch, head) in one program, when every query and key fits in one
    # tile (CLIP's 50 / 77 tokens): P and dS are computed once and give dQ, dK and dV together (5 dots
    # instead of the split path's 7), delta comes from the same tiles, one launch replaces three, and
    # there are no atomics (the program owns its (batch, head)). A variant that loops over query tiles
    # with K/V resident uses more registers, not fewer (its dK/dV accumulators live across the loop).
    # grid: (batch * heads,). read 5 x S x d (Q, K, V, O, dO) + S floats (L); write 3 x S x d
    pid_bh = tl.program_id(0)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_m = offs_m < seqlen_q
    mask_n = offs_n < seqlen_k
    mask_md = mask_m[:, None] & mask_d[None, :]
    mask_nd = mask_n[:, None] & mask_d[None, :]
    row_q = offs_m[:, None]
    row_k = offs_n[:, None]
    col = offs_d[None, :]

    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + row_q * stride_qm + col * stride_qd, mask=mask_md, other=0.0)
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + row_k * stride_kn + col * stride_kd, mask=mask_nd, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + row_k * stride_vn + col * stride_vd, mask=mask_nd, other=0.0)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + row_q * stride_om + col * stride_od, mask=mask_md, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + row_q * stride_dom + col * stride_dod,
                 mask=mask_md, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * seqlen_q + offs_m, mask=mask_m, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # rowsum(dO * O), as the preprocess kernel

    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
    valid = mask_m[:, None] & mask_n[None, :]
    if CAUSAL:
        valid = valid & (offs_m[:, None] >= offs_n[None, :])
    p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)  # (BLOCK_N, d)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
    ds = (p * (dp - delta[:, None])).to(q.dtype)
    dq = tl.dot(ds, k, input_precision=DOT_PRECISION) * softmax_scale  # (BLOCK_M, d)
    dk = tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION) * softmax_scale  # (BLOCK_N, d)

    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + row_q * stride_dqm + col * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=mask_md)
    tl.store(DK + off_b * stride_dkb + off_h * stride_dkh + row_k * stride_dkn + col * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + off_b * stride_dvb + off_h * stride_dvh + row_k * stride_dvn + col * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=mask_nd)


def _empty_bhsd(batch: int, heads: int, seq: int, head_dim: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised (batch, heads, seq, head_dim) tensor stored as (batch, seq, heads, head_dim).

    That is the layout the model's attention reads its output in (`out.transpose(1, 2).reshape(n, l, d)`
    becomes a free view) and the layout of the packed qkv projection its gradients flow back into.
    """
    return torch.empty(batch, seq, heads, head_dim, dtype=like.dtype, device=like.device).transpose(1, 2)


def _attention_forward(q, k, v, causal: bool, softmax_scale: float):
    """Launch the forward kernel. Returns O (batch, heads, seq_q, d) and L (batch, heads, seq_q), fp32, base 2."""
    batch, heads, seqlen_q, head_dim = q.shape
    seqlen_k = k.shape[2]
    o = _empty_bhsd(batch, heads, seqlen_q, head_dim, q)
    lse = torch.empty(batch, heads, seqlen_q, dtype=torch.float32, device=q.device)
    tiles = attention_tiles("fwd", head_dim, seqlen_q, seqlen_k, cuda_capability(q.device), q.dtype == torch.float32)
    grid = (batch * heads, triton.cdiv(seqlen_q, tiles.block_m))
    _attention_fwd_kernel[grid](
        o, *o.stride(),
        lse,
        q, *q.stride(),
        k, *k.stride(),
        v, *v.stride(),
        heads, seqlen_q, seqlen_k, softmax_scale * LOG2E,
        CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_D=max(16, next_power_of_2(head_dim)),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        **kernel_flags(_attention_fwd_kernel, q.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return o, lse


def _attention_backward(do, q, k, v, o, lse, causal: bool, softmax_scale: float):
    """Launch the backward: one fused kernel when a tile holds the sequence, else delta + dK/dV + dQ.

    Returns dQ, dK, dV with the shapes of q, k, v.
    """
    batch, heads, seqlen_q, head_dim = q.shape
    seqlen_k = k.shape[2]
    block_d = max(16, next_power_of_2(head_dim))
    flags = kernel_flags(_attention_bwd_dq_kernel, q.dtype)
    capability = cuda_capability(q.device)
    fp32 = q.dtype == torch.float32
    dq = _empty_bhsd(batch, heads, seqlen_q, head_dim, q)
    dk = _empty_bhsd(batch, heads, seqlen_k, head_dim, k)
    dv = _empty_bhsd(batch, heads, seqlen_k, head_dim, v)

    tiles = attention_tiles("bwd_fused", head_dim, seqlen_q, seqlen_k, capability, fp32)
    if tiles is not None:  # one tile holds every query and key: single-kernel backward
        _attention_bwd_fused_kernel[(batch * heads,)](
            dq, *dq.stride(),
            dk, *dk.stride(),
            dv, *dv.stride(),
            q, *q.stride(),
            k, *k.stride(),
            v, *v.stride(),
            o, *o.stride(),
            do, *do.stride(),
            lse,
            heads, seqlen_q, seqlen_k, softmax_scale, softmax_scale * LOG2E,
            CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, **flags,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )
        return dq, dk, dv

    delta = torch.empty_like(lse)

    pre_block_m = 64
    _attention_bwd_preprocess_kernel[(batch * heads, triton.cdiv(seqlen_q, pre_block_m))](
        delta,
        o, *o.stride(),
        do, *do.stride(),
        heads, seqlen_q,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=pre_block_m,
    )
    tiles = attention_tiles("bwd_dkdv", head_dim, seqlen_q, seqlen_k, capability, fp32)
    _attention_bwd_dkdv_kernel[(batch * heads, triton.cdiv(seqlen_k, tiles.block_n))](
        dk, *dk.stride(),
        dv, *dv.stride(),
        q, *q.stride(),
        k, *k.stride(),
        v, *v.stride(),
        do, *do.stride(),
        lse, delta,
        heads, seqlen_q, seqlen_k, softmax_scale, softmax_scale * LOG2E,
        CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, **flags,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    tiles = attention_tiles("bwd_dq", head_dim, seqlen_q, seqlen_k, capability, fp32)
    _attention_bwd_dq_kernel[(batch * heads, triton.cdiv(seqlen_q, tiles.block_m))](
        dq, *dq.stride(),
        q, *q.stride(),
        k, *k.stride(),
        v, *v.stride(),
        do, *do.stride(),
        lse, delta,
        heads, seqlen_q, seqlen_k, softmax_scale, softmax_scale * LOG2E,
        CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, **flags,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    """Autograd glue: saves q, k, v, O and L; the backward recomputes the probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, softmax_scale: float):
        o, lse = _attention_forward(q, k, v, causal, softmax_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        ctx.softmax_scale = softmax_scale
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _attention_backward(do, q, k, v, o, lse, ctx.causal, ctx.softmax_scale)
        return dq, dk, dv, None, None


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def attention(q, k, v, *, causal: bool = False, softmax_scale: float | None = None):
    """Fused attention: softmax(q kᵀ · softmax_scale [+ causal mask]) v, differentiable in q, k, v.

    q: (batch, heads, seqlen_q, head_dim)
    k, v: (batch, heads, seqlen_k, head_dim)
    returns: (batch, heads, seqlen_q, head_dim), in q's dtype (stored as (batch, seqlen_q, heads, head_dim)
    in memory, so `out.transpose(1, 2)` is contiguous).

    causal: query i attends to keys 0..i (needs seqlen_q == seqlen_k).
    softmax_scale: defaults to 1 / sqrt(head_dim).
    dtypes: fp16 and bf16 (fp32 accumulation) on CUDA sm80+; fp32 also runs (exact fp32 dots, slow on
    GPU, what the interpreter tests use). head_dim <= 128. Any strides; no sequence-length limits.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects q, k, v of shape (batch, heads, seq, head_dim); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            "attention needs k and v of equal shape and q, k sharing batch, heads and head_dim; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise TypeError(f"attention needs q, k, v of one dtype among fp16, bf16, fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention needs q, k, v on one device; got {q.device}, {k.device}, {v.device}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention needs as many queries as keys; got {q.shape[2]} and {k.shape[2]}")
    if q.shape[2] == 0 or k.shape[2] == 0 or q.shape[0] * q.shape[1] == 0:
        raise ValueError(f"attention needs non-empty inputs; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    head_dim = q.shape[3]
    if head_dim > 128:
        raise ValueError(f"the Triton attention supports head_dim up to 128, got {head_dim}; use backend='sdpa'")
    check_kernel_device(_attention_fwd_kernel, q, "attention")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    return AttentionFunction.apply(q, k, v, bool(causal), float(softmax_scale))
