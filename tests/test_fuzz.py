"""Property-based fuzzing of the readers of user files (hypothesis): the image decoder and folder loader,
the label files (CSV, class folders, ``--label`` text) and the run configuration (TOML, JSON, ``key=value``).

The property is the project's rule for bad input: a file either loads, or it is skipped with one
:class:`~difflab.errors.DifflabWarning` that counts and names it, or it is refused with a one-line
:class:`~difflab.errors.DifflabError` naming it; never another exception, a stray warning, a hang or a
large allocation. ``bench/fuzz_atheris.py`` runs the same checks coverage-guided, by hand, for longer.

Each test is kept to a few seconds (``max_examples``; ``DIFFLAB_FUZZ_SCALE=20`` searches twenty times longer);
the examples are random on every run (no example database is written into the checkout), and hypothesis
prints the failing input.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import io
import json
import os
import re
import resource
import signal
import string
import struct
import time
import typing
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from difflab.config import RunConfig, apply_overrides, load_toml, resolve_config, to_dict
from difflab.data.decode import BadImageError, _shown, open_image
from difflab.data.images import IMAGE_EXTENSIONS, SkippedImagesWarning, _load_array, load_folder
from difflab.data.labels import LabelSchema, folder_labels
from difflab.data.labels_csv import csv_labels
from difflab.errors import ConfigError, DataError, DifflabWarning

#: DIFFLAB_FUZZ_SCALE=20 runs twenty times the examples (a longer search by hand; the default keeps each test fast).
SCALE = float(os.environ.get("DIFFLAB_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=max(1, round(examples * SCALE)),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


class Hang(AssertionError):
    """Raised by :func:`time_limit` (not an OSError, which the code under test would report as a bad file)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail a block that runs longer than ``seconds``: interrupted by SIGALRM (a blocking open() of a FIFO
    included), or measured afterwards should something catch the interruption."""
    def fire(signum, frame):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    if time.monotonic() - start > seconds:
        raise Hang(f"took {time.monotonic() - start:.1f} s, over {seconds} s")


@contextlib.contextmanager
def only_difflab_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning; fail on any that is not a one-line DifflabWarning (Pillow's, numpy's, ResourceWarning)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield record
    stray = [f"{w.category.__name__}: {w.message}" for w in record if not issubclass(w.category, DifflabWarning)]
    assert not stray, stray
    for w in record:
        assert_one_line(str(w.message))


def assert_one_line(message: str) -> None:
    assert message and "\n" not in message and "\r" not in message, repr(message)


def fresh_dir(parent: Path) -> Path:
    """A new folder per hypothesis example (tmp_path is shared by all examples of a test)."""
    path = parent / uuid.uuid4().hex[:12]
    path.mkdir()
    return path


# ============================================================================================
# images: valid files of every format and mode, then damaged


def _encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _noise(mode: str, size: tuple[int, int] = (13, 9), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


@functools.cache
def valid_images() -> dict[str, tuple[str, bytes]]:
    """name -> (suffix, bytes): small valid files of each format Pillow here writes, in many modes."""
    rng = np.random.default_rng(1)
    out: dict[str, tuple[str, bytes]] = {}
    for mode in ("RGB", "RGBA", "L", "LA", "1"):
        out[f"png-{mode}"] = (".png", _encode(_noise(mode), "PNG"))
    out["png-P-transparent"] = (".png", _encode(_noise("P"), "PNG", transparency=0))
    out["png-I;16"] = (".png", _encode(Image.fromarray(rng.integers(0, 65536, (9, 13), dtype=np.uint16)), "PNG"))
    out["png-interlaced"] = (".png", _encode(_noise("RGB"), "PNG", interlace=1))
    exif = Image.Exif()
    exif[0x0112] = 6
    out["jpeg-RGB-large"] = (".jpg", _encode(_noise("RGB", (40, 36)), "JPEG", quality=80))  # >= 4x the target: draft decoding
    out["jpeg-L"] = (".jpeg", _encode(_noise("L"), "JPEG"))
    out["jpeg-CMYK"] = (".jpg", _encode(_noise("CMYK"), "JPEG"))
    out["jpeg-progressive"] = (".jpg", _encode(_noise("RGB", (40, 36)), "JPEG", progressive=True))
    out["jpeg-exif-rotated"] = (".jpg", _encode(_noise("RGB"), "JPEG", exif=exif))
    frames = [_noise("P", seed=s) for s in range(2)]
    out["gif-animated"] = (".gif", _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], transparency=0))
    for mode in ("RGB", "RGBA", "L", "P", "1"):
        out[f"bmp-{mode}"] = (".bmp", _encode(_noise(mode), "BMP"))
    out["webp-lossy"] = (".webp", _encode(_noise("RGB"), "WEBP", quality=50))
    out["webp-lossless-RGBA"] = (".webp", _encode(_noise("RGBA"), "WEBP", lossless=True))
    out["webp-animated"] = (".webp", _encode(frames[0].convert("RGB"), "WEBP", save_all=True,
                                             append_images=[frames[1].convert("RGB")]))
    # TIFF: not a folder format (find_images ignores it), but open_image reads whatever Pillow knows
    for mode in ("RGB", "CMYK", "1"):
        out[f"tiff-{mode}"] = (".tiff", _encode(_noise(mode), "TIFF"))
    out["tiff-lzw"] = (".tif", _encode(_noise("RGB"), "TIFF", compression="tiff_lzw"))
    out["tiff-deflate"] = (".tif", _encode(_noise("RGBA"), "TIFF", compression="tiff_adobe_deflate"))
    out["tiff-I"] = (".tif", _encode(Image.fromarray(rng.integers(-2**31, 2**31, (9, 13), dtype=np.int32)), "TIFF"))
    out["tiff-F"] = (".tif", _encode(Image.fromarray(rng.normal(0, 1e30, (9, 13)).astype(np.float32)), "TIFF"))
    out["tiff-I;16"] = (".tif", _encode(Image.fromarray(rng.integers(0, 65536, (9, 13), dtype=np.uint16)), "TIFF"))
    return out


FOLDER_IMAGES = sorted(k for k, (suffix, _) in valid_images().items() if suffix in IMAGE_EXTENSIONS)
MUTATIONS = ("truncate", "flip", "flip-header", "splice", "garbage", "empty")


@st.composite
def damaged_image(draw: st.DrawFn, names: list[str] | None = None) -> tuple[str, bytes, str]:
    """(suffix, bytes, how) of a valid image damaged one way, with the suffix of its format."""
    name = draw(st.sampled_from(names or sorted(valid_images())))
    suffix, original = valid_images()[name]
    data = bytearray(original)
    how = draw(st.sampled_from(MUTATIONS))
    if how == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif how in ("flip", "flip-header"):
        end = min(len(data), 64) if how == "flip-header" else len(data)
        for pos, value in draw(st.lists(st.tuples(st.integers(0, end - 1), st.integers(0, 255)), min_size=1, max_size=8)):
            data[pos] = value
    elif how == "splice":
        start = draw(st.integers(0, len(data)))
        stop = draw(st.integers(start, min(len(data), start + 64)))
        data[start:stop] = draw(st.binary(max_size=64))
    elif how == "garbage":
        data = bytearray(draw(st.binary(min_size=1, max_size=2048)))
    else:
        data = bytearray()
    return suffix, bytes(data), f"{name} {how}"


def assert_refusal_names(error: BaseException, path: Path) -> None:
    message = str(error)
    assert isinstance(error, DataError) and message.startswith(f"{_shown(path)}: "), message
    assert_one_line(message)


@pytest.fixture
def small_pixel_limit(monkeypatch):
    """A damaged header often declares a huge size: refused as a bomb over a million pixels instead of
    Pillow's 89 million, which keeps every example fast (the bomb tests below use the real limit)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)


