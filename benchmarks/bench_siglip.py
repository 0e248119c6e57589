"""SigLIP loss fwd+bwd: time and extra memory, ours vs OpenCLIP's SigLipLoss (measured in the same run).

Run: pytest benchmarks/bench_siglip.py --benchmark-json out.json      (never in `pytest tests`)
     CLIPFORGE_BENCH_N=8192 pytest benchmarks/bench_siglip.py -k cpu   (one N)

CPU: clipforge._C ("cpp", csrc/siglip.cpp) and OpenCLIP 3.3.0's SigLipLoss at N in {4096, 8192, 16384},
clipforge alone at 32768 and 65536 (SigLipLoss materialises several N x N fp32 matrices: 16 GiB each
at 65536); d = 512, fp32, t = 10, b = -10 (SigLIP's initialisation), all four gradients (image, text, t,
b). Extra memory: the peak RSS of a separate process running one fwd+bwd, minus its RSS just before
(features and imports excluded; the gradients the loss returns, 2 N d floats, included), as
bench_contrastive.py measures it.
CUDA (`cuda` marker; CLIPFORGE_BENCH_QUICK=1 is the same single shape, for benchmarks/gpu_check.sh
--quick): N = 32768, d = 768, bf16 features; providers "triton" (fused gradient tiles + cuBLAS GEMMs,
value and gradients in one pass), "chunked" (the same algorithm in PyTorch GEMMs: V100 and fp32),
OpenCLIP's SigLipLoss (N x N logits in bf16), "mm3": three torch.mm of the loss's GEMM size (2 N^2 d
FLOPs each), the speed of light of this one-pass loss, and "mm4": four, that of a loss that recomputes
the logits in backward (the softmax loss's structure). Extra memory: max_memory_allocated minus what
the inputs hold.
extra_info: seconds per fwd+bwd, GFLOP/s and TFLOP/s counted as the algorithm's 3 GEMMs (6 N^2 d),
peak_extra_mb, and on a GPU the roofline (benchmarks/common.py): 6 N^2 d FLOPs at the bf16 peak against
the minimum bytes (features read, gradients written: 8 N d bf16 elements). (Not `gflops_4gemm`, the
contrastive rows' key: benchmarks/gpu_summary.py groups loss rows by it and N, d.)
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from bench_contrastive import (
    cpu_seconds, cuda_peak_and_seconds, features, fwd_bwd_step, gemm_step, has_open_clip, loss_under_test,
    peak_extra_kib,
)
from common import roofline

CPU_N = [int(os.environ["CLIPFORGE_BENCH_N"])] if "CLIPFORGE_BENCH_N" in os.environ else [4096, 8192, 16384, 32768, 65536]
CPU_BASELINE_MAX_N = 16384
GPU_N, GPU_D = [32768], [768]  # the quick run's shape is the whole GPU set: one row per provider
SCALE, BIAS = 10.0, -10.0


def _inputs(n: int, d: int, device, dtype=torch.float32):
    img, txt = features(n, d, device, dtype)
    scale = torch.tensor(SCALE, device=device, requires_grad=True)
    bias = torch.tensor(BIAS, device=device, requires_grad=True)
    return img, txt, scale, bias


@pytest.mark.parametrize("provider", ["cpp", "openclip"])
@pytest.mark.parametrize("n", CPU_N)
def test_cpu_siglip_fwd_bwd(benchmark, n, provider):
    d = 512
    if provider != "cpp" and n > CPU_BASELINE_MAX_N:
        pytest.skip(f"{provider} needs several {n}x{n} fp32 matrices; the CPU baseline stops at N={CPU_BASELINE_MAX_N}")
    if provider == "openclip" and not has_open_clip():
        pytest.skip("open_clip is not installed")
    if provider == "cpp":
        from clipforge import ops

        if ops.siglip_kernels("cpp") is None:
            pytest.skip("clipforge._C is not built (or has no siglip_forward)")
    img, txt, scale, bias = _inputs(n, d, "cpu")
    seconds = cpu_seconds(benchmark, fwd_bwd_step(loss_under_test("siglip", provider), img, txt, scale, bias), n)
    extra_kib = peak_extra_kib("siglip", n, d, provider, SCALE, BIAS)
    benchmark.extra_info.update({
        "device": "cpu", "n": n, "d": d, "provider": provider, "pass": "fwd+bwd", "seconds": seconds,
        "gflops_3gemm": 6 * n * n * d / seconds / 1e9, "peak_extra_mb": extra_kib / 1024,
        "threads": torch.get_num_threads(), "scale": SCALE, "bias": BIAS,
    })
    print(json.dumps(benchmark.extra_info))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("provider", ["triton", "chunked", "openclip", "mm3", "mm4"])
@pytest.mark.parametrize("d", GPU_D)
@pytest.mark.parametrize("n", GPU_N)
def test_cuda_siglip_fwd_bwd(benchmark, n, d, provider):
    if provider == "openclip" and not has_open_clip():
        pytest.skip("open_clip is not installed")
    img, txt, scale, bias = _inputs(n, d, torch.device("cuda"), torch.bfloat16)
    if provider in ("mm3", "mm4"):  # the logits (mm4: and their recomputation), G Y, G^T X
        step = gemm_step(img, txt, logit_gemms=1 if provider == "mm3" else 2)
    else:
        step = fwd_bwd_step(loss_under_test("siglip", provider), img, txt, scale, bias, sync=True)
    peak, seconds = cuda_peak_and_seconds(benchmark, step)
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name(), "n": n, "d": d, "provider": provider, "dtype": "bf16",
        "pass": "fwd+bwd", "seconds": seconds, "gflops_3gemm": 6 * n * n * d / seconds / 1e9,
        "tflops": 6 * n * n * d / seconds / 1e12, "peak_extra_mb": peak / 2**20,
        **roofline(6 * n * n * d, 8 * n * d * 2, seconds, "bf16"),
    })
    print(json.dumps(benchmark.extra_info))
