"""Training: `python -m clipforge.train` and `deepspeed --module clipforge.train` (see run.py).

Nothing outside this package imports it except the CLI and the demo.
"""
from .run import build_config, main, train

__all__ = ["build_config", "main", "train"]
