"""Contrastive loss fwd+bwd: time and peak memory, ours vs the PyTorch reference vs OpenCLIP's ClipLoss.

Run: pytest benchmarks/bench_contrastive.py --benchmark-json out.json      (never in `pytest tests`)
     CLIPFORGE_BENCH_N=8192 pytest benchmarks/bench_contrastive.py -k cpu   (one N)

CPU (clipforge._C, "cpp"): N in {4096, 8192, 16384, 32768}, d = 512, fp32. Peak memory is the peak
RSS of a separate process that runs one fwd+bwd, minus the peak RSS of the same process doing
everything but the loss (imports, features with requires_grad, a tensor scale): the loss's own extra
memory, gradients included. The baselines (reference, ClipLoss) materialise several N x N fp32
matrices (4 GiB each at N = 32768) and take minutes there, so they stop at N = 16384 on CPU.
CUDA: N in {4096, ..., 32768}, d in {512, 768}, bf16 features (CLIPFORGE_BENCH_QUICK=1: N = 32768,
d = 768 only, benchmarks/gpu_check.sh --quick); providers "triton" (fused statistics and probability
tiles + cuBLAS GEMMs), "chunked" (the same algorithm in PyTorch GEMMs, what V100 and fp32 get), the
reference "torch" and OpenCLIP's ClipLoss (both build the N x N logits in bf16), and "mm4": four
torch.mm of the loss's GEMM size (2 N^2 d FLOPs each), the speed of light for a fused loss. Extra
memory is max_memory_allocated minus what the inputs hold.
extra_info: seconds per fwd+bwd, GFLOP/s counted as 4 GEMMs (8 N^2 d), peak_extra_mb, and on a GPU the
roofline (benchmarks/common.py): 8 N^2 d FLOPs at the bf16 peak against the minimum bytes (features
read, gradients written: 8 N d bf16 elements).
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

CPU_N = [int(os.environ["CLIPFORGE_BENCH_N"])] if "CLIPFORGE_BENCH_N" in os.environ else [4096, 8192, 16384, 32768]
CPU_BASELINE_MAX_N = 16384
GPU_N = [4096, 8192, 16384, 32768]
GPU_D = [512, 768]
if os.environ.get("CLIPFORGE_BENCH_QUICK") == "1":
    GPU_N, GPU_D = [32768], [768]


# ---------------------------------------------------- shared with bench_siglip.py (the sigmoid loss)
_OPENCLIP = {"contrastive": "ClipLoss", "siglip": "SigLipLoss"}  # loss -> its OpenCLIP baseline


def has_open_clip() -> bool:
    import importlib.util

    return importlib.util.find_spec("open_clip") is not None


# Run in a fresh process: builds the features, warms up on 8 pairs, then resets the kernel's peak-RSS
# mark (`5 > /proc/self/clear_refs`), runs one fwd+bwd and prints VmHWM - VmRSS-before (KiB): the loss's
# own extra memory, gradients included, whatever the imports peaked at before.
# argv: n, d, provider, clipforge's loss function, OpenCLIP's loss class, the scalar arguments (scale [, bias]).
_CHILD = textwrap.dedent("""
    import sys, types, torch
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    n, d, provider, ours, baseline = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    import clipforge
    if provider == "openclip":
        import open_clip
        loss_fn = getattr(open_clip.loss, baseline)()
    else:
        ours = getattr(clipforge, ours)
        loss_fn = lambda i, t, *s: ours(i, t, *s, backend=provider)
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_(True)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_(True)
    scalars = [torch.tensor(float(v), requires_grad=True) for v in sys.argv[6:]]
    loss_fn(img[:8], txt[:8], *scalars).backward()  # warm every import and code path on a tiny batch
    for x in (img, txt, *scalars):
        x.grad = None
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    loss_fn(img, txt, *scalars).backward()
    print(status("VmHWM") - before)
""")


def peak_extra_kib(loss: str, n: int, d: int, provider: str, *scalars: float) -> int:
    """The extra memory (KiB) of one fwd+bwd of `loss` ("contrastive", "siglip") in a fresh process."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    args = [str(n), str(d), provider, f"{loss}_loss", _OPENCLIP[loss], *map(str, scalars)]
    out = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def loss_under_test(loss: str, provider: str):
    """clipforge's `loss` ("contrastive", "siglip") on `provider`, or its OpenCLIP baseline ("openclip")."""
    import clipforge

    if provider == "openclip":
        shim_torchvision()
        import open_clip

        return getattr(open_clip.loss, _OPENCLIP[loss])()
    ours = getattr(clipforge, f"{loss}_loss")
    return lambda i, t, *s: ours(i, t, *s, backend=provider)


