"""Webdataset tars and their DALI index files: scanning a tar's members into samples, the wds2idx
index (v1.2) written and read here, shard specs (folder, glob, brace range) and file hashes."""
from __future__ import annotations

import hashlib
import os
import tarfile

from .config import DataError


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXT = "txt"


INDEX_VERSION = "v1.2"
STATS_NAME = "stats.json"
STATS_FORMAT = "clipforge-shards/2"  # 2: each shard's SHA-256 (what lets clipforge.data trust it)


# A tar member larger than this is skipped at read-time validation without being read.
MAX_MEMBER_BYTES = 256 << 20


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
                             f"rebuild it with `clipforge.data.webdataset.index_tar`")
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


def expand_shards(spec) -> list[str]:
    """Shard paths from a folder, a glob, a brace range "{00000..00012}", or a list of those."""
    import glob
    import re

    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in expand_shards(s)]
    spec = os.path.expanduser(str(spec))
    if not spec:
        raise DataError("data.path is empty: give a folder of .tar shards, a glob or a list of paths")
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
            raise DataError(f"shard {p} does not exist (data.path = {spec!r})")
    if not paths:
        raise DataError(f"data.path = {spec!r} matches no .tar file")
    return paths


def _pread(fd: int, offset: int, size: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OSError(f"short read: {len(data)} of {size} bytes at offset {offset}")
    return data
