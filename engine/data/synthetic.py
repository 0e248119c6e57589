"""Synthetic (image, caption) data in memory: no files, deterministic from the seed.

One generator, `SyntheticPairs.sample(i, epoch)`: sample i belongs to class c = i % num_classes; its
image is class c's fixed random pattern plus noise drawn from (seed, i, epoch), its caption the tokens
[SOT, 1000 + c, EOT] (then padding) in `context_length` slots, so a model can learn to match them.
Two orders read it:
- `SyntheticPairs.next_batch` (`data.kind: synthetic` in a run): each rank takes its contiguous share
  of every global batch, so the global batches are the same on any number of ranks (what makes runs
  on 1 and on W ranks comparable); the training set wraps around after `num_samples`.
- `SyntheticLoader` (`data.loader: synthetic`): the loaders' interface and order (epochs, rank slices,
  resume) over `num_samples` samples, for tests of that interface without files; its captions have
  the tokenizer's 77 slots, as every loader's.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..model.tokenizer import DEFAULT_CONTEXT_LENGTH, VOCAB_SIZE
from .catalog import Catalog, ShardRef, ShardSamples, _SAMPLE_DTYPE
from .config import DataConfig
from .loaders import _Loader

CLASS_TOKEN = 1000  # class c's caption word


class SyntheticPairs:
    """The synthetic generator, and the trainer's data source for `data.kind: synthetic` (module doc)."""

    def __init__(self, cfg: DataConfig, *, image_size: int, vocab_size: int = VOCAB_SIZE,
                 context_length: int | None = None, global_batch: int | None = None, rank: int = 0,
                 world_size: int = 1):
        """context_length: the model's (cfg.context_length must fit in it); global_batch: the run's
        batch.global_size (next_batch / eval_batch need it)."""
        limit = context_length if context_length is not None else cfg.context_length
        if not 3 <= cfg.context_length <= limit:
            raise ValueError(f"config key 'data.context_length' must be between 3 and the model's context length "
                             f"{limit}, got {cfg.context_length}")
        if vocab_size <= CLASS_TOKEN + cfg.num_classes + 2:
            raise ValueError(f"config key 'data.num_classes' ({cfg.num_classes}) needs a vocabulary of more than "
                             f"{CLASS_TOKEN + cfg.num_classes + 2} tokens, the model has {vocab_size}")
        self.cfg, self.image_size = cfg, image_size
        self.sot, self.eot = vocab_size - 2, vocab_size - 1  # <|startoftext|>, <|endoftext|> (the highest id)
        g = torch.Generator().manual_seed(cfg.seed)
        self.prototypes = torch.randn(cfg.num_classes, 3, image_size, image_size, generator=g)  # (K, 3, R, R)
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.local_batch = global_batch // world_size if global_batch else None
        self.position = 0  # global index of the next training sample

    def sample(self, index: int, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(image (3, R, R) float32, tokens (context_length,) int64) of sample `index`."""
        c = index % self.cfg.num_classes
        g = torch.Generator().manual_seed(int(self.cfg.seed) * 1_000_003 + int(index) * 7 + int(epoch))
        image = self.prototypes[c] + 0.5 * torch.randn(self.prototypes.shape[1:], generator=g)
        tokens = torch.zeros(self.cfg.context_length, dtype=torch.long)
        tokens[0], tokens[1], tokens[2] = self.sot, CLASS_TOKEN + c, self.eot
        return image, tokens

    def batch_at(self, indices, epochs=None) -> tuple[torch.Tensor, torch.Tensor]:
        epochs = [0] * len(indices) if epochs is None else epochs
        pairs = [self.sample(i, e) for i, e in zip(indices, epochs)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the next global batch: (images (B, 3, R, R), tokens (B, L))."""
        start = self.position + self.rank * self.local_batch
        self.position += self.global_batch
        n = self.cfg.num_samples
        idx = range(start, start + self.local_batch)
        return self.batch_at([i % n for i in idx], [i // n for i in idx])

    def eval_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out global batch i (indices past the training set), this rank's share."""
        start = self.cfg.num_samples + i * self.global_batch + self.rank * self.local_batch
        return self.batch_at(range(start, start + self.local_batch))

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class SyntheticLoader(_Loader):
    """`SyntheticPairs`'s samples through the loaders' interface and order (module doc)."""

    backend = "synthetic"

    def _catalog(self) -> Catalog:
        n = int(self.cfg.num_samples)
        samples = ShardSamples(["<synthetic>"], [f"synthetic{i:08d}" for i in range(n)], [""] * n,
                               np.zeros(n, dtype=_SAMPLE_DTYPE))
        return Catalog([ShardRef("<synthetic>", n, "memory", samples)])

    def _batches(self, plan):
        # the loaders' contract: tokens of the tokenizer's length, as the shard loaders deliver them
        cfg = dataclasses.replace(self.cfg, context_length=DEFAULT_CONTEXT_LENGTH)
        pairs = SyntheticPairs(cfg, image_size=self.image_size)
        for b in range(plan.num_batches):
            idx = plan.batch_range(b)
            ids = [plan.locate(i)[1] for i in idx]
            images, tokens = pairs.batch_at(ids, [self.epoch] * len(ids))
            yield images, tokens, [plan.key(i) for i in idx], len(idx)
