"""Trainer features the personalization methods need: the last partial batch, optimizer reset,
freezing layers between phases, and the proximal term towards anchor weights."""

import numpy as np
import pytest
from fedpers.nn import ModelError, OptimizerSpec, Trainer, WeightError, init_weights
from fedpers.nn.optim import proximal_grad

from tests import nets
from tests.test_model_grad import loss_and_grads


def data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 12)).astype(np.float32), rng.integers(0, 4, n).astype(np.int64)


def record_batches(t: Trainer, monkeypatch) -> list[np.ndarray]:
    seen: list[np.ndarray] = []
    step = t._train_step

    def spy(c, x, y, idx, swapper, lr):
        seen.append(np.array(idx))
        return step(c, x, y, idx, swapper, lr)

    monkeypatch.setattr(t, "_train_step", spy)
    return seen


def test_last_partial_batch_is_filled_from_the_start_of_the_epoch(monkeypatch):
    x, y = data(40)
    t = Trainer(nets.mlp(), seed=0)
    seen = record_batches(t, monkeypatch)
    res = t.fit(x, y, epochs=3, batch_size=32, seed=1)
    assert res.steps == 6 and len(seen) == 6
    for first, last in zip(seen[0::2], seen[1::2], strict=True):
        assert len(first) == len(last) == 32  # one batch size: one plan
        assert set(first) | set(last) == set(range(40))  # every example trains every epoch
        assert np.array_equal(last[8:], first[:24])  # the fill is the epoch's first examples


def test_drop_last_keeps_the_old_behaviour(monkeypatch):
    x, y = data(40)
    t = Trainer(nets.mlp(), seed=0)
    seen = record_batches(t, monkeypatch)
    assert t.fit(x, y, epochs=3, batch_size=32, drop_last=True).steps == 3
    assert all(len(s) == 32 for s in seen)


def test_a_device_smaller_than_a_batch_trains_all_of_it_once_per_epoch(monkeypatch):
    x, y = data(5)
    t = Trainer(nets.mlp(), seed=0)
    seen = record_batches(t, monkeypatch)
    assert t.fit(x, y, epochs=2, batch_size=32).steps == 2
    assert all(sorted(s) == list(range(5)) for s in seen)


def test_reset_optimizer_makes_the_next_fit_match_a_fresh_trainer():
    x, y = data(64)
    spec = nets.mlp(opt="adam")
    used = Trainer(spec, seed=0)
    used.fit(x, y, epochs=2, batch_size=16, seed=3)  # moments and step count now non-zero
    start = used.get_weights()
    fresh = Trainer(spec, seed=0)
    fresh.set_weights(start)
    used.reset_optimizer()
    used.fit(x, y, epochs=1, batch_size=16, seed=4)
    fresh.fit(x, y, epochs=1, batch_size=16, seed=4)
    a, b = used.get_weights(), fresh.get_weights()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_without_reset_the_optimizer_state_carries_over():
    x, y = data(64)
    spec = nets.mlp(opt="adam")
    used = Trainer(spec, seed=0)
    used.fit(x, y, epochs=2, batch_size=16, seed=3)
    fresh = Trainer(spec, seed=0)
    fresh.set_weights(used.get_weights())
    used.fit(x, y, epochs=1, batch_size=16, seed=4)
    fresh.fit(x, y, epochs=1, batch_size=16, seed=4)
    a, b = used.get_weights(), fresh.get_weights()
    assert not all(np.array_equal(a[k], b[k]) for k in a)


def grad_names(t: Trainer) -> set[str]:
    return {ti.name for ti in t._train.tensors if ti.role == "grad"}


