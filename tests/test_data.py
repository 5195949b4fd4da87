"""DATA.npz loading: valid files load, every kind of bad file is a DataError naming the problem."""

from __future__ import annotations

import numpy as np
import pytest
from fedpers.client.data import DataError, check_against_model, holdout_split, load_data


def _write(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _xy(n=20, shape=(1, 4, 4), seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, *shape)).astype(np.float32), rng.integers(0, 3, n)


def test_loads_explicit_test_split(tmp_path):
    x, y = _xy()
    xt, yt = _xy(5, seed=1)
    d = load_data(_write(tmp_path, x=x, y=y, x_test=xt, y_test=yt))
    assert d.num_examples == 20 and not d.held_out_by_device
    np.testing.assert_array_equal(d.x, x)
    np.testing.assert_array_equal(d.y_test, yt)
    assert d.x.dtype == np.float32 and d.y.dtype == np.int64 and d.input_shape == (1, 4, 4)


def test_holds_out_a_seeded_fifth_without_test_keys(tmp_path):
    x, y = _xy(50, shape=(6,))
    path = _write(tmp_path, x=x.astype(np.float64), y=y.astype(np.uint8))
    a, b, c = load_data(path, holdout_seed=1), load_data(path, holdout_seed=1), load_data(path, holdout_seed=2)
    assert a.held_out_by_device and a.y_test.size == 10 and a.y.size == 40
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_test, c.x_test)
    # train and test together are exactly the file's examples
    both = np.concatenate([a.x, a.x_test])
    assert sorted(map(tuple, both.round(6))) == sorted(map(tuple, x.round(6)))


def test_holdout_split_keeps_both_sides_nonempty():
    x, y = _xy(2)
    xtr, ytr, xte, yte = holdout_split(x, y, 0.2, 0)
    assert ytr.size == 1 and yte.size == 1
    with pytest.raises(DataError):
        holdout_split(x[:1], y[:1])


@pytest.mark.parametrize(
    "arrays, match",
    [
        (dict(y=np.zeros(3, int)), "missing key 'x'"),
        (dict(x=np.zeros((3, 2), np.float32)), "missing key 'y'"),
        (dict(x=np.zeros((3, 2), np.float32), y=np.zeros(4, int)), "4 labels but x has 3"),
        (dict(x=np.zeros((3, 2), np.float32), y=np.zeros(3, np.float32)), "integer class labels"),
        (dict(x=np.zeros((3, 2), np.float32), y=np.zeros((3, 1), int)), r"\(N,\)"),
        (dict(x=np.zeros((3, 2, 2), np.float32), y=np.zeros(3, int)), r"\(N, C, H, W\) or \(N, F\)"),
        (dict(x=np.zeros((0, 2), np.float32), y=np.zeros(0, int)), "no examples"),
        (dict(x=np.full((3, 2), np.nan, np.float32), y=np.zeros(3, int)), "non-finite"),
        (dict(x=np.array([["a", "b"]] * 3), y=np.zeros(3, int)), "numbers"),
        (dict(x=np.zeros((3, 2), np.float32), y=-np.ones(3, int)), "negative"),
        (dict(x=np.zeros((3, 2), np.float32), y=np.zeros(3, int), x_test=np.zeros((2, 2), np.float32)), "together"),
        (dict(x=np.zeros((3, 2), np.float32), y=np.zeros(3, int), x_test=np.zeros((2, 3), np.float32),
              y_test=np.zeros(2, int)), "x_test examples have shape"),
        (dict(x=np.zeros((3, 2), np.float32), y=np.zeros(3, int), z=np.zeros(1)), "unknown keys"),
    ],
)
def test_bad_files_are_refused_with_a_clear_message(tmp_path, arrays, match):
    with pytest.raises(DataError, match=match):
        load_data(_write(tmp_path, **arrays))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_data(tmp_path / "nope.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match="junk.npz: not an .npz file$"):
        load_data(junk)
    model = tmp_path / "model.ini"
    model.write_text("[Model]\nType = NeuralNetwork\n")
    with pytest.raises(DataError, match="model.ini: not an .npz file \\(it looks like an INI model file"):
        load_data(model)
    one = tmp_path / "x.npy"
    np.save(one, np.zeros(3))
    with pytest.raises(DataError, match="single .npy array"):
        load_data(one)
    with pytest.raises(DataError, match="is a directory"):
        load_data(tmp_path)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 but truncated")
    with pytest.raises(DataError, match="broken.npz: not a readable .npz"):
        load_data(broken)
    pickled = tmp_path / "obj.npz"
    np.savez(pickled, x=np.array([object()] * 3), y=np.zeros(3, int))
    with pytest.raises(DataError):
        load_data(pickled)


def test_holdout_fraction(tmp_path):
    x, y = _xy(50)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    assert load_data(path).y_test.size == 10  # the default 20%
    d = load_data(path, holdout=0.5)
    assert d.held_out_by_device and d.y_test.size == 25 and d.y.size == 25
    with pytest.raises(DataError, match="held-out fraction"):
        load_data(path, holdout=1.0)


def test_check_against_model(tmp_path):
    x, y = _xy(10)
    d = load_data(_write(tmp_path, x=x, y=y))
    check_against_model(d, (1, 4, 4), 3)
    with pytest.raises(DataError, match="model's input"):
        check_against_model(d, (1, 8, 8), 3)
    with pytest.raises(DataError, match="out of range"):
        check_against_model(d, (1, 4, 4), 2)
    flat = load_data(_write(tmp_path, "f.npz", x=x.reshape(10, 16), y=y))
    check_against_model(flat, (1, 1, 16), 3)


def test_test_weights_make_a_weighted_accuracy(tmp_path):
    from fedpers.client.data import evaluate_on_test

    x, y = _xy()
    xt, yt = _xy(4, seed=1)
    d = load_data(_write(tmp_path, x=x, y=y, x_test=xt, y_test=yt, w_test=np.array([3, 1, 0, 0])))
    np.testing.assert_allclose(d.w_test, [0.75, 0.25, 0, 0])

    class Right2:  # predicts the first two test examples right, the others wrong
        def evaluate(self, x, y):
            return type("E", (), {"loss": 0.5, "accuracy": 0.5})()

        def predict(self, x):
            p = np.zeros((len(x), 3), np.float32)
            p[np.arange(len(x)), [*yt[:2], *((yt[2:] + 1) % 3)]] = 1
            return p

    assert evaluate_on_test(Right2(), d) == (0.5, 1.0)
    bad = [(dict(w_test=np.array([1, 1, -1, 1])), "finite, >= 0"), (dict(w_test=np.zeros(4)), "not all 0"),
           (dict(w_test=np.ones(3)), "one number per test example"), (dict(w_test=np.ones((4, 1))), "(4,)")]
    for extra, match in bad:
        with pytest.raises(DataError, match=match.replace("(", r"\(").replace(")", r"\)")):
            load_data(_write(tmp_path, "b.npz", x=x, y=y, x_test=xt, y_test=yt, **extra))
    with pytest.raises(DataError, match="w_test weighs x_test/y_test"):
        load_data(_write(tmp_path, "c.npz", x=x, y=y, w_test=np.ones(20)))
