"""Sample sets: the numbered images ``1.jpg ... N.jpg`` of one folder, written by one or more
``difflab sample`` processes (shards, ``--start K``), possibly at the same time, and read by
``difflab eval``, possibly while they are written.

How that stays consistent:

* **Whole files.** Every image is written atomically (:func:`difflab.io.atomic_path`): into a hidden
  temporary file beside it, ``.7.png.XXXXXXXX.tmp``, fsync'ed, then renamed over ``7.png``. The folder
  readers (:func:`difflab.data.images.find_images`, used by ``eval``, ``fid-stats`` and training)
  skip hidden names and non-image suffixes, so they list only whole images; a file renamed over while
  it is read stays whole for the reader that opened it.
* **One record per shard, claimed before any image.** Under an exclusive ``flock`` on the images
  folder itself (no lock file: the folder holds the images alone) a shard reads the records beside
  the folder, refuses a folder it would mix (below), and writes its own record marked
  ``"complete": false``; when its last image is written it rewrites that record, under the lock
  again, marked ``"complete": true`` with its time. A shard writes only its own record:
  ``<folder>.sampling.json`` (start 0) or ``<folder>.sampling-from-K.json`` (first image K), and if a
  shard with the same start but another ``-n`` holds that name, ``<folder>.sampling-K-to-M.json``.
  Nothing is merged, so concurrent shards cannot clobber each other's record, and a folder's records
  always account for every image in it, even mid-write.
* **Overlapping shards of one sampling both succeed.** Image k depends only on the run, the sampler
  and its own seed (seed, k), so two shards of the same sampling (every :data:`IDENTITY` key equal)
  that share images write the same pictures (bit-identical where their batches line up, else within
  1/255: batched float kernels may differ in the last bit); the later rename wins, each version whole.
* **Mixing is refused, with one line, before any image is written:** a record beside the folder from
  another sampling (another run, step, seed, sampler, ...; or another command), an image asked for
  another condition, images of another format, or images that no record accounts for.
* **Readers learn what is missing.** :func:`sample_set_status` compares the images a reader listed
  with what the records promise, and names the records not complete yet (still being written, or
  interrupted); ``difflab eval`` reports it and scores the images present.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difflab.errors import ConfigError, DataError
from difflab.io import atomic_write_json, locked

__all__ = ["IDENTITY", "Shard", "SampleSetStatus", "abandon", "claim", "finish", "read_shards", "record_files",
           "sample_set_status"]

#: Record keys that decide what image k looks like: shards into one folder must agree on all of them.
IDENTITY = ("run", "step", "weights", "seed", "clip", "precision", "sampler", "grid_kind", "nfe_per_image",
            "guidance", "guidance_interval", "upscale", "format", "jpeg_quality")

# what follows the folder's name in a record's file name
_RECORD_NAME = re.compile(r"\.sampling(?:-from-\d+|-\d+-to-\d+)?\.json")

# how many missing images or files a message names before it just counts
_NAMED = 4


def _folder(images: str | os.PathLike[str]) -> Path:
    return Path(images).expanduser().resolve()


def record_files(images: str | os.PathLike[str]) -> list[Path]:
    """The sampling records beside the folder ``images`` (their temporary files are not listed)."""
    folder = _folder(images)
    try:
        names = os.listdir(folder.parent)
    except OSError:
        return []
    return sorted(folder.parent / n for n in names
                  if n.startswith(folder.name) and _RECORD_NAME.fullmatch(n[len(folder.name):]))


@dataclass(frozen=True)
class Shard:
    """One record beside a folder. ``first``/``last``: its images (1-based, inclusive), or None for a
    record that is not one of ``difflab sample`` (``edit``, ``compare``, ...)."""

    path: Path
    record: dict[str, Any]

    @property
    def is_sample(self) -> bool:
        start, n = self.record.get("start"), self.record.get("n")
        return isinstance(start, int) and isinstance(n, int) and n >= 1 and "sampler" in self.record

    @property
    def first(self) -> int:
        return int(self.record["start"]) + 1

    @property
    def last(self) -> int:
        return int(self.record["start"]) + int(self.record["n"])

    @property
    def complete(self) -> bool:
        return bool(self.record.get("complete", True))  # records older than claims were written when done

    def asked(self, k: int) -> str | None:
        """The condition image ``k`` was asked for (a canonical string), or None (unconditional)."""
        for c in self.record.get("conditions") or []:
            try:
                lo, hi = c["images"]
                if not lo <= k <= hi:
                    continue
            except (KeyError, TypeError, ValueError):  # a hand-edited record: not a condition of image k
                continue
            return json.dumps({key: v for key, v in c.items() if key != "images"}, sort_keys=True)
        return None


def read_shards(images: str | os.PathLike[str]) -> list[Shard]:
    """The records beside the folder ``images``; DataError (one line) for one that cannot be read."""
    shards = []
    for path in record_files(images):
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:  # removed since it was listed
            continue
        except (OSError, ValueError) as e:
            raise DataError(f"sampling record {path} is unreadable ({e}); fix or remove it") from None
        if not isinstance(record, dict):
            raise DataError(f"sampling record {path} is not a JSON object; fix or remove it")
        shards.append(Shard(path, record))
    return shards


def _spans(ks: Iterable[int]) -> str:
    """1, 2, 3, 7, 9, 10 -> '1-3, 7, 9-10' (the first few spans, then a count)."""
    spans: list[list[int]] = []
    for k in sorted(ks):
        if spans and k == spans[-1][1] + 1:
            spans[-1][1] = k
        else:
            spans.append([k, k])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans[:_NAMED])
    return text + (f" and {len(spans) - _NAMED} more spans" if len(spans) > _NAMED else "")


def _canonical(key: str, value: Any) -> Any:
    """A record value as compared: JSON round-trip (tuples become lists), run paths resolved."""
    value = json.loads(json.dumps(value))
    if key == "run" and isinstance(value, str):
        return str(Path(value).expanduser().resolve())
    if key == "upscale" and isinstance(value, dict) and isinstance(value.get("run"), str):
        return {**value, "run": str(Path(value["run"]).expanduser().resolve())}
    return value


def _differences(key: str, theirs: Any, ours: Any) -> list[str]:
    """'key: THEIRS there, OURS here' for each difference (dicts: each differing key both name)."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        return [d for k in sorted(set(theirs) & set(ours)) for d in _differences(f"{key}.{k}", theirs[k], ours[k])]
    return [] if theirs == ours else [f"{key} {json.dumps(theirs)} there, {json.dumps(ours)} here"]