@fuzz(1000)
@given(case=damaged_image(), channels=st.sampled_from([1, 3]))
def test_damaged_image_decodes_or_is_refused_in_one_line(tmp_path, small_pixel_limit, case, channels):
    suffix, data, _ = case
    path = tmp_path / f"fuzzed{suffix}"
    path.write_bytes(data)
    with only_difflab_warnings(), time_limit(10):
        try:
            img = open_image(path, channels)
        except BadImageError as e:
            assert_refusal_names(e, path)
        else:
            assert img.mode == ("RGB" if channels == 3 else "L") and img.width > 0 and img.height > 0
        try:  # the folder loader's unit of work: also JPEG draft decoding, and the resize
            a = _load_array(str(path), 8, channels)
        except BadImageError as e:
            assert_refusal_names(e, path)
        else:
            assert a.shape == (channels, 8, 8) and a.dtype == np.uint8


@fuzz(60)
@given(files=st.lists(st.tuples(st.booleans(), damaged_image(FOLDER_IMAGES)), min_size=1, max_size=8))
def test_folder_with_damaged_files_loads_the_rest_and_counts_the_skipped(tmp_path, small_pixel_limit, files):
    root = fresh_dir(tmp_path)
    intact = []
    for i, (keep, (suffix, data, _)) in enumerate(files):
        if keep:  # this one stays whole
            suffix, data = valid_images()[FOLDER_IMAGES[i % len(FOLDER_IMAGES)]]
            intact.append(f"{i:02d}{suffix}")
        (root / f"{i:02d}{suffix}").write_bytes(data)
    results = []
    for attempt in ("decode", "cache"):
        with only_difflab_warnings() as record, time_limit(20):
            try:
                res = load_folder(root, 8, progress=False)
            except DataError as e:
                assert not intact and f"none of the {len(files)} image files in {root} could be decoded" in str(e)
                assert_one_line(str(e))
                return
        assert set(intact) <= set(res.paths), attempt
        assert len(res.paths) + len(res.skipped) == len(files) and res.images.shape == (len(res.paths), 3, 8, 8)
        skipped = [w for w in record if issubclass(w.category, SkippedImagesWarning)]
        assert len(skipped) == (1 if res.skipped else 0) and len(record) == len(skipped)
        if res.skipped:
            message = str(skipped[0].message)
            assert f"skipped {len(res.skipped)} of {len(files)} image files in {root}" in message
            assert all(f"{rel} (" in message for rel, _ in res.skipped[:5])
        results.append(res)
    decoded, cached = results
    assert (cached.paths, cached.skipped) == (decoded.paths, decoded.skipped)
    assert np.array_equal(cached.images.numpy(), decoded.images.numpy())


