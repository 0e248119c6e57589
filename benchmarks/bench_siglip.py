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
import subprocess
import sys
import textwrap

import pytest
import torch
from common import roofline, shim_torchvision

CPU_N = [int(os.environ["CLIPFORGE_BENCH_N"])] if "CLIPFORGE_BENCH_N" in os.environ else [4096, 8192, 16384, 32768, 65536]
CPU_BASELINE_MAX_N = 16384
GPU_N, GPU_D = [32768], [768]  # the quick run's shape is the whole GPU set: one row per provider
SCALE, BIAS = 10.0, -10.0


def _has_open_clip() -> bool:
    import importlib.util

    return importlib.util.find_spec("open_clip") is not None


# A fresh process: builds the features, warms up on 8 pairs, then resets the kernel's peak-RSS mark
# (`5 > /proc/self/clear_refs`), runs one fwd+bwd and prints VmHWM - VmRSS-before (KiB).
_CHILD = textwrap.dedent("""
    import sys, types, torch
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    n, d, provider, t0, b0 = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
    import clipforge
    if provider == "openclip":
        import open_clip
        loss_fn = open_clip.loss.SigLipLoss()
    else:
        loss_fn = lambda i, t, s, b: clipforge.siglip_loss(i, t, s, b, backend=provider)
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_(True)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_(True)
    scale, bias = torch.tensor(t0, requires_grad=True), torch.tensor(b0, requires_grad=True)
    loss_fn(img[:8], txt[:8], scale, bias).backward()  # warm every import and code path on a tiny batch
    img.grad = txt.grad = scale.grad = bias.grad = None
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    loss_fn(img, txt, scale, bias).backward()
    print(status("VmHWM") - before)
""")


def _peak_extra_kib(n: int, d: int, provider: str) -> int:
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", _CHILD, str(n), str(d), provider, str(SCALE), str(BIAS)],
                         capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _loss_fn(provider: str):
    import clipforge

    if provider == "openclip":
        shim_torchvision()
        import open_clip

        return open_clip.loss.SigLipLoss()
    return lambda i, t, s, b: clipforge.siglip_loss(i, t, s, b, backend=provider)


def _inputs(n: int, d: int, device, dtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g, device=device), dim=1).to(dtype)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g, device=device), dim=1).to(dtype)
    scale = torch.tensor(SCALE, device=device, requires_grad=True)
    bias = torch.tensor(BIAS, device=device, requires_grad=True)
    return img.requires_grad_(True), txt.requires_grad_(True), scale, bias


@pytest.mark.parametrize("provider", ["cpp", "openclip"])
@pytest.mark.parametrize("n", CPU_N)
def test_cpu_siglip_fwd_bwd(benchmark, n, provider):
    d = 512
    if provider != "cpp" and n > CPU_BASELINE_MAX_N:
        pytest.skip(f"{provider} needs several {n}x{n} fp32 matrices; the CPU baseline stops at N={CPU_BASELINE_MAX_N}")
    if provider == "openclip" and not _has_open_clip():
        pytest.skip("open_clip is not installed")
    if provider == "cpp":
        from clipforge import ops

        if ops.siglip_kernels("cpp") is None:
            pytest.skip("clipforge._C is not built (or has no siglip_forward)")
    img, txt, scale, bias = _inputs(n, d, "cpu")
    loss_fn = _loss_fn(provider)

    def step():
        img.grad = txt.grad = scale.grad = bias.grad = None
        loss_fn(img, txt, scale, bias).backward()

    rounds = 5 if n <= 8192 else 1
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1 if n <= 8192 else 0)
    extra_kib = _peak_extra_kib(n, d, provider)
    seconds = benchmark.stats.stats.min
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
    if provider == "openclip" and not _has_open_clip():
        pytest.skip("open_clip is not installed")
    img, txt, scale, bias = _inputs(n, d, torch.device("cuda"), torch.bfloat16)
    if provider in ("mm3", "mm4"):
        a, b = img.detach(), txt.detach()
        p = torch.empty(n, n, device=a.device, dtype=a.dtype)
        logits = 1 if provider == "mm3" else 2

        def step():
            for _ in range(logits):
                torch.mm(a, b.t(), out=p)  # logits (mm4: and their recomputation)
            torch.mm(p, b)                 # G Y
            torch.mm(p.t(), a)             # G^T X
            torch.cuda.synchronize()
    else:
        loss_fn = _loss_fn(provider)

        def step():
            img.grad = txt.grad = scale.grad = bias.grad = None
            loss_fn(img, txt, scale, bias).backward()
            torch.cuda.synchronize()

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    peak = torch.cuda.max_memory_allocated() - base
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=2)
    seconds = benchmark.stats.stats.min
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name(), "n": n, "d": d, "provider": provider, "dtype": "bf16",
        "pass": "fwd+bwd", "seconds": seconds, "gflops_3gemm": 6 * n * n * d / seconds / 1e9,
        "tflops": 6 * n * n * d / seconds / 1e12, "peak_extra_mb": peak / 2**20,
        **roofline(6 * n * n * d, 8 * n * d * 2, seconds, "bf16"),
    })
    print(json.dumps(benchmark.extra_info))
