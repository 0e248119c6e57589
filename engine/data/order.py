"""Order: the per-epoch permutation, each rank's contiguous slice, the resume position, and the
epoch plan (`_EpochPlan`) that addresses a rank's samples and their replacements."""
from __future__ import annotations

import itertools
import math
import os

import numpy as np

from .catalog import Catalog, ShardRef
from .config import DataError
from .webdataset import _pread


# --------------------------------------------------------------------------------------------
# Order: per-epoch permutation, contiguous rank slices, resume
# --------------------------------------------------------------------------------------------

def shard_permutation(count: int, *, seed: int, epoch: int, shard: int, shuffle: bool) -> np.ndarray:
    """Order of one shard's samples in an epoch (the same on every rank)."""
    if not shuffle:
        return np.arange(count)
    return np.random.default_rng([seed, epoch, shard]).permutation(count)


def rank_segments(counts, *, seed: int, epoch: int, rank: int, world_size: int,
                  shuffle: bool) -> list[tuple[int, int, int]]:
    """Rank's share of an epoch as (shard, lo, hi): samples shard_permutation(shard)[lo:hi], in order.

    The epoch's sequence is the shards in a (seed, epoch) permutation, each in its own permutation;
    rank r takes the contiguous slice [r*N/W, (r+1)*N/W) of it: O(shards) memory, whatever N.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world size {world_size}")
    order = np.random.default_rng([seed, epoch]).permutation(len(counts)) if shuffle else np.arange(len(counts))
    ends = np.cumsum(counts[order])
    starts = ends - counts[order]
    total = int(ends[-1]) if len(ends) else 0
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    return [(int(o), int(max(lo, s) - s), int(min(hi, e) - s)) for o, s, e in zip(order, starts, ends)
            if e > lo and s < hi and e > s]


def rank_slice(counts, *, seed: int, epoch: int, rank: int, world_size: int, shuffle: bool):
    """(shard index, sample index) arrays of rank's share of the epoch, in delivery order (small data sets)."""
    segs = rank_segments(counts, seed=seed, epoch=epoch, rank=rank, world_size=world_size, shuffle=shuffle)
    if not segs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    shard_idx = np.concatenate([np.full(hi - lo, o, dtype=np.int64) for o, lo, hi in segs])
    sample_idx = np.concatenate([shard_permutation(int(counts[o]), seed=seed, epoch=epoch, shard=o,
                                                   shuffle=shuffle)[lo:hi] for o, lo, hi in segs])
    return shard_idx, sample_idx.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------

class _FileCache:
    """Per-process read-only file descriptors (opened lazily, so fork-safe)."""

    def __init__(self):
        self.pid, self.fds = None, {}

    def read(self, path: str, offset: int, size: int) -> bytes:
        if self.pid != os.getpid():
            self.pid, self.fds = os.getpid(), {}
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = os.open(path, os.O_RDONLY)
        return _pread(fd, int(offset), int(size))


def _shard_files_exist(ref: ShardRef) -> bool:
    """The tar, and the file its sample list comes from (its .idx, or the validation cache), are there."""
    if ref.source == "memory":
        return True
    sample_list = os.path.splitext(ref.path)[0] + ".idx" if ref.source == "index" else ref.source
    return os.path.exists(ref.path) and os.path.exists(sample_list)


