"""The data plan: the non-IID split while it fits, examples drawn with replacement for larger fleets."""

from __future__ import annotations

import numpy as np
import pytest
from fedpers.client.data_plan import DIGITS, POOL_TEST_FRACTION, plan_for, sampled_digits, write_plan


def test_the_split_is_used_while_it_fits_then_sampling():
    assert plan_for(8).kind == "split" and plan_for(100).kind == "split"
    assert plan_for(1000).kind == "sampled" and plan_for(5000).kind == "sampled"
    assert "with replacement" in plan_for(1000).describe()


def test_sampled_devices_are_deterministic_per_device_and_never_test_on_a_training_image(monkeypatch):
    a = list(sampled_digits(3, seed=7, train=30, test=8))
    b = list(sampled_digits(5, seed=7, train=30, test=8))  # device i does not depend on the fleet's size
    for da, db in zip(a, b[:3], strict=True):
        np.testing.assert_array_equal(da.x, db.x)
        np.testing.assert_array_equal(da.y_test, db.y_test)
    assert a[0].x.shape == (30, 1, 8, 8) and a[0].x_test.shape == (8, 1, 8, 8)
    assert a[0].x.dtype == np.float32 and a[0].y.dtype == np.int64
    assert a[0].distortion != a[1].distortion

    from fedpers.client import data_plan
    from fedpers.client.partition import load_digits_arrays

    monkeypatch.setattr(data_plan, "distort", lambda x, d: x)  # compare the drawn images with the pools
    plain = next(sampled_digits(1, seed=7, train=200, test=50))
    x, _ = load_digits_arrays()
    order = np.random.default_rng(7).permutation(DIGITS)
    train_pool = {x[i].tobytes() for i in order[: int(round(DIGITS * (1 - POOL_TEST_FRACTION)))]}
    assert all(img.tobytes() in train_pool for img in plain.x)
    assert not any(img.tobytes() in train_pool for img in plain.x_test)


def test_write_plan_writes_one_file_per_device(tmp_path):
    paths = write_plan(plan_for(400), tmp_path, seed=1)
    assert len(paths) == 400 and all(p.exists() for p in paths)
    with np.load(paths[123]) as f:
        assert f["x"].shape[0] == 40 and f["x_test"].shape[0] == 10


@pytest.mark.parametrize("devices", [4, 400])  # the split plan and the sampled one
def test_write_plan_fits_the_digits_to_a_models_input(tmp_path, devices):
    paths = write_plan(plan_for(devices), tmp_path, seed=0, input_shape=(1, 28, 28))
    with np.load(paths[-1]) as f:
        assert f["x"].shape[1:] == (1, 28, 28) and f["x_test"].shape[1:] == (1, 28, 28)
        assert f["x"].dtype == np.float32 and f["y"].shape[0] == f["x"].shape[0]
