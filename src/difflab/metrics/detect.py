"""Anime-face detection rate: the share of images in which a detector finds at least one face.

The homework scored this with a YOLOv8 anime-face model that cannot be had here; difflab offers
two real detectors, and reports each one's rate:

``lbp``
    nagadomi's ``lbpcascade_animeface.xml`` (MIT, 2011) run by OpenCV's
    ``cv2.CascadeClassifier`` (``opencv-python-headless<5``: OpenCV 5 dropped the cascade API).
``animeface``
    the ``animeface`` package (nya3jp's Python wrapper of nagadomi's AnimeFace 2009 / libnvxs,
    model compiled in). Its C extension reads Pillow's internal image struct, whose layout
    changed in Pillow 12: there it silently finds nothing. :class:`AnimeFaceDetector` therefore
    runs a self-check at start-up on a face drawn by :func:`reference_face` and raises a
    :class:`DetectorError` if it finds no face there.

The protocol (:class:`DetectProtocol`, recorded in every result) is fixed so that rates are
comparable between models and image sizes:

1. decode with ``difflab.data.decode.open_image(channels=3)`` (RGB; gray repeated);
2. scale to ``size x size`` (default 96, the homework's face size) with
   ``difflab.data.decode.resize_center_crop`` (Lanczos, central square) unless already so;
3. pad ``pad`` pixels (default 24) of white on every side: faces in these crops touch the
   border, and a detector needs context around a face (on the 96 px real faces the LBP cascade
   finds ~81% as they are and ~97% padded, see ``../shared/data/README.md``);
4. ``lbp``: RGB -> gray (``cv2.COLOR_RGB2GRAY``), ``cv2.equalizeHist``, then
   ``detectMultiScale(scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))``: the parameters of
   the cascade's own README. ``animeface``: ``animeface.detect`` on the padded RGB image, a face
   counting when its likelihood is at least ``min_likelihood`` (default 0: any face it reports).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageDraw

from difflab.errors import ConfigError, DifflabError, parse_choice
from difflab.io import atomic_write_bytes, cache_dir

__all__ = [
    "CASCADE_SHA256",
    "CASCADE_URL",
    "AnimeFaceDetector",
    "DetectProtocol",
    "Detector",
    "DetectorError",
    "DetectorKind",
    "LBPCascadeDetector",
    "make_detector",
    "prepare_image",
    "reference_face",
    "resolve_cascade",
]

CASCADE_NAME = "lbpcascade_animeface.xml"
#: Upstream location of the cascade (used only when no local copy is found).
CASCADE_URL = "https://raw.githubusercontent.com/nagadomi/lbpcascade_animeface/master/lbpcascade_animeface.xml"
#: sha256 of the cascade as published upstream (the copy in ../shared/data, 246,945 bytes).
CASCADE_SHA256 = "9376d30ac38db6bda2a68b88b3b76bbd7e6aa33af47f7f5c76bc88ca75f1ce30"
CASCADE_ENV = "DIFFLAB_LBP_CASCADE"
#: Where the shared data sits relative to a source checkout (repo/src/difflab/metrics/detect.py).
_CHECKOUT_SHARED = Path(__file__).resolve().parents[4] / "shared" / "data" / "lbpcascade-animeface" / CASCADE_NAME


class DetectorError(DifflabError):
    """A detector cannot be set up (missing package or file, failed self-check)."""


class DetectorKind(str, Enum):
    LBP = "lbp"
    ANIMEFACE = "animeface"


@dataclass(frozen=True)
class DetectProtocol:
    """How an image is prepared and which detector settings are used (module docstring)."""

    size: int = 96
    pad: int = 24
    scale_factor: float = 1.1
    min_neighbors: int = 5
    min_size: int = 24
    min_likelihood: float = 0.0

    def __post_init__(self) -> None:
        for name in ("size", "min_neighbors", "min_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"detect {name.replace('_', ' ')} must be a positive integer, got {v!r}")
        if isinstance(self.pad, bool) or not isinstance(self.pad, int) or self.pad < 0:
            raise ConfigError(f"detect pad must be a non-negative integer, got {self.pad!r}")
        if not (isinstance(self.scale_factor, (int, float)) and self.scale_factor > 1.0):
            raise ConfigError(f"detect scale factor must be > 1, got {self.scale_factor!r}")
        if not (isinstance(self.min_likelihood, (int, float)) and 0.0 <= self.min_likelihood <= 1.0):
            raise ConfigError(f"detect min likelihood must be in [0, 1], got {self.min_likelihood!r}")


def prepare_image(img: Image.Image, protocol: DetectProtocol) -> Image.Image:
    """Steps 2-3 of the protocol: scale to ``size`` (if needed) and pad with white."""
    from difflab.data.decode import resize_center_crop

    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (protocol.size, protocol.size):
        img = resize_center_crop(img, protocol.size)
    if protocol.pad:
        side = protocol.size + 2 * protocol.pad
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(img, (protocol.pad, protocol.pad))
        img = canvas
    return img


class Detector(Protocol):
    name: str

    def count(self, img: Image.Image) -> int:
        """Number of faces found in an image already prepared by :func:`prepare_image`."""

    def settings(self) -> dict[str, object]:
        """What identifies this detector's results (for the JSON protocol)."""