class _EpochPlan:
    """The rank's remaining samples of one epoch (from `start`), addressed by position i = 0 .. n-1."""

    def __init__(self, catalog: Catalog, segments, *, seed: int, epoch: int, shuffle: bool, start: int,
                 batch_size: int, n_batches: int, epoch_segments=None, offset: int = 0):
        """segments: this rank's (rank_segments); epoch_segments: the whole epoch's sequence (rank 0 of
        1), of which the rank's slice starts at `offset` (default: the rank's own, offset 0); replacements
        for bad samples come from it."""
        self.catalog, self.segments = catalog, segments
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.cum = np.cumsum([hi - lo for _, lo, hi in segments], dtype=np.int64)
        total = int(self.cum[-1]) if len(self.cum) else 0
        self.epoch_segments = segments if epoch_segments is None else epoch_segments
        self.epoch_cum = np.cumsum([hi - lo for _, lo, hi in self.epoch_segments], dtype=np.int64)
        self.epoch_total = int(self.epoch_cum[-1]) if len(self.epoch_cum) else 0
        self.offset = offset
        self.batch_size, self.start, self.total = batch_size, start, total
        self.n = max(0, total - start)
        if n_batches >= 0:  # drop_last: the epoch ends after n_batches full batches
            self.n = min(self.n, max(0, n_batches * batch_size - start))
        self.files = _FileCache()
        self._perms: dict = {}
        # shards of this rank's epoch whose tar is gone (deleted since the catalog was built): their
        # samples are replaced like bad ones (see batch_positions); the loader warns and counts them
        self.missing = {shard for shard, _, _ in self.epoch_segments if not _shard_files_exist(catalog.refs[shard])}

    def batch_range(self, b: int) -> range:
        return range(b * self.batch_size, min((b + 1) * self.batch_size, self.n))

    @property
    def num_batches(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def _perm(self, shard: int) -> np.ndarray:
        perm = self._perms.get(shard)
        if perm is None:
            if len(self._perms) >= 4:
                self._perms.pop(next(iter(self._perms)))
            perm = self._perms[shard] = shard_permutation(int(self.catalog.refs[shard].count), seed=self.seed,
                                                          epoch=self.epoch, shard=shard, shuffle=self.shuffle)
        return perm

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, sample) at position i (outside 0 .. total - 1: the epoch's sequence around the slice,
        where replacements come from)."""
        j = self.start + i
        cum, segments = self.cum, self.segments
        if not 0 <= j < self.total:
            j, cum, segments = self.offset + j, self.epoch_cum, self.epoch_segments
        k = int(np.searchsorted(cum, j, side="right"))
        shard, lo, _ = segments[k]
        return shard, int(self._perm(shard)[lo + j - (int(cum[k - 1]) if k else 0)])

    def runs(self):
        """(shard, sample indices) of the epoch's effective positions (batch_positions), in order, one
        shard at a time."""
        if self.missing:
            yield from self._resolved_runs()
            return
        skip, left = self.start, self.n
        for shard, lo, hi in self.segments:
            if left <= 0:
                return
            if skip >= hi - lo:
                skip -= hi - lo
                continue
            part = self._perm(shard)[lo + skip: min(hi, lo + skip + left)]
            skip, left = 0, left - len(part)
            yield shard, part

    def _resolved_runs(self):
        run_shard, run = None, []
        for b in range(self.num_batches):
            for i in self.batch_positions(b):
                shard, sample = self.locate(i)
                if shard != run_shard and run:
                    yield run_shard, np.array(run, dtype=np.int64)
                    run = []
                run_shard = shard
                run.append(sample)
        if run:
            yield run_shard, np.array(run, dtype=np.int64)

    # ---- replacements: a batch always holds batch_range(b)'s count of samples
    def candidates(self, b: int):
        """Positions that may stand in for a bad sample of batch b, in a fixed order: the epoch's
        sequence after the batch, then from its beginning (wrapping over every rank's samples, so one
        rank whose slice went bad still fills its batches; positions before `start` included, so a
        resumed run replaces exactly as an uninterrupted one), never the batch itself."""
        r = self.batch_range(b)
        base = self.offset + self.start  # epoch position of plan position 0
        for g in itertools.chain(range(base + r.stop, self.epoch_total), range(0, base + r.start)):
            yield g - base

    def in_missing_shard(self, i: int) -> bool:
        return bool(self.missing) and self.locate(i)[0] in self.missing

    def batch_positions(self, b: int) -> list[int]:
        """The positions batch b reads (`replace_vanished`)."""
        return replace_vanished(self, b, f"epoch {self.epoch}", "data.path")

    def row(self, i: int):
        shard, s = self.locate(i)
        samples = self.catalog.shard(shard)
        return samples, samples.table[s]

    def image_bytes(self, i: int) -> bytes:
        shard, r = self.row(i)
        return self.files.read(shard.files[r["img_file"]], r["img_off"], r["img_size"])

    def caption(self, i: int) -> str:
        shard, r = self.row(i)
        raw = self.files.read(shard.files[0], r["txt_off"], r["txt_size"])
        return raw.decode("utf-8-sig", errors="replace").strip()

    def key(self, i: int) -> str:
        shard, s = self.locate(i)
        return self.catalog.shard(shard).keys[s]

    def rng(self, i: int) -> np.random.Generator:
        """Per-sample augmentation randomness: the same whatever the worker, batch or resume point."""
        shard, s = self.locate(i)
        return np.random.default_rng([self.seed, self.epoch, shard, s, 7])


def replace_vanished(plan, b: int, what: str, keys: str) -> list[int]:
    """plan.batch_range(b), each sample of a vanished shard replaced by the next of plan.candidates(b) from a
    shard still there (distinct, deterministic); `what` and `keys` name, in the error when every shard is
    gone, what was read and the config keys to check. plan: an epoch plan here or data/sources.py's."""
    idx = list(plan.batch_range(b))
    if not plan.missing:
        return idx
    out, cand = [], None
    for i in idx:
        if not plan.in_missing_shard(i):
            out.append(i)
            continue
        cand = cand or plan.candidates(b)
        for c in cand:
            if not plan.in_missing_shard(c):
                out.append(c)
                break
        else:
            raise DataError(f"every shard of {what} is gone from disk "
                            f"({', '.join(sorted(plan.catalog.refs[s].path for s in plan.missing))}); check {keys}")
    return out
