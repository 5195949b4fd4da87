"""The round coordinator over plain values: selection, quorum, deadlines, refusals, restarts."""

from pathlib import Path

import numpy as np
import pytest
from fedpers import wire
from fedpers.server import errors
from fedpers.server import state as st
from fedpers.server.rounds import Coordinator, weighted_metrics
from fedpers.store import ModelStore

from tests.server_helpers import LAYOUT, Clock, header, initial_weights, make_coordinator, random_delta, update_blob

TRAIN, WAIT, DONE = wire.TaskKind.TRAIN, wire.TaskKind.WAIT, wire.TaskKind.DONE


def _enroll(c: Coordinator, name: str) -> wire.EnrollReply:
    return c.enroll(wire.EnrollRequest("enroll-me", name, request_id=f"request-of-{name}-0123456789"))


def _join(c: Coordinator, n: int, start: int = 0) -> list[int]:
    """Enroll n devices (dev<start>, ...) and start a session for each; their ids."""
    out = []
    for i in range(start, start + n):
        e = _enroll(c, f"dev{i}")
        out.append(c.join(wire.JoinRequest(e.device_id, e.device_secret)).device_id)
    return out


def _chunks(blob: bytes, size: int = 64):
    return wire.chunk_blob(blob, size)


def _upload(c: Coordinator, dev: int, task: wire.Task, delta, n: int = 10, **metrics):
    blob = update_blob(delta)
    return c.accept_update(dev, header(task, blob, n, **metrics), _chunks(blob))


def _sums(c: Coordinator) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in c.aggregator._sums.items()}


def test_round_opens_only_when_enough_devices_wait(tmp_path: Path) -> None:
    c = make_coordinator(tmp_path, min_devices=3)
    devs = _join(c, 3)
    assert c.get_task(devs[0]).kind == WAIT
    assert c.get_task(devs[1]).kind == WAIT
    t = c.get_task(devs[2])
    assert t.kind == TRAIN and t.round_id >= 1 and t.base_version == 0
    assert t.model_ini == LAYOUT.ini_text
    assert t.config.shared_tensors == ("fc1.bias", "fc1.weight") and t.config.personal_layers == ("head",)
    assert t.config.deadline_unix == c.clock() + 60.0 and t.config.local_epochs == 2
    assert c.get_task(devs[0]).kind == TRAIN and c.get_task(devs[1]).round_id == t.round_id
    devs += _join(c, 1, start=3)
    assert c.get_task(devs[3]).kind == WAIT  # arrived after the round opened


def test_fraction_samples_at_least_min_devices(tmp_path: Path) -> None:
    c = make_coordinator(tmp_path, min_devices=2, fraction=0.25)
    devs = _join(c, 8)
    for d in devs[:7]:
        c.get_task(d)  # rounds open at the 2nd: min 2 of 2
    r = c.state.open_rounds()[0]
    assert len(r.selected) == 2
    c2 = make_coordinator(tmp_path / "b", min_devices=2, fraction=0.5, clock=Clock())
    devs = _join(c2, 8)
    c2._waiting = {d: c2.clock() for d in devs}
    c2.tick()
    assert len(c2.state.open_rounds()[0].selected) == 4


def test_quorum_closes_round_with_weighted_mean(tmp_path: Path) -> None:
    c = make_coordinator(tmp_path)
    a, b = _join(c, 2)
    c.get_task(a)
    t = c.get_task(b)
    d1, d2 = random_delta(1), random_delta(2)
    r1 = _upload(c, a, t, d1, n=10, loss=1.0)
    assert r1.accepted and r1.updates_in_round == 1 and c.version == 0
    r2 = _upload(c, b, t, d2, n=30, loss=3.0)
    assert r2.updates_in_round == 2 and c.version == 1
    base = initial_weights()
    stored = ModelStore(tmp_path).load_version(1)
    for k in LAYOUT.shared:
        want = base[k] + (10 * d1[k].astype(np.float64) + 30 * d2[k]) / 40
        np.testing.assert_allclose(stored.weights[k], want, rtol=1e-5)
    np.testing.assert_array_equal(stored.weights["emb.weight"], base["emb.weight"])  # frozen: unchanged
    assert "head.weight" not in stored.weights  # personal: never stored
    assert stored.meta["round_id"] == t.round_id and stored.meta["metrics"] == {"loss": 2.5}
    closed = c.state.round(t.round_id)
    assert closed.state == st.CLOSED and closed.version == 1 and closed.metrics == {"loss": 2.5}
    t2 = c.get_task(a)
    assert t2.kind == WAIT  # b has not asked yet
    t2 = c.get_task(b)
    assert t2.kind == TRAIN and t2.base_version == 1 and t2.round_id > t.round_id
    assert wire.arrays_from_blob(c.model_blob(1)).keys() == set(LAYOUT.shapes)


