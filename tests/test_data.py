"""Tests for difflab.data: image decoding, folders and their cache, Fashion-MNIST, augmentation."""
from __future__ import annotations

import gzip
import io
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import difflab.data.augment as augment_mod
from difflab.config import from_dict, to_dict
from difflab.data import dataset as dataset_mod
from difflab.data import fashion_mnist as fm
from difflab.data import images as images_mod
from difflab.data import (
    IMAGE_EXTENSIONS,
    AugmentConfig,
    BadImageError,
    find_images,
    load_dataset,
    load_fashion_mnist,
    load_folder,
    open_image,
    resize_center_crop,
    to_float,
    to_uint8,
)
from difflab.data.augment import augment
from difflab.data.images import SkippedImagesWarning
from difflab.errors import ConfigError, DataError

WHITE = (255, 255, 255)


def px(img: Image.Image, xy: tuple[int, int]):
    return img.getpixel(xy)


def close(a, b, tol: int = 0) -> bool:
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return len(a) == len(b) and all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


def noise_rgb(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def skipped_warnings(record) -> list[warnings.WarningMessage]:
    return [w for w in record if issubclass(w.category, SkippedImagesWarning)]


# ---------------------------------------------------------------------------------------------
# find_images


def test_find_images_recursive_sorted_case_insensitive(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for rel in ["b.PNG", "A.JPG", "sub/c.jpeg", "sub/deeper/d.WebP", "e.bmp", "f.gif",
                "notes.txt", "g.tiff", ".h.jpg", ".hidden/i.png", "sub/x.Jpg"]:
        (tmp_path / rel).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["A.JPG", "b.PNG", "e.bmp", "f.gif", "sub/c.jpeg", "sub/deeper/d.WebP", "sub/x.Jpg"]
    assert all(isinstance(p, Path) for p in find_images(tmp_path))
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"} == set(IMAGE_EXTENSIONS)


def test_find_images_follows_folder_symlinks_without_looping(tmp_path):
    (tmp_path / "real").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "real" / "a.png")
    (tmp_path / "real" / "loop").symlink_to(tmp_path / "real", target_is_directory=True)
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(tmp_path / "real", target_is_directory=True)
    assert [p.relative_to(root).as_posix() for p in find_images(root)] == ["linked/a.png"]


def test_find_images_bad_root_names_it(tmp_path):
    with pytest.raises(DataError, match="nope"):
        find_images(tmp_path / "nope")
    f = tmp_path / "file.png"
    f.write_bytes(b"")
    with pytest.raises(DataError, match="file.png"):
        find_images(f)


# ---------------------------------------------------------------------------------------------
# open_image: modes


def test_open_image_rgba_composited_on_white(tmp_path):
    im = Image.new("RGBA", (3, 1))
    im.putpixel((0, 0), (255, 0, 0, 0))      # fully transparent red -> white
    im.putpixel((1, 0), (0, 0, 255, 255))    # opaque blue stays blue
    im.putpixel((2, 0), (0, 0, 0, 128))      # half-transparent black -> 255 * (1 - 128/255) = 127
    im.save(tmp_path / "a.png")
    out = open_image(tmp_path / "a.png")
    assert out.mode == "RGB" and out.size == (3, 1)
    assert px(out, (0, 0)) == WHITE
    assert px(out, (1, 0)) == (0, 0, 255)
    assert close(px(out, (2, 0)), (127, 127, 127), tol=1)
    gray = open_image(tmp_path / "a.png", channels=1)
    assert gray.mode == "L" and px(gray, (0, 0)) == 255 and close(px(gray, (2, 0)), 127, tol=1)


def test_open_image_la_and_palette_transparency(tmp_path):
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 0))
    la.putpixel((1, 0), (40, 255))
    la.save(tmp_path / "la.png")
    out = open_image(tmp_path / "la.png")
    assert px(out, (0, 0)) == WHITE and px(out, (1, 0)) == (40, 40, 40)

    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png", transparency=0)  # palette index 0 (red) is transparent
    reopened = Image.open(tmp_path / "p.png")
    assert reopened.mode == "P" and "transparency" in reopened.info
    out = open_image(tmp_path / "p.png")
    assert px(out, (0, 0)) == WHITE and px(out, (1, 0)) == (0, 255, 0)

    gif = tmp_path / "t.gif"
    p.save(gif, transparency=0)
    assert px(open_image(gif), (0, 0)) == WHITE


