"""Markers of the benchmark files (the same as tests/conftest.py's): `cuda` cases need a GPU and are
what benchmarks/gpu_check.sh runs by default. The torchvision shim is applied before any benchmark
file imports DeepSpeed or open_clip (either may import torchvision)."""
from common import shim_torchvision

shim_torchvision()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped otherwise)")
