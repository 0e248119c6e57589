"""The ops switch: the one place that chooses an implementation for each hot op.

| op                | CUDA sm80+ (A100, H100)                   | CUDA sm70 / sm75 (V100, T4)       | CPU                 |
|-------------------|-------------------------------------------|-----------------------------------|---------------------|
| attention         | triton (fp16/bf16, head_dim <= 128),      | xformers if installed, else sdpa  | sdpa                |
|                   | else sdpa                                 |                                   |                     |
| contrastive_loss  | triton (fp16/bf16 features),              | chunked                           | cpp (clipforge._C), |
|                   | else chunked (fp32, float64)              |                                   | else chunked        |
| siglip_loss       | triton (fp16/bf16 features),              | chunked                           | cpp (clipforge._C), |
|                   | else chunked (fp32, float64)              |                                   | else chunked        |
| chunked_topk      | torch (blocked GEMM + top-k)              | torch                             | cpp (clipforge._C), |
|                   |                                           |                                   | else torch          |

- meta tensors (planning traces): attention takes a stand-in with the fused kernel's memory,
  whatever the backend (`_MetaAttention`: it saves q, k, v, the output and the (B, H, L) log-sum-exps,
  never the L x L matrix); `clipforge plan` traces models on the meta device through it.
- Triton on sm80+ only: current Triton's `tl.dot` has no tensor-core path on sm70 (and sm70 has no
  bf16), and nothing below sm80 is compile-gated (benchmarks/compile_gate.py), so there attention goes
  to the vendor kernels (xformers / SDPA) and the loss to "chunked": the same row-chunked algorithm as
  the fused loss in PyTorch GEMMs (cuBLAS fp16 tensor cores with fp32 results on V100). A forced
  "triton" on such a device is refused with one sentence.
- The two losses (softmax `contrastive_loss`, sigmoid `siglip_loss`) share one rule and one set of
  backends (CONTRASTIVE_BACKENDS): same table, same refusals, each with its own variable
  (CLIPFORGE_BACKEND_CONTRASTIVE_LOSS, CLIPFORGE_BACKEND_SIGLIP_LOSS).
- fp32 features never run exact-fp32 dots on Triton by default: the loss sends them to "chunked"
  (cuBLAS fp32 GEMMs, TF32 when the user enables it with torch.backends.cuda.matmul), attention to
  SDPA. Forced, the Triton loss runs 3xTF32 dots; forced fp32 attention runs exact dots with tiles
  that fit sm80's shared memory (benchmarks/compile_gate.py checks both). float64 never goes to
  Triton (refused when forced; "chunked" / "cpp" / "torch" take it).
- The training loop hands the loss its features in the model's precision (bf16 / fp16 under
  precision.dtype bf16 / fp16), so a GPU run takes the Triton row of the table.

`backend="auto"` picks by the table. A caller (e.g. the model config) may force a backend, and so may
the environment variable ``CLIPFORGE_BACKEND_<OP>`` (``CLIPFORGE_BACKEND_ATTENTION=sdpa``); an explicit
argument other than "auto" wins over the environment. Device capability is read when the op runs,
never at import (importing clipforge must work on a machine without a GPU or driver).
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch
import torch.nn.functional as F

from . import reference

ATTENTION_BACKENDS = ("auto", "triton", "sdpa", "xformers", "torch")
CONTRASTIVE_BACKENDS = ("auto", "triton", "chunked", "cpp", "torch")
TOPK_BACKENDS = ("auto", "cpp", "torch")
TRITON_MIN_CAPABILITY = (8, 0)  # tensor cores in current Triton; bf16


def _env_backend(op: str) -> str | None:
    value = os.environ.get(f"CLIPFORGE_BACKEND_{op.upper()}")
    return value.strip().lower() if value else None


def _check(op: str, backend: str, allowed: tuple[str, ...]) -> str:
    if backend not in allowed:
        raise ValueError(f"unknown backend {backend!r} for {op}; choose one of {', '.join(allowed)}")
    return backend


def _cuda_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=None)
def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _refuse_old_gpu(op: str, cap, other: str) -> None:
    if cap is not None and cap < TRITON_MIN_CAPABILITY:
        raise ValueError(f"the Triton {op} needs a GPU of compute capability 8.0 or newer, this one is "
                         f"sm{cap[0]}{cap[1]} (current Triton has no tensor-core path on V100 (sm70), and no target "
                         f"older than sm80 is compile-gated); use backend={other!r}, which serves it there")


def select_attention_backend(
    device: torch.device, backend: str = "auto", *, dtype: torch.dtype | None = None, head_dim: int | None = None
) -> str:
    """Resolve the attention backend for tensors on `device` (see the table above).

    On sm80+, "auto" picks Triton for the inputs it is fast on (fp16 / bf16, head_dim <= 128, when
    `dtype` / `head_dim` are given) and SDPA otherwise: fp32 would run exact-fp32 dots without tensor
    cores. A forced "triton" is refused on sm70 / sm75 and for float64.
    """
    backend = _check("attention", backend.lower(), ATTENTION_BACKENDS)
    if backend == "auto":
        backend = _check("attention", _env_backend("attention") or "auto", ATTENTION_BACKENDS)
    cap = _cuda_capability(device)
    if backend == "triton":
        _refuse_old_gpu("attention", cap, "xformers" if _has_module("xformers") else "sdpa")
        if dtype == torch.float64:
            raise ValueError("the Triton attention takes fp16 / bf16 / fp32 inputs, not float64; use backend='sdpa'")
    if backend != "auto":
        return backend
    if cap is None:
        return "sdpa"
    if cap >= TRITON_MIN_CAPABILITY:
        fits = dtype in (None, torch.float16, torch.bfloat16) and (head_dim is None or head_dim <= 128)
        return "triton" if fits else "sdpa"
    return "xformers" if _has_module("xformers") else "sdpa"


def _select_loss_backend(op: str, what: str, device: torch.device, backend: str, dtype, cpp) -> str:
    """The one rule of both fused losses (see the table): `op` names the environment variable, `what`
    the loss in refusals, `cpp` says whether clipforge._C serves it."""
    backend = _check(op, backend.lower(), CONTRASTIVE_BACKENDS)
    if backend == "auto":
        backend = _check(op, _env_backend(op) or "auto", CONTRASTIVE_BACKENDS)
    cap = _cuda_capability(device)
    if backend == "triton":
        _refuse_old_gpu(what, cap, "chunked")
        if dtype == torch.float64:
            raise ValueError(f"the Triton {what} never takes float64 features; use backend='chunked' "
                             "(any device) or 'cpp' (CPU)")
    if backend == "cpp" and not cpp:
        raise RuntimeError(f"the 'cpp' {what} backend needs clipforge._C (built from the current sources); build it "
                           "with `pip install --no-build-isolation -e .` or use backend='chunked'")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        half = dtype in (None, torch.float16, torch.bfloat16)
        return "triton" if cap >= TRITON_MIN_CAPABILITY and half else "chunked"
    return "cpp" if cpp else "chunked"


def select_contrastive_backend(device: torch.device, backend: str = "auto", *, dtype: torch.dtype | None = None) -> str:
    """Resolve the contrastive-loss backend for features of `dtype` on `device` (see the table above).

    "auto": triton for fp16 / bf16 (or unknown) features on CUDA sm80+, chunked for any other CUDA case
    (sm70 / sm75, fp32, float64), cpp on CPU (chunked when clipforge._C is not built). A forced "triton"
    is refused for float64 features and on sm70 / sm75.
    """
    return _select_loss_backend("contrastive_loss", "contrastive loss", device, backend, dtype,
                                cpp_extension() is not None)


def select_siglip_backend(device: torch.device, backend: str = "auto", *, dtype: torch.dtype | None = None) -> str:
    """Resolve the SigLIP-loss backend: the contrastive loss's rule (see the table above), with "cpp" only
    when clipforge._C has the sigmoid loss (an extension built from older sources has not: chunked)."""
    return _select_loss_backend("siglip_loss", "SigLIP loss", device, backend, dtype, _cpp_siglip() is not None)


def contrastive_kernels(backend: str):
    """The module that computes a resolved contrastive backend's forward statistics and backward:
    clipforge._C for "cpp", kernels.contrastive for "triton", None for "chunked" / "torch" (loss.py's
    own PyTorch code)."""
    return _loss_kernels(backend, cpp_extension, "contrastive")


def siglip_kernels(backend: str):
    """The module of a resolved SigLIP backend: clipforge._C for "cpp" (siglip_forward and
    siglip_forward_backward), kernels.siglip for "triton", None for "chunked" / "torch" (siglip_loss.py's
    own PyTorch code)."""
    return _loss_kernels(backend, _cpp_siglip, "siglip")


def _loss_kernels(backend: str, cpp, kernels: str):
    """Both losses' rule: cpp() (the extension, or None) for "cpp", the module kernels.<kernels> for
    "triton" (imported on first use: `import clipforge` loads no Triton), None otherwise."""
    if backend == "cpp":
        return cpp()
    if backend == "triton":
        return importlib.import_module(f"{__package__}.kernels.{kernels}")
    return None


def _cpp_siglip():
    ext = cpp_extension()  # warns once when the extension is not built
    if ext is None:
        return None
    if not hasattr(ext, "siglip_forward"):
        _warn_stale_extension("siglip_forward", "the SigLIP loss uses its 'chunked' PyTorch backend")
        return None
    return ext


def select_topk_backend(device: torch.device, backend: str = "auto") -> str:
    """Resolve the chunked top-k backend: "cpp" (clipforge._C, CPU float32 / float64) or "torch" (the
    same blocked loop in PyTorch, any device). "auto": cpp for CPU tensors when the extension has
    chunked_topk, torch otherwise; a forced "cpp" is refused on other devices or without the extension."""
    if backend not in TOPK_BACKENDS:
        raise ValueError(f"unknown retrieval backend {backend!r}; choose one of {', '.join(TOPK_BACKENDS)}")
    if backend == "torch":
        return "torch"
    if device.type != "cpu":
        if backend == "cpp":
            raise ValueError(f"backend='cpp' runs on CPU tensors only, got tensors on {device}")
        return "torch"
    if _cpp_topk() is not None:
        return "cpp"
    if backend == "cpp":
        raise RuntimeError("backend='cpp' needs clipforge._C.chunked_topk; build the extension or use backend='torch'")
    return "torch"


@functools.lru_cache(maxsize=None)
def cpp_extension():
    """The compiled `clipforge._C` module, or None (with a one-time warning) when it was not built."""
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        warnings.warn(
            f"clipforge._C is not built ({exc}); the CPU contrastive loss falls back to the 'chunked' PyTorch "
            "backend and retrieval to its PyTorch chunked top-k. "
            "Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return _C


class _MetaAttention(torch.autograd.Function):
    """Attention on meta tensors (planning traces): what the fused kernels keep for backward, and no more.

    Every fused kernel the table picks (Triton, SDPA-flash / -efficient, xformers) saves q, k, v, the
    output and the (B, H, L) row log-sum-exps in fp32, never the L x L probabilities that SDPA's math
    path (which meta tensors would otherwise take) keeps. The output is laid out (B, L, H, d) in memory,
    as those kernels write it, so the model's transpose + reshape after attention is a view. `causal` is
    kept on the node, as a kernel keeps it for backward (clipforge plan counts attention FLOPs from it).
    """

    @staticmethod
    def forward(ctx, q, k, v, causal):
        b, h, s, _ = q.shape
        out = q.new_empty(b, s, h, v.shape[-1]).transpose(1, 2)  # (B, H, L, d) view of a (B, L, H, d) buffer
        lse = q.new_empty(b, h, s, dtype=torch.float32)
        ctx.causal = causal
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None


def attention(q, k, v, *, causal: bool = False, softmax_scale: float | None = None, backend: str = "auto"):
    """Scaled dot-product attention.

    q, k, v: (batch, heads, seq, head_dim). Returns (batch, heads, seq, head_dim).
    """
    name = select_attention_backend(q.device, backend, dtype=q.dtype, head_dim=q.shape[-1])
    if q.device.type == "meta":  # no kernel runs on meta tensors: model the fused kernels' memory
        return _MetaAttention.apply(q, k, v, causal)
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale)
    if name == "torch":
        return reference.attention(q, k, v, causal=causal, softmax_scale=softmax_scale)
    if name == "triton":  # the kernel refuses a device it cannot run on (kernels.utils.check_kernel_device)
        from .kernels.attention import attention as triton_attention

        return triton_attention(q, k, v, causal=causal, softmax_scale=softmax_scale)
    if name == "xformers":
        import xformers.ops as xops

        # xformers takes (batch, seq, heads, head_dim)
        bias = xops.LowerTriangularMask() if causal else None
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=softmax_scale
        )
        return out.transpose(1, 2)
    raise AssertionError(name)


# ---------------------------------------------------------------------------------------- top-k
# Automatic blocks: up to 16,384 candidate columns, and as many query rows as keep one block of scores
# near 8 MB (the C++ side uses the same numbers).
_AUTO_COLS = 16384
_AUTO_BLOCK_BYTES = 8 << 20


def _auto_rows(cols: int, elem_size: int) -> int:
    rows = _AUTO_BLOCK_BYTES // max(1, cols * elem_size)
    if rows > 64:
        rows -= rows % 64  # GEMM-friendly multiple of 64
    return max(1, rows)


def _torch_chunked_topk(a: torch.Tensor, b: torch.Tensor, k: int, row_chunk: int, col_chunk: int):
    n, m = a.shape[0], b.shape[0]
    cols = min(m, col_chunk or _AUTO_COLS)
    rows = min(n, row_chunk or _auto_rows(cols, a.element_size())) if n else 1
    values = a.new_empty(n, k)
    indices = torch.empty(n, k, dtype=torch.long, device=a.device)
    for r0 in range(0, n, rows):
        a_c = a[r0 : r0 + rows]
        best_v = best_i = None
        for c0 in range(0, m, cols):
            block = a_c @ b[c0 : c0 + cols].t()  # (rows, cols): the only score storage
            v, i = block.topk(min(k, block.shape[1]), dim=1)
            i += c0
            if best_v is None:
                best_v, best_i = v, i
            else:  # merge: top-k of the 2k candidates
                cand_v, cand_i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
                best_v, pos = cand_v.topk(min(k, cand_v.shape[1]), dim=1)
                best_i = cand_i.gather(1, pos)
        values[r0 : r0 + rows] = best_v
        indices[r0 : r0 + rows] = best_i
    return values, indices


def _cpp_topk():
    ext = cpp_extension()  # warns once when the extension is not built
    if ext is None:
        return None
    fn = getattr(ext, "chunked_topk", None)
    if fn is None:
        _warn_stale_extension("chunked_topk", "retrieval uses the PyTorch chunked top-k")
    return fn


_warned_stale: set[str] = set()


def _warn_stale_extension(name: str, fallback: str):
    """One warning per missing function of an extension built from older sources."""
    if name not in _warned_stale:
        _warned_stale.add(name)
        warnings.warn(
            f"clipforge._C has no {name} (built from older sources); {fallback}. "
            "Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=4,
        )


def chunked_topk(a: torch.Tensor, b: torch.Tensor, k: int, *, chunk_size: int | None = None,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest scores of every row of a @ bᵀ, never holding more than one block of it.

    a: (n, d) queries, b: (m, d) candidates, 1 <= k <= m. Returns (values (n, k), indices (n, k) int64),
    best first. chunk_size: side of the (queries x candidates) block scored at once (None = automatic,
    about 8 MB). backend: "cpp" (CPU float32/float64 through clipforge._C), "torch", or "auto" (cpp for
    CPU tensors when the extension is built, torch otherwise).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"chunked_topk needs a (n, d) and b (m, d) with the same d, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not 1 <= k <= b.shape[0]:
        raise ValueError(f"k must be in [1, {b.shape[0]}] (the number of candidates), got {k}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows/columns (or None), got {chunk_size}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device, got {a.device} and {b.device}")
    name = select_topk_backend(a.device, backend)
    if a.dtype != b.dtype:
        dtype = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dtype), b.to(dtype)
    side = chunk_size or 0
    with torch.no_grad():
        if name == "cpp":
            if a.dtype not in (torch.float32, torch.float64):  # fp16/bf16 GEMMs on CPU are slow anyway
                a, b = a.float(), b.float()
            return _cpp_topk()(a.contiguous(), b.contiguous(), k, side, side)
        return _torch_chunked_topk(a, b, k, side, side)
