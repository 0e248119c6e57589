"""Evaluation data sets: ImageFolder-style labelled folders, labelled webdataset shards, and
captioned image sets (tables or shards) for retrieval."""
from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..data.tables import CAPTION_COLUMNS, IMAGE_COLUMNS, TableError, is_table, pick_column, read_table
from ..data.webdataset import IMAGE_EXTS, split_name
from ..data.validate import screen


_CAPTION_COLUMNS = CAPTION_COLUMNS + ("captions",)  # here a cell may also hold a list of captions (JSON)


class EvalDataError(ValueError):
    """An evaluation dataset cannot be used; the message names the file and what to fix."""


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------

def _is_image_name(name: str) -> bool:
    return split_name(name)[1].lower() in IMAGE_EXTS and not os.path.basename(name).startswith(".")


def _is_webdataset(spec: str) -> bool:
    if any(c in spec for c in "*?[{") or spec.endswith(".tar"):
        return True
    return os.path.isdir(spec) and any(n.endswith(".tar") for n in os.listdir(spec))


def image_folder(root: str) -> tuple[list[str], np.ndarray, list[str]]:
    """An ImageFolder directory -> (image paths, int labels, class folder names), classes in sorted order."""
    if not os.path.isdir(root):
        raise EvalDataError(f"{root} is not a directory; give an ImageFolder-style folder with one sub-folder per class")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise EvalDataError(f"{root} has no class sub-folders; put each class's images in a folder named after it")
    paths, labels = [], []
    for c, name in enumerate(classes):
        for dirpath, dirnames, files in os.walk(os.path.join(root, name)):
            dirnames.sort()
            for fname in sorted(files):
                if _is_image_name(fname):
                    # a link leading out of `root` stays listed but is refused when read (reported as skipped)
                    paths.append(screen(os.path.join(dirpath, fname), root))
                    labels.append(c)
    if not paths:
        raise EvalDataError(f"{root} holds no image files ({', '.join(IMAGE_EXTS)}) in its class folders")
    return paths, np.asarray(labels, dtype=np.int64), classes


def list_images(root: str) -> list[str]:
    """Every image file below `root`, sorted (for unlabelled folders: `clipforge embed`, `clipforge zeroshot`)."""
    if not os.path.isdir(root):
        raise EvalDataError(f"{root} is not a directory of images")
    out = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(screen(os.path.join(dirpath, f), root) for f in sorted(files) if _is_image_name(f))
    if not out:
        raise EvalDataError(f"{root} holds no image files ({', '.join(IMAGE_EXTS)})")
    return out


def _webdataset_samples(spec: str) -> Iterator[tuple[str, dict[str, bytes] | None]]:
    """(tar:key, {ext: bytes}) for every sample of the shards, in order, one sample in memory at a time;
    (tar:key, None) for a key that repeats in its tar (the first sample of a key is the one kept, as in
    clipforge.data), and (tar:<tail after byte N>, None) for a tar cut short."""
    from ..data.webdataset import expand_shards
    from ..data.webdataset import scan_tar

    for path in expand_shards(spec):
        fd = os.open(path, os.O_RDONLY)
        seen, report = set(), {}
        try:
            for key, comps in scan_tar(path, report):
                name = f"{os.path.basename(path)}:{key}"
                if key in seen:
                    yield name, None
                    continue
                seen.add(key)
                yield name, {ext.lower(): os.pread(fd, size, off) for ext, (off, size, _) in comps.items()}
            if "truncated_at" in report:  # reported as a skipped entry: the lost samples cannot be listed
                yield f"{os.path.basename(path)}:<tail after byte {report['truncated_at']}>", None
        finally:
            os.close(fd)


def _image_of(comps: dict[str, bytes]) -> bytes | None:
    return next((comps[e] for e in IMAGE_EXTS if e in comps), None)


