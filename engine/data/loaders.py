"""Training and evaluation data: webdataset shards -> (images, tokens) batches, DALI or PyTorch/Pillow.

Interface (what the trainer uses)
---------------------------------
    loader = build_train_loader(cfg, rank, world_size, epoch, start_position, image_size, tokenizer)
    for images, tokens in loader:      # images float32 (B, 3, S, S), CLIP-normalised; tokens int64 (B, 77)
        ...
    ckpt["data"] = loader.state_dict()  # {"epoch", "position", "seed", "world_size", "num_samples"}
    loader.load_state_dict(ckpt["data"])  # before iterating: the rest of that epoch, not a restart
    log(loader.log_dict())             # {"data/skipped/corrupt_image": 3, "data/runtime/...": 0, ...}

    eval_loader = build_eval_loader(cfg, rank, world_size, image_size, tokenizer)  # resize + centre crop

`cfg` is a `DataConfig` (or a dict of its fields). `cfg.loader` picks the implementation:
"dali" (DALI pipeline; GPU decode with nvJPEG when CUDA is available, CPU otherwise), "pytorch"
(DataLoader + Pillow, the fallback and the benchmark baseline), "synthetic" (in-memory, for tests:
no files), or "auto" (DALI when it imports, else PyTorch). All of them share the same order, state
and counters. One pass of `for batch in loader` runs the rest of the current epoch; at its end the
loader moves to the next epoch (position 0), so `state_dict()` taken then resumes at the next epoch.
`len(loader)` is the number of batches of a whole epoch on this rank. The position counts the samples
already handed out (a batch counts once yielded). Images come on the GPU from DALI's "mixed" path and
on the CPU otherwise (pinned when CUDA is present); tokens are CPU tensors. Every batch is the
caller's to keep: DALI's CPU batches come uncopied, each in a buffer of its own (`exec_dynamic`), so
`list(loader)` is as safe as consuming one batch at a time.

Order and sharding
------------------
Each epoch, the shard order is permuted with (seed, epoch) and the samples inside each shard with
(seed, epoch, shard): the concatenation is the epoch's global sequence of N samples, and rank r
reads the contiguous slice [r*N/W, (r+1)*N/W) of it, i.e. its own run of whole shards (cut at most
inside its first and last shard). Every valid sample is delivered once per epoch across ranks and the
ranks' sample counts differ by at most one (`drop_last=True` gives every rank floor((N // W) / B)
batches, for lock-step data parallelism). The position is the number of samples of its slice a rank
has delivered; resuming skips exactly those. DALI reads this order through per-epoch index files
that list the rank's samples in order (DALI follows index order, subsets and repeats of a tar
included), so its reader never shuffles and never needs a shuffle buffer (DALI's own shuffle buffer
and shard_id/num_shards split would make exact resume impossible). Memory is O(shards): a shard's
sample list is loaded when the rank reaches it. Augmentation randomness: the Pillow path draws each
sample's crop from (seed, epoch, shard, sample), so a resumed run crops exactly as an uninterrupted
one; DALI's pipeline seed is (seed, epoch, rank, position), so after a resume DALI sees the same
samples in the same order with different crop draws.

Several sources (`data.sources`, OpenCLIP's `data.path: "a::b"` + `data.upsampling_factors`) and
resampled shards (`data.resampled`) replace that order for training loaders with data/sources.py's:
global batches mixed from the sources in their weights, each rank its slots of every global batch,
each source an endless stream; the same state, plus the streams' positions (`state["sources"]`).

Bad samples (the robustness design)
-----------------------------------
1. `clipforge make-shards` validates every sample (Pillow verify + decode, JPEG marker walk, caption
   UTF-8 and non-empty) and writes only RGB/gray baseline-or-progressive JPEGs; its stats.json marks
   the shards validated, with their sizes and SHA-256. A shard whose bytes hash to its recorded value
   (checked once per file version on each machine, remembered in `cfg.cache_dir`) is read through
   its .idx file, unchecked; any other (changed since, or a stats.json forged or copied from
   elsewhere) is validated like a foreign shard. The hash guards against stale or mistaken metadata;
   someone who can rewrite both the shards and their stats.json controls the data anyway.
2. Shards NOT written by make-shards (any hand-made or downloaded tar) go through the same checks at
   read time, once: a thread pool validates each sample, odd-but-decodable images (CMYK, 16-bit,
   alpha, PNG, EXIF-rotated ...) are re-encoded as RGB JPEGs into a repair tar in `cfg.cache_dir`,
   and the list of usable samples plus the skip counts are cached there (keyed by path, size and
   mtime). Both backends then see the same byte streams.
3. At run time every batch holds its planned number of samples, on every rank (the trainer's steps
   stay in lock-step). A sample that cannot be read (its shard was deleted or changed) or decoded is
   replaced by the first usable sample of a fixed candidate order: the epoch's sequence after its
   batch, wrapping (`_EpochPlan.candidates`), so replacements are the same however the epoch is
   split or resumed; that sample then appears twice in the epoch. A DALI decode error fails only
   its batch (DALI 2.4's pipeline carries on with the next batch: checked by hand on truncated and
   corrupt JPEGs, and by a fault-injection test); that batch is decoded again with Pillow, with the
   same replacements. A shard found gone from disk when an epoch is planned is skipped (its samples
   replaced in the DALI index and the captions alike) and named in a warning. Only when no sample of
   the epoch can stand in does the loader stop, with one sentence (DataError). Nothing is silent:
   every skip and replacement has a counter in `loader.stats` (RUNTIME_COUNTERS), and the trainer
   writes their sums over ranks to data_stats.json at the end of a run.

Tokenisation
------------
Captions never enter DALI. Their offsets are in the sample list, so a background thread (default,
`cfg.token_workers: 0`) or the worker processes of a small DataLoader (`token_workers: N`) read and
tokenize each batch's captions `prefetch` batches ahead of the image pipeline, off the trainer's
thread; the PyTorch backend tokenizes in its decode workers. `clipforge.tokenize` runs ~40-90k
captions/s in one process on this machine (~1 ms per batch of 64), against DALI's ~1k images/s here and
~7k/s on an A100 (benchmarks/bench_dataloader.py measures both), so one thread keeps up while DALI's
threads decode; on 2 cores the thread was ~10% faster than a process (IPC costs more than the
tokenizing). Use processes (`token_workers: N`) for several GPUs' worth of DALI in one process.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections import Counter

import numpy as np
import torch

from ..model.tokenizer import DEFAULT_CONTEXT_LENGTH
from .catalog import Catalog, build_catalog
from .config import DataConfig, DataError, split_sources
from .order import _EpochPlan, rank_segments
from .images import normalize_uint8, pil_decode, pil_transform
from .sources import Mixture, is_mixed, source_catalog


# Run-time counters of a loader (`loader.stats["runtime"]`), in a fixed order so ranks can sum them:
# samples that could not be read / decoded, replacements that kept their batches full, shards found
# gone from disk, DALI batches re-decoded by Pillow and the samples that took.
RUNTIME_COUNTERS = ("read_error", "decode_error", "replaced", "vanished_shards", "dali_failed_batches",
                    "fallback_decoded")  # vanished_shards: this rank's count; stats["vanished"] names them


def _tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    tokens = tokenizer(texts)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] != len(texts):
        raise DataError("the tokenizer must return a (N, context_length) tensor for N captions")
    return tokens.long()


class _CaptionBatches(torch.utils.data.Dataset):
    """Batch b -> (tokens, keys) of the plan's batch b, or None when a caption cannot be read (the
    batch then goes to the Pillow fallback, which replaces that sample): the DALI backend's caption side."""

    def __init__(self, plan: _EpochPlan, tokenizer):
        self.plan, self.tokenizer = plan, tokenizer

    def __len__(self):
        return self.plan.num_batches

    def __getitem__(self, b):
        idx = self.plan.batch_positions(b)
        try:
            captions, keys = [self.plan.caption(i) for i in idx], [self.plan.key(i) for i in idx]
        except (OSError, DataError, ValueError):  # as the Pillow path: the fallback replaces that sample
            return None
        return _tokenize(self.tokenizer, captions), keys


