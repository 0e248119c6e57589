"""Attention throughput at CLIP's shapes: our Triton kernel vs PyTorch SDPA (flash / efficient / cuDNN /
math) and xformers, forward, backward and both, in bf16 on a CUDA GPU.

Run: pytest benchmarks/bench_attention.py --benchmark-json out.json   (skipped without CUDA)
     CLIPFORGE_BENCH_QUICK=1 ...   50 / 77 / 197 / 257 tokens, the fast peers only, 10 rounds
                                   (benchmarks/gpu_check.sh --quick)

Shapes are the ones CLIP trains at: the image towers' token counts (1 class token + patches) at a
per-GPU batch of 256 (ViT-B) / 128 (ViT-L), and the causal text tower (77 tokens, batch 256).
Inputs are laid out as the model makes them: q, k, v are views of one packed (B, S, 3, H, d) projection.

Each timed call runs the op `reps` times and then synchronizes (reps is picked so that one call takes
about 2 ms, so launch and synchronisation overheads do not blur sub-100 us kernels); extra_info holds
ms_per_op, TFLOP/s and the peak memory the op allocates on top of its inputs, and the roofline of the
device (benchmarks/common.py: max(FLOPs / peak, bytes / HBM bandwidth) and the measured fraction of it).
FLOPs (Triton tutorial / FlashAttention convention): forward 4*B*H*S^2*d, backward 2.5x that, halved
when causal. Bytes (the minimum, each tensor once, bf16): forward reads q, k, v and writes o (4 B H S d
elements), backward reads q, k, v, o, dO and writes dq, dk, dv (8 B H S d); fp32 log-sum-exps are small.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from common import roofline

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="attention benchmarks need a CUDA GPU")]

# name: (batch, heads, seq, head_dim, causal)
SHAPES = {
    "vit-b32-s50": (256, 12, 50, 64, False),
    "vit-b16-s197": (256, 12, 197, 64, False),
    "vit-l14-s257": (128, 16, 257, 64, False),
    "vit-l14-336-s577": (128, 16, 577, 64, False),
    "text-b-s77-causal": (256, 8, 77, 64, True),
    "text-l-s77-causal": (256, 12, 77, 64, True),
}
# triton-split: our kernel with the fused single-kernel backward switched off (the split dK/dV + dQ
# kernels), to decide where the fused one pays; it only differs from triton at <= 128 tokens
PROVIDERS = ["triton", "triton-split", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "xformers"]
PASSES = ["fwd", "bwd", "fwd+bwd"]
DTYPE = torch.bfloat16
TARGET_CALL_S = 2e-3
ROUNDS = 20
QUICK = os.environ.get("CLIPFORGE_BENCH_QUICK") == "1"
if QUICK:  # the device check's budget: the four shortest sequences, no slow or diagnostic providers
    SHAPES = {k: v for k, v in SHAPES.items() if v[2] in (50, 77, 197, 257) and k != "text-l-s77-causal"}
    PROVIDERS = ["triton", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "xformers"]
    ROUNDS = 10


def _sdpa(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                "math": "MATH"}
    backend = getattr(SDPBackend, backends[backend_name], None)
    if backend is None:
        pytest.skip(f"this torch ({torch.__version__}) has no SDPA {backend_name} backend")

    def fn(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return fn


def _provider(name):
    if name in ("triton", "triton-split"):
        from clipforge.kernels import attention

        return lambda q, k, v, causal: attention(q, k, v, causal=causal)
    if name.startswith("sdpa-"):
        return _sdpa(name[len("sdpa-"):])
    if name == "xformers":
        xops = pytest.importorskip("xformers.ops", reason="xformers is not installed")

        def fn(q, k, v, causal):
            bias = xops.LowerTriangularMask() if causal else None
            out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
            return out.transpose(1, 2)

        return fn
    raise AssertionError(name)


def _flops(batch, heads, seq, head_dim, causal, pass_):
    fwd = 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[pass_]


def _bytes(batch, heads, seq, head_dim, pass_):
    elems = batch * heads * seq * head_dim * DTYPE.itemsize
    return {"fwd": 4 * elems, "bwd": 8 * elems, "fwd+bwd": 12 * elems}[pass_]


def _inputs(batch, heads, seq, head_dim, grad):
    qkv = torch.randn(batch, seq, 3, heads, head_dim, device="cuda", dtype=DTYPE, requires_grad=grad)
    q, k, v = qkv.unbind(2)  # 3 x (B, S, H, d)
    return qkv, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, d) views


def _step(fn, pass_, q, k, v, causal):
    """A zero-argument callable that runs one pass (without synchronising)."""
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                fn(q, k, v, causal)
        return run
    if pass_ == "fwd+bwd":
        do = torch.randn(q.shape, device=q.device, dtype=q.dtype)

        def run():
            out = fn(q, k, v, causal)
            torch.autograd.grad(out, (q, k, v), do)
        return run
    out = fn(q, k, v, causal)  # bwd: the graph is built once, outside the timed call
    do = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_attention(benchmark, monkeypatch, shape, provider, pass_):
    batch, heads, seq, head_dim, causal = SHAPES[shape]
    if provider == "triton-split":
        if pass_ == "fwd" or seq > 128:
            pytest.skip("triton-split differs from triton only in the backward at <= 128 tokens")
        monkeypatch.setenv("CLIPFORGE_ATTENTION_FUSED_BWD", "0")
    fn = _provider(provider)
    torch.cuda.empty_cache()
    _, q, k, v = _inputs(batch, heads, seq, head_dim, grad=pass_ != "fwd")
    try:
        step = _step(fn, pass_, q, k, v, causal)
        step()  # compiles the Triton kernels; raises if this SDPA backend refuses these inputs
        torch.cuda.synchronize()
    except RuntimeError as exc:
        if provider.startswith("sdpa-") or provider == "xformers":
            pytest.skip(f"{provider} cannot run {shape}: {str(exc).splitlines()[0][:160]}")
        raise

    # peak memory of one pass beyond what is already allocated (inputs, and the graph for "bwd")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20

    # reps per timed call: about TARGET_CALL_S of work
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        step()
    end.record()
    torch.cuda.synchronize()
    reps = max(1, math.ceil(TARGET_CALL_S / (start.elapsed_time(end) / 3e3)))

    def timed():
        for _ in range(reps):
            step()
        torch.cuda.synchronize()

    benchmark.group = f"attention {shape} {pass_}"
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    seconds_per_op = benchmark.stats.stats.median / reps
    flops = _flops(batch, heads, seq, head_dim, causal, pass_)
    benchmark.extra_info.update(
        {
            "shape": shape, "provider": provider, "pass": pass_, "dtype": str(DTYPE).removeprefix("torch."),
            "batch": batch, "heads": heads, "seq": seq, "head_dim": head_dim, "causal": causal,
            "reps": reps, "ms_per_op": seconds_per_op * 1e3, "tflops": flops / seconds_per_op / 1e12,
            "peak_mem_mb": peak_mb, "device": torch.cuda.get_device_name(),
            **roofline(flops, _bytes(batch, heads, seq, head_dim, pass_), seconds_per_op, "bf16"),
        }
    )
