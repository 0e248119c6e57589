"""Markers of the benchmark files (the same as tests/conftest.py's): `cuda` cases need a GPU and are
what benchmarks/gpu_check.sh runs by default."""


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped otherwise)")