class _ReadError(Exception):
    """A sample's bytes could not be read (its shard vanished or changed): the cause is chained."""


class _PillowBatches(torch.utils.data.Dataset):
    """Batch b -> decoded, transformed, normalised batch b: the PyTorch backend (and DALI's fallback).

    A batch always holds its planned number of samples: a sample that cannot be read or decoded is
    replaced by the next of the plan's candidates that can (`_EpochPlan.candidates`: deterministic,
    the same whatever the worker or resume point), and counted (`decode_error` / `read_error`, and
    `replaced`). The replacement appears again in its own batch: that epoch sees it twice."""

    def __init__(self, plan: _EpochPlan, tokenizer, size: int, train: bool, cfg: DataConfig):
        self.plan, self.tokenizer, self.size, self.train = plan, tokenizer, size, train
        self.area, self.ratio = tuple(cfg.random_area), tuple(cfg.random_aspect_ratio)
        self.interpolation, self.mean, self.std = cfg.interpolation, tuple(cfg.mean), tuple(cfg.std)

    def __len__(self):
        return self.plan.num_batches

    def _sample(self, i):
        """(uint8 image, caption) of position i; raises _ReadError, or whatever decoding raises."""
        try:
            raw, caption = self.plan.image_bytes(i), self.plan.caption(i)
        except (OSError, DataError) as exc:
            raise _ReadError(str(exc)) from exc
        im = pil_decode(raw)
        rng = self.plan.rng(i) if self.train else None
        image = pil_transform(im, self.size, train=self.train, rng=rng, area=self.area, ratio=self.ratio,
                              interpolation=self.interpolation)
        return image, caption

    def decode(self, b: int):
        """(images, positions used, captions, error counts, files found missing) of batch b."""
        positions = self.plan.batch_positions(b)
        images, used, captions, errors, missing = [], [], [], Counter(), set()
        taken, cand = set(positions), None
        for i in positions:
            todo = [i]
            while todo:
                j = todo.pop()
                try:
                    image, caption = self._sample(j)
                except Exception as exc:  # noqa: BLE001 - counted and replaced: the batch stays full
                    errors["read_error" if isinstance(exc, _ReadError) else "decode_error"] += 1
                    cause = exc.__cause__
                    if isinstance(cause, FileNotFoundError) and cause.filename:
                        missing.add(str(cause.filename))
                    cand = cand or self.plan.candidates(b)
                    nxt = next((c for c in cand if c not in taken and not self.plan.in_missing_shard(c)), None)
                    if nxt is None:
                        raise DataError(
                            f"no sample of epoch {self.plan.epoch} can replace a bad one: all "
                            f"{self.plan.epoch_total} were tried ({dict(errors)}); check data.path") from exc
                    taken.add(nxt)
                    errors["replaced"] += 1
                    todo.append(nxt)
                    continue
                images.append(image)
                used.append(j)
                captions.append(caption)
        batch = (normalize_uint8(torch.from_numpy(np.stack(images)), self.mean, self.std) if images
                 else torch.zeros(0, 3, self.size, self.size))
        return batch, used, captions, errors, missing

    def __getitem__(self, b):
        images, used, captions, errors, missing = self.decode(b)
        tokens = (_tokenize(self.tokenizer, captions) if used
                  else torch.zeros(0, DEFAULT_CONTEXT_LENGTH, dtype=torch.long))
        return images, tokens, [self.plan.key(i) for i in used], len(self.plan.batch_range(b)), dict(errors), missing


