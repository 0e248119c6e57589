"""Tables of (image, caption) rows: CSV, TSV, Parquet and JSON lines, one reader for make-shards and evaluation."""
from __future__ import annotations

import csv
import os

from .validate import screen


# Column names a (path, caption) table may use, in order of preference (clipforge.serve.datasets reads the same).
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
