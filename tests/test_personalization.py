"""The method registry shared by server and device: splits, heads and typed hyperparameters."""

import subprocess
import sys

import pytest
from fedpers import models
from fedpers import personalization as P
from fedpers.nn import load_ini, weight_specs

from tests import nets

SPECS = {"digits_cnn": load_ini(models.path("digits_cnn")),
         "digits_cnn_personal": load_ini(models.path("digits_cnn_personal")),
         "cnn_bn": nets.cnn(batch_norm=True)}


def test_the_registry_holds_the_issue_methods():
    assert set(P.METHODS) == {"fedavg", "fedprox", "fedper", "fedrep", "ditto", "fedbn"}
    for m in P.METHODS.values():
        assert m.paper and m.summary and m.serves in m.candidates
        assert set(m.candidates) <= set(P.CANDIDATES)
        assert {"mu", "val_fraction"} <= {p.name for p in m.params}
    assert P.get("fedprox").hyperparams().mu > 0
    with pytest.raises(P.MethodError, match="known: fedavg"):
        P.get("fedfoo")


def test_the_module_is_pure_python():
    code = ("import sys, fedpers.personalization; "
            "print(sorted(m for m in ('numba', 'grpc', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("model", sorted(SPECS))
@pytest.mark.parametrize("name", sorted(P.METHODS))
def test_shared_tensors_never_include_local_ones(name, model):
    spec = SPECS[model]
    ws = weight_specs(spec)
    m = P.METHODS[name]
    split = m.split(ws.values(), spec.layers, m.hyperparams())
    assert not set(split.shared) & set(split.local)
    assert set(split.shared) | set(split.local) == {n for n, w in ws.items() if w.trainable}
    assert set(split.served) >= set(split.shared) and not set(split.served) & set(split.local)
    assert all(ws[n].layer in split.local_layers for n in split.local)
    assert split.shared == tuple(sorted(split.shared))


def test_what_each_method_keeps_on_the_device():
    spec = SPECS["digits_cnn_personal"]
    ws = weight_specs(spec).values()

    def local(name, **hp):
        m = P.METHODS[name]
        return m.split(ws, spec.layers, m.hyperparams(hp)).local_layers

    assert local("fedavg") == local("fedprox") == local("ditto") == ()
    assert local("fedper") == local("fedrep") == ("fc1", "output")  # marked personal = true
    assert local("fedrep", head_depth=1) == ("output",)
    assert local("fedbn") == ("bn1",)
    plain = SPECS["digits_cnn"]
    m = P.METHODS["fedrep"]
    assert m.local_layers(plain.layers, m.hyperparams()) == ("output",)  # nothing marked: the last layer
    assert P.METHODS["ditto"].split(ws, spec.layers, P.METHODS["ditto"].hyperparams()).personal_model


def test_heads_that_leave_no_body_and_models_without_batch_norm_are_refused():
    spec = SPECS["digits_cnn"]
    with pytest.raises(P.MethodError, match="no body"):
        P.head_layers(spec.layers, 5)
    m = P.METHODS["fedbn"]
    with pytest.raises(P.MethodError, match="batch-norm layers on the device, but the model has none"):
        m.local_layers(nets.mlp().layers, m.hyperparams())


def test_hyperparameters_are_typed_and_checked():
    m = P.METHODS["ditto"]
    hp = m.hyperparams(lam=2, personal_epochs="3")
    assert hp.lam == 2.0 and isinstance(hp.lam, float) and hp.personal_epochs == 3
    assert hp.to_dict()["method"] == "ditto"
    with pytest.raises(P.MethodError, match=r"lam must be in \[0.0, 100.0\]"):
        m.hyperparams(lam=-1)
    with pytest.raises(P.MethodError, match="personal_epochs must be int"):
        m.hyperparams(personal_epochs=1.5)
    with pytest.raises(P.MethodError, match="ditto has no hyperparameter 'head_epochs'"):
        m.hyperparams(head_epochs=3)
    with pytest.raises(P.MethodError, match="ft_scope must be one of"):
        m.hyperparams(ft_scope="body")
    with pytest.raises(P.MethodError, match="of 'fedrep' given to 'ditto'"):
        m.hyperparams({"method": "fedrep"})
    fedrep = P.METHODS["fedrep"]
    with pytest.raises(P.MethodError, match="given to 'fedrep'"):
        fedrep.local_layers(SPECS["digits_cnn"].layers, hp)


def test_hyperparameters_parse_from_a_flag():
    hp = P.get("fedrep").parse(" head_epochs=6, mu=0.05 ,ft_scope=head")
    assert (hp.head_epochs, hp.mu, hp.ft_scope) == (6, 0.05, "head")
    assert P.get("fedrep").parse("") == P.get("fedrep").hyperparams()
    with pytest.raises(P.MethodError, match="name=value"):
        P.get("fedrep").parse("head_epochs")


def test_a_method_registered_by_name_is_selectable_and_checked():
    m = P.define_method("fedavg_head", "FedAvg + head fine-tune", "McMahan et al. 2017", "fine-tunes the head",
                        P.Keep.NONE, "finetuned", ("global", "finetuned"), ("ft_epochs", "ft_scope", "head_depth"),
                        ft_scope="head")
    try:
        P.register_method(m)
        assert P.get("fedavg_head").hyperparams().ft_scope == "head"
        assert P.get("fedavg_head").procedure == "joint"
        with pytest.raises(P.MethodError, match="registered already"):
            P.register_method(m)
    finally:
        P.METHODS.pop("fedavg_head", None)
    bad = [dict(name="Fed-X"), dict(params=("nope",)), dict(serves="personal"), dict(procedure="magic"),
           dict(lam=0.5)]
    for change in bad:
        kw = {**dict(name="x", title="X", paper="", summary="", keeps=P.Keep.NONE, serves="global",
                     candidates=("global",), params=("ft_epochs",)), **change}
        with pytest.raises(P.MethodError):
            P.define_method(**kw)


def test_the_fleet_default_is_pure_and_needs_both_scores():
    assert P.fleet_default("personal", []) == "personal"
    rows = [{"personal": 0.5, "local_only": 0.9}, {"personal": 0.6, "local_only": 0.3}, {"personal": 0.1}]
    assert P.fleet_default("personal", rows) == "local_only"  # 1.2 > 1.1 over the rows that have both
    assert P.fleet_default("personal", rows[1:]) == "personal"