# --------------------------------------------------------------------------------------------
# the LBP cascade


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _import_cv2():  # noqa: ANN202
    try:
        import cv2
    except ImportError:
        raise DetectorError(
            "the lbp detector needs OpenCV: pip install 'opencv-python-headless<5' "
            "(or difflab[eval])") from None
    if not hasattr(cv2, "CascadeClassifier"):
        raise DetectorError(
            f"OpenCV {getattr(cv2, '__version__', '?')} has no CascadeClassifier (OpenCV 5 removed it): "
            "pip install 'opencv-python-headless<5'")
    return cv2


Opener = Callable[..., object]


def download_cascade(dest: Path, *, url: str = CASCADE_URL, sha256: str = CASCADE_SHA256,
                     opener: Opener = urllib.request.urlopen, timeout: float = 30.0) -> Path:
    """Fetch the cascade from ``url``, check its sha256, write it atomically to ``dest``."""
    try:
        resp: Any = opener(url, timeout=timeout)
        with contextlib.closing(resp):
            data = resp.read()
    except (OSError, ValueError) as e:
        raise DetectorError(
            f"no local {CASCADE_NAME} and downloading it from {url} failed ({e}); "
            f"pass its path with --cascade or ${CASCADE_ENV}") from None
    got = _sha256(data)
    if got != sha256:
        raise DetectorError(f"{url} served a file with sha256 {got}, expected {sha256}; refusing to use it")
    atomic_write_bytes(dest, data)
    return dest


def resolve_cascade(path: str | os.PathLike[str] | None = None, *, download: bool = True,
                    opener: Opener = urllib.request.urlopen, search: Sequence[Path] | None = None) -> Path:
    """Find ``lbpcascade_animeface.xml``.

    Order: ``path``; ``$DIFFLAB_LBP_CASCADE``; ``../shared/data/lbpcascade-animeface/`` relative
    to the working directory, then to the source checkout; the difflab cache
    (``cache_dir("detect")``); else download from :data:`CASCADE_URL` into the cache (sha256
    checked). A user-given file is used as it is (its sha256 goes into the results).
    """
    given = path if path is not None else os.environ.get(CASCADE_ENV) or None
    if given is not None:
        given = Path(given).expanduser()
        if not given.is_file():
            raise DetectorError(f"cascade file {given} does not exist")
        return given
    candidates = list(search) if search is not None else [
        Path.cwd().parent / "shared" / "data" / "lbpcascade-animeface" / CASCADE_NAME,
        _CHECKOUT_SHARED,
    ]
    cached = cache_dir("detect") / CASCADE_NAME
    for c in [*candidates, cached]:
        if c.is_file():
            return c
    if not download:
        raise DetectorError(f"no {CASCADE_NAME} found (looked in {', '.join(map(str, candidates))}, {cached})")
    return download_cascade(cached, opener=opener)


class LBPCascadeDetector:
    name = DetectorKind.LBP.value

    def __init__(self, protocol: DetectProtocol | None = None, cascade: str | os.PathLike[str] | None = None,
                 *, download: bool = True) -> None:
        self.protocol = protocol or DetectProtocol()
        cv2 = _import_cv2()
        self._cv2 = cv2
        self.path = resolve_cascade(cascade, download=download)
        data = self.path.read_bytes()
        self.sha256 = _sha256(data)
        self._cascade = cv2.CascadeClassifier(str(self.path))
        if self._cascade.empty():
            raise DetectorError(f"OpenCV could not load the cascade {self.path}")

    def count(self, img: Image.Image) -> int:
        cv2 = self._cv2
        gray = cv2.equalizeHist(cv2.cvtColor(np.asarray(img.convert("RGB")), cv2.COLOR_RGB2GRAY))
        p = self.protocol
        faces = self._cascade.detectMultiScale(
            gray, scaleFactor=p.scale_factor, minNeighbors=p.min_neighbors, minSize=(p.min_size, p.min_size))
        return int(len(faces))

    def settings(self) -> dict[str, object]:
        p = self.protocol
        return {
            "detector": "lbpcascade_animeface via cv2.CascadeClassifier",
            "opencv": self._cv2.__version__,
            "cascade": str(self.path),
            "cascade_sha256": self.sha256,
            "preprocess": "RGB -> gray (COLOR_RGB2GRAY), equalizeHist",
            "scale_factor": p.scale_factor,
            "min_neighbors": p.min_neighbors,
            "min_size": p.min_size,
        }


