"""Device identity over real gRPC on 127.0.0.1 (TLS): enrollment, secrets, revocation, admin status.

Attacks 2 and 3 of issue 10: a Join with another device's name used to return that device's id
and a fresh token (the victim locked out, the attacker's upload counted as the victim's), and
enrollment was open by default (20,000 anonymous Joins; 20 sybils that poll and never upload got
every round abandoned at --fraction 0.1). Now a name buys nothing, enrollment needs the token or
--open-enrollment, enrolled devices are capped, and a revoked device stays out.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from fedpers import wire
from fedpers.client.agent import Agent, AgentConfig, AgentError
from fedpers.rpc import federation_pb2 as pb
from fedpers.server import app
from fedpers.server import state as st
from fedpers.server.config import ServerConfig
from fedpers.server.identity import IdentityPolicy, hash_secret, verify_secret
from fedpers.stub import FederationClient

from tests.server_helpers import Device, client_tls, header, make_coordinator, random_delta, server_tls, update_blob

ROOT = Path(__file__).resolve().parents[1]
Code = grpc.StatusCode


def _start(tmp_path: Path, identity: IdentityPolicy | None = None, sqlite: bool = False, **policy):
    policy = {"min_devices": 2, "rounds": 3, "round_timeout": 600, **policy}
    state = st.SqliteState(tmp_path / "state.sqlite") if sqlite else None
    coord = make_coordinator(tmp_path, state=state, clock=time.time, identity=identity, **policy)
    cfg = ServerConfig(model=tmp_path / "unused.ini", store=tmp_path, listen="127.0.0.1:0", **server_tls(),
                       round_timeout=policy["round_timeout"])
    return app.start(cfg, coordinator=coord)


def _refused(fn, code: Code, kind: wire.Refusal, match: str = "") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert info.value.code() == code, info.value.details()
    assert wire.refusal_of(info.value) is kind, info.value.details()
    assert match in info.value.details(), info.value.details()
    return info.value


def _enroll(dev_or_stub, token: str, name: str, request_id: str = "r" * 16):
    stub = getattr(dev_or_stub, "stub", dev_or_stub)
    return stub.Enroll(pb.EnrollRequest(enroll_token=token, device_name=name, request_id=request_id), timeout=10)


def _upload(dev: Device, task: wire.Task, seed: int) -> wire.UploadReply:
    blob = update_blob(random_delta(seed))
    return dev.upload(wire.upload_messages(header(task, blob), blob))


def test_a_name_never_takes_over_a_device(tmp_path: Path) -> None:
    """Attack 2: the attacker knows the victim's name and the shared enrollment token."""
    running = _start(tmp_path)
    try:
        victim, other = Device(running.address, "victim"), Device(running.address, "other")
        victim.task()
        task = other.task()
        attacker = Device(running.address, "attacker")
        _refused(lambda: _enroll(attacker, "enroll-me", "victim"), Code.ALREADY_EXISTS, wire.Refusal.NAME_TAKEN,
                 "never by its name")
        _refused(lambda: attacker.stub.Join(pb.JoinRequest(device_id=victim.id, device_secret=attacker.secret),
                                            timeout=10), Code.UNAUTHENTICATED, wire.Refusal.BAD_TOKEN)
        _refused(lambda: attacker.stub.GetTask(pb.TaskRequest(), metadata=wire.auth_metadata(victim.id, attacker.token),
                                               timeout=10), Code.UNAUTHENTICATED, wire.Refusal.BAD_TOKEN)
        # the victim was never locked out, and its own update is the one that counts
        assert victim.task().round_id == task.round_id
        assert _upload(victim, task, 1).accepted and _upload(other, task, 2).accepted
        assert running.coordinator.version == 1
        assert {u.device_id for u in running.coordinator.state.updates(task.round_id)} == {victim.id, other.id}
    finally:
        running.stop(0)


def test_enrollment_is_closed_without_a_token_and_capped(tmp_path: Path) -> None:
    """Attack 3: anonymous enrollment, then sybils."""
    closed = _start(tmp_path / "closed", identity=IdentityPolicy())  # no token, no --open-enrollment
    try:
        with FederationClient(closed.address, tls=client_tls(), timeout=5) as c:
            _refused(lambda: c.enroll(wire.EnrollRequest("", "anon", "r" * 16)), Code.PERMISSION_DENIED,
                     wire.Refusal.ENROLLMENT_CLOSED, "enrollment is closed")
        assert closed.coordinator.state.count_devices() == 0
    finally:
        closed.stop(0)
    capped = _start(tmp_path / "open", identity=IdentityPolicy(open_enrollment=True, max_devices=3))
    try:
        devices = [Device(capped.address, f"d{i}", enroll="") for i in range(3)]
        _refused(lambda: Device(capped.address, "d3", enroll=""), Code.RESOURCE_EXHAUSTED,
                 wire.Refusal.TOO_MANY_DEVICES, "--max-devices 3")
        assert capped.coordinator.state.count_devices() == 3
        for d in devices:
            d.close()
    finally:
        capped.stop(0)