def test_frozen_layers_do_not_train_and_get_no_gradient_memory():
    x, y = data(48)
    t = Trainer(nets.mlp(), seed=0)
    t.fit(x, y, epochs=1, batch_size=16)
    full_arena = t.memory_report().arena_bytes
    t.set_frozen(["fc1", "fc2"])  # FedRep's head phase: only `out` trains
    assert t.frozen == {"fc1", "fc2"}
    before = t.get_weights()
    t.fit(x, y, epochs=2, batch_size=16)
    after = t.get_weights()
    for k in before:
        assert np.array_equal(before[k], after[k]) == (not k.startswith("out.")), k
    assert grad_names(t) == {"out.weight:grad", "out.bias:grad"}
    assert t.memory_report().arena_bytes < full_arena
    t.set_frozen(["out"])  # the body phase
    t.fit(x, y, epochs=1, batch_size=16)
    body = t.get_weights()
    assert np.array_equal(body["out.weight"], after["out.weight"])
    assert not np.array_equal(body["fc1.weight"], after["fc1.weight"])
    t.set_frozen(())
    t.fit(x, y, epochs=1, batch_size=16)
    assert grad_names(t) == {f"{lay}.{p}:grad" for lay in ("fc1", "fc2", "out") for p in ("weight", "bias")}


def test_freezing_an_unknown_layer_is_refused():
    t = Trainer(nets.mlp())
    with pytest.raises(ModelError, match="nope"):
        t.set_frozen(["nope"])


def test_freezing_keeps_the_optimizer_state_of_layers_that_train_in_both_plans():
    x, y = data(48)
    t = Trainer(nets.mlp(opt="adam"), seed=0)
    t.fit(x, y, epochs=1, batch_size=16)
    moment = t._train.views["out.weight:opt0"].copy()
    assert np.any(moment)
    t.set_frozen(["fc1"])
    t.compile(16)
    assert np.array_equal(t._train.views["out.weight:opt0"], moment)


# ---- the proximal term -------------------------------------------------------------------------


def test_proximal_gradient_matches_finite_differences():
    """d/dw [L(w) + mu/2 ||w - a||^2] = dL/dw + mu (w - a), checked in float64 through the graph."""
    spec = nets.cnn(batch_norm=True)
    x = np.random.default_rng(0).standard_normal((6, *spec.layers[0].input_shape))
    y = np.random.default_rng(1).integers(0, 3, 6).astype(np.int64)
    rng = np.random.default_rng(2)
    w = {k: v.astype(np.float64) for k, v in init_weights(spec, seed=1).items()}
    anchor = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in w.items()}
    mu = 0.7

    def objective(weights):
        loss, grads = loss_and_grads(spec, weights, x, y)
        prox = sum(0.5 * mu * float(np.sum((weights[k] - anchor[k]) ** 2)) for k in grads)
        return loss + prox, grads

    _, grads = objective(w)
    for k, g in grads.items():  # the kernel the optimizer runs, in its float64 signature
        proximal_grad(g.reshape(-1), w[k].reshape(-1), anchor[k].reshape(-1), mu)
    for name, g in grads.items():
        flat = w[name].reshape(-1)
        for i in rng.choice(flat.size, min(4, flat.size), replace=False):
            old = flat[i]
            flat[i] = old + 1e-6
            lp, _ = objective(w)
            flat[i] = old - 1e-6
            lm, _ = objective(w)
            flat[i] = old
            num = (lp - lm) / 2e-6
            assert abs(num - g.reshape(-1)[i]) <= 1e-4 * max(1.0, abs(num)), (name, i, num, g.reshape(-1)[i])


def test_one_sgd_step_with_a_proximal_term_matches_a_hand_computation():
    spec = nets.mlp().with_changes(optimizer=OptimizerSpec("sgd", learning_rate=0.1))
    x, y = data(8)
    t = Trainer(spec, seed=0, anchored=init_weights(spec, 0))
    w0 = t.get_weights()
    anchor = {k: v + np.float32(0.5) for k, v in w0.items()}
    t.set_anchor(anchor)
    t.set_proximal(2.0)
    t.fit(x, y, epochs=1, batch_size=8, shuffle=False)
    _, g = loss_and_grads(spec, {k: v.astype(np.float64) for k, v in w0.items()}, x.reshape(8, 1, 1, 12), y)
    w1 = t.get_weights()
    for k in w0:
        expect = w0[k] - 0.1 * (g[k] + 2.0 * (w0[k] - anchor[k]))
        np.testing.assert_allclose(w1[k], expect, rtol=1e-5, atol=1e-6)