def test_deadline_closes_with_enough_updates(tmp_path: Path) -> None:
    clock = Clock()
    c = make_coordinator(tmp_path, min_devices=2, clock=clock)
    devs = _join(c, 3)
    c._waiting = {d: clock() for d in devs}
    c.tick()
    t = c.get_task(devs[0])
    _upload(c, devs[0], t, random_delta(1))
    _upload(c, devs[1], t, random_delta(2))  # devs[2] went silent after GetTask: min-devices is enough
    assert c.version == 0
    clock.t += 61
    c.tick()
    assert c.version == 1 and c.state.round(t.round_id).state == st.CLOSED
    with pytest.raises(errors.LateUpdate, match=f"round {t.round_id} was closed before this update arrived"):
        _upload(c, devs[2], t, random_delta(3))  # a straggler: refused, counted, shown in status
    with pytest.raises(errors.LateUpdate):
        _upload(c, devs[2], t, random_delta(3))  # its retry counts once
    s = c.status()
    assert s.late_updates == 1 and [r.late_updates for r in s.rounds] == [1]
    with pytest.raises(errors.AlreadyReported):  # a retry of an update the closed round did count
        _upload(c, devs[0], t, random_delta(1))


def test_deadline_abandons_without_enough_updates_and_reopens(tmp_path: Path, caplog) -> None:
    clock = Clock()
    c = make_coordinator(tmp_path, min_devices=2, clock=clock)
    a, b = _join(c, 2)
    c.get_task(a)
    t = c.get_task(b)
    _upload(c, a, t, random_delta(1))
    clock.t += 61
    c.tick()
    r = c.state.round(t.round_id)
    assert r.state == st.ABANDONED and "1 of 2 updates (need 2)" in r.reason
    assert "abandoned" in caplog.text and c.version == 0
    c.get_task(a)
    t2 = c.get_task(b)
    assert t2.kind == TRAIN and t2.round_id > t.round_id and t2.base_version == 0
    assert c.aggregator.count == 0


def test_refusals_leave_the_aggregate_unchanged(tmp_path: Path) -> None:
    c = make_coordinator(tmp_path, min_devices=2)
    a, b, outsider = _join(c, 3)
    c.get_task(a)
    t = c.get_task(b)
    _upload(c, a, t, random_delta(1))
    before, count = _sums(c), c.aggregator.count
    cases = [
        (errors.StaleRound, "round 99 is not open", b, wire.Task(TRAIN, 99, 0), random_delta(2), 10),
        (errors.NotSelected, "not selected", outsider, t, random_delta(2), 10),
        (errors.AlreadyReported, "already reported", a, t, random_delta(2), 10),
        (errors.StaleBase, "trained from version 5", b, wire.Task(TRAIN, t.round_id, 5), random_delta(2), 10),
        (errors.BadUpdate, "num_examples", b, t, random_delta(2), 0),
        (errors.BadUpdate, "missing tensor", b, t, {"fc1.weight": random_delta(2)["fc1.weight"]}, 10),
        (errors.LocalTensor, "stay on the device", b, t,
         {**random_delta(2), "head.weight": np.zeros((3, 2), np.float32)}, 10),
        (errors.BadUpdate, "unknown tensor", b, t, {**random_delta(2), "nope.weight": np.zeros((3, 2), np.float32)},
         10),
        (errors.BadUpdate, "shape", b, t, {**random_delta(2), "fc1.bias": np.zeros(4, np.float32)}, 10),
    ]
    for exc, match, dev, task, delta, n in cases:
        with pytest.raises(exc, match=match):
            _upload(c, dev, task, delta, n)
        assert c.aggregator.count == count
        for k, v in before.items():
            np.testing.assert_array_equal(c.aggregator._sums[k], v)
    assert c.state.count_updates(t.round_id) == 1 and c.version == 0


