"""Trainer features the personalization methods need: the last partial batch, optimizer reset,
freezing layers between phases, and the proximal term towards anchor weights."""

import numpy as np
import pytest
from fedpers.nn import ModelError, Trainer

from tests import nets


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
