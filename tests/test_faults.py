"""Faults and influence at the coordinator: durable rounds across restarts, bounded influence,
unsafe models refused, liveness, over-selection and late updates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fedpers import wire
from fedpers.server import aggregate as ag
from fedpers.server import errors, guard
from fedpers.server import state as st
from fedpers.server.model import layout_from_specs
from fedpers.server.rounds import Coordinator, RoundPolicy
from fedpers.store import ModelStore

from tests.server_helpers import (
    INI,
    LAYOUT,
    SPECS,
    Clock,
    FakeSpec,
    header,
    initial_weights,
    join_device,
    make_coordinator,
    random_delta,
    update_blob,
)

TRAIN, WAIT = wire.TaskKind.TRAIN, wire.TaskKind.WAIT


def _join(c: Coordinator, n: int) -> list[int]:
    return [join_device(c, "enroll-me", f"dev{i}").device_id for i in range(n)]


def _upload(c: Coordinator, dev: int, task: wire.Task, delta, n: int = 10):
    blob = update_blob(delta)
    return c.accept_update(dev, header(task, blob, n), wire.chunk_blob(blob, 64))


def _open(c: Coordinator, devs: list[int]) -> wire.Task:
    for d in devs:
        c.get_task(d)
    t = c.get_task(devs[0])
    assert t.kind == TRAIN
    return t


# ------------------------------------------------------------------ durable before acknowledged


def test_restart_rebuilds_the_open_round_from_the_journal(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"
    c = make_coordinator(tmp_path, state=st.SqliteState(db), min_devices=3, rounds=2)
    devs = _join(c, 3)
    t = _open(c, devs)
    d1, d2 = random_delta(1), random_delta(2)
    _upload(c, devs[0], t, d1, n=10)
    _upload(c, devs[1], t, d2, n=30)
    sums = {k: v.copy() for k, v in c.aggregator._sums.items()}
    assert len(list(c.journal.records(t.round_id))) == 2
    c.state.close()  # kill -9: nothing else happens

    c2 = make_coordinator(tmp_path, state=st.SqliteState(db), min_devices=3, rounds=2)
    r = c2.state.round(t.round_id)
    assert r.state == st.OPEN and c2.aggregator.count == 2 and c2.aggregator.total_weight == 40
    for k in sums:
        np.testing.assert_allclose(c2.aggregator._sums[k], sums[k], rtol=1e-12)
    assert c2.get_task(devs[0]).kind == WAIT  # already reported: nothing more to do in this round
    assert c2.get_task(devs[2]).round_id == t.round_id  # same round, same selection
    with pytest.raises(errors.AlreadyReported):  # a retry whose reply was lost in the crash
        _upload(c2, devs[1], t, d2, n=30)
    d3 = random_delta(3)
    _upload(c2, devs[2], t, d3, n=20)
    assert c2.version == 1 and c2.journal.rounds() == []  # closed: its journal is gone
    base = initial_weights()
    for k in LAYOUT.shared:
        want = base[k] + (10 * d1[k].astype(np.float64) + 30 * d2[k] + 20 * d3[k]) / 60
        np.testing.assert_allclose(c2.weights[k], want, rtol=1e-5)


def test_unacknowledged_journal_records_are_dropped(tmp_path: Path, monkeypatch) -> None:
    db = tmp_path / "state.sqlite"
    c = make_coordinator(tmp_path, state=st.SqliteState(db), min_devices=2)
    a, b = _join(c, 2)
    t = _open(c, [a, b])
    _upload(c, a, t, random_delta(1))

    def die(*args, **kw):
        raise KeyboardInterrupt  # the process dies after journaling, before the commit

    monkeypatch.setattr(c.state, "add_update", die)
    with pytest.raises(KeyboardInterrupt):
        _upload(c, b, t, random_delta(2))
    monkeypatch.undo()
    assert len(list(c.journal.records(t.round_id))) == 1  # the failed attempt's record was removed
    # a record left behind by a crash between the journal write and the commit:
    from fedpers.server.journal import JournalRecord

    blob = update_blob(random_delta(2))
    c.journal.append(JournalRecord(t.round_id, b, 10, 10.0, wire.sha256(blob).hex(), 1.0, blob))
    c.state.close()
    c2 = make_coordinator(tmp_path, state=st.SqliteState(db), min_devices=2)
    assert c2.aggregator.count == 1 and len(list(c2.journal.records(t.round_id))) == 1
    assert c2.get_task(b).round_id == t.round_id  # b was never acknowledged: it may still report


def test_crash_after_the_last_update_closes_the_round_on_restart(tmp_path: Path, monkeypatch) -> None:
    db = tmp_path / "state.sqlite"
    c = make_coordinator(tmp_path, state=st.SqliteState(db), min_devices=2)
    a, b = _join(c, 2)
    t = _open(c, [a, b])
    _upload(c, a, t, random_delta(1))
    monkeypatch.setattr(c, "_try_close", lambda now, why: None)  # dies before closing at quorum
    _upload(c, b, t, random_delta(2))
    c.state.close()
    c2 = make_coordinator(tmp_path, state=st.SqliteState(db), min_devices=2)
    assert c2.version == 1 and c2.state.round(t.round_id).state == st.CLOSED


# ------------------------------------------------------------------ bounded influence


def test_claimed_examples_are_capped(tmp_path: Path) -> None:
    c = make_coordinator(tmp_path, min_devices=2, max_examples=100)
    a, b = _join(c, 2)
    t = _open(c, [a, b])
    honest, attack = random_delta(1), random_delta(2)
    _upload(c, a, t, honest, n=100)
    _upload(c, b, t, attack, n=10**9)
    rec = {u.device_id: u for u in c.state.updates(t.round_id)}
    assert rec[b].num_examples == 100
    base = initial_weights()
    for k in LAYOUT.shared:  # equal weights, not 1e9 : 100
        np.testing.assert_allclose(c.weights[k], base[k] + (honest[k] + attack[k]) / 2, rtol=1e-5)


def test_example_cap_is_a_per_device_hook(tmp_path: Path) -> None:
    c = make_coordinator(tmp_path, min_devices=2)
    a, b = _join(c, 2)
    c.example_cap = lambda device_id: 5 if device_id == b else 10_000  # e.g. declared at enrollment
    t = _open(c, [a, b])
    _upload(c, a, t, random_delta(1), n=50)
    _upload(c, b, t, random_delta(2), n=50)
    assert [u.num_examples for u in c.state.updates(t.round_id)] == [50, 5]


def test_huge_finite_deltas_are_refused_by_the_default_norm_bound(tmp_path: Path) -> None:
    c = make_coordinator(tmp_path, min_devices=2)
    w = {k: c.weights[k] for k in LAYOUT.shared}
    assert c.norm_bound == pytest.approx(guard.default_norm_bound(w)) and np.isfinite(c.norm_bound)
    a, b = _join(c, 2)
    t = _open(c, [a, b])
    huge = {k: np.full_like(v, 1e30) for k, v in random_delta(1).items()}
    with pytest.raises(errors.BadUpdate, match="exceeds the bound"):
        _upload(c, a, t, huge)
    assert c.aggregator.count == 0


def test_a_non_finite_model_is_never_published(tmp_path: Path) -> None:
    c = make_coordinator(tmp_path, min_devices=1, rounds=3, norm_bound=float("inf"))
    (a,) = _join(c, 1)
    big = {k: np.full_like(v, 3e38) for k, v in random_delta(1).items()}
    t = c.get_task(a)
    _upload(c, a, t, big)
    assert c.version == 1 and np.isfinite(c.weights["fc1.bias"]).all()
    t = c.get_task(a)
    _upload(c, a, t, big)  # 3e38 + 3e38 overflows float32
    assert c.version == 1, "the Inf model must not be published"
    r = c.state.round(t.round_id)
    assert r.state == st.ABANDONED and "refused to publish" in r.reason and "NaN or Inf" in r.reason
    assert ModelStore(tmp_path).latest_version() == 1
    problem = c.status().problem
    assert "refused to publish version 2" in problem and "version 1 is kept" in problem
    assert np.isfinite(wire.arrays_from_blob(c.model_blob(1))["fc1.bias"]).all()
    t = c.get_task(a)
    _upload(c, a, t, random_delta(3))  # honest rounds go on
    assert c.version == 2 and c.status().problem == ""


def _bn_coordinator(tmp_path: Path, **policy) -> Coordinator:
    specs = {**SPECS, "bn.running_var": FakeSpec("bn.running_var", "bn", (3,), True, False)}
    layout = layout_from_specs(INI, specs)
    weights = {**initial_weights(), "bn.running_var": np.ones(3, np.float32)}
    return Coordinator(state=st.MemoryState(), store=ModelStore(tmp_path), layout=layout, initial_weights=weights,
                       aggregator=ag.WeightedMean(), optimizer=ag.make_optimizer("fedavg"),
                       policy=RoundPolicy(rounds=3, min_devices=1, **policy),
                       training=wire.TrainingConfig(), enroll_token="enroll-me", clock=Clock())


def test_a_delta_that_makes_a_running_variance_negative_is_refused(tmp_path: Path) -> None:
    c = _bn_coordinator(tmp_path)
    (a,) = _join(c, 1)
    t = c.get_task(a)
    delta = {**random_delta(1), "bn.running_var": np.array([-5.0, 0.0, 0.0], np.float32)}
    with pytest.raises(errors.BadUpdate, match="'bn.running_var'.*negative"):
        _upload(c, a, t, delta)
    _upload(c, a, t, {**random_delta(1), "bn.running_var": np.array([-0.5, 0.1, 0.0], np.float32)})
    assert c.version == 1 and (c.weights["bn.running_var"] >= 0).all()


def test_rounding_sized_negative_variances_are_clamped_not_refused() -> None:
    base = {"bn.running_var": np.array([1.0, 1e-9], np.float32)}
    delta = {"bn.running_var": np.array([-1.0 - 1e-8, -2e-9], np.float32)}
    guard.check_update(base, delta)
    assert (base["bn.running_var"] + delta["bn.running_var"] >= 0).all()
    from fedpers import codec

    int2 = codec.parse_codec("int2+zstd")
    assert codec.codec_for("bn1.running_var", int2).name == "fp32"  # statistics travel lossless
    assert codec.codec_for("bn1.gamma", int2) is int2


def test_check_model_refuses_negative_variance() -> None:
    with pytest.raises(guard.UnsafeModel, match="negative"):
        guard.check_model({"bn1.running_var": np.array([1.0, -1e-3], np.float32)})
    guard.check_model({"bn1.running_var": np.array([0.0, 2.0], np.float32), "w": np.ones(2, np.float32)})


# ------------------------------------------------------------------ rounds that survive dropouts


def test_a_device_that_stopped_calling_is_not_selected(tmp_path: Path) -> None:
    clock = Clock()
    c = make_coordinator(tmp_path, min_devices=3, clock=clock, retry_after=0.5)
    assert c.policy.liveness == pytest.approx(3.0)
    a, b, gone, late = _join(c, 4)
    c.get_task(gone)  # killed right after this call
    clock.t += 5
    assert c.get_task(a).kind == WAIT and c.get_task(b).kind == WAIT  # gone is no longer live
    t = c.get_task(late)
    assert t.kind == TRAIN and set(c.state.round(t.round_id).selected) == {a, b, late}


def test_over_selection_closes_at_the_target_and_counts_late_updates(tmp_path: Path) -> None:
    clock = Clock()
    c = make_coordinator(tmp_path, min_devices=2, target_devices=3, over_select=0.34, clock=clock,
                         gather_seconds=2.0)
    devs = _join(c, 5)
    for d in devs[:3]:
        assert c.get_task(d).kind == WAIT  # 3 wait; ceil(3 x 1.34) = 5 wanted
    clock.t += 2.5  # the gather window passed: open with the 3 there
    t = c.get_task(devs[0])
    assert t.kind == TRAIN and len(c.state.round(t.round_id).selected) == 3
    for d in devs[:3]:
        _upload(c, d, t, random_delta(d))
    assert c.version == 1
    # five live devices: four... five selected, the round closes at three
    for d in devs:
        c.get_task(d)
    t2 = c.get_task(devs[0])
    r = c.state.round(t2.round_id)
    assert len(r.selected) == 5 and c.quorum(r) == 3
    for d in r.selected[:3]:
        _upload(c, d, t2, random_delta(d))
    assert c.version == 2 and c.state.round(t2.round_id).state == st.CLOSED
    with pytest.raises(errors.LateUpdate):
        _upload(c, r.selected[3], t2, random_delta(9))
    assert c.status().late_updates == 1


def test_round_policy_checks_the_new_settings() -> None:
    with pytest.raises(ValueError, match="target_devices"):
        RoundPolicy(min_devices=4, target_devices=3)
    with pytest.raises(ValueError, match="max_examples"):
        RoundPolicy(max_examples=0)
    with pytest.raises(ValueError, match="over_select"):
        RoundPolicy(over_select=-1)


def test_a_round_waits_briefly_for_every_live_device(tmp_path: Path) -> None:
    clock = Clock()
    c = make_coordinator(tmp_path, min_devices=2, clock=clock, retry_after=0.5, gather_seconds=2.0)
    a, b, slow = _join(c, 3)
    c._waiting = dict.fromkeys((a, b, slow), clock())  # three live devices ask at once
    c._seen = dict(c._waiting)
    c.tick()
    t = c.get_task(a)
    for d in (a, b):
        _upload(c, d, t, random_delta(d))
    clock.t += 0.5
    _upload(c, slow, t, random_delta(9))  # the round closes; slow is live but not asking yet
    assert c.version == 1
    assert c.get_task(a).kind == WAIT and c.get_task(b).kind == WAIT  # min_devices wait, slow is live
    t2 = c.get_task(slow)
    assert t2.kind == TRAIN and set(c.state.round(t2.round_id).selected) == {a, b, slow}
    for d in (a, b, slow):
        _upload(c, d, t2, random_delta(d))
    # slow dies now: the others open after the gather window, without it
    assert c.get_task(a).kind == WAIT and c.get_task(b).kind == WAIT
    clock.t += 2.1
    t3 = c.get_task(a)
    assert t3.kind == TRAIN and set(c.state.round(t3.round_id).selected) == {a, b}


def test_a_device_that_just_joined_is_awaited_before_the_first_round(tmp_path: Path) -> None:
    clock = Clock()
    c = make_coordinator(tmp_path, min_devices=2, clock=clock, gather_seconds=2.0)
    a, b, starting = _join(c, 3)
    assert c.get_task(a).kind == WAIT and c.get_task(b).kind == WAIT  # `starting` joined: it is live
    t = c.get_task(starting)
    assert t.kind == TRAIN and len(c.state.round(t.round_id).selected) == 3


def test_journal_records_are_checked_and_a_full_disk_is_retryable(tmp_path: Path, monkeypatch) -> None:
    import grpc
    from fedpers.server import journal as jn
    from fedpers.server.service import status_for

    j = jn.Journal(tmp_path / "journal")
    blob = update_blob(random_delta(1))
    path = j.append(jn.JournalRecord(3, 7, 10, 10.0, wire.sha256(blob).hex(), 1.0, blob))
    [(p, rec)] = list(j.records(3))
    assert p == path and rec.blob == blob and rec.weight == 10.0 and j.rounds() == [3]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(jn.JournalError, match="SHA-256"):
        list(j.records(3))
    j.discard(3)
    assert j.rounds() == []

    def full(*args, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jn, "atomic_write_bytes", full)
    with pytest.raises(jn.JournalError, match="No space left"):
        j.append(jn.JournalRecord(4, 7, 10, 10.0, "", 1.0, blob))
    assert status_for(jn.JournalError("x")) == grpc.StatusCode.UNAVAILABLE  # the device retries later
