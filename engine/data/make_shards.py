"""`clipforge make-shards`: image/caption pairs -> validated webdataset shards with DALI index files.

    clipforge make-shards SRC OUT_DIR [--shard-size N] [--max-side PX] [--workers W]

SRC is a folder (every image beside a caption file of the same name, `cat.jpg` + `cat.txt`, searched
recursively) or a table (CSV, TSV, Parquet, JSON lines: data/tables.py) with an image-path column and a caption column (paths relative
to the table's folder). OUT_DIR receives, like img2dataset:

    00000.tar   key.jpg + key.txt + key.json for up to N samples (key = shard id + index, "000000000")
    00000.idx   the DALI index of that tar (wds2idx format v1.2, written here, see `write_index`)
    stats.json  sample and shard counts, every skip and repair counted by reason, the first skipped
                sources with their reason, and `"validated": true` with each shard's byte size and
                the SHA-256 of the shard and of its index: `clipforge.data` skips read-time validation
                only for a shard whose two files hash to the recorded values (checked once per file version on each machine, remembered in
                its cache), so a stale, copied or forged stats.json switches nothing off.

Every sample is validated here (`check_image`, `check_caption`): a JPEG already in RGB or grayscale,
structurally sound and small enough is stored byte for byte; any other image that Pillow decodes
(PNG, WebP, CMYK, 16-bit, alpha, palette, EXIF-rotated, larger than --max-side) is converted to an
RGB JPEG; anything else is skipped and counted. The same two functions are the read-time guard that
`clipforge.data` runs over shards NOT written here.

Exit status: 0 when shards were written; 1 when none was (every sample skipped, or none found: one
sentence says why, stats.json lists the skipped sources); 2 for a usage error (a missing source, an
output folder that already holds shards, a bad option).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass

from .config import DEFAULT_MAX_PIXELS
from .webdataset import CAPTION_EXT, IMAGE_EXTS, STATS_FORMAT, STATS_NAME, index_tar, sha256_file
from .validate import JPEG_QUALITY, MAX_CAPTION_FILE_BYTES, RefusedPath, UnreadableFile, check_caption, check_image, count_skip, read_file, screen
from .tables import _table_items, is_table


MAX_LISTED_SKIPS = 1000


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

def _folder_items(src: str):
    """(source path, image path or None, caption path or None) for a folder, sorted, recursive. A link
    leading outside `src` becomes a RefusedPath (skipped when read); a second image of the same stem
    (`cat.jpg` and `cat.png`) yields an item of its own refused as `duplicate_image`: the first in
    sorted order is kept."""
    stems: dict[str, dict[str, str]] = {}
    duplicates = []
    for root, dirs, files in os.walk(src):  # never follows directory links
        dirs.sort()
        for name in sorted(files):
            if name.startswith("."):
                continue
            stem, ext = os.path.splitext(os.path.join(root, name))
            ext = ext[1:].lower()
            if ext in IMAGE_EXTS or ext == CAPTION_EXT:
                path = screen(os.path.join(root, name), src)
                stems.setdefault(stem, {})
                slot = "caption" if ext == CAPTION_EXT else "image"
                if slot == "image" and "image" in stems[stem]:
                    duplicates.append(path)
                else:
                    stems[stem][slot] = path
    for stem in sorted(stems):
        d = stems[stem]
        yield os.path.relpath(d.get("image", stem), src), d.get("image"), ("file", d.get("caption"))
    for path in duplicates:
        yield os.path.relpath(path, src), RefusedPath(path, "duplicate_image"), ("file", None)


def _load_and_check(item, max_pixels: int, max_side: int | None, quality: int):
    """Worker: read one source sample and validate it. Returns a plain tuple (pickled across processes)."""
    source, image_path, (kind, caption_ref) = item
    if isinstance(image_path, RefusedPath):
        return source, None, None, image_path.reason, "", None
    raw_caption: bytes | None
    try:
        if kind == "file":
            raw_caption = None if caption_ref is None else read_file(caption_ref, limit=MAX_CAPTION_FILE_BYTES)
        else:
            raw_caption = None if caption_ref is None else (
                caption_ref.encode("utf-8") if isinstance(caption_ref, str) else bytes(caption_ref))
        caption, reason = check_caption(raw_caption)
        if reason:
            return source, None, None, reason, "", None
        raw = None
        if image_path is not None and os.path.lexists(image_path):
            raw = read_file(image_path)
    except UnreadableFile as exc:
        return source, None, None, exc.reason, str(exc), None
    except OSError as exc:  # a dangling link, no permission, an I/O error
        return source, None, None, "unreadable_file", f"{type(exc).__name__}: {exc}", None
    chk = check_image(raw, max_pixels=max_pixels, max_side=max_side, quality=quality)
    if chk.reason:
        return source, None, None, chk.reason, chk.detail, None
    meta = {"width": chk.width, "height": chk.height, "original_width": chk.original_width,
            "original_height": chk.original_height, "repaired": chk.repaired}
    return source, chk.data, caption, None, "", meta


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------

class ShardWriter:
    """Writes NNNNN.tar (+ NNNNN.idx) files of at most `shard_size` samples into `out_dir`."""

    def __init__(self, out_dir: str, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
        self.out_dir, self.shard_size = out_dir, shard_size
        self.key_width = len(str(shard_size - 1))
        self.shards: list[dict] = []
        self._tar = None
        self._count = 0

    def _open(self):
        name = f"{len(self.shards):05d}.tar"
        self._path = os.path.join(self.out_dir, name)
        self._tar = tarfile.open(self._path + ".tmp", "w", format=tarfile.GNU_FORMAT)
        self.shards.append({"name": name, "count": 0, "bytes": 0})
        self._count = 0

    def _add(self, name: str, data: bytes):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def add(self, jpeg: bytes, caption: str, meta: dict) -> str:
        if self._tar is None:
            self._open()
        key = f"{len(self.shards) - 1:05d}{self._count:0{self.key_width}d}"
        self._add(f"{key}.jpg", jpeg)
        self._add(f"{key}.txt", caption.encode("utf-8"))
        record = {"key": key, "caption": caption, "status": "success", "error_message": None, **meta}
        self._add(f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8"))
        self._count += 1
        self.shards[-1]["count"] = self._count
        if self._count == self.shard_size:
            self.close()
        return key

    def close(self):
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        os.replace(self._path + ".tmp", self._path)
        index_tar(self._path)
        self.shards[-1]["bytes"] = os.path.getsize(self._path)
        self.shards[-1]["sha256"] = sha256_file(self._path)
        self.shards[-1]["idx_sha256"] = sha256_file(os.path.splitext(self._path)[0] + ".idx")


@dataclass
class MakeShardsConfig:
    src: str
    out_dir: str
    shard_size: int = 10000
    max_side: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    quality: int = JPEG_QUALITY
    workers: int = 0  # 0: os.cpu_count()
    image_col: str | None = None
    caption_col: str | None = None
    progress: bool = True


def make_shards(cfg: MakeShardsConfig) -> dict:
    """Write the shards, their DALI indexes and stats.json; return the stats."""
    from tqdm import tqdm

    if not os.path.exists(cfg.src):
        raise FileNotFoundError(f"make-shards source {cfg.src} does not exist; give a folder or a table (.csv, .tsv, .parquet, .jsonl, .json)")
    if cfg.max_side is not None and cfg.max_side < 1:
        raise ValueError(f"--max-side must be a positive number of pixels, got {cfg.max_side}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    if any(n.endswith(".tar") for n in os.listdir(cfg.out_dir)):
        raise FileExistsError(f"{cfg.out_dir} already holds .tar shards; choose an empty output folder")
    if os.path.isdir(cfg.src):
        items = list(_folder_items(cfg.src))
    elif is_table(cfg.src):
        items = list(_table_items(cfg.src, cfg.image_col, cfg.caption_col))
    else:
        raise ValueError(f"make-shards source {cfg.src} is neither a folder nor a table (.csv, .tsv, .parquet, .jsonl, .json)")

    writer = ShardWriter(cfg.out_dir, cfg.shard_size)
    skipped, repaired, listed = Counter(), Counter(), []
    workers = cfg.workers or os.cpu_count() or 1
    job = _Job(cfg.max_pixels, cfg.max_side, cfg.quality)
    bar = tqdm(total=len(items), unit="img", desc="make-shards", disable=not cfg.progress, file=sys.stderr)
    pool = None
    try:
        if workers > 1 and len(items) > 1:
            import multiprocessing as mp

            pool = mp.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers)
            results = pool.imap(job, items, chunksize=8)
        else:
            results = map(job, items)
        for source, data, caption, reason, detail, meta in results:
            bar.update(1)
            if reason:
                count_skip(skipped, reason)
                if len(listed) < MAX_LISTED_SKIPS:
                    listed.append({"source": source, "reason": reason, "detail": detail})
                continue
            if meta["repaired"]:
                for r in meta["repaired"].split("+"):
                    repaired[r] += 1
            meta["url"] = source
            writer.add(data, caption, meta)
        writer.close()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    stats = {
        "format": STATS_FORMAT,
        "validated": True,
        "source": os.path.abspath(cfg.src),
        "count": sum(s["count"] for s in writer.shards),
        "seen": len(items),
        "skipped": dict(sorted(skipped.items())),
        "skipped_total": sum(skipped.values()),
        "repaired": dict(sorted(repaired.items())),
        "skipped_samples": listed,
        "shards": writer.shards,
        "shard_size": cfg.shard_size,
        "max_side": cfg.max_side,
        "max_pixels": cfg.max_pixels,
    }
    tmp = os.path.join(cfg.out_dir, STATS_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(stats, f, indent=1, ensure_ascii=False)
    os.replace(tmp, os.path.join(cfg.out_dir, STATS_NAME))
    return stats


class _Job:
    """Picklable worker callable (a closure would not cross a spawn boundary)."""

    def __init__(self, max_pixels, max_side, quality):
        self.args = (max_pixels, max_side, quality)

    def __call__(self, item):
        return _load_and_check(item, *self.args)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="folder of images + same-name .txt captions, or a table (.csv, .tsv, .parquet, .jsonl, .json)")
    parser.add_argument("out_dir", help="output folder for NNNNN.tar, NNNNN.idx and stats.json")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples per shard (default 10000)")
    parser.add_argument("--max-side", type=int, default=None,
                        help="re-encode images whose longer side exceeds PX to a JPEG of that side")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="skip images with more pixels than this (after --max-side's reduced decode)")
    parser.add_argument("--quality", type=int, default=JPEG_QUALITY, help="JPEG quality of re-encoded images")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (default: all cores)")
    parser.add_argument("--image-col", default=None, help="table column holding image paths")
    parser.add_argument("--caption-col", default=None, help="table column holding captions")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    cfg = MakeShardsConfig(src=args.src, out_dir=args.out_dir, shard_size=args.shard_size, max_side=args.max_side,
                           max_pixels=args.max_pixels, quality=args.quality, workers=args.workers,
                           image_col=args.image_col, caption_col=args.caption_col, progress=not args.quiet)
    try:
        stats = make_shards(cfg)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"clipforge make-shards: {exc}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{k} {v}" for k, v in stats["skipped"].items()) or "none"
    if stats["count"] == 0:
        print(f"clipforge make-shards: {_nothing_written(stats, cfg)}", file=sys.stderr)
        return 1
    print(f"wrote {stats['count']} samples in {len(stats['shards'])} shards to {cfg.out_dir} "
          f"(skipped {stats['skipped_total']}: {skipped})")
    return 0


def _nothing_written(stats: dict, cfg: MakeShardsConfig) -> str:
    """The sentence of a run that wrote no shard: why, from its skip counts (stats.json lists the sources)."""
    seen, skipped, src = stats["seen"], stats["skipped"], cfg.src
    if seen == 0:
        what = f"images ({', '.join('.' + e for e in IMAGE_EXTS)}) or captions (.txt)" if os.path.isdir(src) else "rows"
        return f"no shard written: {src} holds no {what}"
    if set(skipped) == {"missing_caption"}:
        how = ("a same-name .txt beside each image, cat.jpg + cat.txt, or a table with a caption column: "
               "--caption-col" if os.path.isdir(src) else "the caption column is empty in every row")
        return f"no shard written: {seen} images found in {src}, none with a caption ({how})"
    counts = ", ".join(f"{k} {v}" for k, v in skipped.items())
    return (f"no shard written: all {seen} samples of {src} were skipped ({counts}); "
            f"{os.path.join(cfg.out_dir, STATS_NAME)} lists them with the reasons")


def main(argv=None) -> int:
    from ..cli import run_command

    return run_command("make-shards", argv)


if __name__ == "__main__":
    sys.exit(main())
