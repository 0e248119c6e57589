"""Per-sample checks, shared by make-shards and read-time validation: safe reads of source files
(no pipes, devices, links out of the source), caption checks and image checks (decode, JPEG structure,
repairs to an RGB JPEG). SKIP_REASONS names every reason a sample is skipped."""
from __future__ import annotations

import errno
import io
import math
import os
import stat
import warnings
from dataclasses import dataclass

from .config import DEFAULT_MAX_PIXELS
from .images import pil_to_rgb

JPEG_QUALITY = 95  # quality of re-encoded images


# A source file (image or caption) is read whole only up to this size; a larger one is skipped.
MAX_FILE_BYTES = 256 << 20


# A caption file is text: a larger one is skipped (the tokenizer reads 16,384 characters of it anyway).
MAX_CAPTION_FILE_BYTES = 1 << 20

# Skip reasons: the one vocabulary of make-shards' stats.json and the loaders' skip counters
# (`count_skip` refuses any other name, so a report never carries a reason nobody documented).
SKIP_REASONS = (
    "missing_image", "empty_image", "corrupt_image", "too_large",
    "missing_caption", "empty_caption", "bad_caption_encoding", "duplicate_key",
    "duplicate_image", "not_a_regular_file", "link_outside_source", "path_outside_source", "file_too_large",
    "unreadable_file", "truncated_tar",
)


def count_skip(counter, reason: str, n: int = 1) -> None:
    """Count `n` samples skipped for `reason`, one of SKIP_REASONS."""
    if reason not in SKIP_REASONS:
        raise ValueError(f"skip reason {reason!r} is not one of SKIP_REASONS; add it there (and to the docs)")
    counter[reason] += n


# --------------------------------------------------------------------------------------------
# Reading source files safely (make-shards, the embedding API and the evaluation folders)
# --------------------------------------------------------------------------------------------

class RefusedPath(str):
    """A path that was listed but must not be read; `reason` is its skip reason (a SKIP_REASONS name).
    It is a str, so it travels in path lists and reports like any other path."""

    reason: str

    def __new__(cls, path: str, reason: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"skip reason {reason!r} is not one of SKIP_REASONS")
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
