"""The server's side of personalization: the layout from a method's split, refusing local tensors, the
choice exchange after the last round, and the settings."""

from pathlib import Path

import numpy as np
import pytest
from fedpers import models, wire
from fedpers import personalization as P
from fedpers.nn import load_ini, weight_specs
from fedpers.server import errors
from fedpers.server.config import ConfigError, ServerConfig
from fedpers.server.model import LayoutError, load_model, method_layout
from fedpers.server.validate import decode_update

from tests.server_helpers import Clock, header, make_coordinator, random_delta, update_blob

CNN = models.path("digits_cnn_personal.ini")
TRAIN, DONE = wire.TaskKind.TRAIN, wire.TaskKind.DONE


@pytest.mark.parametrize("name", sorted(P.METHODS))
def test_the_layout_is_the_methods_split(name):
    spec = load_ini(CNN)
    hp = P.get(name).hyperparams()
    layout = method_layout(CNN.read_text(), spec, hp)
    split = P.get(name).split(weight_specs(spec).values(), spec.layers, hp)
    assert layout.shared == split.shared and set(layout.shapes) == set(split.served)
    assert layout.local == split.local and layout.method == name
    keeps = {"fedavg": (), "fedprox": (), "ditto": (), "fedper": ("fc1", "output"), "fedrep": ("fc1", "output"),
             "fedbn": ("bn1",)}[name]  # FedAvg and Ditto share what the INI marks personal
    assert layout.personal_layers == keeps


def test_personal_layers_flag_moves_the_head_and_the_bn_method_needs_bn():
    spec = load_ini(models.path("digits_cnn.ini"))
    text = models.path("digits_cnn.ini").read_text()
    fedper = P.get("fedper").hyperparams()
    assert method_layout(text, spec, fedper).personal_layers == ("output",)  # no marks: the last weighted layer
    assert method_layout(text, spec, fedper, personal_layers=("fc1", "output")).personal_layers == ("fc1", "output")
    with pytest.raises(LayoutError, match="not layers with weights"):
        method_layout(text, spec, fedper, personal_layers=("nope",))
    with pytest.raises(LayoutError, match="has none"):
        load_model(models.path("mlp.ini"), personalization=P.get("fedbn").hyperparams())
    layout, weights = load_model(CNN, personalization=P.get("fedavg").hyperparams(), local_stats=True)
    assert not any(k.endswith("running_var") for k in weights) and "bn1.running_var" in layout.local


def test_an_update_carrying_a_local_tensor_is_refused_by_name():
    spec = load_ini(CNN)
    layout = method_layout(CNN.read_text(), spec, P.get("fedbn").hyperparams())
    good = {k: np.zeros(s, np.float32) for k, s in layout.shared_shapes.items()}
    assert set(decode_update(update_blob(good), layout.shared_shapes, None, layout.local, layout.method)) == set(good)
    for extra in ("bn1.gamma", "bn1.running_mean", "personal/conv1.weight"):
        shape = (1,) if extra.startswith("personal/") else load_model(CNN)[0].shapes[extra]
        blob = update_blob({**good, extra: np.zeros(shape, np.float32)})
        with pytest.raises(errors.LocalTensor, match=rf"\['{extra}'\] stay on the device under fedbn"):
            decode_update(blob, layout.shared_shapes, None, layout.local, layout.method)


def test_server_settings_check_the_method():
    base = dict(model=CNN, store=Path("/tmp/x"), insecure=True)
    assert ServerConfig(**base, personalization="ditto", personalization_params="lam=0.5").hyperparams().lam == 0.5
    assert ServerConfig(**base).hyperparams() is None
    for kw, match in [(dict(personalization="fedfoo"), "personalization: unknown personalization method"),
                      (dict(personalization="ditto", personalization_params="lam=-1"), "lam must be in"),
                      (dict(personalization="fedavg", personalization_params="lam=1"), "fedavg has no hyperparameter"),
                      (dict(personalization_params="mu=1"), "without personalization"),
                      (dict(choice_timeout=0.0), "choice_timeout")]:
        with pytest.raises(ConfigError, match=match):
            ServerConfig(**base, **kw)


