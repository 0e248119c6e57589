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

`cfg` is a `DataConfig` (or a dict of its fields). `cfg.backend` picks the implementation:
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

import collections
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import tarfile
import tempfile
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .shards import (CAPTION_EXT, DEFAULT_MAX_PIXELS, IMAGE_EXTS, MAX_CAPTION_FILE_BYTES, MAX_MEMBER_BYTES,
                     STATS_FORMAT, STATS_NAME, check_caption, check_image, pil_to_rgb, read_index, scan_tar,
                     sha256_file, split_name)
from .tokenizer import DEFAULT_CONTEXT_LENGTH, EOT_ID, SOT_ID

# CLIP's normalisation (CLIP.md): the statistics of the OpenAI training images.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CACHE_VERSION = 2  # 2: samples bound by position (duplicate keys, repair members named per sample)


@dataclass
class DataConfig:
    """Data settings (YAML key `data`). Sizes are per rank."""

    shards: str | list[str] = ""  # folder of .tar, glob, "dir/{00000..00099}.tar", or a list of those
    batch_size: int = 256
    backend: str = "auto"  # auto | dali | pytorch | synthetic
    num_threads: int = 4  # DALI CPU threads, or PyTorch DataLoader decode workers
    # DALI backend: 0 = a thread of this process tokenizes captions `prefetch` batches ahead; N > 0 = N
    # DataLoader processes do. The thread was ~10% faster on 2 CPU cores (a process's IPC costs more
    # than the tokenizing, ~1 ms per 64 captions); processes pay off when one process feeds many GPUs.
    token_workers: int = 0
    seed: int = 0
    shuffle: bool = True  # training order; evaluation never shuffles
    drop_last: bool = False
    random_area: tuple[float, float] = (0.9, 1.0)  # OpenCLIP's RandomResizedCrop scale
    random_aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    max_pixels: int = DEFAULT_MAX_PIXELS
    cache_dir: str | None = None  # read-time validation cache (default ~/.cache/clipforge/shards)
    prefetch: int = 2  # batches prepared ahead
    device: str | None = None  # where DALI decodes / the PyTorch path pins: None = cuda if available
    synthetic_samples: int = 1024
    synthetic_classes: int = 16

    @classmethod
    def from_dict(cls, data) -> "DataConfig":
        if isinstance(data, cls):
            return data
        from .config import dataclass_from_dict

        return dataclass_from_dict(cls, data, "data")


class DataError(ValueError):
    """The shards cannot be used as configured; the message names the file or key."""


# Run-time counters of a loader (`loader.stats["runtime"]`), in a fixed order so ranks can sum them:
# samples that could not be read / decoded, replacements that kept their batches full, shards found
# gone from disk, DALI batches re-decoded by Pillow and the samples that took.
RUNTIME_COUNTERS = ("read_error", "decode_error", "replaced", "vanished_shards", "dali_failed_batches",
                    "fallback_decoded")  # vanished_shards: this rank's count; stats["vanished"] names them


# --------------------------------------------------------------------------------------------
# Catalog: the usable samples of every shard, validated at make-shards time or read time
# --------------------------------------------------------------------------------------------

_SAMPLE_DTYPE = np.dtype([("img_file", np.int8), ("img_off", np.int64), ("img_size", np.int64),
                          ("txt_off", np.int64), ("txt_size", np.int64)])


@dataclass
class ShardSamples:
    """Usable samples of one shard. files[0] is the shard, files[1] (if any) its repair tar."""

    files: list[str]
    keys: list[str]
    img_names: list[str]
    table: np.ndarray  # _SAMPLE_DTYPE, one row per usable sample

    def __len__(self):
        return len(self.keys)


@dataclass
class ShardRef:
    """One shard as the catalog keeps it: its sample count, and where to load its sample list from."""

    path: str
    count: int
    source: str  # "index": make-shards' .idx; else the read-time validation cache file
    samples: ShardSamples | None = None  # kept in memory only for in-memory data (synthetic)


