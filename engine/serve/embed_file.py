"""Streaming embeddings into an .npy file through a memory map, resumable: a progress sidecar
`<out>.progress.json` lets a rerun continue after the last batch recorded there."""
from __future__ import annotations

import csv
import hashlib
import json
import os
from typing import Any, Callable, Sequence

import numpy as np

from .embed import _check_batch_size, _check_texts, _chunks, _encode_images, _encode_texts, _inference, _resolve_device, iter_image_batches


PROGRESS_FORMAT = "clipforge-embed-progress/1"


# --------------------------------------------------------------------------------------------
# Streaming into an .npy file, resumable
# --------------------------------------------------------------------------------------------

def model_fingerprint(model) -> str:
    """A short hash of the model's config and output projections (tells a resumed run it has the same model)."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name in ("text_projection", "logit_scale"):
        h.update(getattr(model, name).detach().float().cpu().numpy().tobytes())
    proj = getattr(model.visual, "proj", None)
    if proj is None:
        proj = model.visual.attnpool.c_proj.weight
    h.update(proj.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _labels_digest(labels: Sequence[str]) -> str:
    h = hashlib.sha256()
    for s in labels:
        h.update(s.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def progress_path(out: str) -> str:
    return f"{out}.progress.json"


def default_index_path(out: str) -> str:
    stem = out[:-4] if out.endswith(".npy") else out
    return f"{stem}.index.csv"


def _shrink_npy(path: str, rows: int) -> None:
    """Cut an .npy file (C order, 2-D) to its first `rows` rows in place: rewrite the header's shape, truncate."""
    with open(path, "r+b") as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"{path}: unexpected .npy format version {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        data_start = f.tell()
        if shape[0] == rows:
            return
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran, "shape": (rows, *shape[1:])}
        text = repr(header)
        # Same header length as before (the new shape is never longer): pad with spaces before the newline.
        size_len = 2 if version == (1, 0) else 4
        room = data_start - 6 - 2 - size_len
        if len(text) + 1 > room:
            raise AssertionError("shrunk .npy header does not fit")
        f.seek(6 + 2 + size_len)
        f.write((text + " " * (room - len(text) - 1) + "\n").encode("latin1"))
        f.truncate(data_start + rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


def write_embeddings(model, kind: str, items: Sequence[Any], out: str, *, labels: Sequence[str] | None = None,
                     batch_size: int = 64, index: str | None = None, overwrite: bool = False, device=None,
                     amp: bool = True, progress: bool | None = None, on_error: str = "skip",
                     stop_after_batches: int | None = None,
                     on_batch: Callable[[int, int], None] | None = None) -> dict:
    """Embed `items` (kind "image" or "text") into the .npy file `out`, streaming, resumable.

    Rows are written batch by batch into a memory-mapped (len(items), E) float32 array; after each
    batch the data is flushed and `<out>.progress.json` records the inputs consumed, the rows written
    and the skipped inputs. A rerun with the same inputs and model continues from there (batches are
    deterministic, so the result equals one uninterrupted run). When every input is done, rows left
    empty by skipped images are cut off the file, the index CSV (`row,source`, default
    `<out stem>.index.csv`) is written, and the sidecar is removed. labels: the `source` of each item
    in the index (default: str(item)). stop_after_batches: stop (resumably) after that many batches of
    this call. on_batch(batch_number, rows_done) is called after each batch is recorded.
    Returns {"rows", "skipped": [[input index, source, reason], ...], "complete", "out", "index"}.
    """
    if kind not in ("image", "text"):
        raise ValueError(f"kind must be 'image' or 'text', got {kind!r}")
    batch_size = _check_batch_size(batch_size)
    items = list(items)
    n = len(items)
    if n == 0:
        raise ValueError(f"nothing to embed into {out}: the list of {kind}s is empty")
    if kind == "text":
        _check_texts(items)
    labels = [str(x) for x in (labels if labels is not None else items)]
    if len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries for {n} items")
    out = os.fspath(out)
    index = index or default_index_path(out)
    side = progress_path(out)
    dim = model.config.embed_dim
    state = {"format": PROGRESS_FORMAT, "kind": kind, "count": n, "dim": dim, "batch_size": batch_size,
             "inputs": _labels_digest(labels), "model": model_fingerprint(model), "items_done": 0, "rows_done": 0,
             "skipped": []}
    if overwrite:
        for p in (side, out):
            if os.path.exists(p):
                os.remove(p)
    if os.path.exists(side):
        with open(side) as f:
            try:
                saved = json.load(f)
            except json.JSONDecodeError:
                raise ValueError(f"{side} is not a valid progress file; delete it (and {out}) or pass overwrite") from None
        for key in ("format", "kind", "count", "dim", "batch_size", "inputs", "model"):
            if saved.get(key) != state[key]:
                raise ValueError(f"{out} was started with a different {key} ({saved.get(key)!r}, now {state[key]!r}); "
                                 f"rerun with the same inputs, model and batch size, or pass overwrite to start again")
        if not os.path.exists(out):
            raise ValueError(f"{side} exists but {out} does not; delete the progress file or pass overwrite")
        state = saved
        mode = "r+"
    elif os.path.exists(out):
        raise FileExistsError(f"{out} already exists and holds no unfinished run; pass overwrite to replace it")
    else:
        mode = "w+"
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if state["items_done"] < n:
        arr = np.lib.format.open_memmap(out, mode=mode, dtype=np.float32, shape=(n, dim) if mode == "w+" else None)
        if arr.shape != (n, dim):
            raise ValueError(f"{out} has shape {arr.shape}, its progress file expects ({n}, {dim}); pass overwrite")
        if mode == "w+":
            arr.flush()
            _write_json_atomic(side, state)
        dev = _resolve_device(model, device)
        start = state["items_done"]
        remaining = -(-(n - start) // batch_size)
        try:
            with _inference(model, remaining, progress, f"embed {kind}s") as tick:
                todo = items[start:]
                if kind == "image":
                    batches = iter_image_batches(model, todo, batch_size, on_error=on_error, start=start)
                else:
                    batches = ((list(range(start + b * batch_size, start + b * batch_size + len(c))), c, [])
                               for b, c in enumerate(_chunks(todo, batch_size)))
                for b, (kept, batch, skipped) in enumerate(batches):
                    if stop_after_batches is not None and b >= stop_after_batches:
                        break
                    r = state["rows_done"]
                    if kept:
                        encode = _encode_images if kind == "image" else _encode_texts
                        emb = encode(model, batch, dev, amp)
                        arr[r : r + len(kept)] = emb
                        arr.flush()  # the rows reach the file before the sidecar says they exist
                    state["rows_done"] = r + len(kept)
                    state["items_done"] = min(n, start + (b + 1) * batch_size)  # each batch covers batch_size inputs
                    state["skipped"].extend([i, labels[i], reason] for i, reason in skipped)
                    _write_json_atomic(side, state)
                    tick()
                    if on_batch is not None:
                        on_batch(b, state["rows_done"])
        finally:
            del arr
    complete = state["items_done"] == n
    if complete:
        _shrink_npy(out, state["rows_done"])
        skipped_idx = {s[0] for s in state["skipped"]}
        tmp = f"{index}.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["row", "source"])
            row = 0
            for i, lab in enumerate(labels):
                if i not in skipped_idx:
                    w.writerow([row, lab])
                    row += 1
        os.replace(tmp, index)
        os.remove(side)
    return {"rows": state["rows_done"], "items_done": state["items_done"], "count": n,
            "skipped": state["skipped"], "complete": complete, "out": out, "index": index if complete else None}