# --------------------------------------------------------------------------------------------
# absurd sizes: decompression bombs are refused from their header, quickly and without the memory


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(width: int, height: int, bit_depth: int = 8, color: int = 2, pixels: bool = False) -> bytes:
    """A PNG declaring ``width x height``; with ``pixels`` its IDAT really holds them (zeros, which compress ~1000:1)."""
    idat = b""
    if pixels:
        row = b"\0" * (1 + (width * bit_depth + 7) // 8)
        z = zlib.compressobj(9)
        idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _patched(fmt: str, patch: Callable[[bytearray], None], mode: str = "RGB", **kwargs) -> bytes:
    data = bytearray(_encode(Image.new(mode, (8, 8)), fmt, **kwargs))
    patch(data)
    return bytes(data)


def _jpeg_size(d: bytearray) -> None:
    i = d.find(b"\xff\xc0")
    d[i + 5:i + 9] = struct.pack(">HH", 65000, 65000)


def _webp_size(d: bytearray) -> None:  # VP8L: 14-bit width - 1 and height - 1 after the signature byte 0x2f
    i = d.find(b"VP8L") + 8
    assert d[i] == 0x2F
    d[i + 1:i + 5] = struct.pack("<I", (d[i + 4] & 0xF0) << 24 | 16383 << 14 | 16383)


def _tiff_size(d: bytearray) -> None:
    (ifd,) = struct.unpack_from("<I", d, 4)
    (count,) = struct.unpack_from("<H", d, ifd)
    for k in range(count):
        entry = ifd + 2 + 12 * k
        if struct.unpack_from("<H", d, entry)[0] in (256, 257):  # ImageWidth, ImageLength
            struct.pack_into("<HHII", d, entry, struct.unpack_from("<H", d, entry)[0], 4, 1, 100_000)


_BOMB_MAKERS: dict[str, Callable[[], bytes]] = {
    "header.png": lambda: _png_bomb(100_000, 100_000),
    "zeros-20000.png": lambda: _png_bomb(20_000, 20_000, bit_depth=1, color=0, pixels=True),  # 400 Mpx > 2x the limit
    "zeros-10000.png": lambda: _png_bomb(10_000, 10_000, bit_depth=1, color=0, pixels=True),  # 100 Mpx: 1x..2x the limit
    "header.gif": lambda: _patched("GIF", lambda d: d.__setitem__(slice(6, 10), struct.pack("<HH", 65535, 65535)), "P"),
    "header.bmp": lambda: _patched("BMP", lambda d: d.__setitem__(slice(18, 26), struct.pack("<ii", 100_000, 100_000))),
    "header.jpg": lambda: _patched("JPEG", _jpeg_size),
    "header.webp": lambda: _patched("WEBP", _webp_size, lossless=True),
    "header.tiff": lambda: _patched("TIFF", _tiff_size),
}


BOMBS = sorted(_BOMB_MAKERS)


@functools.cache
def bomb(name: str) -> bytes:
    return _BOMB_MAKERS[name]()


def _kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def peak_memory_growth(fn: Callable[[], object]) -> int:
    """Bytes by which the peak resident memory rose while ``fn`` ran (Linux: the peak is reset first)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _kib("VmRSS")
        fn()
        return (_kib("VmHWM") - before) * 1024
    except (OSError, AttributeError):  # not Linux: only a new all-time peak shows
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


@pytest.mark.parametrize("name", BOMBS)
def test_decompression_bombs_are_refused_fast_and_small(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(bomb(name))
    refused: list[BadImageError] = []

    def decode() -> None:
        with pytest.raises(BadImageError) as info:
            open_image(path)
        refused.append(info.value)

    start = time.perf_counter()
    with only_difflab_warnings(), time_limit(10):
        grew = peak_memory_growth(decode)
    assert time.perf_counter() - start < 2.0
    assert grew < 64 * 2**20, f"peak memory grew by {grew / 2**20:.0f} MiB"
    assert_refusal_names(refused[0], path)
    if not name.endswith(".webp"):  # libwebp may reject the patched stream before Pillow sees its size
        assert "decompression bomb" in str(refused[0])


def test_folder_with_bombs_loads_the_good_image_and_names_the_bombs(tmp_path):
    bombs = [name for name in BOMBS if Path(name).suffix in IMAGE_EXTENSIONS]
    for name in bombs:
        (tmp_path / name).write_bytes(bomb(name))
    Image.new("RGB", (9, 9), (0, 200, 0)).save(tmp_path / "good.png")
    loaded = []
    start = time.perf_counter()
    with only_difflab_warnings() as record, time_limit(20):
        grew = peak_memory_growth(lambda: loaded.append(load_folder(tmp_path, 8, progress=False)))
    assert time.perf_counter() - start < 5.0 and grew < 64 * 2**20
    (res,) = loaded
    assert res.paths == ("good.png",) and sorted(p for p, _ in res.skipped) == sorted(bombs)
    assert all("decompression bomb" in reason for p, reason in res.skipped if not p.endswith(".webp"))
    (warning,) = record
    assert f"skipped {len(bombs)} of {len(bombs) + 1} image files in {tmp_path}" in str(warning.message)


# --------------------------------------------------------------------------------------------
# modes: every mode loads as the requested channels, with the documented pixels


def _pixels(mode: str) -> st.SearchStrategy[np.ndarray]:
    shape = st.tuples(st.integers(1, 6), st.integers(1, 6))
    dtype, channels, elements = {
        "1": (np.bool_, 0, None),
        "L": (np.uint8, 0, None),
        "LA": (np.uint8, 2, None),
        "P": (np.uint8, 0, None),
        "RGB": (np.uint8, 3, None),
        "RGBA": (np.uint8, 4, st.sampled_from([0, 255]) | st.integers(0, 255)),
        "CMYK": (np.uint8, 4, None),
        "I;16": (np.uint16, 0, None),
        "I": (np.int32, 0, st.integers(0, 255) | st.integers(-2**31, 2**31 - 1)),
        "F": (np.float32, 0, st.floats(0, 1, width=32) | st.floats(width=32)),
    }[mode]
    return shape.flatmap(lambda hw: hnp.arrays(dtype, hw + ((channels,) if channels else ()), elements=elements))


def _image(mode: str, a: np.ndarray) -> Image.Image:
    if mode == "1":
        return Image.fromarray(a.astype(np.uint8) * 255).convert("1")
    if mode in ("LA", "CMYK", "P"):
        if mode == "P":
            im = Image.fromarray(a).convert("P")
            im.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
            return im
        return Image.frombytes(mode, (a.shape[1], a.shape[0]), a.tobytes())
    return Image.fromarray(a)  # L, RGB, RGBA, I (int32), F (float32) from the array's shape and dtype


MODE_FORMATS = [("1", "PNG"), ("1", "BMP"), ("1", "TIFF"), ("L", "PNG"), ("L", "BMP"), ("L", "GIF"), ("L", "TIFF"),
                ("LA", "PNG"), ("LA", "TIFF"), ("P", "PNG"), ("P", "GIF"), ("P", "BMP"), ("RGB", "PNG"), ("RGB", "WEBP"),
                ("RGBA", "PNG"), ("RGBA", "WEBP"), ("RGBA", "TIFF"), ("CMYK", "TIFF"), ("CMYK", "JPEG"),
                ("I;16", "PNG"), ("I;16", "TIFF"), ("I", "TIFF"), ("F", "TIFF")]
LOSSLESS = {"PNG", "BMP", "TIFF", "GIF"}


@fuzz(300)
@given(mode_format=st.sampled_from(MODE_FORMATS), data=st.data(), channels=st.sampled_from([1, 3]),
       transparent=st.booleans())
def test_every_mode_loads_as_the_requested_channels(tmp_path, mode_format, data, channels, transparent):
    mode, fmt = mode_format
    a = data.draw(_pixels(mode))
    im = _image(mode, a)
    kwargs: dict = {"lossless": True} if fmt == "WEBP" else {}
    if mode == "P" and transparent and fmt != "BMP":
        kwargs["transparency"] = int(a.flat[0])  # the first pixel's palette entry is transparent: white
    path = tmp_path / f"m.{fmt.lower()}"
    im.save(path, fmt, **kwargs)
    with only_difflab_warnings():
        out = open_image(path, channels)
    assert out.mode == ("RGB" if channels == 3 else "L") and out.size == im.size
    got = np.asarray(out).astype(int)
    if mode in ("1", "L", "I;16", "I", "F"):
        if channels == 3:  # gray repeated
            assert (got == got[..., :1]).all()
            got = got[..., 0]
        if fmt in LOSSLESS:
            assert np.array_equal(got, _documented_gray(mode, a))
    elif fmt in LOSSLESS and channels == 3:
        if mode == "RGB":
            assert np.array_equal(got, a)
        elif mode == "RGBA":
            opaque, clear = a[..., 3] == 255, a[..., 3] == 0
            assert np.array_equal(got[opaque], a[..., :3][opaque]) and (got[clear] == 255).all()
        elif mode == "P" and "transparency" in kwargs:
            assert (got[a == a.flat[0]] == 255).all()


def _documented_gray(mode: str, a: np.ndarray) -> np.ndarray:
    """The gray values the decoding rules (difflab.data.decode) give a gray image's pixels ``a``."""
    if mode == "1":
        return a.astype(int) * 255
    if mode == "L":
        return a.astype(int)
    v = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = v.min(), v.max()
    if mode == "I;16" or (mode == "I" and 0 <= lo and hi <= 65535 and hi > 255):
        v = v / 257.0
    elif mode == "F" and 0 <= lo and hi <= 1:
        v = v * 255.0
    elif not (0 <= lo and hi <= 255):  # no range to go by: min-max stretched
        v = (v - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(v)
    return np.clip(np.rint(v), 0, 255).astype(int)


# --------------------------------------------------------------------------------------------
# names: non-UTF-8 bytes, spaces and line breaks; symlink loops, dangling links, a FIFO


_name = st.one_of(
    st.binary(min_size=1, max_size=30).filter(lambda b: b"/" not in b and b"\0" not in b),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1, max_size=20).map(os.fsencode),
    st.sampled_from([b"\xff\xfe", b"sp ace", b"new\nline", b"tab\t", b"-", b"\xe9t\xe9", b"a\rb", b"\x1b[31m"]),
)
KINDS = ("good", "good", "garbage", "dangling", "loop", "fifo", "folder-loop")


@fuzz(60)
@given(entries=st.lists(st.tuples(_name, st.sampled_from(KINDS), st.sampled_from([b".png", b".PNG", b".jpg"])),
                        min_size=1, max_size=8, unique_by=lambda e: e[0]))
def test_folder_scan_terminates_on_odd_names_and_links(tmp_path, entries):
    root = fresh_dir(tmp_path) / "root"  # alone in its parent, which a '..' link below leads to
    root.mkdir()
    broot = os.fsencode(root)
    good, bad = [], []
    png = valid_images()["png-RGB"][1]
    for stem, kind, suffix in entries:
        name = stem + suffix
        path = os.path.join(broot, name)
        try:  # names are unique, but a loop's second link or a folder link may meet another entry's name
            if kind == "good":
                with open(path, "wb") as f:
                    f.write(png)
            elif kind == "garbage":
                with open(path, "wb") as f:
                    f.write(b"not an image " + name)
            elif kind == "dangling":
                os.symlink(b"nowhere-" + name, path)
            elif kind == "loop":
                os.symlink(name + b".other" + suffix, path)
                os.symlink(name, os.path.join(broot, name + b".other" + suffix))
            elif kind == "fifo":
                os.mkfifo(path)
            else:  # a folder that links back to the root, and one to itself
                os.symlink(b".", os.path.join(broot, stem))
                os.symlink(b"..", os.path.join(broot, stem + b"-up"))
                continue
        except FileExistsError:
            assume(False)
        if stem.startswith(b"."):  # hidden: not an image of the folder
            continue
        rels = [os.fsdecode(name)] + ([os.fsdecode(name + b".other" + suffix)] if kind == "loop" else [])
        (good if kind == "good" else bad).extend(rels)
    with only_difflab_warnings() as record, time_limit(20):
        try:
            res = load_folder(root, 8, progress=False)
        except DataError as e:
            assert not good, str(e)
            assert_one_line(str(e))
            return
        again = load_folder(root, 8, progress=False)  # the cached copy (or, with unreadable entries, a decode)
    assert set(good) <= set(res.paths) and len(res.paths) + len(res.skipped) >= len(good) + len(bad)
    assert {p for p, _ in res.skipped} >= set(bad)
    assert (again.paths, again.skipped) == (res.paths, res.skipped) and bool((again.images == res.images).all())
    if res.skipped:
        message = str(next(w.message for w in record if issubclass(w.category, SkippedImagesWarning)))
        assert f"skipped {len(res.skipped)} of " in message
        assert all(_shown(p) in message for p, _ in res.skipped[:5])


def test_fifo_named_like_an_image_is_skipped_not_waited_for(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with time_limit(10), pytest.raises(BadImageError, match=re.escape(f"{tmp_path / 'pipe.png'}: not a regular file")):
        open_image(tmp_path / "pipe.png")


def test_non_utf8_and_multiline_names_are_shown_on_one_line(tmp_path):
    root = os.fsencode(tmp_path)
    for name in (b"\xff\xfe.png", b"two\nlines.png"):
        with open(os.path.join(root, name), "wb") as f:
            f.write(b"garbage")
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    with pytest.warns(SkippedImagesWarning) as record:
        res = load_folder(tmp_path, 4, progress=False)
    assert res.paths == ("ok.png",) and {p for p, _ in res.skipped} == {"\udcff\udcfe.png", "two\nlines.png"}
    message = str(record[0].message)
    assert "\\xff\\xfe.png (not an image" in message and "two\\nlines.png (not an image" in message
    assert_one_line(message)
    with pytest.raises(BadImageError) as info:
        open_image(os.fsdecode(os.path.join(root, b"two\nlines.png")))
    assert str(info.value) == f"{tmp_path}/two\\nlines.png: not an image Pillow can read"


# ============================================================================================
# label files


CSV_PATHS = ["1.png", "2.png", "10.png", "a.jpg", "sub/a.png", "sub/b c.png", "x/1.jpg", "\xe9t\xe9.png"]
_cell = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=10),
    st.sampled_from(["1", "2", "10", "a", "a.jpg", "sub/a", "sub/b c", "./1.png", "x\\1", "\xe9t\xe9", "id", "hair",
                     "red", "blue", "", " ", '"', '""', "a,b", "x=y", "\t", "\0", "\ufeff", "0" * 5000]),
)


