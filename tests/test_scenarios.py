"""The benchmark's scenarios have the properties they claim."""

import numpy as np
import pytest
from fedpers.client import scenarios as S
from fedpers.client.partition import PartitionError, load_digits_arrays


@pytest.fixture(scope="module")
def made():
    return {name: S.make(name, seed=0) for name in S.SCENARIOS}


def label_tv(dev) -> float:
    """Total-variation distance of a device's label histogram to the uniform one."""
    counts = np.bincount(np.concatenate([dev.y, dev.y_val]), minlength=10)
    return 0.5 * float(np.abs(counts / counts.sum() - 0.1).sum())


@pytest.mark.parametrize("name", sorted(S.SCENARIOS))
def test_devices_own_disjoint_data_and_never_train_on_the_test_pool(made, name):
    sc = made[name]
    owned = np.concatenate([np.concatenate([d.source, d.source_val]) for d in sc.devices])
    assert np.unique(owned).size == owned.size  # no example on two devices, or twice on one
    tests = np.unique(np.concatenate([d.source_test for d in sc.devices]))
    assert not np.intersect1d(owned, tests).size
    _, y = load_digits_arrays()
    for d in sc.devices:
        assert d.x.dtype == np.float32 and d.x.flags.c_contiguous and d.x.shape[1:] == (1, 8, 8)
        assert len(d.x) == len(d.y) == len(d.source) and len(d.x_val) == len(d.y_val) == len(d.source_val)
        assert 0.0 <= d.x.min() and d.x.max() <= 1.0
        assert np.array_equal(d.y, np.asarray(d.label_map)[y[d.source]])
        assert d.w_test.sum() == pytest.approx(1.0) and np.all(d.w_test > 0)
        # the test view follows the device's own class distribution
        share = np.bincount(y[np.concatenate([d.source, d.source_val])], minlength=10)
        mass = np.bincount(y[d.source_test], weights=d.w_test, minlength=10)
        np.testing.assert_allclose(mass, share / share.sum(), atol=1e-12)


@pytest.mark.parametrize("name", sorted(S.SCENARIOS))
def test_every_device_holds_out_a_stratified_validation_split(made, name):
    for d in made[name].devices:
        n = d.examples
        assert len(d.y_val) >= 1 and abs(len(d.y_val) - 0.2 * n) <= 0.1 * n + 3
        assert set(d.y_val) <= set(d.y) | set(d.y_val)


def test_scenarios_are_deterministic_functions_of_the_seed():
    a, b, c = S.make("concept_shift", seed=3), S.make("concept_shift", seed=3), S.make("concept_shift", seed=4)
    assert all(np.array_equal(x.x, y.x) and np.array_equal(x.y_test, y.y_test) for x, y in zip(a.devices, b.devices,
                                                                                                strict=True))
    assert not np.array_equal(a.devices[0].source, c.devices[0].source)


def test_iid_devices_see_every_class_in_even_proportions(made):
    for d in made["iid"].devices:
        assert len(set(np.concatenate([d.y, d.y_val]))) >= 8
    assert np.mean([label_tv(d) for d in made["iid"].devices]) < 0.25


def test_label_skew_devices_see_few_classes_and_alpha_sets_the_skew(made):
    skewed = made["label_skew"].devices
    assert np.mean([label_tv(d) for d in skewed]) > 0.5
    assert np.median([np.count_nonzero(np.bincount(d.y, minlength=10)) for d in skewed]) <= 4
    mild = S.make("label_skew", seed=0, alpha=10.0).devices
    assert np.mean([label_tv(d) for d in mild]) < np.mean([label_tv(d) for d in skewed]) / 2


def test_feature_shift_the_same_digit_looks_different_across_clusters(made):
    devs = made["feature_shift"].devices
    a, b = next(d for d in devs if d.cluster == 0), next(d for d in devs if d.cluster == 1)
    common, ia, ib = np.intersect1d(a.source_test, b.source_test, return_indices=True)
    assert common.size > 100
    assert np.array_equal(a.y_test[ia], b.y_test[ib])  # same labels ...
    diff = np.abs(a.x_test[ia] - b.x_test[ib]).mean(axis=(1, 2, 3))
    assert np.all(diff > 0.05)  # ... different pixels
    k_all = made["feature_shift"].config.clusters
    means = [np.mean([d.x.mean() for d in devs if d.cluster == k]) for k in range(k_all)]
    assert max(means) - min(means) > 0.15  # the cluster's intensity response


def test_concept_shift_the_same_image_means_different_labels_across_clusters(made):
    devs = made["concept_shift"].devices
    k_all = made["concept_shift"].config.clusters
    assert k_all >= 4 and {d.cluster for d in devs} == set(range(k_all))
    maps = {d.cluster: d.label_map for d in devs}
    assert len(set(maps.values())) == k_all and maps[0] == tuple(range(10))
    for k in range(1, k_all):
        assert sorted(maps[k]) == list(range(10)) and all(maps[k][c] != c for c in range(10))
        a, b = next(d for d in devs if d.cluster == 0), next(d for d in devs if d.cluster == k)
        common, ia, ib = np.intersect1d(a.source_test, b.source_test, return_indices=True)
        assert common.size > 100
        np.testing.assert_array_equal(a.x_test[ia], b.x_test[ib])  # the same inputs ...
        assert np.all(a.y_test[ia] != b.y_test[ib])  # ... with a different label everywhere


def test_scarce_devices_have_tens_of_examples(made):
    devs = made["scarce"].devices
    assert len(devs) >= 30
    assert all(10 <= d.examples <= 30 for d in devs)
    assert np.median([d.examples for d in devs]) >= 15


def test_bad_knobs_are_refused():
    with pytest.raises(PartitionError, match="unknown scenario"):
        S.make("weather")
    with pytest.raises(PartitionError):
        S.make("iid", devices=200)  # 1347 / 200 < min_examples
    with pytest.raises(PartitionError):
        S.make("scarce", examples=5)
    with pytest.raises(PartitionError, match="needs alpha"):
        S.make("label_skew", alpha=None)