class _LabelledShards:
    """A labelled webdataset as a lazy image sequence: iterating yields image bytes; labels and sample
    keys are collected as it goes, samples without an image or a valid label are recorded as skipped."""

    def __init__(self, spec: str):
        self.spec = spec
        self.keys: list[str] = []
        self.labels: list[int] = []
        self.skipped: list[list[str]] = []

    def __iter__(self):
        for key, comps in _webdataset_samples(self.spec):
            if comps is None:
                self.skipped.append([key, "the tar is cut short here: its remaining samples are lost" if "<tail" in key
                                     else "repeated key (the first sample of that key is kept)"])
                continue
            img = _image_of(comps)
            raw = comps.get("cls")
            if img is None:
                self.skipped.append([key, "no image in the sample"])
                continue
            try:
                label = int(raw.decode("utf-8").strip()) if raw is not None else None
            except (UnicodeDecodeError, ValueError):
                label = None
            if label is None or label < 0:
                self.skipped.append([key, "missing or non-integer .cls label"])
                continue
            self.keys.append(key)
            self.labels.append(label)
            yield img


def _classnames_for(found: list[str] | None, classes, n_labels: int | None, where: str) -> list[str]:
    from .prompts import check_classnames, read_classnames

    if classes is not None:
        names = read_classnames(classes)
        if found is not None and len(names) != len(found):
            raise EvalDataError(f"{where} has {len(found)} class folders but {len(names)} class names were given; "
                                "give one name per folder, in sorted folder order")
        if n_labels is not None and n_labels > len(names):
            raise EvalDataError(f"{where} holds label {n_labels - 1} but only {len(names)} class names were given")
        return names
    if found is None:
        raise EvalDataError(f"{where} is a webdataset with integer labels: give the class names (classes=FILE)")
    return check_classnames([f.replace("_", " ") for f in found])


def embed_labelled(model, spec: str, *, batch_size: int = 64, device=None, amp: bool = True, progress=None):
    """Embeddings of a labelled dataset -> (emb (N, E), labels (N,), class folder names or None, sources, skipped)."""
    return merge_labelled([embed_labelled_part(model, spec, batch_size=batch_size, device=device, amp=amp,
                                               progress=progress)])


@dataclass
class LabelledPart:
    """One rank's share of a labelled dataset's embeddings (`embed_labelled_part`)."""

    emb: np.ndarray  # (n, E) the kept images of this share, in input order
    index: np.ndarray  # (n,) their positions in the dataset's image list
    labels: np.ndarray  # (n,)
    sources: list[str]
    folders: list[str] | None  # class folder names (None for shards)
    bad: list[tuple[int, list[str]]]  # (position, [source, reason]): images of this share that could not be read
    unusable: list[list[str]]  # samples of the shards without an image or a label (the same in every share)
    forwards: int  # image batches this share encoded (those with a readable image)
    batches: int  # batches of the whole pass (all shares)


