"""Tables of (image, caption) rows: CSV, TSV, Parquet and JSON lines, one reader for make-shards and evaluation."""
from __future__ import annotations

import csv
import json
import os

from .validate import screen


# Column names a (path, caption) table may use, in order of preference (clipforge.serve.datasets reads the same).
IMAGE_COLUMNS = ("path", "image", "image_path", "filepath", "file", "filename")
CAPTION_COLUMNS = ("caption", "text", "title")


TABLE_EXTS = (".csv", ".tsv", ".parquet", ".jsonl", ".json")


class TableError(ValueError):
    """A table cannot be read as (image, caption) rows; the message names the file and what to fix."""


def is_table(path: str) -> bool:
    return path.lower().endswith(TABLE_EXTS)


def read_table(path: str) -> tuple[list[str], list[dict]]:
    """(column names, rows as dicts) of a CSV, TSV, Parquet, JSON-lines or JSON-list file. A JSON cell
    may hold a list (several captions of one image)."""
    lower = path.lower()
    if lower.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise TableError(f"reading {path} needs pyarrow: pip install pyarrow") from exc
        table = pq.read_table(path)
        return list(table.column_names), table.to_pylist()
    if lower.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            if lower.endswith(".json"):
                rows = json.load(f)
                if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                    raise TableError(f"{path} must hold a JSON list of {{\"image\": ..., \"caption\": ...}} rows")
            else:
                rows = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as exc:
                            raise TableError(f"{path} line {n} is not JSON: {exc}") from None
                        if not isinstance(row, dict):
                            raise TableError(f"{path} line {n} is not a JSON object")
                        rows.append(row)
        columns = list(dict.fromkeys(k for r in rows for k in r))
        return columns, rows
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if lower.endswith(".tsv") else ",")
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def pick_column(columns, wanted: tuple[str, ...], given: str | None, path: str, what: str,
                option: str | None = None) -> str:
    """The column named `given`, else the first of `wanted` present (case-insensitive)."""
    if given:
        if given not in columns:
            raise TableError(f"{path} has no column {given!r} (columns: {', '.join(map(str, columns))})")
        return given
    lower = {c.lower(): c for c in columns if isinstance(c, str)}
    for w in wanted:
        if w in lower:
            return lower[w]
    hint = f"; name it with {option}" if option else ""
    raise TableError(f"{path} has no {what} column (looked for {', '.join(wanted)}; found "
                     f"{', '.join(map(str, columns))}){hint}")


def _table_items(src: str, image_col: str | None, caption_col: str | None):
    """make-shards' items of a table: (source, image path or RefusedPath, ("text", caption))."""
    base = os.path.dirname(os.path.abspath(src))
    columns, rows = read_table(src)
    ic = pick_column(columns, IMAGE_COLUMNS, image_col, src, "image-path", "--image-col")
    cc = pick_column(columns, CAPTION_COLUMNS, caption_col, src, "caption", "--caption-col")
    for row in rows:
        path, caption = row.get(ic), row.get(cc)
        path = path if isinstance(path, str) else ""
        # relative to the table's folder, and inside it (links resolved): "../x" or "/etc/x" is refused
        full = screen(os.path.join(base, path), base, "path_outside_source") if path else None
        yield path, full, ("text", caption if isinstance(caption, str) or caption is None else str(caption))
