"""Several data sources mixed per batch, and resampled shards: OpenCLIP's `--train-data "a::b"`,
`--train-data-upsampling-factors` and `--dataset-resampled`, deterministic from the seed and resumable
mid-epoch like one data.path.

What the training loaders do when `data.sources`, a `data.path` with '::' or `data.resampled: true` is set
(a single data.path without them keeps the order of data/order.py, untouched):

- **Weights.** Source k's weight w_k (data.sources[k].weight, default 1) is the expected fraction of the
  training samples drawn from it: w_k / sum(w). OpenCLIP's `a::b` form reads its upsampling factors as
  OpenCLIP does: there a factor scales the probability of drawing each shard of its source (uniform over
  all shards without factors), so a source's share of the samples is factor x its size; here w_k =
  factor_k x the source's usable samples (no factors: every source in proportion to its size).
- **Mixing per global batch.** Global batch g (g = 0, 1, ... over the whole run) takes n_k(g) samples from
  source k, (n_k(g))_k ~ Multinomial(global batch, w / sum(w)): every slot's source is an independent
  draw with those probabilities. The generator is (seed, g // 64), so batch g's mix needs no earlier
  batch. The global batch is source 0's next n_0(g) samples, then source 1's next n_1(g), ...; rank r of
  W takes slots [r B, (r + 1) B) of it, B = global / W. The global batches are therefore the same
  on any number of ranks (the loss over a global batch does not depend on its order).
- **Streams.** Each source is an endless stream of samples, consumed by the global batches in order:
  without resampling, epoch after epoch of the source (its own epochs: a source with more weight than
  size cycles faster), its shards in a (seed, source, epoch) permutation and each shard's samples in a
  (seed, source, epoch, shard) one; with `resampled`, shards drawn uniformly with replacement
  (generator (seed, source, d // 256) for draw d), each read whole in its own (seed, source, d)
  permutation, with no epoch boundary. Position t of source k's stream is addressed in O(1) (epochs) or
  O(log) after a one-time walk over blocks of 256 draws (resampled).
- **Loader epochs.** `len(loader)` is the batches of a nominal epoch, (sum of the sources' usable
  samples) / global batch; epochs only number the loader's passes (the streams run on across them).
- **Resume.** The state adds `sources`: the global batch reached and each stream's consumed samples
  (plain ints, floats, bools), so a resume starts the streams where they were, without replaying them.
- **Bad samples.** As for one path: a sample that cannot be read or decoded is replaced by the first
  usable one of a fixed order (the streams' positions after the global batch, the sources in turn), the
  same whatever the rank split, worker or resume point; Pillow crops draw from (seed, source, t).
"""
from __future__ import annotations

import bisect
import math
import warnings

import numpy as np

from .catalog import Catalog, build_catalog
from .config import DataConfig, DataError, split_sources
from .order import _FileCache, _shard_files_exist, replace_vanished
from .webdataset import expand_shards


MIX_TAG, EPOCH_TAG, DRAW_TAG, CROP_TAG = 0x6D6978, 0x65706F, 0x647277, 0x637270  # generator families
MIX_BLOCK = 64  # global batches whose mixes one generator draws
DRAW_BLOCK = 256  # resampled shards one generator draws


def is_mixed(cfg: DataConfig) -> bool:
    """Whether a training loader of `cfg` reads through this module (several sources, or resampled)."""
    return cfg.sources is not None or split_sources(cfg.path) is not None or bool(cfg.resampled)


def source_specs(cfg: DataConfig) -> list[tuple[str, object, float | None, float | None]]:
    """(key naming the source, its shard spec, weight or None, upsampling factor or None) per source."""
    if cfg.sources is not None:
        return [(f"data.sources[{i}].path", s["path"], float(s.get("weight", 1.0)), None)
                for i, s in enumerate(cfg.sources)]
    parts = split_sources(cfg.path)
    if parts is not None:
        factors = cfg.upsampling_factors or [1.0] * len(parts)
        return [(f"data.path (source {i + 1} of {len(parts)}, {p!r})", p, None, float(f))
                for i, (p, f) in enumerate(zip(parts, factors))]
    return [("data.path", cfg.path, 1.0, None)]


def source_catalog(cfg: DataConfig, *, rank: int, world_size: int) -> Catalog:
    """One catalog of every source's shards, in source order; `catalog.sources` lists (key, first, end)."""
    paths, ranges = [], []
    for key, spec, _, _ in source_specs(cfg):
        try:
            found = expand_shards(spec)
        except DataError as exc:
            raise DataError(str(exc).replace("data.path", key)) from None
        ranges.append((key, len(paths), len(paths) + len(found)))
        paths += found
    catalog = build_catalog(paths, cache_dir=cfg.cache_dir, max_pixels=cfg.max_pixels, threads=cfg.num_workers,
                            rank=rank, world_size=world_size, key="data.sources" if cfg.sources else "data.path")
    counts = catalog.counts
    for key, lo, hi in ranges:
        if int(counts[lo:hi].sum()) == 0:
            raise DataError(f"config key '{key}': none of its {hi - lo} shard(s) holds a usable sample "
                            f"(skipped: {dict(catalog.skipped)}); fix or remove that source")
    catalog.sources = ranges
    return catalog