def _default_tokenizer():
    from ..model.tokenizer import tokenize

    return tokenize


class _Loader:
    """Shared epoch/position/state/counters logic; subclasses implement `_batches(plan)`."""

    backend = "base"

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, epoch: int, start_position: int,
                 image_size: int, tokenizer, *, train: bool, with_keys: bool = False, catalog: Catalog | None = None):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size  # cfg checked by _backend
        self.batch_size = cfg.loader_batch_size
        self.epoch, self.position = int(epoch), int(start_position)
        self.image_size, self.train, self.with_keys = int(image_size), train, with_keys
        self.tokenizer = tokenizer if tokenizer is not None else _default_tokenizer()
        self.catalog = catalog if catalog is not None else self._catalog()
        # several sources or resampled shards (data/sources.py): the global batches' mix and streams
        self.mix = Mixture(cfg, self.catalog, rank=rank, world_size=world_size, batch_size=self.batch_size,
                           shuffle=cfg.shuffle) if self._mixed else None
        self.runtime = Counter()
        self.delivered = 0
        self._gone: set[str] = set()  # shards found missing (warned about once each)
        if self.position < 0 or self.position > self.num_samples:
            raise DataError(f"start position {self.position} is outside this rank's epoch of {self.num_samples} samples")

    @property
    def _mixed(self) -> bool:  # the synthetic backend (tests, in memory) has one shard and ignores the sources
        return self.train and self.backend != "synthetic" and is_mixed(self.cfg)

    def _catalog(self) -> Catalog:
        if self._mixed:
            return source_catalog(self.cfg, rank=self.rank, world_size=self.world_size)
        spec = split_sources(self.cfg.path) or self.cfg.path  # evaluation reads 'a::b' as both, each sample once
        return build_catalog(spec, cache_dir=self.cfg.cache_dir, max_pixels=self.cfg.max_pixels,
                             threads=self.cfg.num_workers, rank=self.rank, world_size=self.world_size)

    # ---- order
    @property
    def total_samples(self) -> int:
        return int(self.catalog.counts.sum())

    @property
    def num_samples(self) -> int:
        """Samples of this rank's slice of an epoch."""
        if self.mix is not None:
            return self.mix.batches_per_epoch * self.batch_size
        n = self.total_samples
        return (self.rank + 1) * n // self.world_size - self.rank * n // self.world_size

    def _epoch_batches(self) -> int:
        if self.mix is not None:
            return self.mix.batches_per_epoch
        if self.cfg.drop_last:
            return (self.total_samples // self.world_size) // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __len__(self) -> int:
        return self._epoch_batches()

    def _plan(self) -> _EpochPlan:
        if self.mix is not None:
            plan = self.mix.plan(self.catalog, self.epoch, self.position)
            self._vanished(self.catalog.refs[s].path for s in plan.missing)
            return plan
        shuffle = self.train and self.cfg.shuffle
        segments = rank_segments(self.catalog.counts, seed=self.cfg.seed, epoch=self.epoch, rank=self.rank,
                                 world_size=self.world_size, shuffle=shuffle)
        everything = rank_segments(self.catalog.counts, seed=self.cfg.seed, epoch=self.epoch, rank=0, world_size=1,
                                   shuffle=shuffle)
        plan = _EpochPlan(self.catalog, segments, seed=self.cfg.seed, epoch=self.epoch, shuffle=shuffle,
                          start=self.position, batch_size=self.batch_size,
                          n_batches=self._epoch_batches() if self.cfg.drop_last else -1,
                          epoch_segments=everything, offset=self.rank * self.total_samples // self.world_size)
        self._vanished(self.catalog.refs[s].path for s in plan.missing)
        return plan

    def _vanished(self, paths) -> None:
        """Warn once per shard that disappeared from disk during the run, and count it."""
        for path in sorted({p[:-4] + ".tar" if p.endswith(".idx") else p for p in paths}):  # a trusted shard's .idx
            if path in self._gone:
                continue
            self._gone.add(path)
            self.runtime["vanished_shards"] += 1
            warnings.warn(f"shard {path} is gone from disk (or the index or cache file listing its samples is); "
                          f"its samples are skipped and replaced by others (counted in loader.stats['runtime'])",
                          RuntimeWarning, stacklevel=3)

    # ---- state
    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "position": self.position, "seed": self.cfg.seed,
                 "world_size": self.world_size, "num_samples": self.num_samples}
        if self.mix is not None:
            state["sources"] = self.mix.state(self.epoch, self.position)
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("world_size", self.world_size) != self.world_size:
            raise DataError(f"the data position was saved with world size {state['world_size']} and cannot resume "
                            f"mid-epoch at world size {self.world_size}; resume at the epoch start (position 0)")
        if state.get("seed", self.cfg.seed) != self.cfg.seed:
            raise DataError(f"the data position was saved with data.seed {state['seed']}, this run has "
                            f"{self.cfg.seed}: set data.seed back to resume the same order")
        if state.get("num_samples", self.num_samples) != self.num_samples:
            raise DataError(f"the data position was saved over {state['num_samples']} samples per rank, the shards "
                            f"now give {self.num_samples}: the data set changed, resume at the epoch start")
        if self.mix is not None:
            self.mix.load(state.get("sources"), int(state["epoch"]), int(state["position"]))
        elif "sources" in state:
            raise DataError("the data position was saved by a run that mixes sources (data.sources, '::' or "
                            "data.resampled), this run reads one data.path: resume with the data config it was saved with")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    # ---- counters
    @property
    def stats(self) -> dict:
        """Skip counters: dataset-wide validation counts, and this rank's run-time counts."""
        return {"skipped": dict(self.catalog.skipped), "repaired": dict(self.catalog.repaired),
                "skipped_by_shard": dict(self.catalog.skipped_by_shard),
                "skipped_at_make_shards": dict(self.catalog.skipped_at_make_shards),
                "runtime": dict(self.runtime), "vanished": sorted(self._gone), "delivered": self.delivered}

    def log_dict(self) -> dict:
        out = {}
        for group, values in self.stats.items():
            if isinstance(values, list) or group == "skipped_by_shard":
                continue  # names (stats["vanished"]): counted in runtime; per shard: in the run's summary
            if isinstance(values, dict):
                out.update({f"data/{group}/{k}": v for k, v in values.items()})
            else:
                out[f"data/{group}"] = values
        return out

    # ---- iteration
    def __iter__(self):
        plan = self._plan()
        for batch in self._batches(plan):
            images, tokens, keys, consumed = batch
            self.position += consumed
            if len(keys) == 0:
                continue
            self.delivered += len(keys)
            yield (images, tokens, keys) if self.with_keys else (images, tokens)
        self.epoch, self.position = self.epoch + 1, 0

    def _batches(self, plan):
        raise NotImplementedError

    def _pillow(self, plan: _EpochPlan, tokenizer) -> _PillowBatches:
        """The Pillow decoder of this loader's plan: the PyTorch backend, and DALI's fallback."""
        return _PillowBatches(plan, tokenizer, self.image_size, self.train, self.cfg)


class PyTorchLoader(_Loader):
    """DataLoader + Pillow: `num_workers` worker processes each decode, crop, normalise and tokenize whole batches."""

    backend = "pytorch"

    def _batches(self, plan):
        ds = self._pillow(plan, self.tokenizer)
        workers = max(0, int(self.cfg.num_workers))
        loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                                             prefetch_factor=self.cfg.prefetch if workers else None,
                                             pin_memory=_device(self.cfg).type == "cuda")
        for images, tokens, keys, consumed, errors, missing in loader:
            self.runtime.update(errors)
            self._vanished(missing)
            yield images, tokens, keys, consumed