def _finished(tmp_path, clock, devices=3, **policy):
    """A coordinator with a method whose one round closed: (coordinator, device ids)."""
    hp = P.get("fedrep").hyperparams()  # its own model is "personal"
    policy.setdefault("min_devices", devices)
    c = make_coordinator(tmp_path, clock=clock, rounds=1,
                         training=wire.TrainingConfig(local_epochs=1, personalization=hp), **policy)
    ids = []
    for i in range(devices):
        e = c.enroll(wire.EnrollRequest("enroll-me", f"d{i}", request_id=f"request-of-d{i}-0123456789"))
        ids.append(c.join(wire.JoinRequest(e.device_id, e.device_secret)).device_id)
    for d in ids:
        c.get_task(d)  # the last one opens the round
    tasks = [c.get_task(d) for d in ids]
    assert sum(t.kind == TRAIN for t in tasks) >= policy["min_devices"] and tasks[0].config.personalization == hp
    return c, ids, tasks


def _report(c, dev, acc, version=1, n=5):
    return c.report_choice(dev, wire.ChoiceRequest(version=version, val_accuracy=acc, val_examples=n))


def test_the_fleet_default_waits_for_the_last_rounds_devices(tmp_path):
    clock = Clock()
    c, ids, tasks = _finished(tmp_path, clock, min_devices=2)
    with pytest.raises(errors.NotFinished, match="has not finished"):
        _report(c, ids[0], {"personal": 0.5, "local_only": 0.9})
    selected = [(d, t) for d, t in zip(ids, tasks, strict=True) if t.kind == TRAIN]
    assert len(selected) == 2  # two of three devices make it into the round
    ids = [d for d, _ in selected] + [d for d in ids if d not in dict(selected)]
    for d, t in selected:
        blob = update_blob(random_delta(d))
        c.accept_update(d, header(t, blob), wire.chunk_blob(blob))
    assert c.finished
    done = c.get_task(ids[0])
    assert done.kind == DONE and done.config.personalization.method == "fedrep" and done.model_ini
    assert not c.choice_settled()
    with pytest.raises(errors.NotFinished, match="final version is 1"):
        _report(c, ids[0], {"personal": 0.5, "local_only": 0.9}, version=0)
    first = _report(c, ids[0], {"personal": 0.5, "local_only": 0.9})
    assert not first.decided and (first.reported, first.expected) == (1, 2) and first.retry_after_seconds >= 1.0
    again = _report(c, ids[0], {"personal": 0.5, "local_only": 0.9})  # polling repeats the scores, no double count
    assert again.reported == 1 and not again.decided
    last = _report(c, ids[1], {"personal": 0.6, "local_only": 0.3})
    assert last.decided and last.fleet_default == "local_only" and c.choice_settled()  # 1.2 > 1.1
    late = _report(c, ids[2], {"personal": 1.0, "local_only": 0.0})  # after the decision: the same answer
    assert late.decided and late.fleet_default == "local_only"


def test_the_fleet_default_is_decided_at_the_deadline_without_everyone(tmp_path):
    clock = Clock()
    c, ids, tasks = _finished(tmp_path, clock, devices=2, choice_timeout=30.0)
    for d, t in zip(ids, tasks, strict=True):
        blob = update_blob(random_delta(d))
        c.accept_update(d, header(t, blob), wire.chunk_blob(blob))
    assert c.finished and not c.choice_settled()
    assert not _report(c, ids[0], {"personal": 0.8, "local_only": 0.2}).decided
    clock.t += 31
    assert c.choice_settled()  # the server may exit even if a device never reports
    reply = c.report_choice(ids[0], wire.ChoiceRequest(version=1, val_accuracy={}, val_examples=0))  # only asks
    assert reply.decided and reply.fleet_default == "personal"


def test_no_method_no_choice(tmp_path):
    c = make_coordinator(tmp_path, rounds=0)
    e = c.enroll(wire.EnrollRequest("enroll-me", "d0", request_id="request-of-d0-0123456789"))
    dev = c.join(wire.JoinRequest(e.device_id, e.device_secret)).device_id
    assert c.finished and c.choice_settled()
    with pytest.raises(errors.NotFinished, match="no personalization method"):
        _report(c, dev, {"global": 1.0}, version=0)
