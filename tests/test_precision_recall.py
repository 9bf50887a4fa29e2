"""Improved precision and recall (Kynkaanniemi et al. 2019) against hand-computed cases."""
import numpy as np
import pytest

from difflab.errors import ConfigError
from difflab.metrics.precision_recall import knn_radii, precision_recall


def line(xs):
    return np.asarray(xs, dtype=np.float64)[:, None]


def test_radii_are_the_distance_to_the_kth_other_point():
    import torch

    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    assert knn_radii(x, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(x, 2).tolist() == [3.0, 2.0, 3.0, 6.0]


def test_hand_computed_one_dimensional_case():
    """real 0..9 (k = 1: every radius 1, so the real manifold is [-1, 10]); fake {0.5, 5, 20, 30}
    (radii 4.5, 4.5, 10, 10: the fake manifold is [-4, 9.5] and [10, 40]). Precision: 0.5 and 5 are
    inside, 20 and 30 are not -> 0.5. Recall: reals 0..9 lie in [-4, 9.5] -> 1.0."""
    pr = precision_recall(line(range(10)), line([0.5, 5, 20, 30]), k=1)
    assert pr.precision == 0.5 and pr.recall == 1.0


def test_mode_collapse_keeps_precision_and_loses_recall():
    """Fakes drawn from one of two real clusters: as realistic as fakes from both clusters (the same
    precision), but half of the real data is never produced (recall halves); fakes far from the data
    score zero on both."""
    rng = np.random.default_rng(0)

    def two_clusters(n):
        return np.concatenate([rng.normal(0, 1, (n, 2)), rng.normal(20, 1, (n, 2))])

    real = two_clusters(500)
    same = precision_recall(real, two_clusters(500))
    collapsed = precision_recall(real, rng.normal(0, 1, (1000, 2)))
    assert same.precision > 0.9 and same.recall > 0.9
    assert abs(collapsed.precision - same.precision) < 0.05
    assert abs(collapsed.recall - same.recall / 2) < 0.05
    far = precision_recall(real, rng.normal(100, 1, (300, 2)))
    assert far.precision == 0.0 and far.recall == 0.0


def test_bad_input_is_one_line():
    with pytest.raises(ConfigError, match="width"):
        precision_recall(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ConfigError, match="k must be"):
        precision_recall(np.zeros((3, 2)), np.zeros((3, 2)), k=3)
    with pytest.raises(ConfigError, match="finite"):
        precision_recall(np.full((4, 2), np.nan), np.zeros((4, 2)))
