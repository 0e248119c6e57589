"""Synthetic (image, caption) data in memory: no files, deterministic from the seed."""
from __future__ import annotations

import numpy as np
import torch

from ..model.tokenizer import DEFAULT_CONTEXT_LENGTH, EOT_ID, SOT_ID
from .catalog import Catalog, ShardRef, ShardSamples, _SAMPLE_DTYPE
from .config import DataError
from .loaders import _Loader


class SyntheticLoader(_Loader):
    """In-memory data for tests: class c = sample % synthetic_classes gives a fixed image pattern
    (plus noise) and the caption [SOT, 1000 + c, EOT], so a model can learn to match them."""

    backend = "synthetic"

    def _catalog(self) -> Catalog:
        n = int(self.cfg.synthetic_samples)
        if n < 1:
            raise DataError(f"data.synthetic_samples must be positive, got {n}")
        samples = ShardSamples(["<synthetic>"], [f"synthetic{i:08d}" for i in range(n)], [""] * n,
                               np.zeros(n, dtype=_SAMPLE_DTYPE))
        return Catalog([ShardRef("<synthetic>", n, "memory", samples)])

    def _batches(self, plan):
        S, C = self.image_size, int(self.cfg.synthetic_classes)
        g = torch.Generator().manual_seed(self.cfg.seed)
        patterns = torch.randn(C, 3, S, S, generator=g)
        for b in range(plan.num_batches):
            idx = plan.batch_range(b)
            ids = np.array([plan.locate(i)[1] for i in idx], dtype=np.int64)
            cls = torch.from_numpy(ids % C)
            noise = torch.stack([torch.randn(3, S, S, generator=torch.Generator().manual_seed(
                int(self.cfg.seed) * 1_000_003 + int(i) * 7 + self.epoch)) for i in ids])
            images = patterns[cls] + 0.5 * noise
            tokens = torch.zeros(len(ids), DEFAULT_CONTEXT_LENGTH, dtype=torch.long)
            tokens[:, 0], tokens[:, 1], tokens[:, 2] = SOT_ID, 1000 + cls, EOT_ID
            yield images, tokens, [plan.key(i) for i in idx], len(idx)
