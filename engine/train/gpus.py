"""The GPUs the planner and the benchmarks' rooflines know: memory, peak throughput, links, bandwidth."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPUSpec:
    memory_gib: float
    peak_tflops: dict  # dense, per precision
    nvlink_gbs: float  # achievable all-reduce bus bandwidth inside a node (nccl-tests busbw), GB/s
    network_gbs: float  # per-GPU inter-node link at ~80% of line rate, GB/s
    mfu: float  # assumed achievable fraction of peak for CLIP training (no measurement at hand)
    hbm_tbs: float  # memory bandwidth (data sheet), TB/s: the byte side of a roofline


# Peak dense throughput and memory bandwidth from the vendor data sheets (SXM parts): the one table the
# planner and the benchmarks' rooflines (benchmarks/common.py) read. V100 has no bf16 (fp16 tensor cores
# only); "tf32" is the tensor-core rate of fp32 GEMMs that allow TF32. Node links: DGX-1 V100 (NVLink 2,
# 100 Gb/s EDR per GPU), DGX A100 (NVLink 3, 200 Gb/s HDR per GPU), DGX H100 / H200 (NVLink 4, 400 Gb/s
# NDR per GPU). MFU assumptions: ~40% is what OpenCLIP-scale ViT training reports on A100/H100 in bf16,
# V100 fp16 runs lower (35%).
GPU_SPECS: dict[str, GPUSpec] = {
    "V100-16GB": GPUSpec(16, {"fp16": 125.0, "fp32": 15.7}, 130.0, 10.0, 0.35, 0.90),
    "V100-32GB": GPUSpec(32, {"fp16": 125.0, "fp32": 15.7}, 130.0, 10.0, 0.35, 0.90),
    "A100-40GB": GPUSpec(40, {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}, 230.0, 20.0, 0.40, 1.555),
    "A100-80GB": GPUSpec(80, {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}, 230.0, 20.0, 0.40, 2.039),
    "H100-80GB": GPUSpec(80, {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0}, 370.0, 40.0, 0.40, 3.35),
    "H200-141GB": GPUSpec(141, {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0}, 370.0, 40.0, 0.40, 4.8),
}
# torch.cuda.get_device_name() fragments -> GPU_SPECS key (first match wins)
_DEVICE_NAMES = [("H200", "H200-141GB"), ("H100", "H100-80GB"), ("A100-SXM4-40GB", "A100-40GB"),
                 ("A100-PCIE-40GB", "A100-40GB"), ("A100", "A100-80GB"), ("V100-SXM2-16GB", "V100-16GB"),
                 ("V100-PCIE-16GB", "V100-16GB"), ("V100", "V100-32GB")]


def spec_for_device(device_name: str) -> tuple[str, GPUSpec] | None:
    """(GPU_SPECS key, spec) of a CUDA device by its name (torch.cuda.get_device_name()), None if unknown."""
    for fragment, key in _DEVICE_NAMES:
        if fragment in device_name:
            return key, GPU_SPECS[key]
    return None