class Catalog:
    """Per-shard sample counts for every shard; a shard's sample list is loaded when a rank reads it.

    Memory is O(shards) for the whole data set plus O(a few shards) per process, whatever the size:
    41k LAION shards of 10k samples cost ~4 MB here, not the ~20 GB of 400M sample records.
    """

    CACHE_SHARDS = 4

    def __init__(self, refs: list[ShardRef], skipped=None, repaired=None, skipped_at_make_shards=None):
        self.refs = refs
        self.skipped = Counter(skipped or {})  # read-time validation, data-set wide
        self.repaired = Counter(repaired or {})
        self.skipped_at_make_shards = Counter(skipped_at_make_shards or {})
        self._pid, self._cache = None, {}

    @property
    def counts(self) -> np.ndarray:
        return np.array([r.count for r in self.refs], dtype=np.int64)

    def shard(self, i: int) -> ShardSamples:
        """The usable samples of shard i (small per-process LRU cache; fork-safe)."""
        ref = self.refs[i]
        if ref.samples is not None:
            return ref.samples
        if self._pid != os.getpid():
            self._pid, self._cache = os.getpid(), {}
        hit = self._cache.pop(i, None)
        if hit is None:
            hit = _from_index(ref.path) if ref.source == "index" else _load_validated(ref.source, ref.path)
            if len(hit) != ref.count:
                raise DataError(f"shard {ref.path} now lists {len(hit)} samples, {ref.count} when the run started: "
                                f"the data changed under a running job")
        self._cache[i] = hit
        while len(self._cache) > self.CACHE_SHARDS:
            self._cache.pop(next(iter(self._cache)))
        return hit


def expand_shards(spec) -> list[str]:
    """Shard paths from a folder, a glob, a brace range "{00000..00012}", or a list of those."""
    import glob
    import re

    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in expand_shards(s)]
    spec = os.path.expanduser(str(spec))
    if not spec:
        raise DataError("data.shards is empty: give a folder of .tar shards, a glob or a list of paths")
    if os.path.isdir(spec):
        paths = sorted(os.path.join(spec, n) for n in os.listdir(spec) if n.endswith(".tar"))
    else:
        m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
        if m:
            a, b = m.group(1), m.group(2)
            paths = [spec[:m.start()] + str(i).zfill(len(a)) + spec[m.end():] for i in range(int(a), int(b) + 1)]
            paths = [p for s in paths for p in expand_shards(s)]
        elif any(c in spec for c in "*?["):
            paths = sorted(glob.glob(spec))
        else:
            paths = [spec]
    for p in paths:
        if not os.path.isfile(p):
            raise DataError(f"shard {p} does not exist (data.shards = {spec!r})")
    if not paths:
        raise DataError(f"data.shards = {spec!r} matches no .tar file")
    return paths


def _stats_entry(path: str, stats_cache: dict) -> dict | None:
    """make-shards' stats.json entry for this shard when it claims the shard as validated (same size,
    a SHA-256 recorded, the .idx there), else None. A claim only: see _verified."""
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in stats_cache:
        stats = None
        try:
            with open(os.path.join(folder, STATS_NAME)) as f:
                stats = json.load(f)
            if stats.get("format") != STATS_FORMAT or not stats.get("validated"):
                stats = None
            else:
                stats["by_name"] = {e["name"]: e for e in stats["shards"]}
        except (OSError, ValueError, KeyError, TypeError):
            stats = None
        stats_cache[folder] = stats
    stats = stats_cache[folder]
    entry = stats["by_name"].get(os.path.basename(path)) if stats else None
    if (entry is None or entry.get("bytes") != os.path.getsize(path) or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("idx_sha256"), str)):
        return None
    return entry if os.path.isfile(os.path.splitext(path)[0] + ".idx") else None


def _verified(path: str, entry: dict, cache_dir: str) -> bool:
    """Whether the shard and its .idx (which the loader then reads unchecked) hash to the SHA-256s
    make-shards recorded. The hashes are computed once per file version on this machine and remembered
    in cache_dir, so only the first run pays a read of each shard; a shard or index changed since, or a
    stats.json forged or copied from elsewhere, does not match and the shard is validated at read time."""
    idx = os.path.splitext(path)[0] + ".idx"
    # the record names each file's version by inode, size, mtime and ctime (which no copy or `touch`
    # can set back), so a file rewritten in place is hashed again
    key = {"sha256": entry["sha256"], "idx_sha256": entry["idx_sha256"]}
    for name, f in (("tar", path), ("idx", idx)):
        st = os.stat(f)
        key[name] = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    tag = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]
    record = os.path.join(cache_dir, "verified", f"{os.path.splitext(os.path.basename(path))[0]}-{tag}.json")
    try:
        with open(record) as f:
            if json.load(f) == key:
                return True
    except (OSError, ValueError):
        pass
    if sha256_file(path) != entry["sha256"] or sha256_file(idx) != entry["idx_sha256"]:
        return False
    os.makedirs(os.path.dirname(record), exist_ok=True)
    tmp = f"{record}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(key, f)
    os.replace(tmp, record)
    return True