def _names(paths: Sequence[str]) -> str:
    return ", ".join(paths[:_NAMED]) + (f" and {len(paths) - _NAMED} more" if len(paths) > _NAMED else "")


def _check(folder: Path, ours: dict[str, Any], shards: list[Shard]) -> list[str]:
    """Refuse (ConfigError, one line) a folder that ``ours`` would mix; notes on shards it overlaps."""
    from difflab.data.images import find_images

    me = Shard(folder, ours)
    notes: list[str] = []
    covered: set[int] = set()
    for s in shards:
        if not s.is_sample:
            raise ConfigError(f"--out {folder} already holds the output of another command (its record {s.path.name} is "
                              "not one of difflab sample): use another folder")
        diff = [d for key in IDENTITY if key in s.record
                for d in _differences(key, _canonical(key, s.record[key]), _canonical(key, ours[key]))]
        if diff:
            raise ConfigError(f"--out {folder} already holds images {s.first}-{s.last} of another sampling "
                              f"({s.path.name}: {'; '.join(diff)}): use another folder, or remove those images and "
                              "that record")
        lo, hi = max(s.first, me.first), min(s.last, me.last)
        other = [k for k in range(lo, hi + 1) if s.asked(k) != me.asked(k)]
        if other:
            raise ConfigError(f"--out {folder} already holds images {_spans(other)} asked for another condition "
                              f"({s.path.name}): use another folder, or remove those images and that record")
        if lo <= hi:
            notes.append(f"images {lo}-{hi} are also in {s.path.name}, of the same sampling: rewritten, the same images")
        covered.update(range(s.first, s.last + 1))
    fmt = f".{ours['format']}"
    stray, foreign = [], []
    for path in find_images(folder):
        rel = path.relative_to(folder).as_posix()
        if path.parent != folder or path.suffix.lower() != fmt:
            foreign.append(rel)
        elif not (path.stem.isdigit() and int(path.stem) in covered):
            stray.append(rel)
    if foreign:
        raise ConfigError(f"--out {folder} holds {len(foreign)} image(s) other than the {fmt} files of a sample set "
                          f"({_names(foreign)}), which eval would score with them: use another folder")
    if stray:
        raise ConfigError(f"--out {folder} already holds {len(stray)} image(s) that no sampling record beside it "
                          f"accounts for ({_names(stray)}): use another folder, or remove them")
    return notes


