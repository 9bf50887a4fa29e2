"""Segmentation data and scores: paired folders (images + class-index masks), their checks, the split and
the joint augmentation, the confusion-matrix scores, the uncertainty ranking and ``difflab eval-seg``."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import _shared  # the shared-data rule (skip here, fail under CI), not a copy of it
from difflab.cli import main
from difflab.data.paired import (
    PairAugment,
    PairedData,
    SkippedPairsWarning,
    colorize,
    joint_augment,
    load_pairs,
    overlay,
    palette,
    read_classes,
    read_mask,
    save_mask,
    split_pairs,
)
from difflab.errors import ConfigError, DataError
from difflab.metrics.segmentation import confusion, evaluate_folders, scores, uncertainty_ranking

SEVEN = ("background", "hair", "eyes", "mouth", "face", "neck", "clothes")

# The hand-worked case: 2x3 masks, 3 classes.
#   truth [[0, 0, 1],     pred [[0, 1, 1],
#          [1, 2, 2]]           [1, 2, 0]]
# (truth, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0)
# confusion (rows truth): [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
# class 0: TP 1, FP 1 (the (2,0) pixel), FN 1 (the (0,1) pixel): IoU 1/3, Dice 2/4
# class 1: TP 2, FP 1, FN 0: IoU 2/3, Dice 4/5
# class 2: TP 1, FP 0, FN 1: IoU 1/2, Dice 2/3
# mIoU (1/3 + 2/3 + 1/2) / 3 = 1/2; mean Dice (1/2 + 4/5 + 2/3) / 3 = 59/90; pixel accuracy 4/6
TRUTH = torch.tensor([[0, 0, 1], [1, 2, 2]], dtype=torch.uint8)
PRED = torch.tensor([[0, 1, 1], [1, 2, 0]], dtype=torch.uint8)
ABC = ("a", "b", "c")


def one_line(info: pytest.ExceptionInfo) -> str:
    """The error must be a single line (the CLI prints it as one); returns it."""
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    return message


# --------------------------------------------------------------------------------------------
# building paired folders


def _write_pair(root: Path, key: str, size: tuple[int, int] = (8, 8), mask: np.ndarray | None = None,
                mask_mode: str = "L", seed: int = 0) -> None:
    w, h = size
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{key}.png")
    m = rng.integers(0, 7, (h, w), dtype=np.uint8) if mask is None else mask
    img = Image.fromarray(m)
    if mask_mode != "L":
        img = img.convert(mask_mode)
    img.save(root / "masks" / f"{key}.png")


def _paired(root: Path, n: int = 4, classes: tuple[str, ...] = SEVEN, **kw) -> Path:
    for i in range(n):
        _write_pair(root, f"p{i:02d}", seed=i, **kw)
    (root / "classes.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(classes)))
    return root


# --------------------------------------------------------------------------------------------
# classes.txt and single masks


def test_read_classes_both_forms_and_one_line_errors(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("0 background\n1 hair\n\n2 mouth and lips\n")
    assert read_classes(f) == ("background", "hair", "mouth and lips")
    f.write_text("background\nhair\n")
    assert read_classes(f) == ("background", "hair")
    for text, expected in (("0 background\n2 hair\n", "line 2"),           # a gap
                           ("0 background\n1 hair\n1 eyes\n", "line 3"),   # a repeated index
                           ("0 background\n1 background\n", "line 2"),     # a repeated name
                           ("0 background\nhair\n", "line 2"),             # two forms mixed
                           ("background\n", "at least 2")):
        f.write_text(text)
        with pytest.raises(DataError) as info:
            read_classes(f)
        message = one_line(info)
        assert str(f) in message and expected in message, message
    with pytest.raises(DataError) as info:
        read_classes(tmp_path / "none.txt")
    assert "none.txt" in one_line(info)


def test_masks_read_save_and_refuse_colour(tmp_path):
    m = torch.tensor([[0, 3], [6, 1]], dtype=torch.uint8)
    save_mask(m, tmp_path / "m.png")
    assert Image.open(tmp_path / "m.png").mode == "L"
    assert torch.equal(read_mask(tmp_path / "m.png", 7), m)
    indexed = Image.fromarray(m.numpy())
    indexed.putpalette(palette().flatten().tolist())  # a palette PNG (VOC style) counts by its indices
    assert indexed.mode == "P"
    indexed.save(tmp_path / "p.png")
    assert torch.equal(read_mask(tmp_path / "p.png"), m)
    with pytest.raises(DataError) as info:
        read_mask(tmp_path / "m.png", 6)
    message = one_line(info)
    assert "m.png" in message and "index 6" in message
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError) as info:
        read_mask(tmp_path / "rgb.png")
    message = one_line(info)
    assert "rgb.png" in message and "is an RGB image" in message and "not class indices" in message
    with pytest.raises(ConfigError):
        save_mask(m, tmp_path / "m.jpg")


# --------------------------------------------------------------------------------------------
# load_pairs


def test_load_pairs_shapes_ids_resize_and_central_crop(tmp_path):
    root = _paired(tmp_path / "d", n=3)
    data = load_pairs(root, progress=False)
    assert data.images.shape == (3, 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.masks.shape == (3, 8, 8) and data.masks.dtype == torch.uint8
    assert data.ids == ("p00", "p01", "p02") and data.classes == SEVEN and data.num_skipped == 0
    assert torch.equal(data.masks[1], read_mask(root / "masks" / "p01.png"))
    small = load_pairs(root, 4, progress=False)
    assert small.images.shape == (3, 3, 4, 4)
    assert set(small.masks.unique().tolist()) <= set(data.masks.unique().tolist())  # nearest: no blended index

    # a 12x8 pair keeps its central 8x8 square, the same columns on both sides
    wide = tmp_path / "wide"
    mask = np.tile(np.arange(12, dtype=np.uint8) % 7, (8, 1))
    _write_pair(wide, "w", size=(12, 8), mask=mask)
    (wide / "classes.txt").write_text("\n".join(SEVEN))
    got = load_pairs(wide, progress=False)
    assert torch.equal(got.masks[0], torch.from_numpy(mask[:, 2:10]))
    full = np.array(Image.open(wide / "images" / "w.png"))
    assert torch.equal(got.images[0], torch.from_numpy(full[:, 2:10]).permute(2, 0, 1))

    # pairs of two sizes: one size is needed to stack them
    _write_pair(root, "p03", size=(10, 10))
    with pytest.raises(DataError) as info:
        load_pairs(root, progress=False)
    assert "p03.png" in one_line(info) and "10x10" in one_line(info)
    assert load_pairs(root, 8, progress=False).images.shape == (4, 3, 8, 8)


def test_every_bad_pair_is_one_line_naming_the_file(tmp_path):
    cases = {}

    def case(name):
        root = _paired(tmp_path / name, n=2)
        cases[name] = root
        return root

    (case("missing-mask") / "masks" / "p01.png").unlink()
    (case("missing-image") / "images" / "p01.png").unlink()
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(case("size") / "masks" / "p01.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(case("rgb") / "masks" / "p01.png")
    bad_index = np.zeros((8, 8), np.uint8)
    bad_index[3, 4] = 9
    Image.fromarray(bad_index).save(case("index") / "masks" / "p01.png")
    (case("unreadable") / "images" / "p01.png").write_bytes(b"not an image at all")
    expected = {
        "missing-mask": ("images/p01.png", "without a mask"),
        "missing-image": ("masks/p01.png", "without an image"),
        "size": ("masks/p01.png", "8x6"),
        "rgb": ("masks/p01.png", "is an RGB image"),
        "index": ("masks/p01.png", "index 9"),
        "unreadable": ("images/p01.png", "not an image"),
    }
    for name, root in cases.items():
        with pytest.raises(DataError) as info:
            load_pairs(root, progress=False)
        message = one_line(info)
        for part in expected[name]:
            assert part in message, (name, message)
    bad_classes = _paired(tmp_path / "classes", n=1)
    (bad_classes / "classes.txt").write_text("0 background\n1 hair\nthree eyes\n")
    with pytest.raises(DataError) as info:
        load_pairs(bad_classes, progress=False)
    assert "classes.txt line 3" in one_line(info)
    for part in ("images", "masks", "classes.txt"):
        root = _paired(tmp_path / f"no-{part}", n=1)
        target = root / part
        if target.is_dir():
            for f in target.iterdir():
                f.unlink()
            target.rmdir()
        else:
            target.unlink()
        with pytest.raises(DataError) as info:
            load_pairs(root, progress=False)
        assert str(target) in one_line(info)


def test_skip_bad_counts_the_bad_pairs_in_one_warning(tmp_path):
    root = _paired(tmp_path / "d", n=10)
    (root / "masks" / "p01.png").unlink()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "masks" / "p04.png")
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(root / "masks" / "p07.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_pairs(root, skip_bad=True, progress=False)
    found = [w for w in caught if issubclass(w.category, SkippedPairsWarning)]
    assert len(found) == 1
    message = str(found[0].message)
    assert message.startswith("skipped 3 of 10 pairs") and "p01.png" in message and "\n" not in message
    assert data.num_skipped == 3 and len(data.ids) == 7 and "p04" not in data.ids
    for f in (root / "masks").iterdir():
        f.unlink()
    with pytest.raises(DataError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_pairs(root, skip_bad=True, progress=False)
    assert "none of the 10 pairs" in one_line(info)


# --------------------------------------------------------------------------------------------
# split and augmentation


def _fake(ids: list[str]) -> PairedData:
    n = len(ids)
    return PairedData(torch.zeros(n, 3, 2, 2, dtype=torch.uint8), torch.zeros(n, 2, 2, dtype=torch.uint8),
                      ("a", "b"), tuple(ids), "test", 0)


def test_split_is_seeded_and_independent_of_file_order():
    ids = [f"id{i:03d}" for i in range(50)]
    shuffled = [ids[i] for i in torch.randperm(50, generator=torch.Generator().manual_seed(3)).tolist()]
    data, other = _fake(ids), _fake(shuffled)
    train, val = split_pairs(data, 0.1, seed=0)
    assert len(val) == 5 and len(train) == 45 and not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(50))
    assert torch.equal(val, split_pairs(data, 0.1, seed=0)[1])
    held = {data.ids[i] for i in val.tolist()}
    assert {other.ids[i] for i in split_pairs(other, 0.1, seed=0)[1].tolist()} == held
    assert {data.ids[i] for i in split_pairs(data, 0.1, seed=1)[1].tolist()} != held
    assert len(split_pairs(data, 0.0)[1]) == 0
    for bad in (1.0, -0.1, math.nan):
        with pytest.raises(ConfigError):
            split_pairs(data, bad)


def test_joint_augment_moves_image_and_mask_together():
    s = 32
    ramp = torch.linspace(-1.0, 1.0, s)
    image = torch.stack([ramp.expand(s, s), ramp[:, None].expand(s, s), torch.zeros(s, s)])  # (col, row, 0)
    where = (torch.arange(s)[:, None] * s + torch.arange(s)[None, :]).long()  # each pixel names its own position
    cfg = PairAugment(hflip=True, crop=0.5)
    flips = set()
    for seed in range(12):
        img, m = joint_augment(image, where, cfg, torch.Generator().manual_seed(seed))
        again = joint_augment(image, where, cfg, torch.Generator().manual_seed(seed))
        assert torch.equal(img, again[0]) and torch.equal(m, again[1]) and m.dtype == torch.long
        col = (img[0] + 1.0) / 2.0 * (s - 1)  # the source column the image says each pixel came from
        row = (img[1] + 1.0) / 2.0 * (s - 1)
        # the mask's nearest source pixel lies within half a pixel of the image's (bilinear) source point
        assert (col - (m % s).float()).abs().max() <= 0.5 + 1e-3
        assert (row - (m // s).float()).abs().max() <= 0.5 + 1e-3
        flips.add(bool(col[0, -1] < col[0, 0]))
    assert flips == {True, False}
    u8 = torch.randint(0, 7, (s, s), dtype=torch.uint8)
    _, m8 = joint_augment(image, u8, cfg, torch.Generator().manual_seed(0))
    assert m8.dtype == torch.uint8 and set(m8.unique().tolist()) <= set(u8.unique().tolist())
    assert joint_augment(image, u8, PairAugment(), torch.Generator())[1] is u8
    for bad in ({"crop": 1.0}, {"crop": -0.1}, {"hflip": "yes"}):
        with pytest.raises(ConfigError):
            PairAugment(**bad)


def test_colorize_and_overlay():
    pal = palette()
    assert pal.shape == (256, 3) and pal[0].tolist() == [0, 0, 0]
    assert len({tuple(c) for c in pal.tolist()}) == 256
    rgb = colorize(TRUTH)
    assert rgb.shape == (3, 2, 3) and rgb.dtype == torch.uint8
    assert rgb[:, 0, 0].tolist() == [0, 0, 0] and rgb[:, 0, 2].tolist() == pal[1].tolist()
    image = torch.full((3, 2, 3), 200, dtype=torch.uint8)
    assert torch.equal(overlay(image, TRUTH, 0.0), image)
    assert torch.equal(overlay(image, TRUTH, 1.0), rgb)
    assert overlay(image, TRUTH)[:, 0, 0].tolist() == [100, 100, 100]
    with pytest.raises(ConfigError):
        overlay(image, TRUTH, 1.5)


# --------------------------------------------------------------------------------------------
# scores


def test_scores_by_hand():
    conf = confusion(PRED, TRUTH, 3)
    assert conf.dtype == torch.int64 and conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    s = scores(conf, ABC)
    assert s["iou"] == pytest.approx({"a": 1 / 3, "b": 2 / 3, "c": 1 / 2})
    assert s["dice"] == pytest.approx({"a": 1 / 2, "b": 4 / 5, "c": 2 / 3})
    assert s["miou"] == pytest.approx(1 / 2) and s["mean_dice"] == pytest.approx(59 / 90)
    assert s["pixel_accuracy"] == pytest.approx(4 / 6)
    batched = confusion(torch.stack([PRED, TRUTH]), torch.stack([TRUTH, TRUTH]), 3)
    assert batched.tolist() == [[3, 1, 0], [0, 4, 0], [1, 0, 3]]
    # a fourth class in neither mask: no score, left out of the means
    s4 = scores(confusion(PRED, TRUTH, 4), (*ABC, "d"))
    assert s4["iou"]["d"] is None and s4["dice"]["d"] is None
    assert s4["miou"] == pytest.approx(1 / 2) and s4["mean_dice"] == pytest.approx(59 / 90)
    # a class only predicted scores 0 and counts
    only_pred = scores(confusion(torch.tensor([[3, 0]]), torch.tensor([[0, 0]]), 4), (*ABC, "d"))
    assert only_pred["iou"] == {"a": 0.5, "b": None, "c": None, "d": 0.0} and only_pred["miou"] == 0.25
    with pytest.raises(ValueError):
        confusion(PRED, TRUTH, 2)


def test_uncertainty_ranking_by_hand():
    errors = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0, 0, 1], dtype=torch.bool)
    unsure = torch.arange(9, -1, -1)
    r = uncertainty_ranking(errors, unsure, 0.2)  # top 2 pixels: both wrong; rest 1 wrong of 8
    assert r["error_rate_top"] == 1.0 and r["error_rate_rest"] == 0.125 and r["ratio"] == 8.0 and r["num_top"] == 2
    flat = uncertainty_ranking(errors, torch.zeros(10), 0.3)  # all tied: both sides get the overall rate
    assert flat["error_rate_top"] == pytest.approx(0.3) and flat["error_rate_rest"] == pytest.approx(0.3)
    assert flat["ratio"] == pytest.approx(1.0)
    # pixel 0 is above the cut; 4 pixels tie at the cut, 1 of them wrong, and 1 of the 4 places is theirs:
    # top = (1 + 1/4) / 2 = 0.625, rest = (2 - 1.25) / 8 = 0.09375, whatever the pixel order
    errors = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    unsure = torch.tensor([3, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    tied = uncertainty_ranking(errors, unsure, 0.2)
    assert tied["error_rate_top"] == pytest.approx(0.625) and tied["error_rate_rest"] == pytest.approx(0.09375)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    assert uncertainty_ranking(errors[perm], unsure[perm], 0.2) == tied
    with pytest.raises(ConfigError):
        uncertainty_ranking(errors, unsure, 1.0)


# --------------------------------------------------------------------------------------------
# eval-seg

# Two ids over the 3 classes a, b, c. "x" is the hand-worked case above; "y" is right but for one pixel:
#   truth [[0, 1, 2], [0, 1, 2]], pred [[0, 1, 2], [0, 1, 1]]: confusion [[2, 0, 0], [0, 2, 0], [0, 1, 1]]
# together: [[3, 1, 0], [0, 4, 0], [1, 1, 2]]
#   a: TP 3 FP 1 FN 1: IoU 3/5 Dice 3/4; b: TP 4 FP 2 FN 0: IoU 2/3 Dice 4/5; c: TP 2 FP 0 FN 2: IoU 1/2 Dice 2/3
#   mIoU 53/90, mean Dice 133/180, pixel accuracy 9/12
# uncertainty: 255 on x's two wrong pixels, 0 elsewhere; top 0.2 of 12 pixels = 2: both wrong;
#   the rest 1 wrong of 10: rates 1.0 and 0.1, ratio 10
Y_TRUTH = torch.tensor([[0, 1, 2], [0, 1, 2]], dtype=torch.uint8)
Y_PRED = torch.tensor([[0, 1, 2], [0, 1, 1]], dtype=torch.uint8)


def _eval_folders(tmp_path: Path) -> tuple[Path, Path]:
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    for key, t, p in (("x", TRUTH, PRED), ("y", Y_TRUTH, Y_PRED)):
        save_mask(t, truth / "masks" / f"{key}.png")
        save_mask(p, pred / f"{key}.png")
        Image.fromarray(colorize(p).permute(1, 2, 0).numpy()).save(pred / f"{key}_overlay.png")  # RGB: not a prediction
        unsure = ((p != t) * 255).to(torch.uint8) if key == "x" else torch.zeros_like(t)
        save_mask(unsure, pred / f"{key}_uncertainty.png")
    (truth / "classes.txt").write_text("0 a\n1 b\n2 c\n")
    return truth, pred


def test_eval_seg_end_to_end(tmp_path, capsys):
    truth, pred = _eval_folders(tmp_path)
    out = tmp_path / "scores.json"
    assert main(["eval-seg", "--pred", str(pred), "--truth", str(truth), "--top", "0.2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "0.5889" in printed and "ratio 10.00x" in printed
    got = json.loads(out.read_text())
    assert got["images"] == 2 and got["classes"] == list(ABC)
    assert got["confusion"] == [[3, 1, 0], [0, 4, 0], [1, 1, 2]]
    assert got["iou"] == pytest.approx({"a": 3 / 5, "b": 2 / 3, "c": 1 / 2})
    assert got["dice"] == pytest.approx({"a": 3 / 4, "b": 4 / 5, "c": 2 / 3})
    assert got["miou"] == pytest.approx(53 / 90) and got["mean_dice"] == pytest.approx(133 / 180)
    assert got["pixel_accuracy"] == pytest.approx(9 / 12)
    u = got["uncertainty"]
    assert u["error_rate_top"] == pytest.approx(1.0) and u["error_rate_rest"] == pytest.approx(0.1)
    assert u["ratio"] == pytest.approx(10.0)
    # a folder of masks with --classes gives the same; without maps there is no ranking
    bare = evaluate_folders(pred, truth / "masks", ABC, top=0.2)
    assert bare["confusion"] == got["confusion"]
    for f in pred.glob("*_uncertainty.png"):
        f.unlink()
    assert evaluate_folders(pred, truth / "masks", ABC)["uncertainty"] is None


def _fails(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("difflab: error: ") and "\n" not in err, err
    return err


def test_eval_seg_errors_are_one_line(tmp_path, capsys):
    truth, pred = _eval_folders(tmp_path)
    save_mask(Y_TRUTH, truth / "masks" / "z.png")  # a truth mask nobody predicted
    err = _fails(capsys, "eval-seg", "--pred", pred, "--truth", truth)
    assert "z.png" in err and "--only-predicted" in err
    assert main(["eval-seg", "--pred", str(pred), "--truth", str(truth), "--only-predicted"]) == 0
    capsys.readouterr()
    (truth / "masks" / "z.png").unlink()
    save_mask(torch.zeros(3, 3, dtype=torch.uint8), pred / "y.png")
    assert "y.png" in _fails(capsys, "eval-seg", "--pred", pred, "--truth", truth)
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(pred / "y.png")
    assert "is an RGB image" in _fails(capsys, "eval-seg", "--pred", pred, "--truth", truth)
    save_mask(Y_PRED, pred / "y.png")
    save_mask(Y_PRED, pred / "w.png")
    assert "w.png" in _fails(capsys, "eval-seg", "--pred", pred, "--truth", truth)  # no truth for it
    (pred / "w.png").unlink()
    assert "--classes" in _fails(capsys, "eval-seg", "--pred", pred, "--truth", tmp_path / "pred")
    assert "--json" in _fails(capsys, "eval-seg", "--pred", pred, "--truth", truth, "--json", tmp_path)
    assert "index 2" in _fails(capsys, "eval-seg", "--pred", pred, "--truth", truth / "masks", "--classes",
                               _two_classes(tmp_path))


def _two_classes(tmp_path: Path) -> Path:
    f = tmp_path / "two.txt"
    f.write_text("a\nb\n")
    return f


# --------------------------------------------------------------------------------------------
# the real data set


def test_face_parsing_loads_at_64_px():
    root = _shared("face-parsing")
    data = load_pairs(root, 64, progress=False)
    assert data.images.shape == (900, 3, 64, 64) and data.masks.shape == (900, 64, 64)
    assert data.classes == SEVEN and data.num_skipped == 0 and len(set(data.ids)) == 900
    assert int(data.masks.max()) <= 6 and len(data.masks.unique()) == 7
    train, val = split_pairs(data)
    assert len(val) == 90 and len(train) == 810