def test_bad_content_and_streams_are_refused(tmp_path: Path) -> None:
    c = make_coordinator(tmp_path, min_devices=2, max_update_bytes=4096, norm_bound=10.0)
    a, b = _join(c, 2)
    c.get_task(a)
    t = c.get_task(b)
    nan = random_delta(1)
    nan["fc1.weight"][1, 1] = np.nan
    blob = update_blob(nan, codec_name="")
    with pytest.raises(errors.BadUpdate, match="'fc1.weight' holds NaN or Inf"):
        c.accept_update(a, header(t, blob), _chunks(blob))
    half = {k: v.astype(np.float16) for k, v in random_delta(1).items()}
    blob = update_blob(half, codec_name="")
    with pytest.raises(errors.BadUpdate, match="dtype float16, expected float32"):
        c.accept_update(a, header(t, blob), _chunks(blob))
    blob = update_blob(random_delta(1, scale=100.0))
    with pytest.raises(errors.BadUpdate, match="norm .* exceeds the bound 10"):
        c.accept_update(a, header(t, blob), _chunks(blob))
    blob = update_blob(random_delta(1))
    with pytest.raises(wire.TruncatedStream):
        c.accept_update(a, header(t, blob), list(_chunks(blob))[:-1])
    bad = list(_chunks(blob))
    bad[0].data = b"\0" + bad[0].data[1:]
    with pytest.raises(wire.ChecksumMismatch):
        c.accept_update(a, header(t, blob), bad)
    big = wire.UpdateHeader(t.round_id, 0, 10, total_size=5000, sha256=b"x" * 32)
    with pytest.raises(wire.Oversize, match="limit of 4096"):
        c.accept_update(a, big, iter(()))
    assert c.aggregator.count == 0 and c.state.count_updates(t.round_id) == 0
    assert c.accept_update(a, header(t, blob), _chunks(blob)).accepted


def test_finished_after_target_rounds(tmp_path: Path) -> None:
    c = make_coordinator(tmp_path, rounds=2, min_devices=1)
    (a,) = _join(c, 1)
    for v in (1, 2):
        t = c.get_task(a)
        assert t.kind == TRAIN
        _upload(c, a, t, random_delta(v))
        assert c.version == v
    assert c.finished and c.get_task(a).kind == DONE
    with pytest.raises(errors.AlreadyReported):  # a retry of the last round's counted update
        _upload(c, a, t, random_delta(9))
    with pytest.raises(errors.StaleRound, match="finished"):
        _upload(c, a, wire.Task(TRAIN, 99, 2), random_delta(9))
    s = c.status()
    assert (s.version, s.rounds_completed, s.rounds_target, s.finished, s.devices_joined) == (2, 2, 2, True, 1)
    assert [r.state for r in s.rounds] == ["closed", "closed"] and [r.version for r in s.rounds] == [1, 2]
    assert s.rounds[0].devices == 1 and s.current_round == s.rounds[-1].round_id