def _from_index(path: str) -> ShardSamples:
    idx = os.path.splitext(path)[0] + ".idx"
    keys, names, rows = [], [], []
    for comps in read_index(idx):
        by_ext = {ext: (off, size, name) for ext, off, size, name in comps}
        img = by_ext.get("jpg")
        txt = by_ext.get(CAPTION_EXT)
        if img is None or txt is None:
            raise DataError(f"{idx} lists a sample without .jpg or .txt ({comps[0][3]}); the shard was "
                            f"modified after make-shards: rebuild it")
        keys.append(split_name(img[2])[0] if img[2] else str(len(keys)))
        names.append(img[2])
        rows.append((0, img[0], img[1], txt[0], txt[1]))
    return ShardSamples([path], keys, names, np.array(rows, dtype=_SAMPLE_DTYPE))


def _pread(fd: int, offset: int, size: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OSError(f"short read: {len(data)} of {size} bytes at offset {offset}")
    return data


def _cache_paths(path: str, cache_dir: str) -> tuple[str, str]:
    tag = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]
    base = os.path.join(cache_dir, f"{os.path.splitext(os.path.basename(path))[0]}-{tag}")
    return base + ".json", base + ".repair.tar"


def _load_validated(meta_path: str, path: str) -> ShardSamples:
    with open(meta_path) as f:
        meta = json.load(f)
    files = [path] + ([meta_path[:-5] + ".repair.tar"] if meta["repaired_total"] else [])
    rows = [tuple(r[2:]) for r in meta["samples"]]
    return ShardSamples(files, [r[0] for r in meta["samples"]], [r[1] for r in meta["samples"]],
                        np.array(rows, dtype=_SAMPLE_DTYPE).reshape(-1))


