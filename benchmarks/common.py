"""Helpers shared by the benchmark files (importable both under pytest and as `python benchmarks/x.py`)."""
from __future__ import annotations

import sys
import types


def shim_torchvision() -> None:
    """open_clip (a baseline here) imports torchvision, whose PyPI wheel is built against a CUDA torch:
    its meta registrations refer to C++ ops missing from a CPU torch. Skipping that one module (as
    tests/conftest.py does) is enough for what the benchmarks use; call this before open_clip, or
    DeepSpeed (which may import torchvision), is first imported."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))


def roofline(flops: float, bytes_moved: float, seconds: float | None, precision: str = "bf16") -> dict:
    """What the work of one op would take at the current GPU's data-sheet peaks (clipforge.train.plan.GPU_SPECS,
    the one table): `roofline_ms` = max(flops / peak FLOP/s, bytes / HBM bandwidth), the bound that
    decides it, and `roofline_fraction` = roofline / measured time (1.0 = at the limit). Empty off a
    known GPU. `bytes_moved` counts HBM traffic at its minimum (inputs read and outputs written once)."""
    import torch

    from clipforge.train.plan import spec_for_device

    if not torch.cuda.is_available():
        return {}
    found = spec_for_device(torch.cuda.get_device_name())
    if found is None:
        return {}
    key, spec = found
    peak = spec.peak_tflops.get(precision)
    if peak is None:
        return {}
    compute_s, memory_s = flops / (peak * 1e12), bytes_moved / (spec.hbm_tbs * 1e12)
    limit = max(compute_s, memory_s)
    out = {"roofline_gpu": key, "roofline_precision": precision, "roofline_ms": limit * 1e3,
           "roofline_bound": "compute" if compute_s >= memory_s else "memory", "peak_tflops": peak,
           "hbm_tbs": spec.hbm_tbs}
    if seconds:
        out["roofline_fraction"] = limit / seconds
    return out