def test_sybils_without_the_token_cannot_stall_rounds(tmp_path: Path) -> None:
    """20 would-be sybils are refused at enrollment; two honest devices close rounds at --fraction 0.1."""
    running = _start(tmp_path, fraction=0.1, min_devices=2, rounds=2)
    try:
        with FederationClient(running.address, tls=client_tls(), timeout=5) as c:
            for i in range(20):
                _refused(lambda i=i: c.enroll(wire.EnrollRequest("guess", f"sybil-{i}", "r" * 16)),
                         Code.UNAUTHENTICATED, wire.Refusal.BAD_TOKEN, "wrong enrollment token")
        honest = [Device(running.address, f"h{i}") for i in range(2)]
        for r in range(2):
            tasks = [d.task() for d in honest]
            tasks = [d.task() for d in honest]
            for i, (d, t) in enumerate(zip(honest, tasks, strict=True)):
                assert t.kind == wire.TaskKind.TRAIN and _upload(d, t, 10 * r + i).accepted
        assert running.coordinator.state.count_rounds(st.CLOSED) == 2
        assert running.coordinator.state.count_rounds(st.ABANDONED) == 0
    finally:
        running.stop(0)


def test_a_lost_enrollment_reply_is_repeated_safely(tmp_path: Path) -> None:
    running = _start(tmp_path)
    try:
        with FederationClient(running.address, tls=client_tls(), timeout=5) as c:
            first = c.enroll(wire.EnrollRequest("enroll-me", "phone", "request-0123456789"))
            again = c.enroll(wire.EnrollRequest("enroll-me", "phone", "request-0123456789"))  # reply lost: retry
            assert again.device_id == first.device_id and again.device_secret != first.device_secret
            _refused(lambda: c.join(wire.JoinRequest(first.device_id, first.device_secret)), Code.UNAUTHENTICATED,
                     wire.Refusal.BAD_TOKEN)
            _refused(lambda: c.enroll(wire.EnrollRequest("enroll-me", "phone", "another-request-id")),
                     Code.ALREADY_EXISTS, wire.Refusal.NAME_TAKEN)
            assert c.join(wire.JoinRequest(again.device_id, again.device_secret)).device_id == first.device_id
            # once the device has joined with its secret, the request id is spent
            _refused(lambda: c.enroll(wire.EnrollRequest("enroll-me", "phone", "request-0123456789")),
                     Code.ALREADY_EXISTS, wire.Refusal.NAME_TAKEN)
    finally:
        running.stop(0)