@st.composite
def csv_bytes(draw: st.DrawFn) -> bytes:
    """A CSV-ish file: rows of cells written by the csv module or joined by hand, in some encoding, maybe damaged."""
    rows = draw(st.lists(st.lists(_cell, max_size=4), max_size=8))
    if draw(st.booleans()):
        rows = [["id", "hair", "eyes"]] + rows
    buf = io.StringIO()
    if draw(st.booleans()):
        quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]))
        csv.writer(buf, quoting=quoting, lineterminator=draw(st.sampled_from(["\n", "\r\n", "\r"]))).writerows(rows)
    else:
        sep = draw(st.sampled_from([",", ";", "\t", ", "]))
        buf.write(draw(st.sampled_from(["\n", "\r\n"])).join(sep.join(r) for r in rows))
    text = buf.getvalue()
    if draw(st.booleans()):
        text = "\ufeff" + text
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-16", "latin-1"]))
    data = text.encode(encoding, "replace")
    how = draw(st.sampled_from(["none", "none", "truncate", "flip", "huge-field"]))
    if how == "truncate" and data:
        data = data[:draw(st.integers(0, len(data)))]
    elif how == "flip" and data:
        b = bytearray(data)
        b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        data = bytes(b)
    elif how == "huge-field":
        data += b"\n1," + b"x" * 140_000 + b",y\n"
    return data