def embed_labelled_part(model, spec: str, *, rank: int = 0, world: int = 1, batch_size: int = 64, device=None,
                        amp: bool = True, progress=None) -> LabelledPart:
    """The batches b with b % world == rank of the pass `embed_labelled` makes (batch b: images
    [b * batch_size, (b + 1) * batch_size) of the list), each batch made of the same images as there, so
    `merge_labelled` of the `world` shares gives exactly `embed_labelled`'s result."""
    mine = (lambda i: (i // batch_size) % world == rank) if world > 1 else None
    taken: list[int] = []
    if _is_webdataset(spec):
        shards = _LabelledShards(spec)
        items, folders = shards, None
        if mine is not None:  # the whole stream is read (labels, unusable samples), this share's images decoded
            items = _nonempty(img for i, img in enumerate(shards) if mine(i) and not taken.append(i))
    else:
        paths, all_labels, folders = image_folder(spec)
        taken = [i for i in range(len(paths)) if mine is None or mine(i)]
        items = paths if mine is None else [paths[i] for i in taken] or None
    if items is None:  # a share with no batch (fewer batches than ranks)
        emb, bad = np.zeros((0, model.config.embed_dim), np.float32), []
    else:
        emb, bad = model.embed_images(items, batch_size, device=device, amp=amp, progress=progress, on_error="skip",
                                      return_skipped=True)
    if _is_webdataset(spec):
        taken = taken if mine is not None else list(range(len(shards.keys)))
        sources_all, labels_all, unusable = shards.keys, np.asarray(shards.labels, dtype=np.int64), shards.skipped
    else:
        sources_all, labels_all, unusable = paths, all_labels, []
    bad_idx = {i for i, _ in bad}
    keep = np.asarray([g for j, g in enumerate(taken) if j not in bad_idx], dtype=np.int64)
    return LabelledPart(emb=emb, index=keep, labels=labels_all[keep],
                        sources=[sources_all[i] for i in keep], folders=folders,
                        bad=[(taken[j], [sources_all[taken[j]], _renumbered(r, j, taken[j])]) for j, r in bad],
                        unusable=list(unusable),
                        forwards=len({int(i) // batch_size for i in keep}), batches=-(-len(sources_all) // batch_size))


def _renumbered(reason: str, j: int, position: int) -> str:
    """A read error's reason names the image by its place in the share: name its place in the whole list."""
    return re.sub(rf"\bimage {j}\b", f"image {position}", reason, count=1) if j != position else reason


def _nonempty(items: Iterator[Any]) -> Iterator[Any] | None:
    """`items`, or None when it yields nothing (then read to its end)."""
    first = next(items, _END)
    return None if first is _END else itertools.chain([first], items)


_END = object()


def merge_labelled(parts: list[LabelledPart]):
    """The shares of `embed_labelled_part` -> `embed_labelled`'s (emb, labels, folders, sources, skipped)."""
    if len(parts) == 1:  # already in order: no copy of the embeddings
        p = parts[0]
        return p.emb, p.labels, p.folders, p.sources, p.unusable + [r for _, r in p.bad]
    index = np.concatenate([p.index for p in parts])
    order = np.argsort(index, kind="stable")
    emb = np.concatenate([p.emb for p in parts])[order]
    labels = np.concatenate([p.labels for p in parts])[order]
    sources = [s for p in parts for s in p.sources]
    bad = sorted((b for p in parts for b in p.bad), key=lambda b: b[0])
    return (emb, labels, parts[0].folders, [sources[i] for i in order], parts[0].unusable + [r for _, r in bad])


# --------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------

def captioned_images(spec: str) -> tuple[list[Any], list[str], list[str], list[int]]:
    """A captioned dataset -> (images (paths or bytes), image sources, captions, caption -> image index)."""
    images, sources, captions, owner = [], [], [], []
    if os.path.isfile(spec) and is_table(spec):
        try:
            columns, rows = read_table(spec)
            if not rows:
                raise EvalDataError(f"{spec} holds no rows")
            icol = pick_column(columns, IMAGE_COLUMNS, None, spec, "image-path")
            ccol = pick_column(columns, _CAPTION_COLUMNS, None, spec, "caption")
        except TableError as exc:
            raise EvalDataError(str(exc)) from None
        base = os.path.dirname(os.path.abspath(spec))
        where: dict[str, int] = {}
        for r in rows:
            img, cap = r.get(icol), r.get(ccol)
            caps = cap if isinstance(cap, list) else [cap]
            caps = [c.strip() for c in caps if isinstance(c, str) and c.strip()]
            if not img or not caps:
                continue
            if img not in where:
                where[img] = len(images)
                images.append(screen(os.path.join(base, img), base, "path_outside_source"))
                sources.append(img)
            captions.extend(caps)
            owner.extend([where[img]] * len(caps))
    elif _is_webdataset(spec):
        for key, comps in _webdataset_samples(spec):
            if comps is None:
                continue  # a repeated key: its first sample is the one evaluated
            img, txt = _image_of(comps), comps.get("txt")
            caps = [c.strip() for c in txt.decode("utf-8", "replace").splitlines() if c.strip()] if txt else []
            if img is None or not caps:
                continue
            captions.extend(caps)
            owner.extend([len(images)] * len(caps))
            images.append(img)
            sources.append(key)
    else:
        raise EvalDataError(f"{spec}: give a CSV/TSV/JSON-lines caption table or webdataset shards for retrieval")
    if not images:
        raise EvalDataError(f"{spec} holds no image with a caption")
    return images, sources, captions, owner
