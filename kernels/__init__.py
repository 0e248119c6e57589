"""Triton kernels (one op per file). Nothing outside this package imports triton."""
# The functional is re-exported under its module's name, so `clipforge.kernels.attention` is the function;
# reach the module itself with importlib.import_module("clipforge.kernels.attention").
from .attention import attention  # noqa: E402,F401