def _check_labels(labels, n: int) -> None:
    assert labels.keep.shape == (n,) and labels.index.shape == (int(labels.keep.sum()), len(labels.schema.attributes))
    sizes = np.array(labels.schema.sizes)
    index = labels.index.numpy()
    assert ((index >= 0) & (index < sizes)).all()


@fuzz(400)
@given(data=st.one_of(csv_bytes(), st.binary(max_size=300)))
def test_label_csv_loads_or_names_file_and_line(tmp_path, data):
    path = tmp_path / "labels.csv"
    path.write_bytes(data)
    lines = data.count(b"\n") + data.count(b"\r") + 1
    with only_difflab_warnings(), time_limit(10):
        try:
            labels = csv_labels(path, CSV_PATHS)
        except DataError as e:
            message = str(e)
            assert_one_line(message)
            assert str(path) in message
            line = re.match(rf"{re.escape(str(path))}:(\d+):", message)
            assert line is None or 1 <= int(line.group(1)) <= lines, message
        else:
            _check_labels(labels, len(CSV_PATHS))


_segment = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/"), min_size=1, max_size=6) | \
    st.sampled_from(["cats", "dogs", "a b", "\udcff", "x\ny", "10", "2", ".", ".."])


@fuzz(200)
@given(paths=st.lists(st.lists(_segment, min_size=1, max_size=3).map("/".join), max_size=10))
def test_class_folder_labels_load_or_raise_one_line(paths):
    with only_difflab_warnings():
        try:
            labels = folder_labels(paths, "root")
        except DataError as e:
            assert_one_line(str(e))
            assert str(e).startswith("root: ")
        else:
            _check_labels(labels, len(paths))
            for names in labels.schema.classes:
                for n in names:
                    n.encode("utf-8")  # printable and savable: no lone surrogates from undecodable folder names


