"""The ops switch: the one place that chooses an implementation for each hot op.

| op                 | CUDA sm80+ (A100, H100) | CUDA sm70 (V100)                     | CPU                         |
|--------------------|-------------------------|--------------------------------------|-----------------------------|
| attention          | triton                  | xformers if installed, else sdpa     | sdpa                        |
| contrastive_loss   | triton                  | triton (fp16)                        | cpp (clipforge._C), else torch |

V100 goes to xformers / SDPA for attention because current Triton's `tl.dot` has no tensor-core path
on sm70 (and sm70 has no bf16), so a Triton FlashAttention there is slower than the vendor kernels.

`backend="auto"` picks by the table. A caller (e.g. the model config) may force a backend, and so may
the environment variable ``CLIPFORGE_BACKEND_<OP>`` (``CLIPFORGE_BACKEND_ATTENTION=sdpa``); an explicit
argument other than "auto" wins over the environment. Device capability is read when the op runs,
never at import (importing clipforge must work on a machine without a GPU or driver).
"""
from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F

from . import reference

ATTENTION_BACKENDS = ("auto", "triton", "sdpa", "xformers", "torch")
CONTRASTIVE_BACKENDS = ("auto", "triton", "cpp", "torch")


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


def select_attention_backend(
    device: torch.device, backend: str = "auto", *, dtype: torch.dtype | None = None, head_dim: int | None = None
) -> str:
    """Resolve the attention backend for tensors on `device` (see the table above).

    On sm80+, "auto" picks Triton for the inputs it is fast on (fp16 / bf16, head_dim <= 128, when
    `dtype` / `head_dim` are given) and SDPA otherwise: fp32 would run exact-fp32 dots without tensor cores.
    """
    backend = _check("attention", backend.lower(), ATTENTION_BACKENDS)
    if backend == "auto":
        backend = _check("attention", _env_backend("attention") or "auto", ATTENTION_BACKENDS)
    if backend != "auto":
        return backend
    cap = _cuda_capability(device)
    if cap is None:
        return "sdpa"
    if cap >= (8, 0):
        fits = dtype in (None, torch.float16, torch.bfloat16) and (head_dim is None or head_dim <= 128)
        return "triton" if fits else "sdpa"
    return "xformers" if _has_module("xformers") else "sdpa"


def select_contrastive_backend(device: torch.device, backend: str = "auto") -> str:
    """Resolve the contrastive-loss backend for features on `device` (see the table above)."""
    backend = _check("contrastive_loss", backend.lower(), CONTRASTIVE_BACKENDS)
    if backend == "auto":
        backend = _check("contrastive_loss", _env_backend("contrastive_loss") or "auto", CONTRASTIVE_BACKENDS)
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "triton"
    return "cpp" if cpp_extension() is not None else "torch"


@functools.lru_cache(maxsize=None)
def cpp_extension():
    """The compiled `clipforge._C` module, or None (with a one-time warning) when it was not built."""
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        warnings.warn(
            f"clipforge._C is not built ({exc}); falling back to the PyTorch reference. "
            "Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return _C


def attention(q, k, v, *, causal: bool = False, softmax_scale: float | None = None, backend: str = "auto"):
    """Scaled dot-product attention.

    q, k, v: (batch, heads, seq, head_dim). Returns (batch, heads, seq, head_dim).
    """
    name = select_attention_backend(q.device, backend, dtype=q.dtype, head_dim=q.shape[-1])
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