def _device(cfg: DataConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _backend(cfg: DataConfig):
    """The loader class of a checked config (DataConfig.check refuses an unknown data.loader). The DALI and
    synthetic loaders subclass _Loader: imported here, when chosen."""
    cfg.check()
    name = cfg.loader
    if name == "auto":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            return PyTorchLoader
        name = "dali"
    if name == "dali":
        from .dali import DaliLoader

        return DaliLoader
    if name == "synthetic":
        from .synthetic import SyntheticLoader

        return SyntheticLoader
    return PyTorchLoader


def build_train_loader(cfg, rank: int = 0, world_size: int = 1, epoch: int = 0, start_position: int = 0,
                       image_size: int = 224, tokenizer=None, *, with_keys: bool = False, catalog: Catalog | None = None):
    """Training batches for this rank: (images float32 (B, 3, S, S), tokens int64 (B, 77)), see the module doc."""
    cfg = DataConfig.from_dict(cfg)
    return _backend(cfg)(cfg, rank, world_size, epoch, start_position, image_size, tokenizer, train=True,
                                 with_keys=with_keys, catalog=catalog)


def build_eval_loader(cfg, rank: int = 0, world_size: int = 1, image_size: int = 224, tokenizer=None, *,
                      with_keys: bool = False, catalog: Catalog | None = None):
    """Evaluation batches: shorter-side bicubic resize + centre crop, file order, each sample once across ranks."""
    cfg = DataConfig.from_dict(cfg)
    return _backend(cfg)(cfg, rank, world_size, 0, 0, image_size, tokenizer, train=False,
                                 with_keys=with_keys, catalog=catalog)


# ------------------------------------------------------------------------- the trainer's source
class ShardBatches:
    """Webdataset shards through `clipforge.data` (DALI or PyTorch/Pillow), as the trainer's data source.

    Each rank reads its own slice of every epoch (clipforge.data's sharding), `global / world` pairs per
    step with `drop_last`, so all ranks step in lock-step; epochs follow one another. The position
    (epoch, samples read) is the loader's own state.
    """

    def __init__(self, cfg: DataConfig, *, global_batch: int, eval_batches: int, image_size: int, rank: int,
                 world_size: int):
        """cfg: the run's data section as it is; the batch is this rank's share of `global_batch`."""
        self.local_batch = global_batch // world_size
        self.rank, self.world_size, self.image_size = rank, world_size, image_size
        self.train_cfg = dataclasses.replace(cfg, batch_size=self.local_batch, drop_last=True)
        self.eval_cfg = dataclasses.replace(self.train_cfg, path=cfg.eval_path, sources=None, upsampling_factors=None,
                                            resampled=False) if cfg.eval_path else None
        self.eval_batches = eval_batches
        self.loader = build_train_loader(self.train_cfg, rank, world_size, image_size=image_size)
        if len(self.loader) == 0:
            what = "data.sources" if cfg.sources is not None else "data.path"
            raise DataError(
                f"config key '{what}' ({cfg.sources or cfg.path}) holds fewer usable samples than one global batch of "
                f"{global_batch}; use more data or a smaller batch.global_size"
            )
        self._iter = None
        self._eval = None
        self._eval_loader = None
        if self.eval_cfg is not None and eval_batches > 0:  # validated at start-up, not at the first evaluation
            self._eval_loader = build_eval_loader(self.eval_cfg, rank, world_size, image_size=image_size)
            if len(self._eval_loader) == 0:
                raise DataError(f"config key 'data.eval_path' ({self.eval_cfg.path}) holds fewer usable samples "
                                f"than one global batch of {global_batch}; add held-out data or lower batch.global_size")

    def next_batch(self):
        for _ in range(2):  # at most one epoch boundary per batch
            if self._iter is None:
                self._iter = iter(self.loader)
            try:
                return next(self._iter)
            except StopIteration:
                self._iter = None
        raise RuntimeError("the training loader yielded an empty epoch")

    def eval_batch(self, i: int):
        if self._eval_loader is None:
            raise DataError("config key 'evaluation.every_steps' needs data.eval_path with webdataset data")
        if self._eval is None:  # the same batches every evaluation
            self._eval = list(itertools.islice(self._eval_loader, self.eval_batches))
            if not self._eval:
                raise DataError(f"config key 'data.eval_path' ({self.eval_cfg.path}) holds less than one batch")
        return self._eval[i % len(self._eval)]

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._iter = None

    @property
    def stats(self) -> dict:
        """The training loader's counters (clipforge.data's `loader.stats`)."""
        return self.loader.stats