def test_revoked_device_is_refused_also_after_a_restart(tmp_path: Path) -> None:
    running = _start(tmp_path, sqlite=True)
    try:
        dev, other = Device(running.address, "stolen"), Device(running.address, "honest")
        dev.task()
        env = dict(os.environ, FEDPERS_TLS_CA="")
        listed = subprocess.run([sys.executable, "-m", "fedpers.server", "devices", "list", "--store", str(tmp_path),
                                 "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)
        assert [(r["name"], r["state"]) for r in rows] == [("stolen", "active"), ("honest", "active")]
        assert "hash" not in listed.stdout and dev.secret not in listed.stdout
        # the operator revokes it on the live server's store
        r = subprocess.run([sys.executable, "-m", "fedpers.server", "devices", "revoke", "stolen", "--store",
                            str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0 and "revoked" in r.stdout, r.stderr
        deadline = time.monotonic() + 10
        while True:
            try:
                dev.task()
            except grpc.RpcError as exc:
                assert exc.code() == Code.PERMISSION_DENIED and wire.refusal_of(exc) is wire.Refusal.REVOKED
                break
            assert time.monotonic() < deadline, "the running server did not pick up the revocation"
            time.sleep(0.2)
        _refused(dev.join, Code.PERMISSION_DENIED, wire.Refusal.REVOKED, "was revoked at")
        assert other.task().kind in (wire.TaskKind.WAIT, wire.TaskKind.TRAIN)  # everyone else carries on
        shown = subprocess.run([sys.executable, "-m", "fedpers.server", "devices", "show", str(dev.id), "--store",
                                str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
        assert shown.returncode == 0 and "revoked" in shown.stdout
        credentials = dev.credentials
        dev.close()
        other.close()
    finally:
        running.stop(0)
    running = _start(tmp_path, sqlite=True)
    try:
        _refused(lambda: Device(running.address, "stolen", credentials=credentials), Code.PERMISSION_DENIED,
                 wire.Refusal.REVOKED)
    finally:
        running.stop(0)


def test_status_needs_a_session_or_the_admin_token(tmp_path: Path) -> None:
    running = _start(tmp_path, identity=IdentityPolicy(enroll_token="enroll-me", admin_token="admin-secret"))
    try:
        dev = Device(running.address, "d")
        assert dev.status().devices_joined == 1
        with FederationClient(running.address, tls=client_tls(), timeout=5, admin_token="admin-secret") as c:
            assert c.status().devices_joined == 1
        for token in ("", "wrong"):
            with FederationClient(running.address, tls=client_tls(), timeout=5, admin_token=token) as c:
                with pytest.raises((grpc.RpcError, RuntimeError)):
                    c.status()
        _refused(lambda: dev.stub.GetStatus(pb.StatusRequest(), metadata=wire.admin_metadata("wrong"), timeout=5),
                 Code.UNAUTHENTICATED, wire.Refusal.BAD_TOKEN, "wrong admin token")
        dev.close()
    finally:
        running.stop(0)


def test_secrets_are_hashed_and_never_logged(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    running = _start(tmp_path, sqlite=True)
    try:
        dev = Device(running.address, "logged")
        dev.task()
        stored = running.coordinator.state.device(dev.id)
        assert dev.secret not in stored.secret_hash and verify_secret(dev.secret, stored.secret_hash)
        assert verify_secret(dev.token, stored.session_hash) and not verify_secret(dev.token, stored.secret_hash)
        assert hash_secret("x") != hash_secret("x")  # salted
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert "enroll-me" not in text and dev.secret not in text and dev.token not in text
        assert dev.secret.encode() not in (tmp_path / "state.sqlite").read_bytes()
        dev.close()
    finally:
        running.stop(0)


def test_agent_keeps_its_secret_private_and_rejoins_without_the_token(tmp_path: Path) -> None:
    running = _start(tmp_path, min_devices=5)
    data = tmp_path / "data.npz"  # examples that fit the test layout's 1:1:4 input (checked at join)
    np.savez(data, x=np.zeros((10, 4), np.float32), y=np.zeros(10, np.int64))
    state_dir = tmp_path / "device-state"
    cfg = AgentConfig(server=running.address, data=data, state=state_dir,
                      tls=client_tls(), enroll_token="enroll-me", name="agent-1")
    try:
        agent = Agent(cfg)
        first = agent.join()
        agent.close()
        creds = state_dir / "device.secret"
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(creds.stat().st_mode) == 0o600
        assert "enroll-me" not in repr(cfg)
        agent = Agent(AgentConfig(server=running.address, data=cfg.data, state=state_dir, tls=client_tls()))
        assert agent.join() == first  # no token needed any more: the secret proves it
        agent.close()
        # a fresh state directory under the same name is a different device, and is refused
        with pytest.raises(AgentError, match="another device has this name"):
            Agent(AgentConfig(server=running.address, data=cfg.data, state=tmp_path / "impostor", tls=client_tls(),
                              enroll_token="enroll-me", name="agent-1")).join()
    finally:
        running.stop(0)


@pytest.mark.parametrize("command", [["fedpers.server", "--model", "m.ini", "--store", "s"],
                                     ["fedpers.client", "run", "--server", "x:1", "--data", "d.npz", "--state", "s"]])
def test_an_enrollment_token_on_the_command_line_is_refused(command: list[str], tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", *command, "--enroll-token", "visible-to-all"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "/proc/PID/cmdline" in r.stderr and "FEDPERS_ENROLL_TOKEN" in r.stderr


def test_concurrent_enrollments_get_distinct_ids(tmp_path: Path) -> None:
    running = _start(tmp_path, sqlite=True)
    ids: list[int] = []
    try:
        def one(i: int) -> None:
            d = Device(running.address, f"c{i}")
            ids.append(d.id)
            d.close()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(set(ids)) == 8
    finally:
        running.stop(0)


def test_a_session_issued_by_another_server_on_the_same_state_is_accepted(tmp_path: Path) -> None:
    """Two coordinators over one database (a later PostgreSQL backend runs several servers): the cache
    of the first must not refuse a session the second issued."""
    from fedpers.server.identity import Identity

    state = st.SqliteState(tmp_path / "state.sqlite")
    one, two = Identity(state, IdentityPolicy(enroll_token="t")), Identity(state, IdentityPolicy(enroll_token="t"))
    enrolled = one.enroll(wire.EnrollRequest("t", "d", "r" * 16))
    first = one.join(wire.JoinRequest(enrolled.device_id, enrolled.device_secret))
    assert one.authenticate(enrolled.device_id, first.session_token) == enrolled.device_id
    second = two.join(wire.JoinRequest(enrolled.device_id, enrolled.device_secret))
    assert one.authenticate(enrolled.device_id, second.session_token) == enrolled.device_id
    with pytest.raises(Exception, match="wrong or expired"):
        one.authenticate(enrolled.device_id, first.session_token)
    state.close()
