"""Categorical labels for training images, aligned with a list of image paths.

Three sources, one result (:class:`Labels`: a :class:`LabelSchema`, an ``(N, A)`` int64 index
and a ``keep`` mask over the input images):

- :func:`fashion_mnist_labels`: the ten Fashion-MNIST classes from the idx label file.
- :func:`folder_labels`: ``root/<class>/.../image.jpg``, the class is the first path component.
- :func:`~difflab.data.labels_csv.csv_labels` (in :mod:`difflab.data.labels_csv`): a CSV file,
  first column the image, other columns categorical attributes (e.g. ``id,hair,eyes``).

Class names of every attribute are sorted, so index order does not depend on file order:
plain string order, except that an attribute whose names are all decimal integers is sorted by
value ("2" before "10", so a digit class ``"3"`` has index 3 when the classes are 0..9).

A :class:`LabelSchema` turns ``--label`` text into index rows and back (:meth:`LabelSchema.parse`,
:meth:`LabelSchema.names`, :meth:`LabelSchema.describe`); ``-1`` means "not given"
(unconditional for that attribute).

Bad input raises :class:`~difflab.errors.DataError`; problems that do not
stop the work (images outside any class folder, classes with a single image) give one
:class:`~difflab.errors.DifflabWarning` each.
"""
from __future__ import annotations

import os
import re
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from difflab.data.decode import _shown
from difflab.data.images import _WARN_NAMES
from difflab.errors import ConfigError, DataError, DifflabWarning

__all__ = [
    "FASHION_MNIST_CLASSES",
    "LabelSchema",
    "Labels",
    "fashion_mnist_labels",
    "folder_labels",
]

#: The Fashion-MNIST class names, in label order (as published by Zalando).
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

#: The command-line flag that :meth:`LabelSchema.parse` reads, named in its errors.
_FLAG = "--label"

#: How many valid names an "unknown value" error lists before it just counts.
_LIST_NAMES = 30

_DECIMAL = re.compile(r"[0-9]+")


def _listing(items: Sequence[str], limit: int = _WARN_NAMES) -> str:
    """``"a, b, c; and 4 more"``: the first ``limit`` items (each on one line, see ``_shown``), then a count."""
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(_shown(item) for item in items[:limit]) + more


def _warn(message: str) -> None:
    """One DifflabWarning, attributed to the caller of the public function that calls this."""
    warnings.warn(message, DifflabWarning, stacklevel=3)


def _sorted_names(names: Iterable[str]) -> tuple[str, ...]:
    """Distinct names in index order: by value when all are decimal integers, else string order."""
    unique = set(names)
    if unique and all(_DECIMAL.fullmatch(n) for n in unique):
        return tuple(sorted(unique, key=_decimal_key))
    return tuple(sorted(unique))


def _decimal_key(n: str) -> tuple[int, str, str]:
    """Sorts decimal strings by value without int() (which refuses more than 4300 digits)."""
    digits = n.lstrip("0")
    return len(digits), digits, n


