"""`clipforge make-shards`: image/caption pairs -> validated webdataset shards with DALI index files.

    clipforge make-shards SRC OUT_DIR [--shard-size N] [--max-side PX] [--workers W]

SRC is a folder (every image beside a caption file of the same name, `cat.jpg` + `cat.txt`, searched
recursively) or a CSV / Parquet table with an image-path column and a caption column (paths relative
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
"""
from __future__ import annotations

import argparse
import csv
import errno
import hashlib
import io
import json
import math
import os
import stat
import sys
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXT = "txt"
# Pillow's own decompression-bomb threshold (~89.5 MP): larger images are skipped as "too_large",
# unless --max-side lets make-shards decode a JPEG at a reduced DCT scale first.
DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3
JPEG_QUALITY = 95
INDEX_VERSION = "v1.2"
STATS_NAME = "stats.json"
STATS_FORMAT = "clipforge-shards/2"  # 2: each shard's SHA-256 (what lets clipforge.data trust it)
MAX_LISTED_SKIPS = 1000

# A source file (image or caption) is read whole only up to this size; a larger one is skipped.
MAX_FILE_BYTES = 256 << 20
# A tar member larger than this is skipped at read-time validation without being read.
MAX_MEMBER_BYTES = 256 << 20
# A caption file is text: a larger one is skipped (the tokenizer reads 16,384 characters of it anyway).
MAX_CAPTION_FILE_BYTES = 1 << 20

# Skip reasons (shared with clipforge.data, whose counters use the same names).
SKIP_REASONS = (
    "missing_image", "empty_image", "corrupt_image", "too_large",
    "missing_caption", "empty_caption", "bad_caption_encoding", "duplicate_key",
    "duplicate_image", "not_a_regular_file", "link_outside_source", "path_outside_source", "file_too_large",
    "unreadable_file", "truncated_tar",
)


# --------------------------------------------------------------------------------------------
# Reading source files safely (make-shards, the embedding API and the evaluation folders)
# --------------------------------------------------------------------------------------------

class RefusedPath(str):
    """A path that was listed but must not be read; `reason` is its skip reason (a SKIP_REASONS name).
    It is a str, so it travels in path lists and reports like any other path."""

    reason: str

    def __new__(cls, path: str, reason: str):
        obj = super().__new__(cls, path)
        obj.reason = reason
        return obj

    def __reduce__(self):  # make-shards sends items to worker processes: keep the reason across
        return (RefusedPath, (str(self), self.reason))


class UnreadableFile(ValueError):
    """A source file refused before reading: `reason` is its skip reason."""

    def __init__(self, path: str, reason: str, detail: str):
        super().__init__(f"{path}: {detail}")
        self.path, self.reason = path, reason