def claim(images: str | os.PathLike[str], record: dict[str, Any]) -> tuple[Path, dict[str, Any], list[str]]:
    """Make the folder ``images``, check it can take the images of ``record`` (a ``difflab sample``
    record: ``start``, ``n``, the :data:`IDENTITY` keys, ``conditions``) and write that record marked
    incomplete, all under the folder's lock. Returns (the record's path, the record as written, notes
    on overlapping shards); ConfigError (one line) for a folder it would mix."""
    folder = _folder(images)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {folder}: could not make the folder ({e.strerror or e})") from None
    record = {**record, "images": str(folder), "complete": False, "writer": uuid.uuid4().hex}
    first, last = record["start"] + 1, record["start"] + record["n"]
    with locked(folder):
        shards = read_shards(folder)
        notes = _check(folder, record, shards)
        path = folder.parent / (f"{folder.name}.sampling.json" if first == 1 else f"{folder.name}.sampling-from-{first}.json")
        taken = {s.path: s for s in shards}
        if path in taken and (taken[path].first, taken[path].last) != (first, last):
            path = folder.parent / f"{folder.name}.sampling-{first}-to-{last}.json"
        atomic_write_json(path, record)
    return path, record, notes


def finish(path: Path, record: dict[str, Any]) -> None:
    """Rewrite a claimed record (``claim``'s path and record, with what was measured) marked complete."""
    with locked(Path(record["images"])):
        atomic_write_json(path, {**record, "complete": True})


def abandon(path: Path, record: dict[str, Any]) -> None:
    """Remove a claim that wrote no image (the sampling failed first), unless another process claimed
    the same record name since: a failed start leaves no record that would block the folder."""
    with contextlib.suppress(OSError, ValueError), locked(Path(record["images"])):  # never hides the failure itself
        if json.loads(path.read_text()).get("writer") == record["writer"]:
            path.unlink()


@dataclass(frozen=True)
class SampleSetStatus:
    """What the sample records beside a folder promise, against the images a reader listed."""

    expected: int  # images the records name
    missing: tuple[int, ...]  # of those, the ones not listed
    incomplete: tuple[str, ...]  # record file names not marked complete

    def message(self, folder: str | os.PathLike[str], n_listed: int) -> str | None:
        """One line for a reader, or None when every promised image is there and every record complete."""
        parts = []
        if self.missing:
            parts.append(f"{self.expected - len(self.missing)} of the {self.expected} images its sampling records "
                         f"name are there (missing {_spans(self.missing)})")
        if self.incomplete:
            parts.append(f"{_names(list(self.incomplete))} not complete (sampling still running, or interrupted)")
        if not parts:
            return None
        return f"{folder}: {'; '.join(parts)}; using the {n_listed} image files found"


def sample_set_status(images: str | os.PathLike[str], files: Sequence[Path]) -> SampleSetStatus | None:
    """Compare ``files`` (the images a reader listed in the folder ``images``) with the ``difflab sample``
    records beside it; None when there are none (a folder not made by ``difflab sample``)."""
    folder = _folder(images)
    shards = [s for s in read_shards(folder) if s.is_sample]
    if not shards:
        return None
    expected: set[int] = set()
    for s in shards:
        expected.update(range(s.first, s.last + 1))
    parents = {Path(p).parent for p in files}
    top = {parent for parent in parents if parent.resolve() == folder}  # resolved once per folder, not per file
    listed = {int(p.stem) for p in map(Path, files) if p.parent in top and p.stem.isdigit()}
    return SampleSetStatus(len(expected), tuple(sorted(expected - listed)),
                           tuple(s.path.name for s in shards if not s.complete))