def test_open_image_plain_modes(tmp_path):
    Image.new("L", (2, 2), 77).save(tmp_path / "l.png")
    assert px(open_image(tmp_path / "l.png"), (1, 1)) == (77, 77, 77)
    assert px(open_image(tmp_path / "l.png", channels=1), (1, 1)) == 77

    one = Image.new("1", (2, 1))
    one.putpixel((1, 0), 1)
    one.save(tmp_path / "one.bmp")
    out = open_image(tmp_path / "one.bmp", channels=1)
    assert (px(out, (0, 0)), px(out, (1, 0))) == (0, 255)

    Image.new("RGB", (2, 2), (10, 200, 30)).save(tmp_path / "rgb.bmp")
    assert px(open_image(tmp_path / "rgb.bmp"), (0, 0)) == (10, 200, 30)
    # channels=1 is ITU-R 601-2 luma: L = R*299/1000 + G*587/1000 + B*114/1000
    assert close(px(open_image(tmp_path / "rgb.bmp", channels=1), (0, 0)),
                 round(10 * 0.299 + 200 * 0.587 + 30 * 0.114), tol=1)

    Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp_path / "w.webp", lossless=True)
    assert px(open_image(tmp_path / "w.webp"), (3, 3)) == (10, 200, 30)


def test_open_image_16bit_and_float(tmp_path):
    a16 = np.array([[0, 65535], [257 * 100, 257 * 200]], dtype=np.uint16)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = open_image(tmp_path / "g16.png", channels=1)
    assert np.asarray(out).tolist() == [[0, 255], [100, 200]]
    assert np.asarray(open_image(tmp_path / "g16.png")).shape == (2, 2, 3)

    # Mode I (32-bit) with a 16-bit range, and mode F in 0..1 (TIFF keeps both losslessly;
    # open_image reads any format Pillow knows, only find_images filters by extension).
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    assert np.asarray(open_image(tmp_path / "i.tif", channels=1)).tolist() == [[0, 255]]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    assert np.asarray(open_image(tmp_path / "f.tif", channels=1)).tolist() == [[0, 128, 255]]


def test_open_image_cmyk(tmp_path):
    im = Image.new("CMYK", (16, 16), (0, 0, 0, 0))  # no ink: white
    im.paste((255, 0, 0, 0), (8, 0, 16, 16))        # full cyan: (0, 255, 255)
    im.save(tmp_path / "c.jpg", quality=100)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = open_image(tmp_path / "c.jpg")
    assert out.mode == "RGB"
    assert close(px(out, (2, 8)), WHITE, tol=4)
    assert close(px(out, (13, 8)), (0, 255, 255), tol=4)


def test_open_image_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(tmp_path / "anim.GIF").n_frames == 2
    assert px(open_image(tmp_path / "anim.GIF"), (1, 1)) == (255, 0, 0)


