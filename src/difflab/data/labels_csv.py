"""Categorical labels from a CSV file: :func:`csv_labels`, the third source of
:class:`~difflab.data.labels.Labels` beside the Fashion-MNIST and class-folder ones of :mod:`difflab.data.labels`.

The file: a header row, then one row per image; the first column names the image, the other
columns are categorical attributes named by the header (e.g. ``id,hair,eyes``). Cells are UTF-8
(a BOM is fine) and stripped; an image cell is matched against the image paths by exact relative
path, then path without extension, then stem. Class names are those of the matched rows, sorted
as :mod:`difflab.data.labels` describes.

Bad files raise :class:`~difflab.errors.DataError` naming the file and line; problems that do not
stop the work (rows for images that are not there, images without a row, classes with a single
image) give one :class:`~difflab.errors.DifflabWarning` each.
"""
from __future__ import annotations

import csv
import io
import os
import posixpath
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from difflab.data.decode import _shown
from difflab.data.images import IMAGE_EXTENSIONS
from difflab.data.labels import Labels, LabelSchema, _labels, _listing, _name_problem, _sorted_names, _warn
from difflab.errors import DataError

__all__ = ["csv_labels"]


@dataclass(frozen=True)
class _Row:
    line: int
    image: str  # the image cell, stripped
    values: tuple[str, ...]  # the attribute cells, stripped


def _read_csv(path: Path) -> tuple[int, list[str], list[_Row]]:
    """The header's line and names, and the data rows (stripped cells, with their 1-based line numbers), checked for
    shape: the header, field counts, empty cells and columns."""
    name = _shown(path)
    if not path.exists():
        raise DataError(f"label file {name} does not exist")
    if not path.is_file():
        raise DataError(f"label file {name} is not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read label file {name}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{name}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None

    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True)
    records: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for fields in reader:
            if len(fields) > 1 or any(f.strip() for f in fields):  # skip blank lines
                records.append((start, [f.strip() for f in fields]))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{name}:{reader.line_num}: not a readable CSV line ({e})") from None
    if not records:
        raise DataError(f"label file {name} is empty: it needs a header row such as 'id,hair,eyes' and one row per image")

    header_line, header = records[0]
    if len(header) < 2:
        hint = "; separate columns with ','" if any(s in header[0] for s in ";\t|") else ""
        raise DataError(f"{name}:{header_line}: the header names {len(header)} column, needs at least 2 "
                        f"(the image, then one or more attributes, e.g. 'id,hair,eyes'){hint}")
    seen: dict[str, int] = {}
    for col, h in enumerate(header):
        if not h:
            raise DataError(f"{name}:{header_line}: column {col + 1} of the header has no name")
        problem = _name_problem(h) or ("contains '='" if "=" in h and col else None)
        if problem:
            raise DataError(f"{name}:{header_line}: column name {h!r} {problem}")
        if h.casefold() in seen:
            first = seen[h.casefold()] + 1
            raise DataError(f"{name}:{header_line}: column name {h!r} appears twice (columns {first} and {col + 1})")
        seen[h.casefold()] = col

    body = records[1:]
    if not body:
        raise DataError(f"label file {name} has a header but no rows")
    for line, fields in body:
        if len(fields) != len(header):
            raise DataError(f"{name}:{line}: expected {len(header)} fields ({','.join(header)}), found {len(fields)}")
    for col, h in enumerate(header):
        if not any(fields[col] for _, fields in body):
            raise DataError(f"{name}: column {h!r} is empty on every row")
    rows: list[_Row] = []
    for line, fields in body:
        for col, (h, v) in enumerate(zip(header, fields)):
            if not v:
                what = "image name" if col == 0 else "value"
                raise DataError(f"{name}:{line}: empty {what} in column {h!r}")
            problem = _name_problem(v)
            if col and problem:
                raise DataError(f"{name}:{line}: value {v!r} in column {h!r} {problem}")
        rows.append(_Row(line=line, image=fields[0], values=tuple(fields[1:])))
    return header_line, header, rows