SCHEMAS = [LabelSchema(("class",), (("T-shirt/top", "Trouser", "a=b", "10", "2"),)),
           LabelSchema(("hair", "eyes"), (("red", "blue", "Blue"), tuple(str(i) for i in range(12))))]


@fuzz(300)
@given(schema=st.sampled_from(SCHEMAS),
       text=st.text(max_size=30) | st.sampled_from(["hair=red", "eyes=0" + "9" * 5000, "9" * 5000, "hair=,eyes=1", "=",
                                                    "hair=red,hair=blue", ",", "class=a=b", " Trouser "]))
def test_label_text_parses_or_raises_one_line(schema, text):
    try:
        row = schema.parse(text)
    except ConfigError as e:
        assert_one_line(str(e))
        assert str(e).startswith("--label ")
    else:
        assert len(row) == len(schema.attributes) and all(-1 <= v < n for v, n in zip(row, schema.sizes))
        if any(v >= 0 for v in row):
            assert schema.parse(schema.describe(row)) == row


def _json_containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)


def _lists(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=4)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-2**80, 2**80) | st.floats() | st.text(max_size=8),
    _json_containers,
    max_leaves=12,
)


@fuzz(200)
@given(attributes=_json | st.lists(st.text(max_size=5), max_size=3),
       classes=_json | st.lists(st.lists(st.text(max_size=5), max_size=4), max_size=3))
