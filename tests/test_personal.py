"""Device state: atomic round trip, refusal of corrupted state, shared/local split, no personal leak."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from fedpers.client.personal import (
    DeviceState,
    PersonalLeak,
    PersonalStore,
    RoundRecord,
    StateError,
    TaskMismatch,
    check_shared,
    overlay,
    personal_layer_names,
    split_weights,
)
from fedpers.client.report import DeviceReport, ReportError, read_report, write_report


def _record(r: int) -> RoundRecord:
    return RoundRecord(round_id=r, base_version=r - 1, num_examples=10, global_accuracy=0.5, global_loss=1.0,
                       personalized_accuracy=0.7, personalized_loss=0.8, train_loss=0.9, train_accuracy=0.6,
                       bytes_up=100, bytes_down=200, train_seconds=0.1, codec="topk:0.05", epochs=2)


def test_state_round_trip(tmp_path):
    store = PersonalStore(tmp_path / "s")
    assert store.load() is None
    state = store.load_or_create("dev-a")
    assert state.name == "dev-a" and store.state_path.exists()
    state.device_id = 7
    state.last_round, state.base_version, state.codec = 3, 2, "topk:0.05"
    state.local = {"head.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "head.bias": np.ones(3, np.float32)}
    state.residuals = {"hidden.weight": np.full((4, 2), 0.25, np.float32)}
    state.history = [_record(1), _record(2), _record(3)]
    state.bytes_up, state.bytes_down = 300, 600
    store.save(state)
    again = PersonalStore(tmp_path / "s").load()
    assert again is not None
    assert (again.name, again.device_id, again.last_round, again.base_version, again.codec) == (
        "dev-a", 7, 3, 2, "topk:0.05")
    assert again.history == state.history and again.epochs_trained == 6
    assert again.bytes_up == 300 and again.bytes_down == 600
    for got, want in ((again.local, state.local), (again.residuals, state.residuals)):
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_fresh_state_gets_a_stable_random_name(tmp_path):
    a = PersonalStore(tmp_path).load_or_create(None)
    b = PersonalStore(tmp_path).load_or_create(None)
    assert a.name == b.name and a.name.startswith("device-")
    with pytest.raises(StateError, match="belongs to device"):
        PersonalStore(tmp_path).load_or_create("someone-else")


def test_corrupted_state_is_refused_with_a_way_out(tmp_path):
    store = PersonalStore(tmp_path)
    state = store.load_or_create("x")
    state.local = {"a.weight": np.ones(100, np.float32)}
    store.save(state)
    data = bytearray(store.state_path.read_bytes())
    data[-5] ^= 0xFF
    store.state_path.write_bytes(bytes(data))
    with pytest.raises(StateError, match="move .* away"):
        store.load()


def test_save_leaves_no_temp_files(tmp_path):
    store = PersonalStore(tmp_path)
    state = store.load_or_create("x")
    for r in range(5):
        state.last_round = r
        store.save(state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.fpst"]


def test_report_and_uploads(tmp_path):
    store = PersonalStore(tmp_path)
    assert read_report(store.report_path) is None
    state = DeviceState(name="x", device_id=3, history=[_record(1), _record(2)], bytes_up=100, bytes_down=200)
    written = DeviceReport.from_state(state, peak_rss_bytes=123, final_epochs=2, final_global_accuracy=0.25)
    write_report(store.report_path, written)
    rep = read_report(store.report_path)
    assert rep == written
    assert rep.id == 3 and rep.personalized_accuracy == 0.7 and rep.peak_rss_bytes == 123
    assert rep.rounds[0] == _record(1) and rep.rounds_trained == 2 and rep.epochs_trained == 4
    assert rep.total_epochs == 6 and rep.end_global_accuracy == 0.25 and rep.end_personalized_accuracy == 0.7
    path = store.save_upload(4, b"blob")
    assert path.read_bytes() == b"blob" and path.parent.name == "uploads"


def test_report_refuses_unknown_and_missing_fields():
    good = DeviceReport(name="x").to_dict()
    with pytest.raises(ReportError, match="unknown device report fields \\['final_acc'\\]"):
        DeviceReport.from_dict({**good, "final_acc": 0.5})
    del good["name"]
    with pytest.raises(ReportError, match="name"):
        DeviceReport.from_dict(good)
    with pytest.raises(ReportError, match="not JSON"):
        DeviceReport.from_json("{")


def test_personal_layers_from_model_and_server():
    layers = [SimpleNamespace(name="a", personal=False), SimpleNamespace(name="b", personal=True)]
    assert personal_layer_names(layers) == {"b"}
    assert personal_layer_names(layers, ["a"]) == {"a", "b"}


def test_check_shared_refuses_personal_and_unknown_tensors():
    layers = {"a.weight": "a", "a.bias": "a", "b.weight": "b", "b.bias": "b"}
    assert check_shared(["a.weight", "a.bias"], layers, {"b"}) == ["a.bias", "a.weight"]
    with pytest.raises(PersonalLeak, match="b.weight"):
        check_shared(["a.weight", "b.weight"], layers, {"b"})
    with pytest.raises(TaskMismatch, match="does not have"):
        check_shared(["c.weight"], layers, {"b"})


def test_split_and_overlay():
    init = {"a.weight": np.zeros((2, 2), np.float32), "b.weight": np.zeros(3, np.float32),
            "c.weight": np.zeros(1, np.float32)}
    base = {"a.weight": np.ones((2, 2), np.float32)}
    local = {"b.weight": np.full(3, 2.0, np.float32), "c.weight": np.zeros(5, np.float32),  # c: stale shape
             "a.weight": np.full((2, 2), 9.0, np.float32)}  # a is shared: the base wins
    out = overlay(init, base, local)
    np.testing.assert_array_equal(out["a.weight"], 1.0)
    np.testing.assert_array_equal(out["b.weight"], 2.0)
    assert out["c.weight"].shape == (1,)
    with pytest.raises(TaskMismatch, match="shape"):
        overlay(init, {"a.weight": np.ones(3, np.float32)}, {})
    up, keep = split_weights(out, ["a.weight"])
    assert set(up) == {"a.weight"} and set(keep) == {"b.weight", "c.weight"}