def _validate_shard(path: str, cache_dir: str, max_pixels: int, threads: int):
    """Read-time guard for a shard make-shards did not write.

    Returns (cache file, usable sample count, skipped, repaired); the sample list is in the cache file.
    """
    st = os.stat(path)
    meta_path, repair_path = _cache_paths(path, cache_dir)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if (meta["version"] == CACHE_VERSION and meta["size"] == st.st_size and meta["mtime_ns"] == st.st_mtime_ns
                and meta["max_pixels"] == max_pixels):
            return meta_path, len(meta["samples"]), Counter(meta["skipped"]), Counter(meta["repaired"])
    except (OSError, ValueError, KeyError):
        pass

    tar_report: dict = {}
    try:
        scanned = scan_tar(path, tar_report)
    except tarfile.TarError as exc:
        raise DataError(f"shard {path} is not a readable tar file ({exc}); remove it from data.shards") from exc
    if "truncated_at" in tar_report:  # how many samples the lost tail held cannot be known: counted once
        warnings.warn(f"shard {path} is cut short or damaged after byte {tar_report['truncated_at']:,}: the samples "
                      "there are lost (counted as skipped/truncated_tar)", RuntimeWarning, stacklevel=2)
    # A key that repeats (a foreign tar may hold two samples of one name): the first is kept, the
    # others are skipped and counted, so a key names one (image, caption) pair.
    samples, seen, duplicates = [], set(), 0
    for key, comps in scanned:
        if key in seen:
            duplicates += 1
        else:
            seen.add(key)
            samples.append((key, comps))
    fd = os.open(path, os.O_RDONLY)
    try:
        def check(sample):
            key, comps = sample
            img_ext = next((e for e in IMAGE_EXTS if e in comps), None)
            if img_ext is None:
                img_ext = next((e for e in comps if e.lower() in IMAGE_EXTS), None)
            txt = comps.get(CAPTION_EXT)
            if txt is not None and txt[1] > MAX_CAPTION_FILE_BYTES:  # sizes come from the tar: never read them
                return key, None, "file_too_large", None
            caption, reason = check_caption(None if txt is None else _pread(fd, txt[0], txt[1]))
            if reason:
                return key, None, reason, None
            if img_ext is None:
                return key, None, "missing_image", None
            off, size, name = comps[img_ext]
            if size > MAX_MEMBER_BYTES:
                return key, None, "file_too_large", None
            chk = check_image(_pread(fd, off, size), max_pixels=max_pixels)
            return key, (img_ext, off, size, name, txt), chk.reason, chk

        with ThreadPoolExecutor(max(1, threads)) as pool:  # Pillow decodes without the GIL
            results = list(pool.map(check, samples))
    finally:
        os.close(fd)

    skipped, repaired = Counter({"duplicate_key": duplicates} if duplicates else {}), Counter()
    if "truncated_at" in tar_report:
        skipped["truncated_tar"] += 1
    keys, names, rows = [], [], []
    tmp_repair = f"{repair_path}.tmp{os.getpid()}"
    repair_tar = None
    for key, img, reason, chk in results:
        if reason:
            skipped[reason] += 1
            continue
        img_ext, off, size, name, txt = img
        if chk.repaired:
            for r in chk.repaired.split("+"):
                repaired[r] += 1
            if repair_tar is None:
                repair_tar = tarfile.open(tmp_repair, "w", format=tarfile.GNU_FORMAT)
            # named by the sample's position, not its key: the offset found below is this sample's
            info = tarfile.TarInfo(f"{len(keys):09d}.jpg")
            info.size = len(chk.data)
            repair_tar.addfile(info, io.BytesIO(chk.data))
            row = (1, -1, len(chk.data), txt[0], txt[1])  # data offset filled in below
            name = info.name
        else:
            row = (0, off, size, txt[0], txt[1])
        keys.append(key)
        names.append(name)
        rows.append(row)
    if repair_tar is not None:
        repair_tar.close()
        os.replace(tmp_repair, repair_path)
        offsets = {comps["jpg"][2]: comps["jpg"][0] for _, comps in scan_tar(repair_path)}
        rows = [(r[0], offsets[n] if r[0] == 1 else r[1], *r[2:]) for r, n in zip(rows, names)]
    meta = {"version": CACHE_VERSION, "shard": os.path.abspath(path), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "max_pixels": max_pixels, "skipped": dict(skipped),
            "repaired": dict(repaired), "repaired_total": int(repair_tar is not None),
            "samples": [[k, n, *map(int, r)] for k, n, r in zip(keys, names, rows)]}
    tmp = f"{meta_path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, meta_path)
    return meta_path, len(keys), skipped, repaired


def build_catalog(spec, *, cache_dir: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, threads: int = 2,
                  rank: int = 0, world_size: int = 1) -> Catalog:
    """Sample counts of every shard (same result on every rank; read-time checks are cached)."""
    paths = expand_shards(spec)
    cache_dir = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                          "clipforge", "shards")
    refs: list[ShardRef | None] = [None] * len(paths)
    skipped, repaired, at_make_shards = Counter(), Counter(), Counter()
    stats_cache: dict = {}
    claimed, untrusted = [], []
    for i, p in enumerate(paths):
        entry = _stats_entry(p, stats_cache)
        (claimed if entry is not None else untrusted).append((i, entry))

    def rotated(items):
        # Start at a rank-dependent shard so that ranks working at the same time mostly split the work
        # (each finds the others' results in the shared cache).
        k = (rank * len(items)) // max(1, world_size)
        return items[k:] + items[:k]

    for i, entry in rotated(claimed):
        if _verified(paths[i], entry, cache_dir):
            refs[i] = ShardRef(paths[i], int(entry["count"]), "index")
        else:
            untrusted.append((i, None))
    for stats in stats_cache.values():
        if stats:
            at_make_shards.update(stats.get("skipped", {}))
    if untrusted:
        os.makedirs(cache_dir, exist_ok=True)
        for i, _ in rotated(sorted(untrusted)):
            meta_path, count, sk, rp = _validate_shard(paths[i], cache_dir, max_pixels, threads)
            refs[i] = ShardRef(paths[i], count, meta_path)
            skipped.update(sk)
            repaired.update(rp)
    cat = Catalog(refs, skipped, repaired, at_make_shards)
    if int(cat.counts.sum()) == 0:
        raise DataError(f"no usable sample in data.shards = {spec!r} (skipped: {dict(cat.skipped)})")
    return cat


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
# Pillow transforms (the PyTorch backend, and DALI's per-batch fallback)
# --------------------------------------------------------------------------------------------