def test_label_schema_from_any_json_is_built_or_refused(attributes, classes):
    try:
        schema = LabelSchema(attributes, classes)
    except ConfigError as e:
        assert_one_line(str(e))
    else:
        assert len(schema.attributes) == len(schema.classes) and all(n >= 2 for n in schema.sizes)


# ============================================================================================
# configuration: TOML files, run configs (JSON) and key=value overrides


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, object]]:
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, object]] = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", hints[f.name]))
    return out


LEAVES = _leaves(RunConfig)
KEYS = [k for k, _ in LEAVES]
WORDS = ["cosine", "linear", "ddpm", "ddim", "euler", "v", "eps", "min-snr", "fp32", "bf16", "none", "true", "false",
         "small", "tiny", "default", "fashion-mnist", "folders", "classes", "x.csv", "convnext", "group", "layer"]
_scalar_text = st.one_of(
    st.text(max_size=12), st.sampled_from(WORDS),
    st.integers(-2**70, 2**70).map(str), st.integers(-3, 70).map(str), st.floats().map(repr),
    st.sampled_from(["", "nan", "inf", "-inf", "1e300", "1e-300", "0x10", "1_000", "[", "[]", "[1, 2.5]", "1,2,2",
                     "[" * 3000, "[" + "9" * 5000 + "]", "none", "null", "8", "16", "32", "64", "0", "-1"]),
    st.lists(st.integers(-3, 70), max_size=5).map(json.dumps), st.lists(st.integers(-3, 70), max_size=5).map(
        lambda v: ",".join(map(str, v))),
)
_override = st.tuples(st.sampled_from(KEYS) | st.text(max_size=12) | st.sampled_from(["train", "train.lr.x", "a..b", "."]),
                      _scalar_text).map(lambda kv: f"{kv[0]}={kv[1]}") | st.text(max_size=20)


@fuzz(300)
@given(overrides=st.lists(_override, min_size=1, max_size=4))
def test_overrides_apply_or_raise_config_error(overrides):
    try:
        cfg = apply_overrides(RunConfig(), overrides)
    except ConfigError as e:
        assert_one_line(str(e))
    else:
        assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg
    try:
        cfg = resolve_config(overrides=overrides)
    except ConfigError as e:
        assert_one_line(str(e))
    else:
        assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg


_toml_scalar = st.one_of(
    st.integers(-2**63, 2**63 - 1), st.integers(-3, 130), st.floats(), st.booleans(), st.sampled_from(WORDS),
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=8),
)
_toml_value = st.recursive(_toml_scalar, _lists, max_leaves=8)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value > 0 else "-inf") if abs(value) == float("inf") else repr(value)
    if isinstance(value, (int, str)):
        return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return "[" + ", ".join(_toml(v) for v in value) + "]"  # type: ignore[union-attr]


SECTIONS = sorted({k.split(".")[0] for k in KEYS if "." in k})


@st.composite
def toml_document(draw: st.DrawFn) -> bytes:
    """A TOML document over the config's own sections and options (and some others), maybe damaged."""
    lines = []
    if draw(st.booleans()):
        lines.append(f"preset = {_toml(draw(st.sampled_from(['small', 'tiny', 'huge']) | _toml_value))}")
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from(SECTIONS) | st.text(string.ascii_lowercase, min_size=1, max_size=5))
        if draw(st.integers(0, 9)) == 0:
            lines.append(f"{section} = {_toml(draw(_toml_value))}")
            continue
        lines.append(f"[{section}]")
        fields = [k.split(".", 1)[1] for k in KEYS if k.startswith(section + ".")] or ["x"]
        for _ in range(draw(st.integers(0, 4))):
            key = draw(st.sampled_from(fields) | st.text(string.ascii_lowercase + "_", min_size=1, max_size=5))
            value = draw(_toml_value | st.dictionaries(st.sampled_from(fields), _toml_scalar, max_size=2))
            lines.append(f"{key} = {_toml(value)}")
    data = "\n".join(lines).encode()
    how = draw(st.sampled_from(["none", "none", "none", "truncate", "flip", "garbage"]))
    if how == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    elif how == "flip" and data:
        b = bytearray(data)
        b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        data = bytes(b)
    elif how == "garbage":
        data = draw(st.binary(max_size=200) | st.sampled_from([b"a = " + b"[" * 3000, b"\xff\xfe[train]"]))
    return data