def test_restart_continues_from_latest_version_and_optimizer_state(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"
    c = make_coordinator(tmp_path, state=st.SqliteState(db), strategy="fedavgm", rounds=5, min_devices=1)
    enrolled = _enroll(c, "dev0")
    a = c.join(wire.JoinRequest(enrolled.device_id, enrolled.device_secret)).device_id
    for seed in (1, 2):
        t = c.get_task(a)
        _upload(c, a, t, random_delta(seed))
    t_open = c.get_task(a)
    assert t_open.kind == TRAIN and c.version == 2
    momentum = {k: v.copy() for k, v in c.optimizer.m.items()}
    weights = {k: v.copy() for k, v in c.weights.items()}
    c.state.close()  # crash: the open round is left open in the database

    c2 = make_coordinator(tmp_path, state=st.SqliteState(db), strategy="fedavgm", rounds=5, min_devices=1)
    assert c2.version == 2 and c2.status().rounds_completed == 2
    for k in weights:
        np.testing.assert_array_equal(c2.weights[k], weights[k])
    for k in momentum:
        np.testing.assert_array_equal(c2.optimizer.m[k], momentum[k])
    assert c2.state.round(t_open.round_id).state == st.OPEN  # continued, not abandoned
    with pytest.raises(errors.NameTaken):  # its name buys nothing
        c2.enroll(wire.EnrollRequest("enroll-me", "dev0", "x" * 16))
    again = c2.join(wire.JoinRequest(a, enrolled.device_secret))  # its secret does, also after a restart
    assert again.device_id == a
    t3 = c2.get_task(a)
    assert t3.base_version == 2 and t3.round_id == t_open.round_id
    d3 = random_delta(3)
    _upload(c2, a, t3, d3)
    for k in LAYOUT.shared:
        np.testing.assert_allclose(c2.weights[k], weights[k] + 0.9 * momentum[k] + d3[k], rtol=1e-5)


def test_restart_after_crash_between_version_file_and_round_close(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"
    c = make_coordinator(tmp_path, state=st.SqliteState(db), min_devices=1)
    (a,) = _join(c, 1)
    t = c.get_task(a)
    original = c.state.close_round

    def crash(*args, **kw):
        raise KeyboardInterrupt  # dies right after the version file is written

    c.state.close_round = crash
    with pytest.raises(KeyboardInterrupt):
        _upload(c, a, t, random_delta(1))
    assert ModelStore(tmp_path).latest_version() == 0  # rolled back: the file was removed
    c.state.close_round = original
    # a version file whose round was never closed (e.g. power loss after the rename):
    ModelStore(tmp_path).save_version(1, c.weights, {"round_id": t.round_id, "metrics": {}})
    c.state.close()
    c2 = make_coordinator(tmp_path, state=st.SqliteState(db), min_devices=1)
    assert c2.version == 1
    r = c2.state.round(t.round_id)
    assert r.state == st.CLOSED and r.version == 1


def test_failed_close_keeps_round_open_and_optimizer_state(tmp_path: Path, monkeypatch) -> None:
    c = make_coordinator(tmp_path, strategy="fedadam", min_devices=1)
    (a,) = _join(c, 1)
    t = c.get_task(a)

    def disk_full(*args, **kw):
        raise OSError("No space left on device")

    monkeypatch.setattr(c.store, "save_version", disk_full)
    reply = _upload(c, a, t, random_delta(1))
    assert reply.accepted and c.version == 0 and c.optimizer.t == 0
    assert c.state.round(t.round_id).state == st.OPEN
    monkeypatch.undo()
    c.clock.t += 61
    c.tick()  # the deadline retries the close
    assert c.version == 1 and c.optimizer.t == 1


def test_enroll_join_and_authenticate(tmp_path: Path) -> None:
    c = make_coordinator(tmp_path)
    with pytest.raises(errors.BadToken, match="enrollment"):
        c.enroll(wire.EnrollRequest("nope", "x", "r" * 16))
    e = _enroll(c, "phone")
    r1 = c.join(wire.JoinRequest(e.device_id, e.device_secret))
    assert c.authenticate(str(r1.device_id), r1.session_token) == r1.device_id
    r2 = c.join(wire.JoinRequest(e.device_id, e.device_secret))
    assert r2.device_id == r1.device_id
    with pytest.raises(errors.BadToken, match="wrong or expired session token"):
        c.authenticate(r1.device_id, r1.session_token)  # replaced by the new join
    with pytest.raises(errors.BadToken, match="wrong device secret"):
        c.join(wire.JoinRequest(e.device_id, "guessed"))
    with pytest.raises(errors.BadToken, match="missing"):
        c.authenticate(None, "t")
    with pytest.raises(errors.BadToken, match="decimal"):
        c.authenticate("abc", "t")
    with pytest.raises(errors.BadToken, match="not enrolled"):
        c.authenticate("99", "t")
    with pytest.raises(errors.BadToken, match="not enrolled"):
        c.authenticate(str(1 << 70), "t")
    anon = c.enroll(wire.EnrollRequest("enroll-me", "", "a" * 16))
    assert anon.device_id != r1.device_id


def test_model_blob_versions(tmp_path: Path) -> None:
    c = make_coordinator(tmp_path, min_devices=1)
    (a,) = _join(c, 1)
    v0 = wire.arrays_from_blob(c.model_blob(0))
    t = c.get_task(a)
    _upload(c, a, t, random_delta(1))
    np.testing.assert_array_equal(wire.arrays_from_blob(c.model_blob(0))["fc1.bias"], v0["fc1.bias"])
    assert not np.array_equal(wire.arrays_from_blob(c.model_blob(1))["fc1.bias"], v0["fc1.bias"])
    with pytest.raises(errors.UnknownVersion, match="version 7"):
        c.model_blob(7)


def test_stop_keeps_the_open_round_for_a_restart(tmp_path: Path) -> None:
    c = make_coordinator(tmp_path, min_devices=1)
    (a,) = _join(c, 1)
    t = c.get_task(a)
    c.stop()
    assert c.state.round(t.round_id).state == st.OPEN
    with pytest.raises(errors.ShuttingDown):
        c.get_task(a)
    with pytest.raises(errors.ShuttingDown):
        _upload(c, a, t, random_delta(1))


def test_store_with_another_model_is_refused(tmp_path: Path) -> None:
    ModelStore(tmp_path).save_version(0, {"other": np.zeros(3, np.float32)})
    with pytest.raises(Exception, match="different model"):
        make_coordinator(tmp_path)


def test_weighted_metrics() -> None:
    ups = [st.UpdateRecord(1, 1, 10, 0, "", 0, {"acc": 0.5, "loss": 1.0}),
           st.UpdateRecord(1, 2, 30, 0, "", 0, {"acc": 0.9})]
    assert weighted_metrics(ups) == pytest.approx({"acc": 0.8, "loss": 1.0})