def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, area=(0.9, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (left, top, right, bottom) in pixels."""
    total = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = total * rng.uniform(area[0], area[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            return x, y, x + w, y + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    x, y = (width - w) // 2, (height - h) // 2
    return x, y, x + w, y + h


def pil_decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS):
    """JPEG/any bytes -> RGB Pillow image, EXIF orientation applied (as DALI's decoder does). An image
    of more than `max_pixels` pixels raises ValueError from its header, before anything is decoded
    (a decompression-bomb PNG of a few KB would otherwise take gigabytes)."""
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > max_pixels:
            raise ValueError(f"an image of {w}x{h} pixels is over the {max_pixels:,}-pixel limit")
        im.load()
    if im.format == "JPEG" and 0x0112 in im.getexif():
        im = ImageOps.exif_transpose(im)
    return pil_to_rgb(im)


def pil_transform(im, size: int, *, train: bool, rng: np.random.Generator | None = None, area=(0.9, 1.0),
                  ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """RGB image -> uint8 (size, size, 3): random resized crop (train) or shorter-side resize + centre crop."""
    from PIL import Image

    w, h = im.size
    if train:
        box = random_resized_crop_box(w, h, rng, area, ratio)
        out = im.resize((size, size), Image.BICUBIC, box=box)
    else:
        # Same geometry as DALI's resize(resize_shorter) + crop_mirror_normalize(crop): the longer
        # side and the centre offset round half up (checked against DALI's output).
        s = size / min(w, h)
        nw, nh = max(size, math.floor(w * s + 0.5)), max(size, math.floor(h * s + 0.5))
        left, top = math.floor((nw - size) / 2 + 0.5), math.floor((nh - size) / 2 + 0.5)
        sx, sy = nw / w, nh / h
        # Resize and crop in one pass: the crop box mapped back to source pixels.
        box = (left / sx, top / sy, (left + size) / sx, (top + size) / sy)
        out = im.resize((size, size), Image.BICUBIC, box=box)
    return np.asarray(out, dtype=np.uint8)


def normalize_uint8(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W), CLIP mean/std."""
    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


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
        """The positions batch b reads: batch_range(b), with each sample of a vanished shard replaced by
        the next candidate from a shard that is still there (distinct, deterministic)."""
        idx = list(self.batch_range(b))
        if not self.missing:
            return idx
        out, cand = [], None
        for i in idx:
            if not self.in_missing_shard(i):
                out.append(i)
                continue
            cand = cand or self.candidates(b)
            for c in cand:
                if not self.in_missing_shard(c):
                    out.append(c)
                    break
            else:
                raise DataError(f"every shard of epoch {self.epoch} is gone from disk "
                                f"({', '.join(sorted(self.catalog.refs[s].path for s in self.missing))}); "
                                "check data.shards")
        return out

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

    def __init__(self, plan: _EpochPlan, tokenizer, size: int, train: bool, area, ratio):
        self.plan, self.tokenizer, self.size, self.train = plan, tokenizer, size, train
        self.area, self.ratio = area, ratio

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
        image = pil_transform(im, self.size, train=self.train, rng=rng, area=self.area, ratio=self.ratio)
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
                            f"{self.plan.epoch_total} were tried ({dict(errors)}); check data.shards") from exc
                    taken.add(nxt)
                    errors["replaced"] += 1
                    todo.append(nxt)
                    continue
                images.append(image)
                used.append(j)
                captions.append(caption)
        batch = (normalize_uint8(torch.from_numpy(np.stack(images))) if images
                 else torch.zeros(0, 3, self.size, self.size))
        return batch, used, captions, errors, missing

    def __getitem__(self, b):
        images, used, captions, errors, missing = self.decode(b)
        tokens = (_tokenize(self.tokenizer, captions) if used
                  else torch.zeros(0, DEFAULT_CONTEXT_LENGTH, dtype=torch.long))
        return images, tokens, [self.plan.key(i) for i in used], len(self.plan.batch_range(b)), dict(errors), missing


def _default_tokenizer():
    from .tokenizer import tokenize

    return tokenize


class _Loader:
    """Shared epoch/position/state/counters logic; subclasses implement `_batches(plan)`."""

    backend = "base"

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, epoch: int, start_position: int,
                 image_size: int, tokenizer, *, train: bool, with_keys: bool = False, catalog: Catalog | None = None):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.epoch, self.position = int(epoch), int(start_position)
        self.image_size, self.train, self.with_keys = int(image_size), train, with_keys
        self.tokenizer = tokenizer if tokenizer is not None else _default_tokenizer()
        self.catalog = catalog if catalog is not None else self._catalog()
        self.runtime = Counter()
        self.delivered = 0
        self._gone: set[str] = set()  # shards found missing (warned about once each)
        if self.position < 0 or self.position > self.num_samples:
            raise DataError(f"start position {self.position} is outside this rank's epoch of {self.num_samples} samples")

    def _catalog(self) -> Catalog:
        return build_catalog(self.cfg.shards, cache_dir=self.cfg.cache_dir, max_pixels=self.cfg.max_pixels,
                             threads=self.cfg.num_threads, rank=self.rank, world_size=self.world_size)

    # ---- order
    @property
    def total_samples(self) -> int:
        return int(self.catalog.counts.sum())

    @property
    def num_samples(self) -> int:
        """Samples of this rank's slice of an epoch."""
        n = self.total_samples
        return (self.rank + 1) * n // self.world_size - self.rank * n // self.world_size

    def _epoch_batches(self) -> int:
        if self.cfg.drop_last:
            return (self.total_samples // self.world_size) // self.cfg.batch_size
        return math.ceil(self.num_samples / self.cfg.batch_size)

    def __len__(self) -> int:
        return self._epoch_batches()

    def _plan(self) -> _EpochPlan:
        shuffle = self.train and self.cfg.shuffle
        segments = rank_segments(self.catalog.counts, seed=self.cfg.seed, epoch=self.epoch, rank=self.rank,
                                 world_size=self.world_size, shuffle=shuffle)
        everything = rank_segments(self.catalog.counts, seed=self.cfg.seed, epoch=self.epoch, rank=0, world_size=1,
                                   shuffle=shuffle)
        plan = _EpochPlan(self.catalog, segments, seed=self.cfg.seed, epoch=self.epoch, shuffle=shuffle,
                          start=self.position, batch_size=self.cfg.batch_size,
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
        return {"epoch": self.epoch, "position": self.position, "seed": self.cfg.seed,
                "world_size": self.world_size, "num_samples": self.num_samples}

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
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    # ---- counters
    @property
    def stats(self) -> dict:
        """Skip counters: dataset-wide validation counts, and this rank's run-time counts."""
        return {"skipped": dict(self.catalog.skipped), "repaired": dict(self.catalog.repaired),
                "skipped_at_make_shards": dict(self.catalog.skipped_at_make_shards),
                "runtime": dict(self.runtime), "vanished": sorted(self._gone), "delivered": self.delivered}

    def log_dict(self) -> dict:
        out = {}
        for group, values in self.stats.items():
            if isinstance(values, list):
                continue  # names (stats["vanished"]): counted in runtime
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
        return _PillowBatches(plan, tokenizer, self.image_size, self.train, tuple(self.cfg.random_area),
                              tuple(self.cfg.random_aspect_ratio))


class PyTorchLoader(_Loader):
    """DataLoader + Pillow: `num_threads` worker processes each decode, crop, normalise and tokenize whole batches."""

    backend = "pytorch"

    def _batches(self, plan):
        ds = self._pillow(plan, self.tokenizer)
        workers = max(0, int(self.cfg.num_threads))
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


class _ThreadAhead:
    """Iterates ds[0], ds[1], ... with one background thread computing up to `depth` items ahead (its
    exceptions surface at the item that raised). close() stops it; so does reaching the end."""

    def __init__(self, ds, depth: int):
        self.ds, self.depth, self.next_index = ds, depth, 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipforge-captions")
        self.pending = collections.deque()
        self._fill()

    def _fill(self):
        while len(self.pending) < self.depth and self.next_index < len(self.ds):
            self.pending.append(self.pool.submit(self.ds.__getitem__, self.next_index))
            self.next_index += 1

    def __iter__(self):
        return self

    def __next__(self):
        if not self.pending:
            self.close()
            raise StopIteration
        item = self.pending.popleft().result()
        self._fill()
        return item

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


def _index_name(name: str) -> str:
    """A member name as a DALI index field: DALI splits index lines on whitespace (a name with a space
    made it refuse the whole index: "Malformed index file") and reads data by offset and size, using the
    name only to describe the sample; so whitespace becomes "_" (unicode and dots stay)."""
    return "".join("_" if c.isspace() else c for c in name) or "_"


class DaliLoader(_Loader):
    """DALI: readers.webdataset (our per-epoch index) -> decoders.image -> crop/resize -> normalise."""

    backend = "dali"

    def _build(self, plan: _EpochPlan, tmpdir: str):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        from .shards import write_index

        # Runs of consecutive samples read from the same tar become one (tar, index) pair; DALI reads
        # the pairs in order and each index in its listed order. One shard in memory at a time.
        paths, indexes = [], []
        for shard, idx in plan.runs():
            samples = self.catalog.shard(shard)
            rows = samples.table[idx]
            cuts = np.flatnonzero(np.diff(rows["img_file"])) + 1
            for part in np.split(np.arange(len(idx)), cuts):
                r0 = rows[part[0]]
                path = os.path.join(tmpdir, f"{len(indexes):06d}.idx")
                write_index(path, ([("jpg", int(r["img_off"]), int(r["img_size"]), _index_name(samples.img_names[s]))]
                                   for r, s in zip(rows[part], idx[part])))
                paths.append(samples.files[r0["img_file"]])
                indexes.append(path)

        dev = _device(self.cfg)
        gpu = dev.type == "cuda"
        S = self.image_size
        seed = int.from_bytes(hashlib.sha1(f"{self.cfg.seed}/{self.epoch}/{self.rank}/{self.position}".encode())
                              .digest()[:4], "little") & 0x7FFFFFFF
        device_id = None  # CPU-only pipeline (no GPU, or no driver): DALI wants None, not -1
        if gpu:
            device_id = dev.index if dev.index is not None else torch.cuda.current_device()
        # exec_dynamic (DALI's default execution model, named so it cannot change under us): each output
        # batch is a fresh buffer that stays valid while referenced, so `_to_torch` can hand it out uncopied.
        pipe = Pipeline(batch_size=self.cfg.batch_size, num_threads=max(1, self.cfg.num_threads), device_id=device_id,
                        seed=seed, prefetch_queue_depth=self._depth(plan), exec_dynamic=True)
        with pipe:
            jpegs = fn.readers.webdataset(paths=paths, index_paths=indexes, ext=["jpg"], random_shuffle=False,
                                          missing_component_behavior="error", name="reader")
            images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
            if self.train:
                images = fn.random_resized_crop(images, size=(S, S), random_area=list(self.cfg.random_area),
                                                random_aspect_ratio=list(self.cfg.random_aspect_ratio),
                                                interp_type=types.INTERP_CUBIC, antialias=True)
                crop = None
            else:
                images = fn.resize(images, resize_shorter=S, interp_type=types.INTERP_CUBIC, antialias=True)
                crop = (S, S)
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", crop=crop,
                                              mean=[255 * m for m in CLIP_MEAN], std=[255 * s for s in CLIP_STD])
            pipe.set_outputs(images)
        pipe.build()
        return pipe

    def _depth(self, plan: _EpochPlan) -> int:
        """DALI's prefetch queue: `prefetch` batches, but never more than the epoch holds."""
        return max(1, min(int(self.cfg.prefetch), plan.num_batches))

    @staticmethod
    def _to_torch(out) -> torch.Tensor:
        from nvidia.dali.tensors import TensorGPU

        tensor = out.as_tensor()
        if isinstance(tensor, TensorGPU):  # DALI copies it into a new CUDA tensor on torch's stream
            from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor

            return to_torch_tensor(tensor, copy=True)
        # No copy: under exec_dynamic DALI allocates every output batch anew and the NumPy view keeps
        # it alive (tests/test_data.py holds a whole epoch of batches and checks none changed). The
        # copy cost ~7% of the loader's images/s on 2 cores.
        return torch.from_numpy(np.asarray(tensor))

    def _captions(self, plan):
        ds = _CaptionBatches(plan, self.tokenizer)
        workers = max(0, int(self.cfg.token_workers))
        if workers == 0:
            return _ThreadAhead(ds, depth=max(2, self.cfg.prefetch))
        return iter(torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                                                prefetch_factor=max(2, self.cfg.prefetch)))

    def _batches(self, plan):
        if plan.n == 0:
            return
        # Caption workers fork before the DALI pipeline starts its threads.
        captions = self._captions(plan)
        tmpdir = tempfile.mkdtemp(prefix="clipforge-dali-")
        fallback = None
        pipe = None
        try:
            pipe = self._build(plan, tmpdir)
            # schedule_run/outputs rather than run(): run() keeps `prefetch` iterations in flight, so it
            # would decode depth - 1 batches past the epoch's end, and the teardown would wait for them.
            pipe.schedule_run()  # the first call schedules `depth` iterations
            scheduled = self._depth(plan)
            for b in range(plan.num_batches):
                n_b = len(plan.batch_range(b))
                caption_batch = next(captions)
                if b > 0 and scheduled < plan.num_batches:
                    pipe.schedule_run()
                    scheduled += 1
                failure = None
                try:
                    (out,) = pipe.outputs()
                    images = self._to_torch(out)[:n_b]
                except Exception as exc:  # noqa: BLE001 - DALI raises RuntimeError for a bad batch
                    failure = str(exc).splitlines()[-1][:200]
                if caption_batch is None and failure is None:
                    failure = "a caption could not be read"
                if failure is not None:
                    # Only this batch is lost inside DALI (its pipeline carries on with the next):
                    # decode it again with Pillow, replacing what Pillow cannot read or decode either.
                    self.runtime["dali_failed_batches"] += 1
                    if self.runtime["dali_failed_batches"] == 1:
                        warnings.warn(f"DALI failed on a batch ({failure}); decoding it with Pillow instead. "
                                      f"Counted in loader.stats['runtime'].", RuntimeWarning)
                    if fallback is None:
                        fallback = self._pillow(plan, None)
                    images, used, texts, errors, missing = fallback.decode(b)
                    self.runtime.update(errors)
                    self._vanished(missing)
                    self.runtime["fallback_decoded"] += len(used)
                    tokens, keys = _tokenize(self.tokenizer, texts), [plan.key(i) for i in used]
                    images = images.to(_device(self.cfg))
                else:
                    tokens, keys = caption_batch
                yield images, tokens, keys, n_b
        finally:
            if isinstance(captions, _ThreadAhead):
                captions.close()
            del pipe
            shutil.rmtree(tmpdir, ignore_errors=True)


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


