"""End to end over real gRPC on 127.0.0.1: one server process and three device processes.

One federation (3 rounds, top-k codec with error feedback, devices keep copies of their uploads)
is run once per module; device 0 stops after round 1 and is started again. The tests then check
the run from every side: completion, the server's bases against a numpy FedAvg of the very
payloads the devices sent, personal layers absent from everything the server received or
stored, and the restarted device resuming with its saved personal layers.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from fedpers import codec, wire
from fedpers.client.partition import partition_digits, write_partition
from fedpers.client.personal import PersonalStore
from fedpers.client.processes import Child, wait_for_server
from fedpers.client.report import read_report
from fedpers.rpc import federation_pb2 as pb
from fedpers.rpc import federation_pb2_grpc as pb_grpc
from fedpers.store import ModelStore
from fedpers.stub import get_status
from fedpers.tls import TlsConfig

from tests.server_helpers import client_tls, client_tls_args, server_tls_args

MODEL = Path(__file__).parent / "data" / "digits_mlp_personal.ini"
PERSONAL = "privhead"
ROUNDS = 3
pytestmark = pytest.mark.slow  # server and device processes over real gRPC

DEVICES = 3
CODEC = "topk:0.3+zstd"
TOKEN = "e2e-token"
ADMIN = "e2e-admin-token"
SERVER_ENV = {"FEDPERS_ENROLL_TOKEN": TOKEN, "FEDPERS_ADMIN_TOKEN": ADMIN}  # secrets never go in argv


def _server(tmp: Path, *extra: str, min_devices: int = DEVICES, rounds: int = ROUNDS) -> tuple[Child, str]:
    port_file = tmp / "server.port"
    argv = [sys.executable, "-m", "fedpers.server", "serve", "--model", str(MODEL), "--listen", "127.0.0.1:0",
            "--port-file", str(port_file), "--store", str(tmp / "store"), "--rounds", str(rounds),
            "--min-devices", str(min_devices), "--round-timeout", "120", "--codec", CODEC, "--local-epochs", "1",
            "--retry-after", "0.1", "--strategy", "fedavg", "--server-lr", "1.0", *server_tls_args(), *extra]
    server = Child.start("server", argv, tmp / "logs" / "server.log", env=SERVER_ENV)
    return server, wait_for_server(port_file, server, timeout=60, tls=client_tls())


def _device(tmp: Path, address: str, i: int, *extra: str) -> Child:
    argv = [sys.executable, "-m", "fedpers.client", "run", "--server", address, "--data",
            str(tmp / "data" / f"device-{i}.npz"), "--state", str(tmp / "dev" / str(i)), "--name", f"e2e-{i}",
            "--save-uploads", "--retry-seconds", "30", *client_tls_args(), *extra]
    return Child.start(f"device-{i}", argv, tmp / "logs" / f"device-{i}-{time.monotonic_ns()}.log",
                       env={"FEDPERS_ENROLL_TOKEN": TOKEN})


def _wait(child: Child, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while child.poll() is None:
        if time.monotonic() > deadline:
            child.stop()
            raise AssertionError(f"{child.name} did not finish in {timeout}s:\n{child.tail(30)}")
        time.sleep(0.05)
    return child.stop()


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """Run the federation once; yields paths and what the processes left behind."""
    tmp = tmp_path_factory.mktemp("e2e")
    splits = partition_digits(DEVICES, seed=1)
    # few samples keep the run short
    small = [type(s)(s.x[:96], s.y[:96], s.x_test[:40], s.y_test[:40], s.distortion) for s in splits]
    write_partition(tmp / "data", small)
    server, address = _server(tmp)
    children: list[Child] = []
    try:
        first = _device(tmp, address, 0, "--max-rounds", "1")
        # device 1 swaps saved activations to a file; device 2 lets a memory budget choose
        memory = {1: ("--memory", "swap", "--lookahead", "1"), 2: ("--memory-budget", "128MiB")}
        children = [first] + [_device(tmp, address, i, *memory.get(i, ())) for i in range(1, DEVICES)]
        assert _wait(first, 90) == 0, first.tail(30)
        snapshot = PersonalStore(tmp / "dev" / "0").load()
        report_after_first = read_report(PersonalStore(tmp / "dev" / "0").report_path)
        restarted = _device(tmp, address, 0, "--json")
        children.append(restarted)
        codes = [_wait(c, 120) for c in children[1:]]
        status = get_status(address, tls=client_tls(), admin_token=ADMIN)
    finally:
        for c in children:
            c.stop()
        server.stop()
    yield {
        "tmp": tmp, "codes": codes, "status": status, "snapshot": snapshot,
        "report_after_first": report_after_first, "restarted_log": restarted.log_path,
    }


def test_devices_complete_three_rounds(fed):
    assert fed["codes"] == [0] * DEVICES
    status = fed["status"]
    assert status.finished and status.rounds_completed == ROUNDS and status.version == ROUNDS
    closed = [r for r in status.rounds if r.state == "closed"]
    assert [r.version for r in closed] == [1, 2, 3] and all(r.devices == DEVICES for r in closed)
    for i in range(DEVICES):
        rep = read_report(fed["tmp"] / "dev" / str(i) / "report.json")
        assert rep.finished and [r.round_id for r in rep.rounds] == [1, 2, 3]
        assert rep.bytes_up > 0 and rep.bytes_down > 0 and rep.peak_rss_bytes > 0
        assert 0.0 <= rep.personalized_accuracy <= 1.0
        # after DONE: the final base evaluated, then personalized locally (nothing uploaded)
        assert rep.final_version == ROUNDS and rep.final_epochs == 1
        assert 0.0 <= rep.final_global_accuracy <= 1.0 and 0.0 <= rep.final_personalized_accuracy <= 1.0
    swapping = read_report(PersonalStore(fed["tmp"] / "dev" / "1").report_path).memory_report
    assert swapping["mode"] == "swap" and swapping["swap_out_bytes"] > 0
    assert swapping["swap_in_bytes"] == swapping["swap_out_bytes"]
    budgeted = read_report(PersonalStore(fed["tmp"] / "dev" / "2").report_path).memory_report
    assert budgeted["mode"] == "planned" and budgeted["rss_process_peak_bytes"] <= 128 * 2**20
    # round metrics reach the server: each round's personalized accuracy is reported
    assert all("personalized_accuracy" in r.metrics and "global_accuracy" in r.metrics for r in closed)


def _decoded_upload(path: Path) -> dict[str, np.ndarray]:
    out = {}
    for t in wire.tensorset_from_blob(path.read_bytes()):
        assert t.codec == codec.parse_codec(CODEC).name
        out[t.name] = codec.decode(t.codec, t.data, t.shape)
    return out


def test_new_base_equals_numpy_fedavg_of_the_sent_deltas(fed):
    tmp = fed["tmp"]
    store = ModelStore(tmp / "store")
    assert store.versions() == [0, 1, 2, 3]
    for r in range(1, ROUNDS + 1):
        base = store.load_version(r - 1).weights
        total = None
        weight = 0.0
        for i in range(DEVICES):
            state = PersonalStore(tmp / "dev" / str(i)).load()
            rec = next(h for h in state.history if h.round_id == r)
            assert rec.base_version == r - 1
            delta = _decoded_upload(tmp / "dev" / str(i) / "uploads" / f"round-{r:06d}.blob")
            assert set(delta) == set(base)
            contrib = {k: rec.num_examples * v.astype(np.float64) for k, v in delta.items()}
            total = contrib if total is None else {k: total[k] + contrib[k] for k in total}
            weight += rec.num_examples
        expected = {k: (base[k] + (total[k] / weight).astype(np.float32)).astype(np.float32) for k in base}
        got = store.load_version(r).weights
        assert set(got) == set(expected)
        for k in expected:
            np.testing.assert_allclose(got[k], expected[k], rtol=1e-6, atol=1e-7, err_msg=f"round {r} {k}")


def _server_side_bytes(tmp: Path) -> list[tuple[str, bytes]]:
    files = [p for p in (tmp / "store").rglob("*") if p.is_file()]
    files += list((tmp / "dev").glob("*/uploads/*.blob"))
    assert len(files) >= 4 + DEVICES * ROUNDS
    return [(str(p), p.read_bytes()) for p in files]


def test_personal_layers_never_reach_the_server(fed):
    tmp = fed["tmp"]
    blobs = _server_side_bytes(tmp)
    for path, data in blobs:
        assert f"{PERSONAL}.".encode() not in data, f"personal tensor name in {path}"
    personal_arrays = []
    for i in range(DEVICES):
        state = PersonalStore(tmp / "dev" / str(i)).load()
        personal_arrays += [v for k, v in state.local.items() if k.startswith(PERSONAL + ".")]
    personal_arrays += [v for k, v in fed["snapshot"].local.items() if k.startswith(PERSONAL + ".")]
    assert len(personal_arrays) == 2 * (DEVICES + 1)
    needles = set()
    for arr in personal_arrays:
        flat = np.ascontiguousarray(arr, np.float32).reshape(-1)
        assert np.count_nonzero(flat) > 0
        # every run of 3 consecutive values (12 bytes) of every personal tensor, as raw float32
        for j in range(0, flat.size - 2):
            if np.count_nonzero(flat[j:j + 3]):
                needles.add(flat[j:j + 3].tobytes())
    assert len(needles) > 100
    # the scan finds what it looks for: the device's own state file holds its personal layer
    own = (tmp / "dev" / "1" / "device.fpst").read_bytes()
    assert f"{PERSONAL}.".encode() in own and any(n in own for n in needles)
    for path, data in blobs:
        leaked = [n for n in needles if n in data]
        assert not leaked, f"{len(leaked)} runs of personal values found in {path}"


def test_restarted_device_resumes_with_its_personal_layers(fed):
    tmp = fed["tmp"]
    snap = fed["snapshot"]
    assert snap.last_round == 1 and [h.round_id for h in snap.history] == [1]
    assert set(snap.local) == {f"{PERSONAL}.weight", f"{PERSONAL}.bias"}
    assert snap.residuals and snap.codec == codec.parse_codec(CODEC).name
    final = PersonalStore(tmp / "dev" / "0").load()
    assert final.device_id == snap.device_id == fed["report_after_first"].id
    assert [h.round_id for h in final.history] == [1, 2, 3]
    # round 2 started from base v1 plus the personal layer saved after round 1: its "global" accuracy
    # is exactly what those weights score on the device's held-out split
    from fedpers.client.data import load_data
    from fedpers.nn import Trainer, init_weights, load_ini

    spec = load_ini(MODEL)
    weights = init_weights(spec, 0)
    weights.update(ModelStore(tmp / "store").load_version(1).weights)
    weights.update(snap.local)
    data = load_data(tmp / "data" / "device-0.npz")
    with Trainer(spec) as t:
        t.set_weights(weights)
        acc = t.evaluate(data.x_test, data.y_test).accuracy
    assert final.history[1].global_accuracy == pytest.approx(acc, abs=1e-12)
    # the restarted process printed its final report as JSON (--json)
    out = [line for line in fed["restarted_log"].read_text().splitlines() if line.startswith("{")]
    assert out and json.loads(out[-1])["last_round"] == 3


def test_sigterm_while_waiting_exits_cleanly(tmp_path):
    write_partition(tmp_path / "data", partition_digits(2, seed=2)[:1])
    server, address = _server(tmp_path, min_devices=2, rounds=1)
    try:
        dev = _device(tmp_path, address, 0)
        deadline = time.monotonic() + 60
        # joined, now waiting for a second device
        while get_status(address, tls=client_tls(), admin_token=ADMIN).devices_joined < 1:
            assert time.monotonic() < deadline and dev.poll() is None, dev.tail(30)
            time.sleep(0.05)
        dev.proc.send_signal(signal.SIGTERM)
        assert _wait(dev, 30) == 0, dev.tail(30)
        state = PersonalStore(tmp_path / "dev" / "0").load()
        assert state is not None and state.name == "e2e-0" and state.last_round == 0
        rep = read_report(PersonalStore(tmp_path / "dev" / "0").report_path)
        assert rep.reason == "stopped" and not rep.finished
    finally:
        server.stop()


class _FlakyServicer(pb_grpc.FederationServicer):
    """Join fails once with UNAVAILABLE; the first download breaks after two chunks."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.joins = 0
        self.offsets: list[int] = []

    def Enroll(self, request, context):
        return pb.EnrollReply(device_id=5, device_secret="secret")

    def Join(self, request, context):
        self.joins += 1
        if self.joins == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "starting up")
        return pb.JoinReply(device_id=5, session_token="tok")

    def DownloadModel(self, request, context):
        self.offsets.append(request.offset)
        chunks = list(wire.chunk_blob(self.blob, chunk_size=1000, start=request.offset))
        if len(self.offsets) == 1:
            yield from chunks[:2]
            context.abort(grpc.StatusCode.UNAVAILABLE, "link dropped")
        yield from chunks


