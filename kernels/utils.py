"""Shared helpers of the Triton kernels: device checks, interpreter detection, tile-size heuristics.

One home for each helper (STYLE.md, habit 3): kernels import these, never copy them. Nothing here runs
at import time: the device is inspected when an op is called.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import triton

__all__ = [
    "TileConfig",
    "attention_tiles",
    "check_kernel_device",
    "cuda_capability",
    "dot_precision",
    "is_interpreted",
    "kernel_flags",
    "multiprocessor_count",
    "next_power_of_2",
]


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(n)


def is_interpreted(kernel) -> bool:
    """True when `kernel` (a `@triton.jit` function) runs through the Triton interpreter.

    `@triton.jit` reads TRITON_INTERPRET when the kernel is *decorated* (at import), so the environment
    variable at call time says nothing: ask the kernel object itself.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def check_kernel_device(kernel, tensor: torch.Tensor, op: str, other: str = "sdpa") -> None:
    """Raise one clear sentence when `kernel` cannot run on `tensor`'s device (`other`: the backend that
    serves the op there)."""
    if tensor.device.type == "cuda" or is_interpreted(kernel):
        return
    raise RuntimeError(
        f"the Triton {op} kernel needs CUDA tensors, got a tensor on {tensor.device}; for CPU testing set "
        f"TRITON_INTERPRET=1 before triton is first imported, or use the {other!r} backend"
    )


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None for any other device (e.g. CPU under the interpreter)."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (grid heuristics size their launches by it); 4 for any
    other device, so that interpreter runs on CPU exercise the same multi-program split as a GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def dot_precision(dtype: torch.dtype, fp32_precision: str = "ieee") -> str:
    """`tl.dot` input precision: `fp32_precision` for fp32 operands ("ieee": exact FMA dots, no tensor
    cores; "tf32x3": near-fp32 on the tensor cores), the default ("tf32", a no-op for fp16/bf16 operands,
    which always use the tensor cores with an fp32 accumulator) otherwise."""
    return fp32_precision if dtype == torch.float32 else "tf32"


def kernel_flags(kernel, dtype: torch.dtype, fp32_precision: str = "ieee") -> dict:
    """The UPCAST / DOT_PRECISION constexprs of a launch. UPCAST: under the interpreter, which computes
    bf16 incorrectly, tiles are converted to fp32 right after tl.load."""
    return {"UPCAST": is_interpreted(kernel), "DOT_PRECISION": dot_precision(dtype, fp32_precision)}


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Block sizes and launch options of one Triton kernel launch."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    block_k: int | None = None  # the K loop's tile, for kernels that have one (the loss)


