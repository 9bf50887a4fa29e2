"""Conditional accuracy (difflab.metrics.accuracy, and its cache difflab.metrics.classifier_cache):
the accuracy arithmetic on hand-made predictions, training on a separable synthetic set,
determinism, the cache, save/load, input conversion, and (slow) the Fashion-MNIST quality bar."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import difflab.metrics.accuracy as acc
import difflab.metrics.classifier_cache as cache
from difflab.errors import CheckpointError, ConfigError, DifflabWarning
from difflab.metrics.accuracy import (
    ClassifierConfig,
    LabelClassifier,
    TrainedClassifier,
    train_classifier,
)
from difflab.metrics.classifier_cache import classifier_for, load_classifier, save_classifier

ATTRS = ("light", "stripes")
CLASSES = (("dark", "bright"), ("horizontal", "vertical"))
# small and quick: 16 px, 8 channels in the first stage
TINY = ClassifierConfig(image_size=16, channels=3, width=8, epochs=4, batch_size=32, lr=1e-2)


def synthetic(n: int, seed: int = 0, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB images: dark or bright (attribute 0) with horizontal or vertical stripes (attribute 1),
    plus noise. Both attributes survive a horizontal flip, so flip augmentation keeps labels right."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n, 2), generator=g)
    base = torch.where(labels[:, 0] == 1, 170.0, 60.0).view(n, 1, 1, 1)
    stripe = (torch.arange(size) // max(1, size // 8) % 2).float() * 60.0 - 30.0  # period size / 4, +-30
    horizontal = stripe.view(1, 1, size, 1).expand(n, 3, size, size)
    vertical = stripe.view(1, 1, 1, size).expand(n, 3, size, size)
    pattern = torch.where((labels[:, 1] == 1).view(n, 1, 1, 1), vertical, horizontal)
    noise = torch.rand((n, 3, size, size), generator=g) * 30.0 - 15.0
    images = (base + pattern + noise).round().clamp(0, 255).to(torch.uint8)
    return images, labels


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return synthetic(480)


@pytest.fixture(scope="module")
def trained(data: tuple[torch.Tensor, torch.Tensor]) -> TrainedClassifier:
    images, labels = data
    return train_classifier(images, labels, ATTRS, CLASSES, TINY, progress=False)


def _untrained(sizes: tuple[int, ...] = (3, 2), attrs: tuple[str, ...] = ("a", "b"), config: ClassifierConfig = TINY,
               classes: tuple[tuple[str, ...], ...] | None = None) -> TrainedClassifier:
    classes = classes or tuple(tuple(f"c{i}" for i in range(k)) for k in sizes)
    return TrainedClassifier(model=LabelClassifier(sizes, config).eval(), config=config, sizes=sizes,
                             attributes=attrs, classes=classes, val_accuracy={})


# --------------------------------------------------------------------------------------------
# accuracy arithmetic


def test_accuracy_arithmetic_with_unrequested_attributes(monkeypatch: pytest.MonkeyPatch) -> None:
    clf = _untrained()
    pred = torch.tensor([[0, 1], [1, 1], [2, 0], [0, 0], [1, 1]])
    expected = torch.tensor([[0, 1], [2, -1], [2, 1], [-1, -1], [-1, 1]])
    monkeypatch.setattr(clf, "predict", lambda images, batch_size=256: pred)
    images = torch.zeros((5, 3, 8, 8), dtype=torch.uint8)
    got = clf.accuracy(images, expected)
    # a: rows 0, 1, 2 asked; right in 0 and 2.  b: rows 0, 2, 4 asked; right in 0 and 4.
    # all: row 3 asked nothing (left out); rows 0 and 4 right on all they asked, 1 and 2 not.
    assert got == {"a": pytest.approx(2 / 3), "b": pytest.approx(2 / 3), "all": 0.5}


def test_accuracy_none_when_nothing_requested(monkeypatch: pytest.MonkeyPatch) -> None:
    clf = _untrained()
    pred = torch.tensor([[0, 1], [1, 0]])
    monkeypatch.setattr(clf, "predict", lambda images, batch_size=256: pred)
    images = torch.zeros((2, 1, 8, 8), dtype=torch.uint8)
    assert clf.accuracy(images, torch.tensor([[0, -1], [0, -1]])) == {"a": 0.5, "b": None, "all": 0.5}
    assert clf.accuracy(images, torch.full((2, 2), -1)) == {"a": None, "b": None, "all": None}


def test_accuracy_rejects_bad_expected_labels() -> None:
    clf = _untrained()
    images = torch.zeros((2, 3, 8, 8), dtype=torch.uint8)
    with pytest.raises(ConfigError, match=r"'b' has 1 value\(s\) outside -1\.\.1"):
        clf.accuracy(images, torch.tensor([[0, 2], [0, 1]]))
    with pytest.raises(ConfigError, match=r"shape \(2, 2\)"):
        clf.accuracy(images, torch.tensor([[0, 1, 0], [0, 1, 0]]))
    with pytest.raises(ConfigError, match="integer"):
        clf.accuracy(images, torch.zeros((2, 2)))


# --------------------------------------------------------------------------------------------
# training


def test_separable_data_is_learned_exactly(trained: TrainedClassifier, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert trained.val_accuracy == {"light": 1.0, "stripes": 1.0}
    assert (trained.n_train, trained.n_val) == (432, 48)
    # fresh images from another seed, and requests with gaps
    images, labels = synthetic(200, seed=1)
    assert torch.equal(trained.predict(images), labels)
    expected = labels.clone()
    expected[::3, 0] = -1
    assert trained.accuracy(images, expected) == {"light": 1.0, "stripes": 1.0, "all": 1.0}
    # asking for the other class than the one shown scores zero
    assert trained.accuracy(images, 1 - labels) == {"light": 0.0, "stripes": 0.0, "all": 0.0}


def test_training_is_deterministic(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = data[0][:160], data[1][:160]
    cfg = ClassifierConfig(image_size=16, width=4, epochs=1, batch_size=32, seed=3)
    a = train_classifier(images, labels, ATTRS, CLASSES, cfg, progress=False).model.state_dict()
    torch.rand(5)  # the global RNG's state must not matter
    b = train_classifier(images, labels, ATTRS, CLASSES, cfg, progress=False).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = train_classifier(images, labels, ATTRS, CLASSES, ClassifierConfig(**{**cfg.to_dict(), "seed": 4}),
                         progress=False).model.state_dict()
    assert not torch.equal(a["heads.0.weight"], c["heads.0.weight"])


def test_training_leaves_the_global_rng_alone(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    state = torch.get_rng_state()
    cfg = ClassifierConfig(image_size=16, width=4, epochs=1, batch_size=32)
    train_classifier(data[0][:96], data[1][:96], ATTRS, CLASSES, cfg, progress=False)
    assert torch.equal(torch.get_rng_state(), state)


def test_minus_one_in_training_labels_is_a_one_line_error(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = data
    labels = labels.clone()
    labels[7, 1] = -1
    with pytest.raises(ConfigError) as e:
        train_classifier(images, labels, ATTRS, CLASSES, TINY, progress=False)
    assert "\n" not in str(e.value)
    assert "'stripes' is -1" in str(e.value)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"attributes": ("light",)}, "1 attributes but 2 class lists"),
    ({"attributes": ("all", "stripes")}, '"all" cannot be an attribute name'),
    ({"classes": (("dark",), ("h", "v"))}, "at least two distinct class names"),
    ({"labels_fn": lambda y: y[:-1]}, r"shape \(480, 2\)"),
    ({"labels_fn": lambda y: y * 2}, "outside 0..1"),
    ({"images_fn": lambda x: x.float()}, "uint8"),
    ({"images_fn": lambda x: x[:, :2]}, "1 or 3 channels"),
    ({"images_fn": lambda x: x[..., :8]}, "square"),
    ({"groups": torch.zeros(480)}, "groups must be an integer tensor"),
    ({"groups": torch.zeros(480, dtype=torch.int64)}, "cannot hold out"),
])
def test_bad_training_input_is_a_config_error(data: tuple[torch.Tensor, torch.Tensor], kwargs: dict, message: str) -> None:
    images, labels = data
    images = kwargs.pop("images_fn", lambda x: x)(images)
    labels = kwargs.pop("labels_fn", lambda y: y)(labels)
    args = {"attributes": ATTRS, "classes": CLASSES, **kwargs}
    with pytest.raises(ConfigError, match=message):
        train_classifier(images, labels, config=TINY, progress=False, **args)


def test_groups_stay_on_one_side_of_the_split() -> None:
    n = 1000
    cfg = ClassifierConfig(val_fraction=0.2, seed=5)
    groups = torch.arange(n) // 2 * 7  # pairs, with ids that are neither contiguous nor from 0
    train, val = acc._split(n, groups, cfg)
    side = torch.zeros(n, dtype=torch.bool)
    side[val] = True
    assert torch.equal(side[0::2], side[1::2])
    assert len(val) == 2 * round(0.2 * n / 2)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(n))
    # no groups is the same as one group per image
    a, b = acc._split(n, None, cfg), acc._split(n, torch.arange(n), cfg)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_config_is_checked_and_normalised() -> None:
    with pytest.raises(ConfigError, match="channels must be 1 or 3"):
        ClassifierConfig(channels=2)
    with pytest.raises(ConfigError, match="val_fraction"):
        ClassifierConfig(val_fraction=1.0)
    with pytest.raises(ConfigError, match="epochs must be of type int"):
        ClassifierConfig(epochs=2.5)
    with pytest.raises(ConfigError, match="augment_hflip must be of type bool"):
        ClassifierConfig(augment_hflip=1)
    cfg = ClassifierConfig(lr=1)
    assert cfg == ClassifierConfig(lr=1.0) and isinstance(cfg.lr, float)
    assert ClassifierConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg


# --------------------------------------------------------------------------------------------
# the input protocol


def test_rgb_to_gray_is_pillow_luma() -> None:
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (2, 3, 8, 8), generator=g, dtype=torch.uint8)
    cfg = ClassifierConfig(image_size=8, channels=1)
    got = (acc._prepare(rgb, cfg) + 1.0) * 127.5  # back to 0..255, unrounded
    for i in range(2):
        pil = Image.fromarray(rgb[i].permute(1, 2, 0).numpy()).convert("L")
        ref = torch.from_numpy(np.asarray(pil).astype(np.float32))
        assert got.shape == (2, 1, 8, 8)
        assert (got[i, 0] - ref).abs().max() <= 0.5 + 1e-3  # Pillow rounds to integers


def test_gray_to_rgb_repeats_and_resize_keeps_flat_images_flat() -> None:
    gray = torch.arange(0, 250, 10, dtype=torch.uint8).view(25, 1, 1, 1).expand(25, 1, 24, 24)
    x = acc._prepare(gray, ClassifierConfig(image_size=16, channels=3))
    assert x.shape == (25, 3, 16, 16)
    expected = gray[:, :, :1, :1].float() / 127.5 - 1.0
    assert torch.allclose(x, expected.expand(25, 3, 16, 16), atol=1e-5)
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_predict_converts_channels_and_sizes(trained: TrainedClassifier) -> None:
    gray = synthetic(64, seed=2)[0][:, :1]
    assert torch.equal(trained.predict(gray), trained.predict(gray.expand(-1, 3, -1, -1)))
    # the same pattern at twice the size is resized to 16 px and still recognised
    images, labels = synthetic(64, seed=3, size=32)
    assert torch.equal(trained.predict(images), labels)
    # results do not depend on the batch size
    assert torch.equal(trained.predict(images, batch_size=7), trained.predict(images, batch_size=64))
    with pytest.raises(ConfigError, match="uint8"):
        trained.predict(images.float())


def test_forward_gives_one_logits_tensor_per_attribute() -> None:
    model = LabelClassifier((12, 10, 2), ClassifierConfig(image_size=16, channels=1, width=4)).eval()
    out = model(torch.zeros(5, 1, 16, 16))
    assert [tuple(z.shape) for z in out] == [(5, 12), (5, 10), (5, 2)]


# --------------------------------------------------------------------------------------------
# files and the cache


def test_save_load_round_trip(trained: TrainedClassifier, tmp_path: Path) -> None:
    save_classifier(trained, tmp_path / "clf")
    back = load_classifier(tmp_path / "clf")
    assert (back.config, back.sizes, back.attributes, back.classes) == (
        trained.config, trained.sizes, trained.attributes, trained.classes)
    assert (back.val_accuracy, back.n_train, back.n_val, back.seconds) == (
        trained.val_accuracy, trained.n_train, trained.n_val, trained.seconds)
    images = synthetic(50, seed=4)[0]
    assert torch.equal(back.predict(images), trained.predict(images))
    own, loaded = trained.model.state_dict(), back.model.state_dict()
    assert all(torch.equal(own[k], loaded[k]) for k in own)
    meta = json.loads((tmp_path / "clf" / "meta.json").read_text())
    assert meta["torch"] == torch.__version__ and meta["sizes"] == [2, 2]


def test_load_reports_missing_and_damaged_files(trained: TrainedClassifier, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing"):
        load_classifier(tmp_path / "nothing")
    save_classifier(trained, tmp_path / "clf")
    weights = tmp_path / "clf" / "weights.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="damaged"):
        load_classifier(tmp_path / "clf")
    (tmp_path / "clf" / "meta.json").write_text('{"format": 1, "config": {"width": "x"}}')
    with pytest.raises(CheckpointError, match="meta.json is damaged"):
        load_classifier(tmp_path / "clf")


def test_cache_hit_and_damaged_entry(data: tuple[torch.Tensor, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = data[0][:128], data[1][:128]
    cfg = ClassifierConfig(image_size=16, width=4, epochs=1, batch_size=32)
    first, hit = classifier_for(images, labels, ATTRS, CLASSES, data_key="cache-test", config=cfg, progress=False)
    assert not hit

    def no_training(*args: object, **kwargs: object) -> TrainedClassifier:
        raise AssertionError("a cache hit must not train")

    with monkeypatch.context() as m:
        m.setattr(cache, "train_classifier", no_training)  # the name classifier_for calls
        second, hit = classifier_for(images, labels, ATTRS, CLASSES, data_key="cache-test", config=cfg, progress=False)
        assert hit
        assert torch.equal(second.predict(images), first.predict(images))
        assert second.val_accuracy == first.val_accuracy
        # another data key, config or class list is another entry
        other_seed = ClassifierConfig(**{**cfg.to_dict(), "seed": 1})
        other_names = (("dim", "bright"), CLASSES[1])
        others = (("other", cfg, CLASSES), ("cache-test", other_seed, CLASSES), ("cache-test", cfg, other_names))
        for key, config, names in others:
            with pytest.raises(AssertionError, match="must not train"):
                classifier_for(images, labels, ATTRS, names, data_key=key, config=config, progress=False)

    folders = [p for p in cache.cache_dir("classifiers").iterdir() if p.name.startswith(
        cache.classifier_key("cache-test", ATTRS, CLASSES, cfg))]
    assert len(folders) == 1 and sorted(p.name for p in folders[0].iterdir()) == ["meta.json", "weights.safetensors"]
    (folders[0] / "weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.warns(DifflabWarning, match="damaged cache entry"):
        third, hit = classifier_for(images, labels, ATTRS, CLASSES, data_key="cache-test", config=cfg, progress=False)
    assert not hit
    assert torch.equal(third.predict(images), first.predict(images))  # deterministic retraining
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert classifier_for(images, labels, ATTRS, CLASSES, data_key="cache-test", config=cfg, progress=False)[1]
    # a crash between the two files leaves no entry: no meta.json means a plain miss, no warning
    (folders[0] / "meta.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not classifier_for(images, labels, ATTRS, CLASSES, data_key="cache-test", config=cfg, progress=False)[1]


# --------------------------------------------------------------------------------------------
# the quality bar on real data


@pytest.mark.slow
def test_fashion_mnist_held_out_accuracy(fashion_mnist_dir: Path) -> None:
    from difflab.data.fashion_mnist import load_fashion_mnist

    images, targets = load_fashion_mnist(fashion_mnist_dir, "train", progress=False)
    names = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
    clf = train_classifier(images, targets, ["item"], [names], ClassifierConfig(image_size=28, channels=1), progress=False)
    assert clf.n_val == 6000
    assert clf.val_accuracy["item"] >= 0.90