def test_join_retries_and_download_resumes_at_the_byte_it_reached(tmp_path):
    from concurrent import futures

    from fedpers.client.agent import Agent, AgentConfig

    arrays = {"a.weight": np.arange(2000, dtype=np.float32), "b.bias": np.ones(3, np.float32)}
    blob = wire.arrays_to_blob(arrays)
    servicer = _FlakyServicer(blob)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_FederationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    write_partition(tmp_path / "data", partition_digits(2, seed=0)[:1])
    agent = Agent(AgentConfig(server=f"127.0.0.1:{port}", data=tmp_path / "data" / "device-0.npz",
                              state=tmp_path / "state", backoff_initial=0.01, tls=TlsConfig.plaintext()))
    try:
        assert agent.join() == 5 and servicer.joins == 2
        got = agent.download(3)
    finally:
        agent.close()
        server.stop(0)
    assert servicer.offsets == [0, 2000]
    assert set(got) == set(arrays)
    for k in arrays:
        np.testing.assert_array_equal(got[k], arrays[k])
    assert agent.state.bytes_down == len(blob)


def test_models_out_after_the_federation(fed, tmp_path):
    """The device exports base v3 + its own head; the server exports v3 with an initial head; they
    share every served tensor, and the device's export evaluates as `evaluate --state` does."""
    tmp = fed["tmp"]
    state = PersonalStore(tmp / "dev" / "1").load()
    assert state.base_kept == ROUNDS and sorted(state.base) == ["hidden.bias", "hidden.weight"]
    dev_out, srv_out = tmp_path / "device.npz", tmp_path / "server.bin"
    for argv in (["fedpers.client", "export", "--state", str(tmp / "dev" / "1"), "--out", str(dev_out)],
                 ["fedpers.server", "export", "--store", str(tmp / "store"), "--out", str(srv_out)]):
        proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    from fedpers.export import read_weights
    from fedpers.nn import load_ini

    spec = load_ini(MODEL)
    device, server = read_weights(dev_out, spec), read_weights(srv_out, spec)
    for name in ("hidden.weight", "hidden.bias"):
        np.testing.assert_array_equal(device[name], server[name])
        np.testing.assert_array_equal(device[name], state.base[name])
    np.testing.assert_array_equal(device["privhead.weight"], state.local["privhead.weight"])
    assert not np.array_equal(device["privhead.weight"], server["privhead.weight"])
    data = tmp / "data" / "device-1.npz"
    runs = [subprocess.run([sys.executable, "-m", "fedpers.client", "evaluate", *src, "--data", str(data), "--json"],
                           capture_output=True, text=True, timeout=120)
            for src in (["--state", str(tmp / "dev" / "1")], [str(MODEL), "--weights", str(dev_out)])]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    assert json.loads(runs[0].stdout) == {**json.loads(runs[1].stdout), "model": str(tmp / "dev" / "1" / "model.ini")}