def attention_tiles(
    kind: str, head_dim: int, seqlen_q: int, seqlen_k: int, capability: tuple[int, int] | None = None,
    fp32: bool = False,
) -> TileConfig | None:
    """Tile sizes of the fused attention kernels, picked by a heuristic (no autotuning).

    kind: "fwd" (BLOCK_M queries x BLOCK_N keys), "bwd_dkdv" (a program owns BLOCK_N keys and walks the
    queries BLOCK_M at a time), "bwd_dq" (a program owns BLOCK_M queries and walks the keys), or
    "bwd_fused" (one program owns a whole (batch, head); None when it does not fit, and the backward
    takes the split path). capability: the CUDA device's (major, minor); None (CPU, interpreter) is
    treated as the newest architecture.

    Why these numbers (FlashAttention-2 on sm80/sm90 with Triton, CLIP's short sequences):
    - CLIP's sequences are 50, 77, 197, 257 and 577 tokens. Up to 128 keys fit in one K/V tile at
      head_dim <= 64, so the inner loop of seq 50 / 77 runs once: no pipelining is needed
      (num_stages=1 saves shared memory and lets more programs share an SM).
    - BLOCK_M = 64 when the whole sequence fits in it (seq 50: 64 instead of 128 halves the wasted
      rows), 128 otherwise to reuse each K/V tile across more queries.
    - head_dim 128 halves BLOCK_N (and the backward tiles) to keep the fp32 accumulators, the score
      tile and the K/V tiles within registers and shared memory; it takes 8 warps.
    - The backward splits work like FlashAttention-2 (no atomics): the dK/dV program keeps a large
      key tile resident (BLOCK_N 128 / 64) and streams small query tiles (BLOCK_M 32), the dQ program
      the opposite. When one tile holds the whole sequence, "bwd_fused" replaces the three backward
      kernels by one (see its limits below).
    - Checked without a GPU by `benchmarks/compile_gate.py` (compiles every CLIP shape for
      sm80 and sm90): no register spills, shared memory <= 112 KiB (head_dim 64) / 128 KiB (128).
    tl.dot needs every block dimension >= 16.
    fp32: fp32 operands (only when the Triton backend is forced; ops sends fp32 to SDPA), whose exact
    dots run on the FMA units with operands held in registers: small tiles on a GPU (see
    _fp32_attention_tiles). Under the interpreter (capability None) fp32 keeps the tiles above: it has
    no registers to spill, and CPU tests of small tiles set them explicitly.
    """
    if head_dim > 128:
        raise ValueError(f"head_dim {head_dim} is not supported by the Triton attention (at most 128)")
    if fp32 and capability is not None:
        return _fp32_attention_tiles(kind, head_dim, seqlen_q, seqlen_k)
    big_head = head_dim > 64
    if kind == "fwd":
        block_m = 64 if seqlen_q <= 64 else 128
        block_n = 64 if (big_head or seqlen_k <= 64) else 128
        # head_dim 128 on 4 warps reaches sm80's 255-register cap at 64 x 64
        num_warps = 8 if (big_head or (block_m == 128 and block_n == 128)) else 4
        num_stages = 1 if seqlen_k <= block_n else 3
        return TileConfig(block_m, block_n, num_warps, num_stages)
    if kind == "bwd_fused":
        # One program per (batch, head) holding every query and key. Limits from
        # benchmarks/compile_gate.py (bf16; register counts in docs/BENCHMARKS.md): up to 64 tokens fits
        # without spills on sm80 and sm90 at head_dim 64 and 128; 128 x 128 tiles at head_dim 64 fit on
        # sm90 but spill on sm80, so sm80 takes the split path for 77 tokens.
        # CLIPFORGE_ATTENTION_FUSED_BWD=0 forces the split path (to compare).
        if os.environ.get("CLIPFORGE_ATTENTION_FUSED_BWD", "1") == "0":
            return None
        newest = capability is None or capability >= (9, 0)
        limit = 128 if (newest and not big_head) else 64
        if seqlen_q > limit or seqlen_k > limit:
            return None
        block_m = max(16, next_power_of_2(seqlen_q))
        block_n = max(16, next_power_of_2(seqlen_k))
        num_warps = 8 if (big_head or block_m * block_n > 64 * 64) else 4
        return TileConfig(block_m, block_n, num_warps, 1)
    if kind == "bwd_dkdv":
        block_n = 64 if (big_head or seqlen_k <= 64) else 128
        block_m = 32
        # 4 warps hold 255 registers per thread at head_dim 128 and spill on sm80
        num_warps = 8 if (block_n == 128 or big_head) else 4
        num_stages = 1 if seqlen_q <= block_m else 2
        return TileConfig(block_m, block_n, num_warps, num_stages)
    if kind == "bwd_dq":
        block_m = 64 if (big_head or seqlen_q <= 64) else 128
        block_n = 32 if big_head else 64
        num_warps = 8 if block_m == 128 else 4
        # always 2 stages: with 1, ptxas on sm80 uses all 255 registers and spills at 64 x 64
        # (benchmarks/compile_gate.py), even when the key loop runs once
        num_stages = 2
        return TileConfig(block_m, block_n, num_warps, num_stages)
    raise ValueError(f"unknown attention kernel kind {kind!r}; choose fwd, bwd_dkdv, bwd_dq or bwd_fused")


def _fp32_attention_tiles(kind: str, head_dim: int, seqlen_q: int, seqlen_k: int) -> TileConfig | None:
    """Tiles for fp32 operands. Exact fp32 dots have no tensor-core layout: Triton keeps both operand
    tiles in registers, so the bf16 tiles spill heavily there and their pipelined key loop overflows
    sm80's shared memory (figures: docs/BENCHMARKS.md, "Attention"). 32-key tiles on 4 warps, no fused
    backward; benchmarks/compile_gate.py checks them for sm80 and sm90."""
    if kind == "bwd_fused":
        return None
    big_head = head_dim > 64
    if kind == "fwd":
        # one stage: the FMA dots are the bottleneck, not the loads, and two stages spilled on sm90
        # (Triton 3.6, 77 causal tokens)
        block_m, block_n = (16, 16) if big_head else (32, 32)
        return TileConfig(block_m, block_n, 4, 1)
    if kind == "bwd_dkdv":
        return TileConfig(16, 16 if big_head else 32, 4, 1 if seqlen_q <= 16 else 2)
    if kind == "bwd_dq":
        return TileConfig(32, 16 if big_head else 32, 4, 2)
    raise ValueError(f"unknown attention kernel kind {kind!r}; choose fwd, bwd_dkdv, bwd_dq or bwd_fused")