class _Matcher:
    """Finds the image a CSV cell names among ``paths``: the exact relative path, then the path
    without its extension, then the file's stem. A cell that carries an image extension only
    matches files with that name (the extension is never ignored)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.exact = {p: i for i, p in enumerate(paths)}
        self.no_ext: dict[str, list[int]] = {}
        self.stem: dict[str, list[int]] = {}
        self.base: dict[str, list[int]] = {}
        self.paths = paths
        for i, p in enumerate(paths):
            base = posixpath.basename(p)
            self.no_ext.setdefault(posixpath.splitext(p)[0], []).append(i)
            self.stem.setdefault(posixpath.splitext(base)[0], []).append(i)
            self.base.setdefault(base, []).append(i)

    def find(self, cell: str) -> tuple[int | None, list[str]]:
        """(index of the image or None, and the candidates when the cell is ambiguous)."""
        key = cell.replace("\\", "/")
        while key.startswith("./"):
            key = key[2:]
        if key in self.exact:
            return self.exact[key], []
        base = posixpath.basename(key)
        has_ext = posixpath.splitext(base)[1].lower() in IMAGE_EXTENSIONS
        tables = [(self.base, base)] if has_ext else [(self.no_ext, key), (self.stem, base)]
        for table, k in tables:
            hits = table.get(k, [])
            if len(hits) == 1:
                return hits[0], []
            if hits:
                return None, [self.paths[i] for i in hits]
        return None, []


def csv_labels(csv_path: str | os.PathLike[str], paths: Sequence[str]) -> Labels:
    """Labels from a CSV file for the images ``paths`` (relative, ``/`` separators).

    The header is required: the first column names the image, the others are categorical
    attributes named by the header. An image cell may be a relative path (``images/12.jpg`` or
    ``12.jpg``), a path without extension or the stem (``12``); it is matched against ``paths``
    by exact path, then path without extension, then stem (a stem shared by several images is a
    DataError). Cells are UTF-8 (a BOM is fine) and stripped. Class names are those of the
    matched rows, sorted. Rows for other images, images without a row and values that label a
    single image each give one warning; malformed files raise DataError naming file and line.
    """
    path = Path(csv_path).expanduser()
    name = _shown(path)
    header_line, header, rows = _read_csv(path)
    if not paths:
        raise DataError(f"{name}: no images to label")
    matcher = _Matcher(paths)
    if matcher.find(header[0])[0] is not None:
        raise DataError(f"{name}:{header_line}: the first row names the image {header[0]!r}; the file needs a header row "
                        f"naming the columns first (e.g. 'id,hair,eyes')")

    first_line: dict[object, int] = {}
    matched: dict[int, _Row] = {}
    unmatched: list[_Row] = []
    for row in rows:
        i, candidates = matcher.find(row.image)
        if candidates:
            raise DataError(f"{name}:{row.line}: image {row.image!r} is ambiguous, it could be any of {_listing(candidates)}")
        key: object = i if i is not None else ("?", row.image.replace("\\", "/"))
        if key in first_line:
            raise DataError(f"{name}:{row.line}: image {row.image!r} is listed twice, on lines {first_line[key]} and {row.line}")
        first_line[key] = row.line
        if i is None:
            unmatched.append(row)
        else:
            matched[i] = row
    if not matched:
        raise DataError(f"{name}: none of its {len(rows)} rows names one of the {len(paths)} images "
                        f"(line {rows[0].line} names {rows[0].image!r}; the images are named like {paths[0]!r})")

    attributes = header[1:]
    classes = [_sorted_names(r.values[a] for r in matched.values()) for a in range(len(attributes))]
    for a, names in enumerate(classes):
        if len(names) < 2:
            raise DataError(f"{name}: column {attributes[a]!r} has the single value {names[0]!r} for all "
                            f"{len(matched)} labelled images; a label needs at least 2 classes")
    schema = LabelSchema(attributes=tuple(attributes), classes=tuple(classes))

    if unmatched:
        entries = [f"{name}:{r.line} ({r.image})" for r in unmatched]
        _warn(f"{name}: {len(unmatched)} of {len(rows)} rows name images that are not among the {len(paths)} images "
              f"and are ignored: {_listing(entries)}")
    missing = [p for i, p in enumerate(paths) if i not in matched]
    if missing:
        _warn(f"{name}: {len(missing)} of {len(paths)} images have no row and are left out: {_listing(missing)}")

    position = [{n: i for i, n in enumerate(names)} for names in classes]
    order = sorted(matched)
    index_rows = [[position[a][v] for a, v in enumerate(matched[i].values)] for i in order]
    counts = [Counter(r[a] for r in index_rows) for a in range(len(attributes))]
    single = [
        f"{attributes[a]}={classes[a][r[a]]} (line {line})"
        for line, r in sorted((matched[i].line, r) for i, r in zip(order, index_rows))
        for a in range(len(attributes)) if counts[a][r[a]] == 1
    ]
    if single:
        _warn(f"{name}: {len(single)} values label a single image (a class cannot be learned from one image): "
              f"{_listing(single, 10)}")
    return _labels(schema, index_rows, [i in matched for i in range(len(paths))])