def inside(path: str, root: str) -> bool:
    """Whether `path`, its links resolved, lies inside the folder `root`."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def screen(path: str, root: str, reason: str = "link_outside_source") -> str:
    """`path`, or a RefusedPath when it (a link, or a table's relative path) leads outside `root`."""
    return path if inside(path, root) else RefusedPath(path, reason)


def read_file(path: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. A RefusedPath, a pipe, a device (a link to
    /dev/zero once made `zeroshot` read 19 GB), a socket, or a larger file raises UnreadableFile without
    blocking: the file is opened non-blocking and checked on its descriptor before a byte is read."""
    if isinstance(path, RefusedPath):
        raise UnreadableFile(path, path.reason, "leads outside the source folder" if "outside" in path.reason
                             else path.reason.replace("_", " "))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a socket
            raise UnreadableFile(path, "not_a_regular_file", "not a regular file (a socket)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a pipe" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or \
                stat.S_ISBLK(st.st_mode) else "not a file"
            raise UnreadableFile(path, "not_a_regular_file", f"not a regular file ({kind})")
        if st.st_size > limit:
            raise UnreadableFile(path, "file_too_large", f"{st.st_size:,} bytes, over the {limit:,}-byte limit")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # the file grew while being read
                raise UnreadableFile(path, "file_too_large", f"over the {limit:,}-byte limit")
        return b"".join(chunks)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# DALI index files (what `wds2idx` writes; `fn.readers.webdataset(index_paths=...)` reads them):
#   line 1:  "v1.2 <number of samples>"
#   then one line per sample, its components in tar order: "<ext> <data offset> <size> <name>" ...
# The offset is that of the member's DATA (its 512-byte header excluded). DALI returns samples in
# index order and accepts an index that lists a subset of a tar's samples in any order, which is
# how clipforge.data shuffles, shards across ranks and resumes mid-epoch (checked in tests).
# --------------------------------------------------------------------------------------------

def split_name(name: str) -> tuple[str, str]:
    """Split a member name into (key, extension) at the first dot of its basename (wds2idx's rule)."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def scan_tar(path: str, report: dict | None = None) -> list[tuple[str, dict[str, tuple[int, int, str]]]]:
    """Samples of a tar in file order: [(key, {ext: (data offset, size, member name)})].

    Members are grouped like wds2idx does (consecutive members with the same key), except that a
    component already in the current sample starts a new one (`a.jpg a.txt a.jpg a.txt` is two
    samples, never one whose image and caption come from different members); a key may therefore
    repeat, and callers decide what a repeat means (clipforge.data keeps the first). Directories,
    links and hidden files are ignored. A tar cut short keeps the members that end inside the file;
    `report`, when given, then gets "truncated_at": the byte offset after which the rest is lost.
    """
    file_size = os.path.getsize(path)
    samples: list[tuple[str, dict]] = []
    with tarfile.open(path, "r:") as tar:
        while True:
            try:
                member = tar.next()
            except (tarfile.ReadError, EOFError):
                if report is not None:  # truncated or damaged tail: keep what was readable
                    report["truncated_at"] = tar.offset
                break
            if member is None:
                break
            if member.offset_data + member.size > file_size:
                if report is not None:
                    report["truncated_at"] = member.offset
                break
            if not member.isreg():
                continue
            key, ext = split_name(member.name)
            if not key or key.endswith("/") or os.path.basename(key).startswith("."):
                continue
            if samples and samples[-1][0] == key and ext not in samples[-1][1]:
                samples[-1][1][ext] = (member.offset_data, member.size, member.name)
            else:
                samples.append((key, {ext: (member.offset_data, member.size, member.name)}))
    return samples


def write_index(idx_path: str, samples) -> None:
    """Write a DALI index file atomically; `samples` yields lists of (ext, offset, size, name)."""
    samples = list(samples)
    tmp = f"{idx_path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{INDEX_VERSION} {len(samples)}\n")
        for components in samples:
            f.write(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in components))
            f.write("\n")
    os.replace(tmp, idx_path)


def read_index(idx_path: str) -> list[list[tuple[str, int, int, str]]]:
    """Parse a DALI index file (v1.2, or v1.1 without names) into lists of (ext, offset, size, name)."""
    with open(idx_path) as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] not in ("v1.1", "v1.2"):
            raise ValueError(f"{idx_path} is not a DALI webdataset index (first line {' '.join(header)!r}); "
                             f"rebuild it with `clipforge.shards.index_tar`")
        per = 4 if header[0] == "v1.2" else 3
        out = []
        for line in f:
            parts = line.split()
            if not parts:
                continue
            comps = []
            for i in range(0, len(parts), per):
                ext, off, size = parts[i], int(parts[i + 1]), int(parts[i + 2])
                comps.append((ext, off, size, parts[i + 3] if per == 4 else ""))
            out.append(comps)
    if len(out) != int(header[1]):
        raise ValueError(f"{idx_path} announces {header[1]} samples but lists {len(out)}; rebuild it")
    return out


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def index_tar(tar_path: str, idx_path: str | None = None) -> str:
    """Write `tar_path`'s DALI index (default: same name with .idx) and return its path."""
    idx_path = idx_path or os.path.splitext(tar_path)[0] + ".idx"
    samples = scan_tar(tar_path)
    if not samples:
        raise ValueError(f"{tar_path} holds no samples; a webdataset shard needs key.ext members")
    write_index(idx_path, ([(ext, *comp) for ext, comp in comps.items()] for _, comps in samples))
    return idx_path


# --------------------------------------------------------------------------------------------
# Validation: one function per component, used at make-shards time and as the read-time guard.
# --------------------------------------------------------------------------------------------