def _name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a label or attribute name, or None when it can."""
    if not name:
        return "is empty"
    if name != name.strip():
        return "has surrounding spaces"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "contains a control character (tab, line break)"
    if any(unicodedata.category(c) == "Cs" for c in name):
        return "is not valid UTF-8 text"
    if "," in name:
        return f"contains ',' (which separates the parts of {_FLAG})"
    return None


def _lookup(names: Sequence[str], wanted: str) -> int | None:
    """Index of ``wanted`` among ``names``: exact match first, then a unique case-insensitive one."""
    for i, n in enumerate(names):
        if n == wanted:
            return i
    folded = wanted.casefold()
    hits = [i for i, n in enumerate(names) if n.casefold() == folded]
    return hits[0] if len(hits) == 1 else None


def _as_tuple(value: object, what: str) -> tuple[object, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"label schema: {what} must be a list of names, got {value!r}")
    return tuple(value)


# --------------------------------------------------------------------------------------------
# the schema: attribute and class names, and --label text


@dataclass(frozen=True)
class LabelSchema:
    """The attributes of a label and the class names of each, in index order.

    ``attributes``: e.g. ``("class",)`` or ``("hair", "eyes")``; ``classes[a]``: the value names of
    attribute ``a``. Lists are accepted and stored as tuples, so a schema saved as JSON (e.g.
    ``dataclasses.asdict``) loads back equal with ``LabelSchema(**d)``.
    """

    attributes: tuple[str, ...]
    classes: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        attributes = _as_tuple(self.attributes, "attributes")
        class_lists = _as_tuple(self.classes, "classes")
        classes = tuple(_as_tuple(c, f"the classes of attribute {i + 1}") for i, c in enumerate(class_lists))
        if not attributes:
            raise ConfigError("label schema: no attributes")
        if len(attributes) != len(classes):
            raise ConfigError(f"label schema: {len(attributes)} attributes but {len(classes)} class lists")
        for a in attributes:
            if not isinstance(a, str):
                raise ConfigError(f"label schema: attribute name {a!r} is not a string")
            problem = _name_problem(a) or ("contains '='" if "=" in a else None)
            if problem:
                raise ConfigError(f"label schema: attribute name {a!r} {problem}")
        dup = [a for a, k in Counter(str(a).casefold() for a in attributes).items() if k > 1]
        if dup:
            raise ConfigError(f"label schema: attribute {dup[0]!r} appears more than once")
        for a, names in zip(attributes, classes):
            for n in names:
                if not isinstance(n, str):
                    raise ConfigError(f"label schema: class name {n!r} of attribute {a!r} is not a string")
                problem = _name_problem(n)
                if problem:
                    raise ConfigError(f"label schema: class name {n!r} of attribute {a!r} {problem}")
            repeated = [n for n, k in Counter(names).items() if k > 1]
            if repeated:
                raise ConfigError(f"label schema: attribute {a!r} lists class {repeated[0]!r} more than once")
            if len(names) < 2:
                raise ConfigError(f"label schema: attribute {a!r} needs at least 2 classes, has {len(names)}")
        object.__setattr__(self, "attributes", attributes)
        object.__setattr__(self, "classes", classes)

    @property
    def sizes(self) -> tuple[int, ...]:
        """The number of classes of each attribute."""
        return tuple(len(c) for c in self.classes)

    def _attribute(self, name: str) -> int:
        i = _lookup(self.attributes, name.strip())
        if i is None:
            raise ConfigError(f"unknown label attribute {name.strip()!r}; the attributes are {', '.join(self.attributes)}")
        return i

    def _index(self, a: int, value: str) -> int:
        value = value.strip()
        names = self.classes[a]
        i = _lookup(names, value)
        if i is not None:
            return i
        if _DECIMAL.fullmatch(value) and len(value.lstrip("0")) <= len(str(len(names))) and int(value) < len(names):
            return int(value)
        valid = _listing(names, _LIST_NAMES)
        raise ConfigError(f"unknown {self.attributes[a]} {value!r}; choose one of {valid} (or an index 0..{len(names) - 1})")

    def index_of(self, attribute: str, value: str) -> int:
        """The index of ``value`` (a class name, case-insensitive with exact matches first, or a
        decimal index) in ``attribute``; ConfigError naming the attribute and the valid names."""
        return self._index(self._attribute(attribute), value)

    def parse(self, text: str) -> list[int]:
        """``"hair=blue,eyes=red"`` -> one index per attribute, -1 for attributes not named.

        A one-attribute schema also takes a bare value (``"Trouser"`` or ``"1"``). Parts are split
        on ``,`` and then on the first ``=``, so names may hold ``/`` and spaces. ConfigError
        (naming ``--label``) for unknown attributes or values, repeats and empty parts.
        """
        def fail(why: str) -> ConfigError:
            return ConfigError(f"{_FLAG} {text!r}: {why}")

        row = [-1] * len(self.attributes)
        whole = text.strip()
        if not whole:
            raise fail(f"is empty; give {self._example()}")
        if len(self.attributes) == 1 and _lookup(self.classes[0], whole) is not None:
            row[0] = self._index(0, whole)  # a bare name, even one holding '=' or ','
            return row
        for part in whole.split(","):
            part = part.strip()
            if not part:
                raise fail(f"has an empty part; give {self._example()}")
            if "=" in part:
                attribute, value = (s.strip() for s in part.split("=", 1))
                if not attribute or not value:
                    raise fail(f"part {part!r} needs both an attribute and a value, as {self._example()}")
                try:
                    a = self._attribute(attribute)
                except ConfigError as e:
                    raise fail(str(e)) from None
            elif len(self.attributes) == 1:
                a, value = 0, part
            else:
                choices = " or ".join(_shown(f"{n}={part}") for n in self.attributes)
                raise fail(f"say which attribute {part!r} is for, as {choices}")
            if row[a] != -1:
                raise fail(f"gives {self.attributes[a]} more than once")
            try:
                row[a] = self._index(a, value)
            except ConfigError as e:
                raise fail(str(e)) from None
        return row

    def _example(self) -> str:
        if len(self.attributes) == 1:
            return f"a {self.attributes[0]} such as {self.classes[0][0]!r}"
        return "'" + ",".join(f"{a}={c[0]}" for a, c in zip(self.attributes, self.classes)) + "'"

    def _check_row(self, row: Sequence[int]) -> list[int]:
        values = [int(v) for v in row]
        if len(values) != len(self.attributes):
            raise ConfigError(f"label row {values} has {len(values)} entries; the schema has {len(self.attributes)} attributes")
        for a, (v, size) in enumerate(zip(values, self.sizes)):
            if not -1 <= v < size:
                raise ConfigError(f"label row {values}: {self.attributes[a]} index {v} is outside -1..{size - 1}")
        return values

    def names(self, row: Sequence[int]) -> dict[str, str | None]:
        """The inverse of :meth:`parse`: attribute -> class name, None where the index is -1."""
        values = self._check_row(row)
        return {a: (names[v] if v >= 0 else None) for a, names, v in zip(self.attributes, self.classes, values)}

    def describe(self, row: Sequence[int]) -> str:
        """``"hair=blue, eyes=red"`` (attributes at -1 left out), the bare name for a one-attribute
        schema, ``"unconditional"`` when every index is -1. :meth:`parse` reads it back."""
        named = {a: n for a, n in self.names(row).items() if n is not None}
        if not named:
            return "unconditional"
        if len(self.attributes) == 1:
            return next(iter(named.values()))
        return ", ".join(f"{a}={n}" for a, n in named.items())


@dataclass(frozen=True)
class Labels:
    """Labels of a list of images.

    ``index``: int64, ``(N, A)``, row ``i`` for the ``i``-th kept image (indices into
    ``schema.classes``, -1 for "not given"). ``keep``: bool, one entry per input path, True for
    the images that have labels (the caller drops the others), so ``keep.sum() == N``.
    """

    schema: LabelSchema
    index: torch.Tensor
    keep: torch.Tensor

    def __post_init__(self) -> None:
        a = len(self.schema.attributes)
        if self.index.dtype != torch.int64 or self.index.ndim != 2 or self.index.shape[1] != a:
            raise ValueError(f"Labels.index must be int64 of shape (N, {a}), got {self.index.dtype} {tuple(self.index.shape)}")
        if self.keep.dtype != torch.bool or self.keep.ndim != 1:
            raise ValueError(f"Labels.keep must be a 1-d bool tensor, got {self.keep.dtype} {tuple(self.keep.shape)}")
        if int(self.keep.sum()) != self.index.shape[0]:
            raise ValueError(f"Labels: keep marks {int(self.keep.sum())} images but index has {self.index.shape[0]} rows")
        if self.index.numel():
            sizes = torch.tensor(self.schema.sizes, dtype=torch.int64)
            if bool((self.index < -1).any()) or bool((self.index >= sizes).any()):
                raise ValueError(f"Labels.index holds values outside -1..size-1 (sizes {self.schema.sizes})")

    def in_schema(self, schema: LabelSchema) -> torch.Tensor:
        """``index`` in the index space of another schema with the same attributes (a run's config names
        the classes in its own order); ConfigError if a value here is unknown there."""
        if schema.attributes != self.schema.attributes:
            raise ConfigError(f"the data's label attributes {list(self.schema.attributes)} differ from "
                              f"{list(schema.attributes)}")
        out = self.index.clone()
        for a, (mine, theirs) in enumerate(zip(schema.classes, self.schema.classes)):
            missing = sorted(set(theirs) - set(mine))
            if missing:
                raise ConfigError(f"the data has {schema.attributes[a]} values the run does not know: {', '.join(missing[:5])}")
            table = torch.tensor([mine.index(name) for name in theirs] + [-1])  # index -1 stays -1
            out[:, a] = table[self.index[:, a]]
        return out


def _labels(schema: LabelSchema, rows: list[list[int]], keep: list[bool]) -> Labels:
    index = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), len(schema.attributes))
    return Labels(schema=schema, index=index, keep=torch.tensor(keep, dtype=torch.bool))


# --------------------------------------------------------------------------------------------
# Fashion-MNIST and class folders


def fashion_mnist_labels(targets: torch.Tensor) -> Labels:
    """Labels ``("class",)`` over :data:`FASHION_MNIST_CLASSES` from the idx label values (N,)."""
    if targets.ndim != 1 or targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise DataError(f"fashion-mnist labels must be a 1-d integer tensor, got {targets.dtype} {tuple(targets.shape)}")
    schema = LabelSchema(attributes=("class",), classes=(FASHION_MNIST_CLASSES,))
    t = targets.to(torch.int64)
    bad = ((t < 0) | (t >= len(FASHION_MNIST_CLASSES))).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise DataError(
            f"fashion-mnist label {int(t[i])} (image {i}, {bad.numel()} such) is outside 0..{len(FASHION_MNIST_CLASSES) - 1}"
        )
    return Labels(schema=schema, index=t.reshape(-1, 1).clone(), keep=torch.ones(len(t), dtype=torch.bool))


def folder_labels(paths: Sequence[str], root: str | os.PathLike[str]) -> Labels:
    """Labels ``("class",)`` from class sub-folders: the class of ``cats/a.jpg`` is ``cats``.

    ``paths``: relative to ``root`` with ``/`` separators, as the folder loader returns them.
    Class names are sorted. Images directly in ``root`` are dropped (``keep`` False) with one
    warning; a class with a single image gets one warning; fewer than 2 classes is a DataError.
    """
    if not paths:
        raise DataError(f"{_shown(root)}: no images to label")
    classes: list[str | None] = [p.split("/", 1)[0] if "/" in p else None for p in paths]
    loose = [p for p, c in zip(paths, classes) if c is None]
    found = _sorted_names(c for c in classes if c is not None)
    for c in found:
        problem = _name_problem(c)
        if problem:
            raise DataError(f"{_shown(root)}: class folder {c!r} {problem}; rename it")
    if len(found) < 2:
        what = f"found only {found[0]!r}" if found else "found none"
        raise DataError(f"{_shown(root)}: class labels need images in at least 2 class sub-folders, {what}")
    if loose:
        _warn(f"{_shown(root)}: {len(loose)} of {len(paths)} images lie directly in the folder, not in a class "
              f"sub-folder, and are left out: {_listing(loose)}")
    counts = Counter(c for c in classes if c is not None)
    single = [f"{c!r} ({p})" for p, c in zip(paths, classes) if c is not None and counts[c] == 1]
    if single:
        _warn(f"{_shown(root)}: {len(single)} classes have a single image (a class cannot be learned from one image): "
              f"{_listing(single)}")
    schema = LabelSchema(attributes=("class",), classes=(found,))
    position = {c: i for i, c in enumerate(found)}
    rows = [[position[c]] for c in classes if c is not None]
    return _labels(schema, rows, [c is not None for c in classes])
