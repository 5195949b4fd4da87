"""The digits partition: deterministic, disjoint, non-IID, distorted per device."""

from __future__ import annotations

import numpy as np
import pytest
from fedpers.client.data import load_data
from fedpers.client.partition import (
    Distortion,
    PartitionError,
    dirichlet_split,
    distort,
    load_digits_arrays,
    partition_digits,
    write_partition,
)


@pytest.fixture(scope="module")
def digits():
    return load_digits_arrays()


def test_digits_are_scaled_images(digits):
    x, y = digits
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10))


def test_dirichlet_split_is_a_disjoint_cover_and_deterministic(digits):
    _, y = digits
    a = dirichlet_split(y, 6, 0.3, np.random.default_rng(1), min_size=20)
    b = dirichlet_split(y, 6, 0.3, np.random.default_rng(1), min_size=20)
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(pa, pb)
    allidx = np.concatenate(a)
    assert allidx.size == y.size and np.unique(allidx).size == y.size
    assert min(p.size for p in a) >= 20


def test_small_alpha_skews_labels_more_than_large_alpha(digits):
    _, y = digits

    def skew(alpha):
        parts = dirichlet_split(y, 8, alpha, np.random.default_rng(0), min_size=10)
        # mean total-variation distance of each device's label histogram to the global one
        glob = np.bincount(y, minlength=10) / y.size
        return np.mean([0.5 * np.abs(np.bincount(y[p], minlength=10) / p.size - glob).sum() for p in parts])

    assert skew(0.1) > 2 * skew(100.0)


def test_impossible_split_is_refused(digits):
    _, y = digits
    with pytest.raises(PartitionError):
        dirichlet_split(y, 100, 0.5, np.random.default_rng(0), min_size=50)
    with pytest.raises(PartitionError):
        dirichlet_split(y, 3, 0.0, np.random.default_rng(0), min_size=1)


def test_distortion_identity_shift_and_rotation(digits):
    x, _ = digits
    batch = x[:10]
    np.testing.assert_allclose(distort(batch, Distortion(0.0, (0, 0))), batch, atol=1e-6)
    shifted = distort(batch, Distortion(0.0, (1, -1)))
    np.testing.assert_allclose(shifted[:, :, 1:, :-1], batch[:, :, :-1, 1:], atol=1e-6)
    assert np.all(shifted[:, :, 0, :] == 0)
    # four quarter turns on a square image bring it back
    img = batch
    for _ in range(4):
        img = distort(img, Distortion(90.0, (0, 0)))
    np.testing.assert_allclose(img, batch, atol=1e-5)
    rotated = distort(batch, Distortion(20.0, (0, 0)))
    assert rotated.min() >= 0 and rotated.max() <= 1 and np.abs(rotated - batch).mean() > 0.01


def test_partition_files_are_deterministic_and_loadable(tmp_path):
    a = write_partition(tmp_path / "a", partition_digits(4, seed=3))
    b = write_partition(tmp_path / "b", partition_digits(4, seed=3))
    c = write_partition(tmp_path / "c", partition_digits(4, seed=4))
    assert [p.name for p in a] == [f"device-{i}.npz" for i in range(4)]
    for pa, pb in zip(a, b, strict=True):
        da, db = np.load(pa), np.load(pb)
        assert set(da.files) == {"x", "y", "x_test", "y_test"}
        for key in da.files:
            np.testing.assert_array_equal(da[key], db[key])
    assert not np.array_equal(np.load(a[0])["y"], np.load(c[0])["y"])
    total = 0
    for p in a:
        d = load_data(p)
        assert not d.held_out_by_device and d.input_shape == (1, 8, 8)
        assert d.y_test.size >= 1
        total += d.y.size + d.y_test.size
    assert total == 1797


def test_devices_get_different_distortions():
    splits = partition_digits(8, seed=0)
    assert len({s.distortion for s in splits}) == 8
    assert max(abs(s.distortion.angle_deg) for s in splits) > 5


def test_small_alpha_with_many_devices_tops_up_the_short_devices(digits):
    _, y = digits
    parts = dirichlet_split(y, 60, 0.05, np.random.default_rng(0), min_size=12)
    allidx = np.concatenate(parts)
    assert allidx.size == y.size and np.unique(allidx).size == y.size
    assert min(p.size for p in parts) >= 12
    classes = [np.count_nonzero(np.bincount(y[p], minlength=10)) for p in parts]
    assert np.median(classes) <= 4  # still skewed: most devices see a few classes
    again = dirichlet_split(y, 60, 0.05, np.random.default_rng(0), min_size=12)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