def check_caption(raw: bytes | None) -> tuple[str | None, str | None]:
    """(caption, None) for a usable caption, else (None, skip reason)."""
    if raw is None:
        return None, "missing_caption"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, "bad_caption_encoding"
    text = text.strip()
    if not text:
        return None, "empty_caption"
    return text, None


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_structure_error(data: bytes) -> str | None:
    """None if the JPEG's marker structure is sound, else what is wrong.

    Pillow (libjpeg) decodes many damaged JPEGs with a warning and hides it; DALI's parser and
    decoders treat the same damage as a fatal error ("Invalid marker", "Premature end of JPEG
    data"). Walking the markers (SOI, sized segments, entropy-coded scans whose 0xFF bytes must be
    stuffed or restart markers, EOI) catches most of that damage cheaply, without decoding.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return "no start-of-image marker"
    i, seen_sof = 2, False
    while True:
        if i >= n:
            return "ends before the end-of-image marker"
        if data[i] != 0xFF:
            return f"expected a marker at byte {i}"
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            return "ends inside a marker"
        marker = data[i]
        i += 1
        if marker == 0xD9:
            return None if seen_sof else "end-of-image before any frame"
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue  # standalone markers
        if marker < 0xC0 or marker == 0xD8:
            return f"invalid marker 0xFF{marker:02X} at byte {i - 2}"
        if i + 2 > n:
            return "ends inside a segment length"
        length = (data[i] << 8) | data[i + 1]
        if length < 2 or i + length > n:
            return f"segment 0xFF{marker:02X} at byte {i - 2} overruns the file"
        seen_sof |= marker in _SOF_MARKERS
        i += length
        if marker == 0xDA:  # start of scan: skip the entropy-coded data up to the next real marker
            if not seen_sof:
                return "scan before any frame header"
            while True:
                j = data.find(b"\xff", i)
                if j < 0 or j + 1 >= n:
                    return "truncated inside a scan"
                nxt = data[j + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:
                    i = j + 2
                elif nxt == 0xFF:
                    i = j + 1
                else:
                    i = j
                    break


def pil_to_rgb(im):
    """Any Pillow image -> 8-bit RGB: alpha composited over white, 16/32-bit scaled (not clipped)."""
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im)
        # 16-bit range to 8 bits (Pillow's own convert("L") clips at 255 instead).
        arr = (np.clip(arr, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im)
        hi = float(arr.max()) if arr.size else 1.0
        scale = 255.0 if hi <= 1.0 else (255.0 / 65535.0 if hi > 255.0 else 1.0)
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK (Pillow undoes Adobe's inverted CMYK), YCbCr, LAB, ...


@dataclass
class ImageCheck:
    """Outcome of `check_image`: `reason` set means skip; `data` is the JPEG to store."""

    data: bytes | None = None
    reason: str | None = None  # skip reason
    detail: str = ""
    repaired: str | None = None  # why the image was re-encoded (None: original bytes kept)
    width: int = 0
    height: int = 0
    original_width: int = 0
    original_height: int = 0


def check_image(raw: bytes | None, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None,
                quality: int = JPEG_QUALITY) -> ImageCheck:
    """Validate one encoded image and return the bytes to store, or a skip reason.

    Kept byte for byte: a structurally sound JPEG in RGB or grayscale, without EXIF rotation, not
    larger than max_side. Re-encoded as an RGB JPEG: every other image Pillow verifies and decodes
    fully. Skipped: missing, empty, undecodable or truncated files, and images over max_pixels
    (counted after the reduced-scale JPEG decode that max_side allows).
    """
    from PIL import Image, ImageOps

    if raw is None:
        return ImageCheck(reason="missing_image")
    if len(raw) == 0:
        return ImageCheck(reason="empty_image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(raw)) as probe:
                probe.verify()  # structure / CRC checks; the image must be reopened afterwards
            im = Image.open(io.BytesIO(raw))
        except Image.DecompressionBombError as exc:
            return ImageCheck(reason="too_large", detail=str(exc))
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
            return ImageCheck(reason="corrupt_image", detail=f"{type(exc).__name__}: {exc}")
        ow, oh = im.size
        fmt = im.format
        if ow < 1 or oh < 1:
            return ImageCheck(reason="corrupt_image", detail=f"size {ow}x{oh}")
        orientation = 1
        try:
            orientation = int(im.getexif().get(0x0112, 1) or 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
            orientation = 1
        too_big_side = max_side is not None and max(ow, oh) > max_side
        structure = jpeg_structure_error(raw) if fmt == "JPEG" else None
        keep = (fmt == "JPEG" and im.mode in ("RGB", "L") and orientation == 1 and not too_big_side
                and structure is None)
        if fmt == "JPEG" and structure is not None:
            # Libjpeg may still decode it (Pillow would); GPU/DALI decoders refuse it. Skip.
            return ImageCheck(reason="corrupt_image", detail=f"JPEG structure: {structure}",
                              original_width=ow, original_height=oh)
        if fmt == "JPEG" and too_big_side:
            # Decode at the smallest DCT scale (1/2 .. 1/8) that still covers max_side.
            s = max_side / max(ow, oh)
            im.draft(im.mode, (max(1, math.ceil(ow * s)), max(1, math.ceil(oh * s))))
        if im.size[0] * im.size[1] > max_pixels:
            return ImageCheck(reason="too_large", detail=f"{ow}x{oh} pixels (limit {max_pixels}; "
                              f"make-shards --max-side can shrink large JPEGs)", original_width=ow,
                              original_height=oh)
        if keep:
            # Validation only: a 1/8-scale DCT decode still reads every entropy-coded byte, so
            # truncation and undecodable scans fail here, at a fraction of a full decode.
            im.draft(im.mode, (max(1, ow // 8), max(1, oh // 8)))
        try:
            im.load()
        except Exception as exc:  # noqa: BLE001 - truncated files raise OSError, others vary
            return ImageCheck(reason="corrupt_image", detail=f"{type(exc).__name__}: {exc}",
                              original_width=ow, original_height=oh)
    if keep:
        return ImageCheck(data=raw, width=ow, height=oh, original_width=ow, original_height=oh)

    reasons = []
    if fmt != "JPEG":
        reasons.append(f"format_{fmt or 'unknown'}")
    if im.mode not in ("RGB", "L"):
        reasons.append(f"mode_{im.mode}")
    if orientation != 1:
        reasons.append("exif_orientation")
        im = ImageOps.exif_transpose(im)
    rgb = pil_to_rgb(im)
    if max_side is not None and max(rgb.size) > max_side:
        reasons.append("resized")
        s = max_side / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.size[0] * s)), max(1, round(rgb.size[1] * s))), Image.BICUBIC,
                         reducing_gap=3.0)
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=quality)
    w, h = rgb.size
    return ImageCheck(data=out.getvalue(), repaired="+".join(reasons) or "reencoded", width=w, height=h,
                      original_width=ow, original_height=oh)


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


# Column names a (path, caption) table may use, in order of preference (clipforge.eval reads the same).
IMAGE_COLUMNS = ("path", "image", "image_path", "filepath", "file", "filename")
CAPTION_COLUMNS = ("caption", "text", "title")


def _pick(columns, wanted, given, table):
    if given:
        if given not in columns:
            raise ValueError(f"{table} has no column {given!r} (columns: {', '.join(columns)})")
        return given
    for c in wanted:
        if c in columns:
            return c
    raise ValueError(f"{table} has none of the columns {', '.join(wanted)}; name them with "
                     f"--image-col / --caption-col (columns: {', '.join(columns)})")


def _table_items(src: str, image_col: str | None, caption_col: str | None):
    base = os.path.dirname(os.path.abspath(src))
    if src.lower().endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise SystemExit(f"reading {src} needs pyarrow: pip install pyarrow") from exc
        table = pq.read_table(src)
        cols = table.column_names
        ic, cc = _pick(cols, IMAGE_COLUMNS, image_col, src), _pick(cols, CAPTION_COLUMNS, caption_col, src)
        rows = zip(table.column(ic).to_pylist(), table.column(cc).to_pylist())
    else:
        f = open(src, newline="", encoding="utf-8")
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        ic, cc = _pick(cols, IMAGE_COLUMNS, image_col, src), _pick(cols, CAPTION_COLUMNS, caption_col, src)
        rows = ((r[ic], r[cc]) for r in reader)
    for path, caption in rows:
        # relative to the table's folder, and inside it (links resolved): "../x" or "/etc/x" is refused
        full = screen(os.path.join(base, path), base, "path_outside_source") if path else None
        yield path or "", full, ("text", caption)


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
        raise FileNotFoundError(f"make-shards source {cfg.src} does not exist; give a folder or a .csv/.parquet file")
    if cfg.max_side is not None and cfg.max_side < 1:
        raise ValueError(f"--max-side must be a positive number of pixels, got {cfg.max_side}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    if any(n.endswith(".tar") for n in os.listdir(cfg.out_dir)):
        raise FileExistsError(f"{cfg.out_dir} already holds .tar shards; choose an empty output folder")
    if os.path.isdir(cfg.src):
        items = list(_folder_items(cfg.src))
    elif cfg.src.lower().endswith((".csv", ".parquet")):
        items = list(_table_items(cfg.src, cfg.image_col, cfg.caption_col))
    else:
        raise ValueError(f"make-shards source {cfg.src} is neither a folder nor a .csv/.parquet table")

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
                skipped[reason] += 1
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
    parser.add_argument("src", help="folder of images + same-name .txt captions, or a .csv/.parquet table")
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
    print(f"wrote {stats['count']} samples in {len(stats['shards'])} shards to {cfg.out_dir} "
          f"(skipped {stats['skipped_total']}: {skipped})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="clipforge make-shards", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
