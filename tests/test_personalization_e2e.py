"""Every personalization method on a tiny federation over real gRPC with TLS: a server and two device
agents in this process. What the devices uploaded and what the server stored hold no tensor that stays on
a device; each device ends with its per-device choice, reported and kept in --state; a server with a
method refuses an update carrying a local tensor."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from fedpers import models, wire
from fedpers import personalization as P
from fedpers.client.agent import Agent, AgentConfig
from fedpers.client.export_cmd import personalized_model
from fedpers.client.personal import PersonalStore
from fedpers.rpc import federation_pb2 as pb
from fedpers.server import app
from fedpers.server.config import ServerConfig
from fedpers.store import ModelStore

from tests.server_helpers import Device, client_tls, server_tls, update_blob

pytestmark = pytest.mark.slow  # a server and two devices over real gRPC
MODEL = models.path("digits_cnn_personal.ini")  # batch norm (FedBN) and two layers marked personal
DEVICES, ROUNDS = 2, 2
FAST = "ft_epochs=1,val_fraction=0.25"  # keep each federation short
EXTRA = {"fedrep": ",head_epochs=1,body_epochs=1", "ditto": ",personal_epochs=1", "fedprox": ",mu=0.05"}


def _data(tmp: Path) -> list[Path]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    paths = []
    for i in range(DEVICES):
        path = tmp / f"device-{i}.npz"
        part = slice(i * 80, (i + 1) * 80)
        np.savez(path, x=x[part], y=y[part], x_test=x[1600:1700], y_test=y[1600:1700],
                 w_test=np.linspace(1, 2, 100))  # test weights: the accuracy is the weighted share
        paths.append(path)
    return paths


def federate(tmp: Path, method: str) -> dict:
    """One federation of `method`: the server's layout and store, and each device's result and state."""
    server = app.start(ServerConfig(
        model=MODEL, store=tmp / "store", listen="127.0.0.1:0", rounds=ROUNDS, min_devices=DEVICES,
        local_epochs=1, batch_size=16, enroll_token="tok", retry_after=0.1, personalization=method,
        personalization_params=FAST + EXTRA.get(method, ""), **server_tls()))
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def device(i: int, data: Path) -> None:
        cfg = AgentConfig(server=server.address, data=data, state=tmp / f"dev{i}", name=f"{method}-{i}",
                          tls=client_tls(), enroll_token="tok", save_uploads=True, retry_seconds=30)
        try:
            results[i] = Agent(cfg).run()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=device, args=(i, p)) for i, p in enumerate(_data(tmp))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        layout, fleet = server.coordinator.layout, server.coordinator.fleet_default
    finally:
        server.stop()
    assert not errors, errors
    return {"layout": layout, "fleet": fleet, "results": results,
            "states": [PersonalStore(tmp / f"dev{i}").load() for i in range(DEVICES)]}


@pytest.mark.parametrize("method", sorted(P.METHODS))
def test_each_method_federates_and_serves_its_per_device_choice(tmp_path, method):
    run = federate(tmp_path, method)
    m, layout = P.get(method), run["layout"]
    assert layout.method == method and run["fleet"] in (m.serves, P.LOCAL_ONLY)
    for i in range(DEVICES):
        rep = run["results"][i].report
        assert run["results"][i].reason == "done" and rep.rounds_trained == ROUNDS and rep.method == method
        assert set(rep.candidate_accuracy) == {*m.candidates, P.LOCAL_ONLY}
        assert rep.served in rep.candidate_accuracy and rep.fleet_default == run["fleet"]
        assert rep.val_examples == 20 and set(rep.val_accuracy) == set(rep.candidate_accuracy)
        assert rep.local_only_epochs == ROUNDS * 1 + 1 and rep.final_personalized_accuracy == \
            rep.candidate_accuracy[m.serves]
        assert all(r.num_examples == 60 for r in rep.rounds)  # the validation split never trains
        anchors = rep.memory_report["anchor_bytes"]
        assert (anchors > 0) == (m.personal_model or method == "fedprox"), anchors  # Ditto's copy is planned
        state = run["states"][i]
        assert state.served_name == rep.served and set(state.served) >= set(layout.shared)
        _, exported, _ = personalized_model(tmp_path / f"dev{i}")  # `fedpers-client export` writes what it serves
        assert all(np.array_equal(exported[k], v) for k, v in state.served.items())
        if m.personal_model:
            assert {k for k in state.local if k.startswith(P.PERSONAL_PREFIX)}
        else:
            assert set(state.local) == set(layout.local)
    _nothing_local_left_the_devices(tmp_path, run)


def _nothing_local_left_the_devices(tmp: Path, run: dict) -> None:
    """Every uploaded blob carries exactly the shared tensors; every stored version only served ones; the
    bytes of the server's store and of every upload hold no run of a device's local values."""
    layout = run["layout"]
    uploads = sorted(tmp.glob("dev*/uploads/*.blob"))
    assert len(uploads) == DEVICES * ROUNDS
    for path in uploads:
        assert sorted(t.name for t in wire.tensorset_from_blob(path.read_bytes())) == sorted(layout.shared)
    store = ModelStore(tmp / "store")
    for v in store.versions():
        assert set(store.load_version(v).weights) == set(layout.shapes)
        assert not set(store.load_version(v).weights) & set(layout.local)
    blobs = [p.read_bytes() for p in (tmp / "store").rglob("*") if p.is_file()] + [p.read_bytes() for p in uploads]
    versions = [store.load_version(v).weights for v in store.versions()]
    needles = set()
    for state in run["states"]:
        for name, arr in state.local.items():
            flat = np.ascontiguousarray(arr, np.float32).reshape(-1)
            own = flat != np.round(flat)  # skip initial values such as 0 and 1
            plain = name.removeprefix(P.PERSONAL_PREFIX)
            for w in versions:  # Ditto's personal model starts from the global one: equal values are no leak
                if name.startswith(P.PERSONAL_PREFIX) and plain in w:
                    own &= flat != np.asarray(w[plain], np.float32).reshape(-1)
            for j in np.flatnonzero(own[:-2] & own[1:-1] & own[2:]):
                needles.add(flat[j:j + 3].tobytes())
    if layout.local or any(k.startswith(P.PERSONAL_PREFIX) for s in run["states"] for k in s.local):
        assert needles
    for data in blobs:
        assert not [n for n in needles if n in data], "a device's local values reached the server"


def test_a_server_with_a_method_refuses_a_local_tensor_in_an_update(tmp_path):
    server = app.start(ServerConfig(model=MODEL, store=tmp_path / "store", listen="127.0.0.1:0", rounds=1,
                                    min_devices=1, enroll_token="tok", personalization="fedbn", **server_tls()))
    try:
        dev = Device(server.address, "intruder", enroll="tok")
        task = dev.task()
        while task.kind != wire.TaskKind.TRAIN:
            task = dev.task()
        layout = server.coordinator.layout
        assert task.config.personalization.method == "fedbn" and "bn1.gamma" in layout.local
        delta = {k: np.zeros(s, np.float32) for k, s in layout.shared_shapes.items()}
        delta["bn1.gamma"] = np.zeros(layout_shape(MODEL, "bn1.gamma"), np.float32)
        blob = update_blob(delta)
        import grpc

        with pytest.raises(grpc.RpcError) as info:
            dev.upload(wire.upload_messages(wire.UpdateHeader(
                round_id=task.round_id, base_version=task.base_version, num_examples=5, total_size=len(blob),
                sha256=wire.sha256(blob)), blob))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "LocalTensor: tensor(s) ['bn1.gamma'] stay on the device under fedbn" in info.value.details()
        assert wire.refusal_of(info.value) is wire.Refusal.LOCAL_TENSOR
        assert server.coordinator.aggregator.count == 0
        with pytest.raises(grpc.RpcError) as early:  # the choice exchange only after the last round
            dev.stub.ReportChoice(pb.ChoiceRequest(version=0, val_examples=1, val_accuracy={"personal": 1.0}),
                                  metadata=dev.md, timeout=10)
        assert early.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert wire.refusal_of(early.value) is wire.Refusal.NOT_FINISHED
        with pytest.raises(grpc.RpcError) as bad:  # bounded: a made-up candidate is refused as malformed
            dev.stub.ReportChoice(pb.ChoiceRequest(version=0, val_examples=1, val_accuracy={"mine": 1.0}),
                                  metadata=dev.md, timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        dev.close()
    finally:
        server.stop()


def layout_shape(model: Path, name: str) -> tuple[int, ...]:
    from fedpers.nn import load_ini, weight_specs

    return tuple(weight_specs(load_ini(model))[name].shape)
