"""Atomic, checksummed array files and the model version store."""

import os
from pathlib import Path

import numpy as np
import pytest
from fedpers import store


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "fc1:weight": rng.standard_normal((7, 5)).astype(np.float32),
        "fc1:bias": rng.standard_normal(5).astype(np.float32),
        "count": np.array(3, dtype=np.int64),
        "mask": rng.integers(0, 2, size=(2, 3, 4)).astype(np.uint8),
        "half": rng.standard_normal(9).astype(np.float16),
        "empty": np.zeros((0, 4), np.float32),
    }


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_arrays_round_trip_with_meta(tmp_path: Path, seed: int) -> None:
    arrays = _arrays(seed)
    path = tmp_path / "sub" / "state.fpst"
    store.save_arrays(path, arrays, {"round": seed, "codec": "int8", "nested": {"a": [1, 2]}})
    got, meta = store.load_arrays_and_meta(path)
    _assert_same(arrays, got)
    assert meta == {"round": seed, "codec": "int8", "nested": {"a": [1, 2]}}
    got["fc1:weight"][0, 0] = 42.0  # loaded arrays are writable copies
    _assert_same(store.load_arrays(path), arrays)


def test_big_endian_and_non_contiguous_inputs_are_stored_as_values(tmp_path: Path) -> None:
    x = np.arange(12, dtype=">f4").reshape(3, 4)[:, ::2]
    store.save_arrays(tmp_path / "a", {"x": x})
    got = store.load_arrays(tmp_path / "a")["x"]
    np.testing.assert_array_equal(got, x)
    assert got.dtype == np.float32 and got.flags.c_contiguous


def test_overwrite_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    store.atomic_write_bytes(path, b"old")
    store.atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "f.fpst"
    store.save_arrays(path, {"a": np.ones(3, np.float32)})
    with pytest.raises(TypeError):
        store.save_arrays(path, {"a": np.array([object()])})
    np.testing.assert_array_equal(store.load_arrays(path)["a"], np.ones(3, np.float32))
    assert os.listdir(tmp_path) == ["f.fpst"]


@pytest.mark.parametrize("where", ["magic", "digest", "header", "body", "truncate"])
def test_corrupted_file_is_refused(tmp_path: Path, where: str) -> None:
    path = tmp_path / "f.fpst"
    store.save_arrays(path, _arrays(0), {"k": 1})
    data = bytearray(path.read_bytes())
    if where == "truncate":
        data = data[:-10]
    else:
        pos = {"magic": 0, "digest": 20, "header": 50, "body": len(data) - 3}[where]
        data[pos] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(store.CorruptFile, match=str(path)):
        store.load_arrays(path)


def test_too_short_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"abc")
    with pytest.raises(store.CorruptFile, match="too short"):
        store.load_arrays(tmp_path / "x")


def test_model_store_versions_and_optimizer_state(tmp_path: Path) -> None:
    ms = store.ModelStore(tmp_path)
    assert ms.latest_version() is None
    w0 = {"a": np.zeros((2, 2), np.float32)}
    ms.save_version(0, w0, {"round": 0})
    w1 = {"a": np.ones((2, 2), np.float32)}
    opt = {"m/a": np.full((2, 2), 0.5, np.float32), "t": np.array(1, np.int64)}
    ms.save_version(1, w1, {"round": 1, "strategy": "fedadam"}, opt)
    assert ms.versions() == [0, 1] and ms.latest_version() == 1
    v1 = store.ModelStore(tmp_path).load_version(1)  # a new instance (a restarted server)
    assert v1.version == 1 and v1.meta == {"round": 1, "strategy": "fedadam"}
    _assert_same(v1.weights, w1)
    _assert_same(v1.optimizer_state, opt)
    assert store.ModelStore(tmp_path).load_version(0).optimizer_state == {}


def test_model_store_refuses_overwrite_missing_and_corrupt(tmp_path: Path) -> None:
    ms = store.ModelStore(tmp_path)
    ms.save_version(3, {"a": np.zeros(2, np.float32)})
    with pytest.raises(store.StoreError, match="already exists"):
        ms.save_version(3, {"a": np.ones(2, np.float32)})
    with pytest.raises(store.MissingVersion, match="version 4"):
        ms.load_version(4)
    path = ms.path(3)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(store.CorruptFile, match="SHA-256"):
        ms.load_version(3)


def test_model_store_detects_a_renamed_version_file(tmp_path: Path) -> None:
    ms = store.ModelStore(tmp_path)
    ms.save_version(1, {"a": np.zeros(2, np.float32)})
    os.replace(ms.path(1), ms.path(2))
    with pytest.raises(store.CorruptFile, match="holds version 1"):
        ms.load_version(2)


def test_model_store_removes_unfinished_temp_files(tmp_path: Path) -> None:
    ms = store.ModelStore(tmp_path)
    stale = ms.directory / ".v000000000001.fpst.tmp-abc"
    stale.write_bytes(b"half")
    store.ModelStore(tmp_path)
    assert not stale.exists()
    assert ms.latest_version() is None