@fuzz(300)
@given(data=toml_document())
def test_toml_config_loads_or_raises_config_error(tmp_path, data):
    path = tmp_path / "run.toml"
    path.write_bytes(data)
    try:
        doc = load_toml(path)
        cfg = resolve_config(toml=doc)
    except ConfigError as e:
        assert_one_line(str(e))
    else:
        assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg


@st.composite
def run_config_json(draw: st.DrawFn) -> bytes:
    """A saved run config with some options replaced, removed or added; or its text damaged."""
    d = to_dict(resolve_config())
    for _ in range(draw(st.integers(1, 4))):
        node, key = d, draw(st.sampled_from(sorted(d)))
        while isinstance(node.get(key), dict) and draw(st.integers(0, 3)) > 0:
            node = node[key]
            key = draw(st.sampled_from(sorted(node) or ["x"]))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            node[key] = draw(_json)
        elif action == "delete":
            node.pop(key, None)
        else:
            node[draw(st.text(max_size=6))] = draw(_json)
    data = json.dumps(d).encode()
    how = draw(st.sampled_from(["none", "none", "none", "truncate", "flip", "garbage"]))
    if how == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    elif how == "flip":
        b = bytearray(data)
        b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        data = bytes(b)
    elif how == "garbage":
        data = draw(st.binary(max_size=100) | st.sampled_from([b"[" * 100_000, b'{"train": {"seed": ' + b"9" * 5000 + b"}}"]))
    return data


@fuzz(300)
@given(data=run_config_json())
def test_run_config_json_loads_or_raises_config_error(tmp_path, data):
    path = tmp_path / "config.json"
    path.write_bytes(data)
    try:
        cfg = RunConfig.load(path)
    except ConfigError as e:
        assert_one_line(str(e))
    else:
        assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize(("data", "match"), [
    (b"a = '\xff'", "not UTF-8 text"),
    (b"a = " + b"[" * 3000 + b"]" * 3000, "nested too deeply"),
])
def test_toml_file_errors_name_the_file(tmp_path, data, match):
    path = tmp_path / "run.toml"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=f"--config file {re.escape(str(path))} .*{match}"):
        load_toml(path)
    with pytest.raises(ConfigError, match="is a folder"):
        load_toml(tmp_path)


@pytest.mark.parametrize(("toml", "overrides", "match"), [
    ({"preset": ["small"]}, [], "unknown --preset"),
    ({"sampler": 3}, [], "config.sampler must be a table of options, got 3"),
    ({"sampler": {"sampler": "ddpm", "foo": 1}}, [], "unknown option config.sampler.foo"),
    ({"data": {"image_size": "64"}}, [], "config.data.image_size must be of type int"),
    ({"data": {"channels": "3"}}, [], "config.data.channels must be of type int"),
    ({"model": {"image_size": 0}}, [], "UNetConfig.image_size must be >= 1"),
    ({"model": {"attention_resolutions": [0]}, "data": {"image_size": 64}}, [], "attention_resolutions must hold integers >= 1"),
    ({"train": {"grad_clip": float("nan")}}, [], "config.train.grad_clip must be a number, got nan"),
    ({}, ["train.lr.x.y=1"], "unknown option 'train.lr.x.y'"),
    ({}, ["schedule.timesteps=1e300"], "schedule.timesteps: the integer of 301 digits is out of range"),
    ({}, ["model.channel_mults=[" + "9" * 5000 + "]"], "not a JSON list"),
])
def test_config_shapes_found_by_fuzzing_are_config_errors(toml, overrides, match):
    with pytest.raises(ConfigError, match=re.escape(match)) as info:
        resolve_config(toml=toml, overrides=overrides)
    assert_one_line(str(info.value))


def test_run_config_json_errors_name_the_file(tmp_path):
    for data in (b'{"preset": "\xff"}', b"[" * 100_000, b'{"train": {"seed": ' + b"9" * 5000 + b"}}"):
        path = tmp_path / "config.json"
        path.write_bytes(data)
        with pytest.raises(ConfigError, match=f"cannot read run config {re.escape(str(path))}: "):
            RunConfig.load(path)
    path.write_text('{"schedule": {"timesteps": 1' + "0" * 400 + "}}")
    with pytest.raises(ConfigError, match="config.schedule.timesteps: the integer of 401 digits is out of range"):
        RunConfig.load(path)