def test_proximal_coefficients_per_weight_and_off():
    spec = nets.mlp().with_changes(optimizer=OptimizerSpec("sgd", learning_rate=0.1))
    x, y = data(8)
    plain = Trainer(spec, seed=0)
    plain.fit(x, y, epochs=1, batch_size=8, shuffle=False)
    t = Trainer(spec, seed=0, anchored=["out.weight", "out.bias"])
    t.set_anchor({k: v + 1 for k, v in t.get_weights().items()})  # names it does not anchor are ignored
    t.set_proximal({"out.weight": 3.0})
    t.fit(x, y, epochs=1, batch_size=8, shuffle=False)
    a, b = plain.get_weights(), t.get_weights()
    assert not np.allclose(a["out.weight"], b["out.weight"])
    assert all(np.array_equal(a[k], b[k]) for k in a if k != "out.weight")
    t.set_proximal(0.0)
    assert t._mu == {}


def test_proximal_needs_an_anchor_value_and_an_anchored_weight():
    t = Trainer(nets.mlp(), anchored=["out.weight"])
    with pytest.raises(WeightError, match="set_anchor"):
        t.set_proximal(1.0)
    t.set_anchor({"out.weight": t.get_weights()["out.weight"]})
    with pytest.raises(WeightError, match="no anchor for fc1.weight"):
        t.set_proximal({"fc1.weight": 1.0})
    with pytest.raises(WeightError, match="unknown"):
        Trainer(nets.mlp(), anchored=["nope.weight"])


def test_anchors_are_planned_reported_and_survive_a_recompile():
    spec = nets.cnn(batch_norm=True)
    x = np.random.default_rng(0).standard_normal((12, 2, 8, 8)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 3, 12).astype(np.int64)
    plain = Trainer(spec, seed=0)
    t = Trainer(spec, seed=0, anchored=plain.get_weights())  # every weight: Ditto's personal model
    anchored = {ti.name.removesuffix(":anchor") for ti in t.compile(4).tensors
                if ti.role == "anchor"}
    assert t.anchored == anchored
    assert "bn1.gamma" in anchored and "bn1.running_mean" not in anchored  # statistics have no gradient
    rep, base = t.memory_report(4), plain.memory_report(4)
    assert rep.anchor_bytes == sum(v.nbytes for k, v in plain.get_weights().items() if k in anchored)
    assert base.anchor_bytes == 0
    assert rep.lower_bound_bytes >= base.lower_bound_bytes + rep.anchor_bytes
    assert rep.arena_bytes >= base.arena_bytes + rep.anchor_bytes
    target = {k: np.full_like(v, 0.25) for k, v in plain.get_weights().items()}
    t.set_anchor(target)
    t.set_frozen(["c1"])  # a new plan: anchors are copied over
    t.fit(x, y, epochs=1, batch_size=4)
    assert np.all(t._train.views["c1.weight:anchor"] == 0.25)


def test_a_budget_counts_the_anchors(monkeypatch):
    from fedpers.nn import rss
    from fedpers.nn.budget import predict_growth

    monkeypatch.setattr(rss, "rss_bytes", lambda: 50 << 20)  # what the process holds: fixed, so the test is exact
    spec = nets.mlp()
    anchors = frozenset(init_weights(spec, 0))
    _, plain = predict_growth(spec, 16, "numpy", "planned", 1, 1, 1)
    _, anchored = predict_growth(spec, 16, "numpy", "planned", 1, 1, 1, anchors)
    assert anchored > plain
    t = Trainer(spec, anchored=anchors, memory_budget=(50 << 20) + plain, kernels="numpy")
    t.compile(16)
    assert (t.choice.mode, t.choice.micro_batch) != ("planned", 1)  # the plain model's plan leaves no room
    assert t.choice.peak_bytes <= (50 << 20) + plain