# --------------------------------------------------------------------------------------------
# animeface


def reference_face(size: int = 128) -> Image.Image:
    """A plain drawn anime face (our own drawing, made here, no file), white background.

    Used as the known positive of :class:`AnimeFaceDetector`'s self-check: animeface 2.0.3
    finds it (likelihood ~0.9 at 128 px) with Pillow <= 11.3 and nothing with Pillow 12+.
    """
    s = size / 256
    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)

    def box(*v: float) -> list[float]:
        return [x * s for x in v]

    hair, skin = (90, 60, 40), (255, 224, 200)
    d.ellipse(box(30, 10, 226, 200), fill=hair)
    d.ellipse(box(60, 50, 196, 230), fill=skin)
    d.polygon(box(50, 40, 206, 40, 200, 110, 170, 80, 128, 110, 90, 80, 56, 110), fill=hair)
    w = max(1, int(3 * s))
    for cx in (98, 158):
        d.ellipse(box(cx - 18, 115, cx + 18, 165), fill=(255, 255, 255), outline=(40, 20, 10), width=w)
        d.ellipse(box(cx - 13, 122, cx + 13, 162), fill=(60, 90, 200))
        d.ellipse(box(cx - 7, 132, cx + 7, 156), fill=(10, 10, 40))
        d.ellipse(box(cx - 9, 126, cx - 2, 134), fill=(255, 255, 255))
        d.line(box(cx - 22, 108, cx + 22, 104), fill=(60, 30, 20), width=max(1, int(4 * s)))
    d.line(box(115, 200, 141, 200), fill=(180, 60, 60), width=w)
    return im


class AnimeFaceDetector:
    name = DetectorKind.ANIMEFACE.value

    def __init__(self, protocol: DetectProtocol | None = None, *, self_check: bool = True) -> None:
        self.protocol = protocol or DetectProtocol()
        try:
            import animeface
        except ImportError:
            raise DetectorError("the animeface detector needs the animeface package: "
                                "pip install animeface 'Pillow<11.4' (or difflab[eval])") from None
        self._animeface = animeface
        if self_check:
            self.check()

    def _faces(self, img: Image.Image) -> list:  # noqa: ANN401
        return [f for f in self._animeface.detect(img) if f.likelihood >= self.protocol.min_likelihood]

    def check(self) -> None:
        """Fail loudly unless the reference face is found and a blank image is not."""
        import PIL

        found = len(self._animeface.detect(reference_face(128)))
        blank = len(self._animeface.detect(Image.new("RGB", (128, 128), (255, 255, 255))))
        if found >= 1 and blank == 0:
            return
        major = int(PIL.__version__.split(".")[0])
        hint = (f"Pillow {PIL.__version__} is installed and animeface 2.0.3 only works with Pillow <= 11.3: "
                "pip install 'Pillow<11.4' (difflab[eval] pins it)") if major >= 12 else \
            f"with Pillow {PIL.__version__}"
        raise DetectorError(
            f"animeface self-check failed: it found {found} face(s) in the reference face and {blank} in a "
            f"blank image; {hint}")

    def count(self, img: Image.Image) -> int:
        return len(self._faces(img.convert("RGB")))

    def settings(self) -> dict[str, object]:
        from importlib.metadata import PackageNotFoundError, version

        import PIL
        try:
            v = version("animeface")
        except PackageNotFoundError:
            v = "?"
        return {
            "detector": "animeface (libnvxs, nagadomi's AnimeFace 2009)",
            "animeface": v,
            "pillow": PIL.__version__,
            "min_likelihood": self.protocol.min_likelihood,
            "self_check": "reference_face(128) found, blank image not",
        }


def make_detector(kind: DetectorKind | str, protocol: DetectProtocol | None = None,
                  cascade: str | os.PathLike[str] | None = None) -> Detector:
    kind = parse_choice(DetectorKind, kind, "detector")
    if kind is DetectorKind.LBP:
        return LBPCascadeDetector(protocol, cascade)
    return AnimeFaceDetector(protocol)


def protocol_dict(protocol: DetectProtocol) -> dict[str, object]:
    d = asdict(protocol)
    d["steps"] = (f"open_image RGB -> resize_center_crop to {protocol.size} (Lanczos) unless already -> "
                  f"pad {protocol.pad} px white")
    return d


def detection_counts(images: Iterable[Image.Image], detectors: Sequence[Detector],
                     protocol: DetectProtocol) -> np.ndarray:
    """For each image (decoded, any size) and detector, the number of faces found: N x D int."""
    rows = []
    for img in images:
        prepared = prepare_image(img, protocol)
        rows.append([d.count(prepared) for d in detectors])
    return np.asarray(rows, dtype=np.int64).reshape(-1, len(detectors))