def _evict(cache: dict, keep: int) -> None:
    """Drop the oldest entries of a small cache (two threads may do it at once: DALI's caption thread)."""
    while len(cache) > keep:
        try:
            cache.pop(next(iter(cache)), None)
        except (StopIteration, RuntimeError):
            break


class _Epochs:
    """A source read epoch after epoch, without replacement."""

    def __init__(self, counts, first: int, seed: int, k: int, shuffle: bool):
        self.counts, self.first, self.seed, self.k, self.shuffle = np.asarray(counts, np.int64), first, seed, k, shuffle
        self.size = int(self.counts.sum())
        self._orders: dict = {}
        self._perms: dict = {}

    def _order(self, e: int):
        hit = self._orders.get(e)
        if hit is None:
            n = len(self.counts)
            order = np.random.default_rng([self.seed, EPOCH_TAG, self.k, e]).permutation(n) if self.shuffle \
                else np.arange(n)
            hit = self._orders[e] = (order, np.cumsum(self.counts[order]))
            _evict(self._orders, 2)
        return hit

    def _perm(self, e: int, local: int) -> np.ndarray:
        hit = self._perms.get((e, local))
        if hit is None:
            count = int(self.counts[local])
            hit = np.random.default_rng([self.seed, EPOCH_TAG, self.k, e, local]).permutation(count) \
                if self.shuffle else np.arange(count)
            self._perms[(e, local)] = hit
            _evict(self._perms, 4)
        return hit

    def pieces(self, t0: int, t1: int):
        """(catalog shard, sample indices) of stream positions [t0, t1), in order, one shard at a time."""
        while t0 < t1:
            e, j = divmod(t0, self.size)
            order, ends = self._order(e)
            i = int(np.searchsorted(ends, j, side="right"))
            local = int(order[i])
            start, take = int(ends[i]) - int(self.counts[local]), min(t1 - t0, int(ends[i]) - j)
            yield self.first + local, self._perm(e, local)[j - start: j - start + take]
            t0 += take

    def locate(self, t: int) -> tuple[int, int]:
        shard, idx = next(self.pieces(t, t + 1))
        return shard, int(idx[0])


class _Resampled(_Epochs):
    """A source read as an endless stream of shards drawn uniformly with replacement (OpenCLIP's
    --dataset-resampled); a shard drawn twice is read twice, each time whole, in two orders."""

    def __init__(self, counts, first: int, seed: int, k: int, shuffle: bool):
        super().__init__(counts, first, seed, k, shuffle)
        self._starts = [0]  # the stream position where each block of draws starts, extended on use

    def _block(self, q: int):
        hit = self._orders.get(q)
        if hit is None:
            shards = np.random.default_rng([self.seed, DRAW_TAG, self.k, q]).integers(0, len(self.counts), DRAW_BLOCK)
            hit = self._orders[q] = (shards, np.cumsum(self.counts[shards]))
            _evict(self._orders, 2)
        return hit

    def _draw_perm(self, q: int, i: int, count: int) -> np.ndarray:
        hit = self._perms.get((q, i))
        if hit is None:
            hit = np.random.default_rng([self.seed, DRAW_TAG, self.k, q, i]).permutation(count) if self.shuffle \
                else np.arange(count)
            self._perms[(q, i)] = hit
            _evict(self._perms, 4)
        return hit

    def pieces(self, t0: int, t1: int):
        while t0 < t1:
            starts = self._starts
            if starts[-1] <= t0:  # extended on a copy, then swapped in: DALI's caption thread reads it too
                starts = list(starts)
                while starts[-1] <= t0:
                    starts.append(starts[-1] + int(self._block(len(starts) - 1)[1][-1]))
                self._starts = starts
            q = bisect.bisect_right(starts, t0) - 1
            shards, ends = self._block(q)
            j = t0 - starts[q]
            i = int(np.searchsorted(ends, j, side="right"))
            count = int(self.counts[shards[i]])
            start, take = int(ends[i]) - count, min(t1 - t0, int(ends[i]) - j)
            yield self.first + int(shards[i]), self._draw_perm(q, i, count)[j - start: j - start + take]
            t0 += take