def test_open_image_applies_exif_orientation(tmp_path):
    im = Image.new("RGB", (4, 2), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display after turning 90 degrees clockwise
    im.save(tmp_path / "o.jpg", exif=exif)
    assert open_image(tmp_path / "o.jpg").size == (2, 4)


# ---------------------------------------------------------------------------------------------
# open_image: bad files


def _truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    noise_rgb((64, 64)).save(buf, "JPEG", quality=90)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_open_image_bad_files(tmp_path):
    _truncated_jpeg(tmp_path / "trunc.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello, I am not a picture\n")
    cases = {"trunc.jpg": "truncated", "empty.jpg": "empty", "text.png": "not an image"}
    for name, reason in cases.items():
        with pytest.raises(BadImageError, match=reason) as info:
            open_image(tmp_path / name)
        msg = str(info.value)
        assert name in msg and "\n" not in msg
        assert isinstance(info.value, DataError)
    with pytest.raises(BadImageError, match="not found"):
        open_image(tmp_path / "missing.png")


def test_open_image_decompression_bomb(tmp_path, monkeypatch):
    Image.new("L", (64, 64)).save(tmp_path / "big.png")   # 4096 px
    Image.new("L", (40, 40)).save(tmp_path / "warn.png")  # 1600 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    before = list(warnings.filters)
    with pytest.raises(BadImageError, match="decompression bomb"):
        open_image(tmp_path / "big.png")  # > 2 x limit: Pillow raises DecompressionBombError
    with pytest.raises(BadImageError, match="decompression bomb"):
        open_image(tmp_path / "warn.png")  # between 1x and 2x: Pillow only warns; we refuse
    assert list(warnings.filters) == before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert open_image(tmp_path / "big.png").size == (64, 64)


def test_channels_validated(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "a.png")
    with pytest.raises(ConfigError, match="channels"):
        open_image(tmp_path / "a.png", channels=4)


# ---------------------------------------------------------------------------------------------
# resize_center_crop


def _bands(horizontal: bool) -> Image.Image:
    """60 x 20 (or 20 x 60) image: red | green | blue thirds."""
    im = Image.new("RGB", (60, 20) if horizontal else (20, 60))
    for i, c in enumerate(((255, 0, 0), (0, 255, 0), (0, 0, 255))):
        box = (20 * i, 0, 20 * i + 20, 20) if horizontal else (0, 20 * i, 20, 20 * i + 20)
        im.paste(c, box)
    return im


@pytest.mark.parametrize("horizontal", [True, False])
def test_resize_center_crop_keeps_the_middle(horizontal):
    out = resize_center_crop(_bands(horizontal), 10)
    assert out.size == (10, 10)
    a = np.asarray(out).astype(int)
    inner = a[2:-2, 2:-2]
    # only the green third (Pillow's fixed-point Lanczos may round 255 to 254)
    assert np.all(inner[..., 1] >= 254) and np.all(inner[..., [0, 2]] <= 1)
    # At the crop's edge the Lanczos kernel reaches a little across into the cut-off thirds,
    # exactly as resizing the whole image and then cropping does.
    assert np.all(a[..., 1] >= 230) and np.all(a[..., [0, 2]] <= 25)
    whole = _bands(horizontal).resize((30, 10) if horizontal else (10, 30), Image.Resampling.LANCZOS)
    ref = np.asarray(whole.crop((10, 0, 20, 10) if horizontal else (0, 10, 10, 20))).astype(int)
    assert np.abs(a - ref).max() <= 1


def test_resize_center_crop_antialiases():
    # A 1-pixel checkerboard shrunk 4x must come out flat mid-gray (nearest neighbour would
    # give pure black or white; unfiltered bilinear would keep strong structure).
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    out = np.asarray(resize_center_crop(Image.fromarray(board), 16)).astype(int)
    assert np.all(np.abs(out - 127.5) <= 2)


# ---------------------------------------------------------------------------------------------
# load_folder


def _make_folder(root: Path) -> dict[str, tuple[int, int, int]]:
    """A small mixed folder; returns the colour each good image should have after decoding."""
    (root / "nested" / "deeper").mkdir(parents=True)
    good = {
        "a.png": (255, 0, 0),
        "B.JPG": (0, 128, 0),
        "nested/c.bmp": (0, 0, 255),
        "nested/deeper/d.webp": (200, 100, 50),
        "e.gif": (255, 255, 0),
    }
    for rel, color in good.items():
        im = Image.new("RGB", (24, 16), color)
        kwargs = {"quality": 95} if rel.endswith(".JPG") else {"lossless": True} if rel.endswith(".webp") else {}
        im.save(root / rel, **kwargs)
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    rgba.save(root / "nested" / "transparent.png")
    good["nested/transparent.png"] = WHITE
    _truncated_jpeg(root / "bad_trunc.jpg")
    (root / "bad_empty.png").write_bytes(b"")
    (root / "nested" / "bad_text.png").write_text("not an image")
    (root / "readme.txt").write_text("ignored: not an image extension")
    return good


def test_load_folder_decodes_skips_and_warns_once(tmp_path):
    good = _make_folder(tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        res = load_folder(tmp_path, 8, progress=False)
    sk = skipped_warnings(record)
    assert len(sk) == 1
    msg = str(sk[0].message)
    assert "skipped 3 of 9" in msg and "bad_empty.png" in msg and "bad_trunc.jpg" in msg
    assert str(tmp_path) in msg
    assert sk[0].filename == __file__  # attributed to the caller of load_folder
    assert sorted(res.paths) == sorted(good) and list(res.paths) == sorted(res.paths)
    assert [p for p, _ in res.skipped] == ["bad_empty.png", "bad_trunc.jpg", "nested/bad_text.png"]
    assert all(reason for _, reason in res.skipped)
    assert res.images.dtype == torch.uint8 and res.images.shape == (6, 3, 8, 8)
    assert res.images.is_contiguous()
    for i, rel in enumerate(res.paths):
        mean = res.images[i].float().mean(dim=(1, 2))
        assert close(tuple(mean.round().int().tolist()), good[rel], tol=3), rel
        # the same pixels as the public single-image functions give
        ref = np.asarray(resize_center_crop(open_image(tmp_path / rel), 8)).transpose(2, 0, 1)
        assert np.array_equal(res.images[i].numpy(), ref)


def test_load_folder_gray(tmp_path):
    Image.new("RGB", (10, 10), (10, 200, 30)).save(tmp_path / "a.png")
    res = load_folder(tmp_path, 4, channels=1, progress=False)
    assert res.images.shape == (1, 1, 4, 4)
    assert close(int(res.images[0, 0, 0, 0]), round(10 * 0.299 + 200 * 0.587 + 30 * 0.114), tol=1)


def test_load_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_folder(tmp_path / "empty", 8, progress=False)
    bad = tmp_path / "allbad"
    bad.mkdir()
    (bad / "x.png").write_text("nope")
    with pytest.raises(DataError, match="allbad"):
        load_folder(bad, 8, progress=False)
    with pytest.raises(DataError, match="missing"):
        load_folder(tmp_path / "missing", 8, progress=False)
    with pytest.raises(ConfigError, match="image_size"):
        load_folder(bad, 0, progress=False)


def test_load_folder_cache_hit_is_identical_and_skips_decoding(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(150):
        noise_rgb((48, 40), seed=i).save(root / f"{i:03d}.png")
    (root / "broken.png").write_text("x")

    def decode_counter():
        calls = []
        real = images_mod._decode_chunk

        def counted(paths, *args):
            calls.append(len(paths))
            return real(paths, *args)
        return calls, counted

    calls, counted = decode_counter()
    monkeypatch.setattr(images_mod, "_decode_chunk", counted)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        first = load_folder(root, 16, progress=False, workers=1)
        cold = time.perf_counter() - t0
    assert sum(calls) == 151
    keys = sorted(p.name for p in (Path(os.environ["DIFFLAB_CACHE"]) / "datasets").iterdir())
    assert any(k.endswith(".npy") for k in keys) and any(k.endswith(".json") for k in keys)
    assert not any(k.startswith(".") for k in keys)  # no temporary files left behind

    calls.clear()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        second = load_folder(root, 16, progress=False, workers=1)
        cached = time.perf_counter() - t0
    assert calls == []  # nothing decoded
    assert len(skipped_warnings(record)) == 1  # the cached result still reports what it left out
    assert torch.equal(first.images, second.images) and second.images.dtype == torch.uint8
    assert second.paths == first.paths and second.skipped == first.skipped
    assert cached < cold, (cached, cold)

    # Changing a file (its mtime), the size or the channels means decoding again.
    st = (root / "007.png").stat()
    os.utime(root / "007.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        load_folder(root, 16, progress=False, workers=1)
        assert sum(calls) == 151
        calls.clear()
        assert load_folder(root, 12, progress=False, workers=1).images.shape[-1] == 12
        assert sum(calls) == 151


def test_load_folder_damaged_cache_is_rebuilt(tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    first = load_folder(tmp_path, 4, progress=False)
    store = Path(os.environ["DIFFLAB_CACHE"]) / "datasets"
    npys = [p for p in store.glob("*.npy") if p.with_suffix(".json").read_text().count(str(tmp_path.resolve()))]
    assert len(npys) == 1
    npys[0].write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="damaged"):
        again = load_folder(tmp_path, 4, progress=False)
    assert torch.equal(first.images, again.images)


def test_load_folder_process_pool_matches_serial(tmp_path, monkeypatch):
    for i in range(40):
        noise_rgb((30, 20), seed=100 + i).save(tmp_path / f"{i:02d}.png")
    (tmp_path / "bad.png").write_bytes(b"")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        serial = load_folder(tmp_path, 8, progress=False, workers=1)
        monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "other-cache"))
        pooled = load_folder(tmp_path, 8, progress=False, workers=2)
    assert torch.equal(serial.images, pooled.images)
    assert serial.paths == pooled.paths and pooled.skipped == (("bad.png", "empty file"),)


def _die(*args):
    os._exit(3)  # what a decoder segfault or the OOM killer looks like to the pool


def test_load_folder_dead_worker_is_a_data_error(tmp_path, monkeypatch):
    for i in range(4):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{i}.png")
    monkeypatch.setattr(images_mod, "_decode_chunk", _die)
    with pytest.raises(DataError, match="decoding process died"):
        load_folder(tmp_path, 4, progress=False, workers=2)


def test_load_folder_jpeg_draft_matches_full_decode(tmp_path):
    # A large smooth JPEG is decoded with DCT scaling; the result must match a full decode
    # closely, which also checks that the crop box survives the draft rescaling.
    y, x = np.mgrid[0:300, 0:400]
    rgb = np.stack([x * 255 // 399, y * 255 // 299, (x + y) * 255 // 698], -1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "big.jpg", quality=95)
    res = load_folder(tmp_path, 16, progress=False)
    full = np.asarray(resize_center_crop(open_image(tmp_path / "big.jpg"), 16)).transpose(2, 0, 1)
    diff = np.abs(res.images[0].numpy().astype(int) - full.astype(int))
    assert diff.max() <= 4, diff.max()


def test_load_folder_on_real_anime_faces_subset(anime_faces_dir, tmp_path):
    # Symlinks, so no real image is copied anywhere.
    names = sorted(os.listdir(anime_faces_dir))[:40]
    for n in names:
        (tmp_path / n).symlink_to(anime_faces_dir / n)
    res = load_folder(tmp_path, 32, progress=False)
    assert res.images.shape == (40, 3, 32, 32) and res.skipped == ()
    assert res.paths == tuple(sorted(names))
    ref = np.asarray(resize_center_crop(open_image(anime_faces_dir / res.paths[3]), 32)).transpose(2, 0, 1)
    assert np.array_equal(res.images[3].numpy(), ref)
    assert 40 < res.images.float().mean() < 220 and res.images.float().std() > 20  # real pictures


@pytest.mark.slow
def test_load_folder_full_anime_faces(anime_faces_dir):
    t0 = time.perf_counter()
    cold = load_folder(anime_faces_dir, 32, progress=False)
    t_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = load_folder(anime_faces_dir, 32, progress=False)
    t_warm = time.perf_counter() - t0
    print(f"\nanime faces 24k @32px: cold {t_cold:.1f} s, cached {t_warm:.2f} s")
    assert cold.images.shape == (24000, 3, 32, 32) and cold.skipped == ()
    assert torch.equal(cold.images, warm.images)
    assert t_warm < t_cold / 5


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST


def _write_idx(folder: Path, part: str, n: int, *, fill: int = 0, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    img_name, lab_name = fm.FILES[part]
    images = (np.arange(n * 28 * 28) % 256).astype(np.uint8).reshape(n, 28, 28)
    images[:, 0, 0] = fill
    img = (0x0803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28)) + images.tobytes()
    lab = (0x0801).to_bytes(4, "big") + n.to_bytes(4, "big") + bytes(i % 10 for i in range(n))
    for name, data in ((img_name, img), (lab_name, lab)):
        if gz:
            (folder / name).write_bytes(gzip.compress(data))
        else:
            (folder / name.removesuffix(".gz")).write_bytes(data)


def _write_all(folder: Path, n: int, **kw) -> None:
    _write_idx(folder, "train", n, **kw)
    _write_idx(folder, "test", n, **kw)


def test_fashion_mnist_real(fashion_mnist_dir):
    images, labels = load_fashion_mnist(fashion_mnist_dir)
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    # The data set is balanced: 6,000 train / 1,000 test images per class (Xiao et al. 2017).
    assert torch.equal(torch.bincount(labels), torch.full((10,), 6000))
    assert images.float().mean() > 50  # real clothing pictures, not zeros
    t_img, t_lab = load_fashion_mnist(fashion_mnist_dir, split="test")
    assert t_img.shape == (10000, 1, 28, 28) and torch.equal(torch.bincount(t_lab), torch.full((10,), 1000))
    a_img, a_lab = load_fashion_mnist(fashion_mnist_dir, split="all")
    assert torch.equal(a_img, torch.cat([images, t_img])) and torch.equal(a_lab, torch.cat([labels, t_lab]))


def test_fashion_mnist_split_and_path_checked(tmp_path):
    with pytest.raises(ConfigError, match="split"):
        load_fashion_mnist(tmp_path, split="validation")
    with pytest.raises(DataError, match=str(tmp_path)):
        load_fashion_mnist(tmp_path)
    with pytest.raises(DataError, match="nowhere"):
        load_fashion_mnist(tmp_path / "nowhere")


@pytest.fixture
def no_default_dirs(monkeypatch, tmp_path):
    """Hide every built-in search location, so only what a test sets up can be found."""
    monkeypatch.delenv("DIFFLAB_DATA", raising=False)
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(fm, "_repo_root", lambda: None)
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work" / "cwd"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    return tmp_path


def test_fashion_mnist_search_order(no_default_dirs, monkeypatch):
    tmp = no_default_dirs
    _write_all(tmp / "work" / "shared" / "data" / "fashion-mnist", 3)  # ../shared from the cwd
    assert len(load_fashion_mnist()[1]) == 3
    _write_all(tmp / "no-debian", 4)
    assert len(load_fashion_mnist()[1]) == 4          # Debian's folder before ../shared
    _write_all(tmp / "env" / "fashion-mnist", 5)
    monkeypatch.setenv("DIFFLAB_DATA", str(tmp / "env"))
    assert len(load_fashion_mnist()[1]) == 5          # $DIFFLAB_DATA/fashion-mnist before Debian's
    _write_all(tmp / "env", 6)
    assert len(load_fashion_mnist()[1]) == 6          # $DIFFLAB_DATA itself first
    _write_all(tmp / "given", 7, gz=False)            # plain (gunzipped) files work too
    assert len(load_fashion_mnist(tmp / "given", split="test")[1]) == 7   # an explicit path beats all
    images, labels = load_fashion_mnist(tmp / "given", split="all")
    assert len(labels) == 14 and labels[:3].tolist() == [0, 1, 2]

    dirs = fm._search_dirs()
    assert dirs[:3] == [tmp / "env", tmp / "env" / "fashion-mnist", tmp / "no-debian"]
    assert dirs[3].resolve() == (tmp / "work" / "shared" / "data" / "fashion-mnist").resolve()
    assert dirs[-1] == tmp / "cache" / "fashion-mnist"


def test_fashion_mnist_search_includes_repo_relative_shared():
    repo = fm._repo_root()
    assert repo is not None and (repo / "src" / "difflab" / "data" / "fashion_mnist.py").is_file()
    assert repo / ".." / "shared" / "data" / "fashion-mnist" in fm._search_dirs()


def test_fashion_mnist_corrupt_files_named(tmp_path):
    cases = tmp_path / "cases"
    _write_all(cases / "ok", 2)
    assert len(load_fashion_mnist(cases / "ok")[1]) == 2

    magic = cases / "magic"
    _write_all(magic, 2)
    raw = bytearray(gzip.decompress((magic / "train-images-idx3-ubyte.gz").read_bytes()))
    raw[3] = 0x01
    (magic / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*magic"):
        load_fashion_mnist(magic)

    short = cases / "short"
    _write_all(short, 2)
    raw = gzip.decompress((short / "train-images-idx3-ubyte.gz").read_bytes())
    (short / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_fashion_mnist(short)

    cut = cases / "cut"
    _write_all(cut, 2)
    data = (cut / "train-labels-idx1-ubyte.gz").read_bytes()
    (cut / "train-labels-idx1-ubyte.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz.*corrupt"):
        load_fashion_mnist(cut)

    label = cases / "label"
    _write_all(label, 2)
    lab = (0x0801).to_bytes(4, "big") + (2).to_bytes(4, "big") + bytes([3, 10])
    (label / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(lab))
    with pytest.raises(DataError, match="label 10"):
        load_fashion_mnist(label)

    count = cases / "count"
    _write_all(count, 2)
    _write_idx(tmp_path / "three", "train", 3)
    (count / "train-labels-idx1-ubyte.gz").write_bytes((tmp_path / "three" / "train-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(DataError, match="2 images, 3 labels"):
        load_fashion_mnist(count)


class _FakeResponse(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def _md5sums(folder: Path) -> dict[str, str]:
    out = {}
    for line in (folder / "MD5SUMS").read_text().splitlines():
        digest, name = line.split()
        out[name] = digest
    return out


def test_fashion_mnist_download_with_fake_opener(no_default_dirs, fashion_mnist_dir, monkeypatch):
    # The shared copy is Debian's re-compressed one, so its MD5s (from its MD5SUMS file) stand
    # in for upstream's published ones here.
    for name, digest in _md5sums(fashion_mnist_dir).items():
        monkeypatch.setitem(fm.MD5, name, digest)
    urls: list[str] = []

    def fake_urlopen(url, timeout=None):
        urls.append(url)
        return _FakeResponse((fashion_mnist_dir / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(fm, "urlopen", fake_urlopen)
    images, labels = load_fashion_mnist(split="train", progress=False)
    assert images.shape == (60000, 1, 28, 28)
    assert urls == [fm.MIRRORS[0] + "train-images-idx3-ubyte.gz", fm.MIRRORS[0] + "train-labels-idx1-ubyte.gz"]
    cache = no_default_dirs / "cache" / "fashion-mnist"
    assert sorted(p.name for p in cache.iterdir()) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    ref_images, ref_labels = load_fashion_mnist(fashion_mnist_dir)
    assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)
    urls.clear()
    load_fashion_mnist(split="train", progress=False)
    assert urls == []  # found in the cache, not downloaded again


def test_fashion_mnist_download_checksum_mismatch_leaves_nothing(no_default_dirs, monkeypatch):
    urls: list[str] = []

    def fake_urlopen(url, timeout=None):
        urls.append(url)
        return _FakeResponse(b"<html>some captive portal</html>")

    monkeypatch.setattr(fm, "urlopen", fake_urlopen)
    with pytest.raises(DataError, match="checksum mismatch") as info:
        load_fashion_mnist(progress=False)
    assert "\n" not in str(info.value) and "train-images-idx3-ubyte.gz" in str(info.value)
    assert urls == [m + "train-images-idx3-ubyte.gz" for m in fm.MIRRORS]  # every mirror tried
    cache = no_default_dirs / "cache" / "fashion-mnist"
    assert list(cache.iterdir()) == []  # not even a temporary file


def test_fashion_mnist_download_network_error(no_default_dirs, monkeypatch):
    from urllib.error import URLError

    def offline(url, timeout=None):
        raise URLError("Temporary failure in name resolution")

    monkeypatch.setattr(fm, "urlopen", offline)
    with pytest.raises(DataError, match="could not download.*name resolution.*DIFFLAB_DATA"):
        load_fashion_mnist(progress=False)


# ---------------------------------------------------------------------------------------------
# load_dataset and the pixel helpers


def test_to_float_to_uint8_round_trip():
    u = torch.arange(256, dtype=torch.uint8)
    f = to_float(u)
    assert f.dtype == torch.float32 and f[0] == -1 and f[-1] == 1
    assert torch.equal(to_uint8(f), u)
    assert torch.equal(to_uint8(to_float(u, torch.bfloat16)), u)  # 8 bits of mantissa suffice
    assert to_uint8(torch.tensor([-3.0, 2.0, float("nan"), 0.0])).tolist() == [0, 255, 0, 128]
    with pytest.raises(TypeError):
        to_float(f)


def test_resize_uint8_antialias_closed_forms():
    const = torch.full((2, 1, 28, 28), 93, dtype=torch.uint8)
    assert torch.equal(dataset_mod.resize_uint8(const, 32), torch.full((2, 1, 32, 32), 93, dtype=torch.uint8))
    board = (torch.arange(28)[:, None] + torch.arange(28)[None, :]) % 2 * 255
    small = dataset_mod.resize_uint8(board.to(torch.uint8)[None, None], 7).float()
    assert (small - 127.5).abs().max() <= 3  # antialiased: the checkerboard averages out


def test_load_dataset_fashion_mnist(fashion_mnist_dir, monkeypatch):
    monkeypatch.setenv("DIFFLAB_DATA", str(fashion_mnist_dir))
    d = load_dataset("fashion-mnist", 28, labels="classes", progress=False)
    ref_images, ref_labels = load_fashion_mnist(fashion_mnist_dir)
    assert torch.equal(d.images, ref_images) and torch.equal(d.labels.index[:, 0], ref_labels)
    assert d.labels.schema.classes[0][1] == "Trouser"
    assert d.num_skipped == 0 and "fashion-mnist" in d.source and "60000" in d.source
    # Resizing and channel repeats, on a slice (resizing all 60,000 takes seconds).
    monkeypatch.setattr(dataset_mod, "load_fashion_mnist", lambda *a, **k: (ref_images[:500], ref_labels[:500]))
    d3 = load_dataset("fashion-mnist", 32, channels=3, progress=False)
    ref_images = ref_images[:500]
    assert d3.images.shape == (500, 3, 32, 32) and d3.images.dtype == torch.uint8
    assert d3.images.is_contiguous()
    assert torch.equal(d3.images[:, 0], d3.images[:, 2])
    assert abs(d3.images.float().mean() - ref_images.float().mean()) < 1.0


def test_load_dataset_folder_and_errors(tmp_path):
    _make_folder(tmp_path / "imgs")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        d = load_dataset(str(tmp_path / "imgs"), 8, progress=False)
        g = load_dataset(tmp_path / "imgs", 8, channels=1, progress=False)
    assert d.images.shape == (6, 3, 8, 8) and d.labels is None and d.num_skipped == 3
    assert str((tmp_path / "imgs").resolve()) in d.source
    assert g.images.shape == (6, 1, 8, 8)
    with pytest.raises(DataError, match="no-such-thing"):
        load_dataset(str(tmp_path / "no-such-thing"), 8)
    with pytest.raises(ConfigError, match="channels"):
        load_dataset(str(tmp_path / "imgs"), 8, channels=2)
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("fashion-mnist", -1)


# ---------------------------------------------------------------------------------------------
# augmentation


def _batch(n: int = 16, c: int = 3, s: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, s, s, generator=g) * 2 - 1


def test_augment_config_validation_and_round_trip():
    cfg = AugmentConfig(hflip=True, rotate_degrees=10, brightness=0.1, contrast=0.2)
    assert from_dict(AugmentConfig, to_dict(cfg)) == cfg
    assert to_dict(cfg) == {"hflip": True, "rotate_degrees": 10.0, "brightness": 0.1, "contrast": 0.2}
    assert from_dict(AugmentConfig, {}) == AugmentConfig()
    for bad in ({"rotate_degrees": -1}, {"brightness": float("nan")}, {"contrast": 1.5},
                {"hflip": "yes"}, {"brightness": "0.1"}):
        with pytest.raises(ConfigError):
            AugmentConfig(**bad)
    with pytest.raises(ConfigError, match="vflip"):
        from_dict(AugmentConfig, {"vflip": True})


def test_augment_identity_returns_input():
    x = _batch()
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    assert augment(x, AugmentConfig(), g) is x
    assert torch.equal(g.get_state(), state)  # and draws no random numbers


def test_augment_deterministic_given_generator():
    cfg = AugmentConfig(hflip=True, rotate_degrees=15, brightness=0.2, contrast=0.3)
    x = _batch(32)
    a = augment(x, cfg, torch.Generator().manual_seed(7))
    b = augment(x, cfg, torch.Generator().manual_seed(7))
    c = augment(x, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= -1 and a.max() <= 1


def test_augment_flip_really_flips():
    x = _batch(64)
    y = augment(x, AugmentConfig(hflip=True), torch.Generator().manual_seed(0))
    flipped = [torch.equal(y[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(y[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 16 < sum(flipped) < 48  # each image flipped with probability 1/2


def test_rotation_closed_forms():
    x = _batch(2, 1, 6)
    # 90 degrees maps pixel centres onto pixel centres: exactly rot90 (counter-clockwise).
    assert torch.allclose(augment_mod._rotate(x, torch.tensor([90.0, -90.0])),
                          torch.stack([torch.rot90(x[0], 1, (-2, -1)), torch.rot90(x[1], -1, (-2, -1))]),
                          atol=1e-5)
    assert torch.allclose(augment_mod._rotate(x, torch.zeros(2)), x, atol=1e-6)
    # A constant image stays constant under any rotation (reflection padding: no black corners).
    const = torch.full((4, 3, 9, 9), 0.25)
    y = augment(const, AugmentConfig(rotate_degrees=45), torch.Generator().manual_seed(3))
    assert torch.allclose(y, const, atol=1e-6)
    # Non-square images are rotated without distortion: 90 degrees on 4x8 equals rot90's
    # content in the central square.
    wide = torch.zeros(1, 1, 4, 8)
    wide[0, 0, :, 2:6] = torch.arange(16.0).view(4, 4)
    r = augment_mod._rotate(wide, torch.tensor([90.0]))
    assert torch.allclose(r[0, 0, :, 2:6], torch.rot90(wide[0, 0, :, 2:6], 1, (0, 1)), atol=1e-5)


def test_augment_brightness_and_contrast_statistics():
    n, b = 4000, 0.3
    x = torch.zeros(n, 1, 2, 2)
    y = augment(x, AugmentConfig(brightness=b), torch.Generator().manual_seed(0))
    off = y.mean(dim=(1, 2, 3))
    assert torch.all((y - off.view(n, 1, 1, 1)).abs() < 1e-7)  # one offset per image
    assert off.abs().max() <= b
    # Uniform on [-b, b]: mean 0, std b / sqrt(3); 4000 samples give a few-% tolerance.
    assert abs(off.mean()) < 4 * b / (3 ** 0.5) / n ** 0.5
    assert abs(off.std() - b / 3 ** 0.5) < 0.05 * b / 3 ** 0.5

    c = 0.5
    x = torch.tensor([-0.5, 0.5]).repeat(n, 1).view(n, 1, 1, 2) + 0.1
    y = augment(x, AugmentConfig(contrast=c), torch.Generator().manual_seed(1))
    assert torch.allclose(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-6)  # mean kept
    factor = (y[:, 0, 0, 1] - y[:, 0, 0, 0])  # original spread is 1
    assert factor.min() >= 1 - c - 1e-6 and factor.max() <= 1 + c + 1e-6
    assert abs(factor.mean() - 1) < 0.02

    # Clamped to the data range.
    y = augment(torch.full((64, 1, 2, 2), 0.95), AugmentConfig(brightness=0.5), torch.Generator().manual_seed(2))
    assert y.max() == 1.0 and y.min() >= -1.0


def test_augment_channels_last():
    cfg = AugmentConfig(hflip=True, rotate_degrees=20, brightness=0.1, contrast=0.1)
    x = _batch(8, 3, 8)
    xc = x.contiguous(memory_format=torch.channels_last)
    a = augment(x, cfg, torch.Generator().manual_seed(5))
    b = augment(xc, cfg, torch.Generator().manual_seed(5))
    assert torch.allclose(a, b, atol=1e-6)
    assert b.is_contiguous(memory_format=torch.channels_last)


def test_cached_folder_is_memory_mapped_copy_on_write(tmp_path):
    """A cache hit maps the decoded array instead of reading it (every DDP rank on a node shares the
    page cache); writing into the tensor never reaches the file."""
    for i in range(3):
        noise_rgb((12, 12), seed=i).save(tmp_path / f"{i}.png")
    first = load_folder(tmp_path, 8, progress=False)
    again = load_folder(tmp_path, 8, progress=False)
    assert torch.equal(first.images, again.images)
    npy = next(p for p in (Path(os.environ["DIFFLAB_CACHE"]) / "datasets").glob("*.npy")
               if str(tmp_path.resolve()) in p.with_suffix(".json").read_text())
    if Path("/proc/self/maps").exists():
        assert str(npy.resolve()) in Path("/proc/self/maps").read_text()
    again.images[0] = 0
    assert torch.equal(load_folder(tmp_path, 8, progress=False).images, first.images)
