"""The catalog: usable samples of every shard, from make-shards' index (trusted by SHA-256) or from
read-time validation cached in `cache_dir`. Memory is O(shards); a shard's sample list loads on use."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .webdataset import CAPTION_EXT, IMAGE_EXTS, MAX_MEMBER_BYTES, STATS_FORMAT, STATS_NAME, read_index, scan_tar, sha256_file, split_name
from .validate import MAX_CAPTION_FILE_BYTES, check_caption, check_image, count_skip
from .config import DEFAULT_MAX_PIXELS, DataError
from .webdataset import _pread, expand_shards


CACHE_VERSION = 2  # 2: samples bound by position (duplicate keys, repair members named per sample)


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

    def __init__(self, refs: list[ShardRef], skipped=None, repaired=None, skipped_at_make_shards=None,
                 skipped_by_shard=None):
        self.refs = refs
        self.skipped = Counter(skipped or {})  # read-time validation, data-set wide
        self.skipped_by_shard = dict(skipped_by_shard or {})  # {shard file name: {reason: count}}
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
        raise DataError(f"shard {path} is not a readable tar file ({exc}); remove it from data.path") from exc
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

    skipped, repaired = Counter(), Counter()
    if duplicates:
        count_skip(skipped, "duplicate_key", duplicates)
    if "truncated_at" in tar_report:
        count_skip(skipped, "truncated_tar")
    keys, names, rows = [], [], []
    tmp_repair = f"{repair_path}.tmp{os.getpid()}"
    repair_tar = None
    for key, img, reason, chk in results:
        if reason:
            count_skip(skipped, reason)
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
                  rank: int = 0, world_size: int = 1, key: str = "data.path") -> Catalog:
    """Sample counts of every shard (same result on every rank; read-time checks are cached). `key`: the
    config key the spec came from, for the message when nothing is usable."""
    paths = expand_shards(spec)
    # skips by shard are reported by file name; by path where two shards (e.g. of two sources) share one
    names = [os.path.basename(p) for p in paths]
    clash = {n for n, c in Counter(names).items() if c > 1}
    names = [p if n in clash else n for p, n in zip(paths, names)]
    cache_dir = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                          "clipforge", "shards")
    refs: list[ShardRef | None] = [None] * len(paths)
    skipped, repaired, at_make_shards, by_shard = Counter(), Counter(), Counter(), {}
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
            if sk:
                by_shard[names[i]] = dict(sk)
    cat = Catalog(refs, skipped, repaired, at_make_shards, by_shard)
    if int(cat.counts.sum()) == 0:
        raise DataError(f"no usable sample in {key} = {spec!r} (skipped: {dict(cat.skipped)})")
    return cat