_BACKENDS = {"dali": DaliLoader, "pytorch": PyTorchLoader, "synthetic": SyntheticLoader}


def _backend(name: str):
    if name == "auto":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            return PyTorchLoader
        return DaliLoader
    if name not in _BACKENDS:
        raise DataError(f"data.backend = {name!r} is not one of auto, dali, pytorch, synthetic")
    return _BACKENDS[name]


def build_train_loader(cfg, rank: int = 0, world_size: int = 1, epoch: int = 0, start_position: int = 0,
                       image_size: int = 224, tokenizer=None, *, with_keys: bool = False, catalog: Catalog | None = None):
    """Training batches for this rank: (images float32 (B, 3, S, S), tokens int64 (B, 77)), see the module doc."""
    cfg = DataConfig.from_dict(cfg)
    return _backend(cfg.backend)(cfg, rank, world_size, epoch, start_position, image_size, tokenizer, train=True,
                                 with_keys=with_keys, catalog=catalog)


def build_eval_loader(cfg, rank: int = 0, world_size: int = 1, image_size: int = 224, tokenizer=None, *,
                      with_keys: bool = False, catalog: Catalog | None = None):
    """Evaluation batches: shorter-side bicubic resize + centre crop, file order, each sample once across ranks."""
    cfg = DataConfig.from_dict(cfg)
    return _backend(cfg.backend)(cfg, rank, world_size, 0, 0, image_size, tokenizer, train=False,
                                 with_keys=with_keys, catalog=catalog)