def features(n: int, d: int, device, dtype=torch.float32):
    """(image, text) features (n, d) requiring grad: seeded normal rows, L2-normalised in fp32, then cast."""
    g = torch.Generator(device=device).manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g, device=device), dim=1).to(dtype)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g, device=device), dim=1).to(dtype)
    return img.requires_grad_(True), txt.requires_grad_(True)


def fwd_bwd_step(loss_fn, img, txt, *scalars, sync: bool = False):
    """One fwd+bwd of loss_fn(img, txt, *scalars), gradients cleared first (sync: wait for the GPU)."""
    def step():
        for x in (img, txt, *scalars):
            x.grad = None
        loss_fn(img, txt, *scalars).backward()
        if sync:
            torch.cuda.synchronize()

    return step


def gemm_step(img, txt, logit_gemms: int):
    """The speed of light of a fused loss: `logit_gemms` GEMMs of the logits (1: computed once; 2: and
    recomputed in backward), then G Y and G^T X, each 2 N^2 d FLOPs, on an N x N buffer."""
    a, b = img.detach(), txt.detach()
    p = torch.empty(a.shape[0], b.shape[0], device=a.device, dtype=a.dtype)

    def step():
        for _ in range(logit_gemms):
            torch.mm(a, b.t(), out=p)  # logits (and their recomputation)
        torch.mm(p, b)                 # G Y
        torch.mm(p.t(), a)             # G^T X
        torch.cuda.synchronize()

    return step


def cpu_seconds(benchmark, step, n: int) -> float:
    """The fastest of 5 rounds (1 beyond N = 8192, where one fwd+bwd takes seconds)."""
    rounds = 5 if n <= 8192 else 1
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1 if n <= 8192 else 0)
    return benchmark.stats.stats.min


def cuda_peak_and_seconds(benchmark, step) -> tuple[int, float]:
    """(max_memory_allocated of one step beyond what was allocated before it, bytes; the fastest of 10
    rounds, seconds), after one warm-up step."""
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    peak = torch.cuda.max_memory_allocated() - base
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=2)
    return peak, benchmark.stats.stats.min


# ----------------------------------------------------------------------------------- the contrastive loss
@pytest.mark.parametrize("provider", ["cpp", "torch", "openclip"])
@pytest.mark.parametrize("n", CPU_N)
def test_cpu_contrastive_fwd_bwd(benchmark, n, provider):
    d = 512
    if provider != "cpp" and n > CPU_BASELINE_MAX_N:
        pytest.skip(f"{provider} needs several {n}x{n} fp32 matrices; CPU baselines stop at N={CPU_BASELINE_MAX_N}")
    if provider == "openclip" and not has_open_clip():
        pytest.skip("open_clip is not installed")
    if provider == "cpp":
        from clipforge import ops

        if ops.cpp_extension() is None:
            pytest.skip("clipforge._C is not built")
    img, txt = features(n, d, "cpu")
    scale = torch.tensor(14.3, requires_grad=True)
    seconds = cpu_seconds(benchmark, fwd_bwd_step(loss_under_test("contrastive", provider), img, txt, scale), n)
    extra_kib = peak_extra_kib("contrastive", n, d, provider, 14.3)
    benchmark.extra_info.update({
        "device": "cpu", "n": n, "d": d, "provider": provider, "pass": "fwd+bwd", "seconds": seconds,
        "gflops_4gemm": 8 * n * n * d / seconds / 1e9, "peak_extra_mb": extra_kib / 1024,
        "threads": torch.get_num_threads(),
    })
    print(json.dumps(benchmark.extra_info))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("provider", ["triton", "chunked", "torch", "openclip", "mm4"])
@pytest.mark.parametrize("d", GPU_D)
@pytest.mark.parametrize("n", GPU_N)
def test_cuda_contrastive_fwd_bwd(benchmark, n, d, provider):
    if provider == "openclip" and not has_open_clip():
        pytest.skip("open_clip is not installed")
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    img = torch.nn.functional.normalize(torch.randn(n, d, device=dev), dim=1).to(dtype).requires_grad_(True)
    txt = torch.nn.functional.normalize(torch.randn(n, d, device=dev), dim=1).to(dtype).requires_grad_(True)
    scale = torch.tensor(14.3, device=dev, requires_grad=True)
    if provider == "mm4":  # logits, their recompute, G T, G^T I
        step = gemm_step(img, txt, logit_gemms=2)
    else:
        step = fwd_bwd_step(loss_under_test("contrastive", provider), img, txt, scale, sync=True)
    peak, seconds = cuda_peak_and_seconds(benchmark, step)
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name(), "n": n, "d": d, "provider": provider, "dtype": "bf16",
        "pass": "fwd+bwd", "seconds": seconds, "gflops_4gemm": 8 * n * n * d / seconds / 1e9,
        "peak_extra_mb": peak / 2**20, **roofline(8 * n * n * d, 8 * n * d * 2, seconds, "bf16"),
    })
    print(json.dumps(benchmark.extra_info))
