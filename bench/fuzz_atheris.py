"""Coverage-guided fuzzing (atheris / libFuzzer) of the readers of user files, run by hand; not part of the tests.

    pip install atheris
    python bench/fuzz_atheris.py image [CORPUS_DIR] [libFuzzer options, e.g. -runs=200000 -max_len=65536]
    python bench/fuzz_atheris.py toml  [CORPUS_DIR] [...]
    python bench/fuzz_atheris.py csv   [CORPUS_DIR] [...]

Targets: ``image``: the bytes as an image file (the first byte picks the suffix and channels) through
``open_image`` and the folder loader's per-file decode; ``toml``: ``load_toml`` then ``resolve_config``;
``csv``: ``csv_labels`` against a few image paths. The property is the one tests/test_fuzz.py checks with
hypothesis: the input loads, or a ``DifflabError`` refuses it in one line. Anything else (another exception,
a multi-line message) is a crash: libFuzzer saves the input as ``crash-*``; ``-timeout=10`` reports hangs and
``-rss_limit_mb=2048`` (the default) memory blow-ups. Without a CORPUS_DIR, a temporary one is seeded with
small valid files (every image format and mode, a TOML config, a label CSV).
"""
from __future__ import annotations

import io
import os
import sys
import tempfile
import warnings
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["PIL", "difflab", "tomllib", "csv"]):
    from PIL import Image

    Image.init()  # imports every format plugin now, to instrument them (Image.open would, later)
    from difflab.config import load_toml, resolve_config
    from difflab.data.decode import open_image
    from difflab.data.images import _load_array
    from difflab.data.labels_csv import csv_labels
    from difflab.errors import DifflabError

SUFFIXES = (".png", ".jpg", ".gif", ".bmp", ".webp", ".tiff")
CSV_PATHS = ["1.png", "2.png", "10.png", "a.jpg", "sub/a.png", "sub/b c.png"]
WORK = Path(tempfile.mkdtemp(prefix="difflab-atheris-"))


def _check(error: DifflabError) -> None:
    message = str(error)
    if not message or "\n" in message or "\r" in message:
        raise AssertionError(f"not a one-line error: {message!r}")


def fuzz_image(data: bytes) -> None:
    if not data:
        return
    path = WORK / f"input{SUFFIXES[data[0] % len(SUFFIXES)]}"
    path.write_bytes(data[1:])
    channels = 1 if data[0] & 0x80 else 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stray warning (Pillow's, numpy's) is a finding too
        try:
            open_image(path, channels)
        except DifflabError as e:
            _check(e)
        try:
            _load_array(str(path), 8, channels)
        except DifflabError as e:
            _check(e)


def fuzz_toml(data: bytes) -> None:
    path = WORK / "run.toml"
    path.write_bytes(data)
    try:
        resolve_config(toml=load_toml(path))
    except DifflabError as e:
        _check(e)


def fuzz_csv(data: bytes) -> None:
    path = WORK / "labels.csv"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            csv_labels(path, CSV_PATHS)
        except DifflabError as e:
            _check(e)


def _seed(target: str, folder: Path) -> None:
    if target == "image":
        for i, suffix in enumerate(SUFFIXES):
            for mode in ("RGB", "RGBA", "L", "P", "1", "CMYK", "I;16", "F"):
                buf = io.BytesIO()
                try:
                    Image.new(mode, (12, 9)).save(buf, Image.registered_extensions()[suffix])
                except (OSError, KeyError, ValueError):
                    continue  # a mode this format cannot store
                (folder / f"{suffix[1:]}-{mode.replace(';', '')}").write_bytes(bytes([i]) + buf.getvalue())
    elif target == "toml":
        (folder / "run.toml").write_text('preset = "tiny"\n[train]\nlr = 5e-4\nbatch_size = 16\n'
                                         '[schedule]\nkind = "cosine"\n[model]\nchannel_mults = [1, 2]\n')
    else:
        (folder / "labels.csv").write_text("id,hair,eyes\n1,red,blue\n2,red,green\nsub/a,black,blue\n10.png,black,green\n")


def main() -> None:
    targets = {"image": fuzz_image, "toml": fuzz_toml, "csv": fuzz_csv}
    if len(sys.argv) < 2 or sys.argv[1] not in targets:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(targets)}}} [CORPUS_DIR] [libFuzzer options]")
    target, rest = sys.argv[1], sys.argv[2:]
    if not any(not a.startswith("-") for a in rest):
        corpus = WORK / "corpus"
        corpus.mkdir()
        _seed(target, corpus)
        rest = [os.fspath(corpus), *rest]
    atheris.Setup([sys.argv[0], *rest], targets[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
