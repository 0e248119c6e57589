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
