"""The learning-rate schedule: a factor of optimizer.lr per optimizer step (OpenCLIP's `--lr-scheduler`).

Every kind starts with a linear warm-up over `warmup` steps ((step + 1) / warmup), then:
- "cosine": a half cosine from 1 at the end of the warm-up to `min_ratio` at `total`, then `min_ratio`;
- "const": 1 until the end;
- "const-cooldown": 1 until `total - cooldown_steps`, then (1 - e / cooldown_steps) ** power from 1 to
  `min_ratio` at `total` (e: steps into the cool-down; power 1 is linear), then `min_ratio`.
OpenCLIP's cosine ends at 0 and its cool-down at `--lr-cooldown-end` (an absolute rate): here both end at
`min_ratio` x optimizer.lr (0 by default, OpenCLIP's default), one key for the floor of either kind.
"""
from __future__ import annotations

import math

KINDS = ("cosine", "const", "const-cooldown")


def lr_factor(step: int, warmup: int, total: int, min_ratio: float, kind: str = "cosine",
              cooldown_steps: int = 0, cooldown_power: float = 1.0) -> float:
    """The factor of optimizer.lr at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "const":
        return 1.0
    if kind == "const-cooldown":
        start = total - cooldown_steps
        if step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, cooldown_steps))
        return min_ratio + (1 - min_ratio) * (1 - progress) ** cooldown_power
    if kind != "cosine":
        raise ValueError(f"unknown schedule kind {kind!r}; one of {', '.join(KINDS)}")
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