class Mixture:
    """The global batches of a run over several sources (or resampled shards): their mix, the sources'
    streams and the position (global batch, samples consumed per stream). One per training loader."""

    def __init__(self, cfg: DataConfig, catalog: Catalog, *, rank: int, world_size: int, batch_size: int,
                 shuffle: bool):
        specs = source_specs(cfg)
        ranges = getattr(catalog, "sources", None) or [("data.path", 0, len(catalog.refs))]
        if len(ranges) != len(specs):
            raise DataError(f"the catalog lists {len(ranges)} sources, the config {len(specs)}: build it with "
                            "clipforge.data.sources.source_catalog")
        counts = catalog.counts
        self.keys = [key for key, _, _ in ranges]
        self.sizes = [int(counts[lo:hi].sum()) for _, lo, hi in ranges]
        self.weights = [w if w is not None else f * n for (_, _, w, f), n in zip(specs, self.sizes)]
        self.p = np.asarray(self.weights, dtype=np.float64) / sum(self.weights)
        self.seed, self.resampled = int(cfg.seed), bool(cfg.resampled)
        self.rank, self.batch_size, self.global_batch = rank, batch_size, batch_size * world_size
        stream = _Resampled if self.resampled else _Epochs
        self.streams = [stream(counts[lo:hi], lo, self.seed, k, shuffle) for k, (_, lo, hi) in enumerate(ranges)]
        total = sum(self.sizes)
        self.batches_per_epoch = (total // self.global_batch if cfg.drop_last
                                  else math.ceil(total / self.global_batch))
        self._anchor = (0, np.zeros(len(specs), np.int64))  # (global batch, samples consumed per stream)
        self._mix = (None, None)

    # ---- the mix of each global batch
    def _mix_block(self, block: int) -> np.ndarray:
        if self._mix[0] != block:
            rng = np.random.default_rng([self.seed, MIX_TAG, block])
            self._mix = (block, rng.multinomial(self.global_batch, self.p, size=MIX_BLOCK).astype(np.int64))
        return self._mix[1]

    def compositions(self, lo: int, hi: int) -> np.ndarray:
        """(hi - lo, sources): the samples global batches lo .. hi - 1 take from each source."""
        if len(self.p) == 1:
            return np.full((max(0, hi - lo), 1), self.global_batch, dtype=np.int64)
        parts = []
        for block in range(lo // MIX_BLOCK, (hi - 1) // MIX_BLOCK + 1) if hi > lo else ():
            base = block * MIX_BLOCK
            parts.append(self._mix_block(block)[max(lo, base) - base: min(hi, base + MIX_BLOCK) - base])
        return np.concatenate(parts) if parts else np.zeros((0, len(self.p)), np.int64)

    def consumed_at(self, g: int) -> np.ndarray:
        """Samples of each stream the global batches before g took (from the last known point on)."""
        g0, c = self._anchor
        if g < g0:
            g0, c = 0, np.zeros(len(self.p), np.int64)
        for lo in range(g0, g, 1 << 16):
            c = c + self.compositions(lo, min(g, lo + (1 << 16))).sum(axis=0)
        self._anchor = (g, c)
        return c.copy()

    # ---- the loader's passes
    def plan(self, catalog: Catalog, epoch: int, position: int) -> "_MixPlan":
        done = self._batches_done(position)
        return _MixPlan(self, catalog, g0=epoch * self.batches_per_epoch + done,
                        n_batches=self.batches_per_epoch - done, epoch=epoch)

    def _batches_done(self, position: int) -> int:
        if position % self.batch_size:
            raise DataError(f"data position {position} is not a whole number of batches of {self.batch_size}: "
                            "mixed sources deliver whole global batches")
        return position // self.batch_size

    def state(self, epoch: int, position: int) -> dict:
        g = epoch * self.batches_per_epoch + self._batches_done(position)
        return {"global_batch": int(g), "consumed": [int(c) for c in self.consumed_at(g)],
                "weights": [float(w) for w in self.weights], "resampled": self.resampled}

    def load(self, state: dict | None, epoch: int, position: int) -> None:
        if not isinstance(state, dict):
            raise DataError("the data position was saved by a run of one data.path, this run mixes sources "
                            "(data.sources, '::' or data.resampled): resume with the data config it was saved with")
        if len(state["consumed"]) != len(self.p) or bool(state["resampled"]) != self.resampled:
            raise DataError(f"the data position was saved over {len(state['consumed'])} source(s) with data.resampled "
                            f"{str(bool(state['resampled'])).lower()}, this run has {len(self.p)} with "
                            f"{str(self.resampled).lower()}: resume with the data config it was saved with")
        g = epoch * self.batches_per_epoch + self._batches_done(position)
        if int(state["global_batch"]) != g:
            raise DataError(f"the data position names global batch {state['global_batch']} but epoch {epoch}, "
                            f"position {position} is batch {g}: the checkpoint's data state is inconsistent")
        if not np.allclose(state["weights"], self.weights, rtol=1e-12):
            warnings.warn(f"the sources' weights changed since the checkpoint ({state['weights']} -> {self.weights}): "
                          "the streams continue where they were, the mix follows the new weights", RuntimeWarning,
                          stacklevel=3)
        self._anchor = (g, np.asarray(state["consumed"], dtype=np.int64))


class _MixPlan:
    """One pass over global batches [g0, g0 + n_batches): this rank's slots of each, addressed by
    position i = 0 .. n - 1 (batch i // B, slot i % B), or by (source, stream position) for the samples
    that replace bad ones. The interface of order._EpochPlan, which the Pillow and DALI backends read."""

    def __init__(self, mix: Mixture, catalog: Catalog, *, g0: int, n_batches: int, epoch: int):
        self.catalog, self.streams, self.sizes = catalog, mix.streams, mix.sizes
        self.seed, self.epoch, self.rank, self.batch_size = mix.seed, epoch, mix.rank, mix.batch_size
        self.comp = mix.compositions(g0, g0 + n_batches)
        first = mix.consumed_at(g0)
        self.consumed = first + np.concatenate([np.zeros((1, len(first)), np.int64), np.cumsum(self.comp, axis=0)])
        self.n, self.epoch_total = n_batches * self.batch_size, sum(mix.sizes)
        self.files = _FileCache()
        self.missing = {i for i, ref in enumerate(catalog.refs) if not _shard_files_exist(ref)}

    @property
    def num_batches(self) -> int:
        return self.n // self.batch_size

    def batch_range(self, b: int) -> range:
        return range(b * self.batch_size, (b + 1) * self.batch_size)

    def slots(self, b: int) -> list[tuple[int, int, int]]:
        """(source, t0, t1): the stream positions of this rank's slots of batch b, in slot order."""
        lo, hi, s, out = self.rank * self.batch_size, (self.rank + 1) * self.batch_size, 0, []
        for k, n_k in enumerate(self.comp[b]):
            a, z = max(lo, s), min(hi, s + int(n_k))
            if a < z:
                t = int(self.consumed[b, k]) + a - s
                out.append((k, t, t + z - a))
            s += int(n_k)
        return out

    def address(self, pos) -> tuple[int, int]:
        if isinstance(pos, tuple):
            return pos
        b, j = divmod(int(pos), self.batch_size)
        for k, t0, t1 in self.slots(b):
            if j < t1 - t0:
                return k, t0 + j
            j -= t1 - t0
        raise IndexError(pos)

    def locate(self, pos) -> tuple[int, int]:
        k, t = self.address(pos)
        return self.streams[k].locate(t)

    def candidates(self, b: int):
        """Stand-ins for a bad sample of batch b, in a fixed order: each stream's positions after the
        global batch, the sources in turn (none of the global batch itself)."""
        ends = [int(c) for c in self.consumed[b + 1]]
        for u in range(max(self.sizes)):
            for k, end in enumerate(ends):
                if u < self.sizes[k]:
                    yield (k, end + u)

    def in_missing_shard(self, pos) -> bool:
        return bool(self.missing) and self.locate(pos)[0] in self.missing

    def batch_positions(self, b: int) -> list:
        """batch_range(b), samples of vanished shards replaced (data/order.py's `replace_vanished`)."""
        return replace_vanished(self, b, "the sources", "data.sources / data.path")

    def runs(self):
        """(shard, sample indices) of the pass's effective positions, in order, one shard at a time."""
        run_shard, parts = None, []
        for b in range(self.num_batches):
            if self.missing:
                located = (self.locate(i) for i in self.batch_positions(b))
                pieces = ((shard, np.array([s], np.int64)) for shard, s in located)
            else:
                pieces = (p for k, t0, t1 in self.slots(b) for p in self.streams[k].pieces(t0, t1))
            for shard, idx in pieces:
                if shard != run_shard and parts:
                    yield run_shard, np.concatenate(parts)
                    parts = []
                run_shard = shard
                parts.append(idx)
        if parts:
            yield run_shard, np.concatenate(parts)

    def row(self, pos):
        shard, s = self.locate(pos)
        samples = self.catalog.shard(shard)
        return samples, samples.table[s]

    def image_bytes(self, pos) -> bytes:
        shard, r = self.row(pos)
        return self.files.read(shard.files[r["img_file"]], r["img_off"], r["img_size"])

    def caption(self, pos) -> str:
        shard, r = self.row(pos)
        raw = self.files.read(shard.files[0], r["txt_off"], r["txt_size"])
        return raw.decode("utf-8-sig", errors="replace").strip()

    def key(self, pos) -> str:
        shard, s = self.locate(pos)
        return self.catalog.shard(shard).keys[s]

    def rng(self, pos) -> np.random.Generator:
        """Per-sample crop randomness: (seed, source, stream position), whatever the rank, worker or resume."""
        k, t = self.address(pos)
        return np.random.default_rng([self.seed, CROP_TAG, k, t])
