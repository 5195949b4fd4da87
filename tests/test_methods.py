"""Device procedures per personalization method, checked against hand computations (numpy) on a
two-layer model, and the end-of-federation per-device choice."""

import numpy as np
import pytest
from fedpers import personalization as P
from fedpers.client.methods import (
    MIN_EVIDENCE,
    Setup,
    TrainSettings,
    choose,
    final_candidates,
    fleet_default,
    pick,
    run_round,
    train_local_only,
    validation_split,
)
from fedpers.nn import LayerSpec, ModelSpec, OptimizerSpec, Trainer

from tests import nets

LR = 0.1
N, F, H, C = 24, 6, 5, 3


def two_layer() -> ModelSpec:
    return ModelSpec(layers=(
        LayerSpec("in", "input", input_shape=(1, 1, F)),
        LayerSpec("body", "fully_connected", unit=H, activation="relu"),
        LayerSpec("head", "fully_connected", unit=C, activation="softmax"),
    ), optimizer=OptimizerSpec("sgd", learning_rate=LR))


def problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, F)).astype(np.float32)
    y = rng.integers(0, C, N).astype(np.int64)
    return x, y


def random_weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"body.weight": (F, H), "body.bias": (H,), "head.weight": (H, C), "head.bias": (C,)}
    return {k: (0.5 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def grads(w: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Mean cross-entropy gradients of the two-layer relu net, by hand (float64)."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    z1 = x @ w["body.weight"] + w["body.bias"]
    a1 = np.maximum(z1, 0)
    z2 = a1 @ w["head.weight"] + w["head.bias"]
    p = np.exp(z2 - z2.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz2 = (p - np.eye(C)[y]) / len(y)
    dz1 = (dz2 @ w["head.weight"].T) * (z1 > 0)
    return {"head.weight": a1.T @ dz2, "head.bias": dz2.sum(0), "body.weight": x.T @ dz1, "body.bias": dz1.sum(0)}


def sgd(w, x, y, steps, names, anchor=None, coef=0.0):
    """`steps` full-batch SGD steps on `names` (+ coef/2 ||w - anchor||² on them)."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    for _ in range(steps):
        g = grads(w, x, y)
        for k in names:
            step = g[k] + (coef * (w[k] - anchor[k]) if anchor is not None else 0.0)
            w[k] = w[k] - LR * step
    return w


def close(a, b):
    """Every tensor of `a` equals its namesake in `b`."""
    assert a
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)


ALL = ("body.weight", "body.bias", "head.weight", "head.bias")


def test_ditto_round_matches_a_hand_computation():
    x, y = problem()
    setup = Setup.create(two_layer(), "ditto", {"lam": 0.5, "personal_epochs": 3, "mu": 0.2})
    trainer = setup.trainer()
    base, personal = random_weights(1), random_weights(2)
    local = {P.PERSONAL_PREFIX + k: v for k, v in personal.items()}
    res = run_round(setup, trainer, base, local, x, y, TrainSettings(epochs=2, batch_size=N, seed=5))
    # the global model: FedAvg with FedProx's mu towards the base, 2 epochs = 2 full-batch steps
    close(res.shared, sgd(base, x, y, 2, ALL, anchor=base, coef=0.2))
    # the personal model: 3 steps from the device's previous one, pulled towards the round's base by lambda
    want = sgd(personal, x, y, 3, ALL, anchor=base, coef=0.5)
    close({k[len(P.PERSONAL_PREFIX):]: v for k, v in res.local.items()}, want)
    assert set(res.local) == {P.PERSONAL_PREFIX + k for k in ALL}


def test_ditto_starts_its_personal_model_from_the_base():
    x, y = problem()
    setup = Setup.create(two_layer(), "ditto", {"lam": 1.0, "personal_epochs": 1})
    base = random_weights(3)
    res = run_round(setup, setup.trainer(), base, {}, x, y, TrainSettings(epochs=1, batch_size=N))
    close({k[len(P.PERSONAL_PREFIX):]: v for k, v in res.local.items()}, sgd(base, x, y, 1, ALL))  # w = anchor


def test_fedrep_round_matches_a_hand_computation():
    x, y = problem(1)
    setup = Setup.create(two_layer(), "fedrep", {"head_epochs": 3, "body_epochs": 2, "head_depth": 1})
    assert setup.split.shared == ("body.bias", "body.weight") and setup.head == ("head",)
    base, head = random_weights(4), random_weights(5)
    local = {k: head[k] for k in ("head.weight", "head.bias")}
    res = run_round(setup, setup.trainer(), {k: base[k] for k in setup.split.served}, local, x, y,
                    TrainSettings(epochs=7, batch_size=N))  # epochs are FedRep's own
    start = {**base, **local}
    after_head = sgd(start, x, y, 3, ("head.weight", "head.bias"))  # body frozen
    after_body = sgd(after_head, x, y, 2, ("body.weight", "body.bias"))  # head frozen
    close(res.shared, after_body)
    close(res.local, after_body)
    assert set(res.local) == {"head.weight", "head.bias"}


def test_fedprox_round_matches_a_hand_computation():
    x, y = problem(2)
    setup = Setup.create(two_layer(), "fedprox", {"mu": 1.5})
    base = random_weights(6)
    res = run_round(setup, setup.trainer(), base, {}, x, y, TrainSettings(epochs=2, batch_size=N))
    close(res.shared, sgd(base, x, y, 2, ALL, anchor=base, coef=1.5))
    assert res.local == {}


def test_mu_needs_a_trainer_with_anchors():
    x, y = problem()
    setup = Setup.create(two_layer(), "fedavg", {"mu": 0.1})
    with pytest.raises(P.MethodError, match="Setup.trainer"):
        run_round(setup, Trainer(setup.spec), random_weights(0), {}, x, y, TrainSettings(epochs=1))


@pytest.mark.parametrize("name", sorted(P.METHODS))
def test_every_method_sends_only_shared_tensors_and_keeps_its_local_ones(name):
    spec = nets.cnn(batch_norm=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 2, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 20).astype(np.int64)
    setup = Setup.create(spec, name, {"ft_epochs": 1})
    trainer = setup.trainer()
    base = {k: setup.init[k] for k in setup.split.served}
    local: dict = {}
    for r in range(2):
        res = run_round(setup, trainer, base, local, x, y, TrainSettings(epochs=1, batch_size=8, seed=r))
        assert sorted(res.shared) == list(setup.split.shared)
        assert not set(res.shared) & set(setup.split.local)
        if setup.method.personal_model:
            assert set(res.local) == {P.PERSONAL_PREFIX + k for k in setup.init}
        else:
            assert set(res.local) == set(setup.split.local)
        base = {**base, **res.shared}
        local = res.local
    with pytest.raises(P.MethodError):
        run_round(setup, trainer, {**base, **{k: setup.init[k] for k in setup.split.local}} if setup.split.local
                  else {k: v for k, v in base.items() if k != setup.split.shared[0]}, local, x, y,
                  TrainSettings(epochs=1))
    cands = final_candidates(setup, trainer, base, local, x, y, TrainSettings(epochs=1, batch_size=8))
    assert set(cands) == set(setup.method.candidates)


def test_fedrep_final_personal_model_retrains_only_the_head():
    x, y = problem(3)
    setup = Setup.create(two_layer(), "fedrep", {"head_epochs": 2, "ft_epochs": 0})
    base, head = random_weights(7), random_weights(8)
    served = {k: base[k] for k in setup.split.served}
    local = {k: head[k] for k in setup.split.local}
    cands = final_candidates(setup, setup.trainer(), served, local, x, y, TrainSettings(epochs=1, batch_size=N))
    assert set(cands) == {"personal"}
    close(cands["personal"], sgd({**base, **local}, x, y, 2, ("head.weight", "head.bias")))


def test_finetuning_the_head_only_keeps_the_body():
    x, y = problem(4)
    setup = Setup.create(two_layer(), "fedavg", {"ft_epochs": 2, "ft_scope": "head", "head_depth": 1})
    base = random_weights(9)
    cands = final_candidates(setup, setup.trainer(), base, {}, x, y, TrainSettings(epochs=1, batch_size=N))
    close(cands["global"], base)
    close(cands["finetuned"], sgd(base, x, y, 2, ("head.weight", "head.bias")))


def test_local_only_trains_from_the_initial_weights():
    x, y = problem(5)
    setup = Setup.create(two_layer(), "fedavg")
    w = train_local_only(setup, setup.trainer(), x, y, TrainSettings(epochs=3, batch_size=N))
    close(w, sgd(dict(setup.init), x, y, 3, ALL))


def test_the_choice_picks_the_best_validation_candidate_and_breaks_ties_by_loss():
    x, y = problem(6)
    t = Trainer(two_layer())
    good = train_local_only(Setup.create(two_layer(), "fedavg"), t, x, y, TrainSettings(epochs=40, batch_size=N))
    cands = {"global": random_weights(10), "finetuned": good, "personal": random_weights(11)}

    def accuracy(w):
        return float(np.mean((np.maximum(x @ w["body.weight"] + w["body.bias"], 0) @ w["head.weight"]
                              + w["head.bias"]).argmax(1) == y))

    choice = choose(t, cands, x, y)
    assert choice.picked == max(cands, key=lambda k: accuracy(cands[k])) == "finetuned"
    assert choice.val_accuracy == pytest.approx({k: accuracy(w) for k, w in cands.items()})
    assert choice.val_examples == N
    sharper = {**good, "head.weight": good["head.weight"] * 1.5, "head.bias": good["head.bias"] * 1.5}
    tie = choose(t, {"a": good, "b": sharper}, x, y)  # same predictions, the sharper one has a lower loss
    assert tie.val_accuracy["a"] == tie.val_accuracy["b"]
    assert tie.picked == min(("a", "b"), key=lambda k: tie.val_loss[k]) and tie.val_loss["a"] != tie.val_loss["b"]
    assert choose(t, {"a": good, "b": sharper}, x, y, own="a").picked == "a"  # the own model wins ties
    assert choose(t, cands, x, y, own="global").picked == "finetuned"  # ... but not against a clearly better one
    with pytest.raises(P.MethodError, match="no validation"):
        choose(t, cands, x[:0], y[:0])
    with pytest.raises(P.MethodError, match="'nope'"):
        choose(t, cands, x, y, own="nope")


def test_pick_rule_on_validation_scores():
    acc = {"personal": 0.75, "finetuned": 0.75, "local_only": 0.75}
    loss = {"personal": 0.9, "finetuned": 0.2, "local_only": 0.1}
    assert pick(acc, loss, 4) == "local_only"  # no default: the lower loss
    assert pick(acc, loss, 40, own="personal") == "personal"  # ties go to the model served by default
    assert pick({**acc, "finetuned": 0.8}, loss, 20, own="personal") == "finetuned"  # one more right of 20
    assert pick({**acc, "finetuned": 1.0}, loss, 4, own="personal") == "personal"  # of 4, one more is noise
    small = {"personal": 0.5, "finetuned": 1.0, "local_only": 0.5}
    assert pick(small, loss, 4, own="personal") == "finetuned"  # two more are evidence
    perfect = dict.fromkeys(acc, 1.0)
    assert pick(perfect, loss, MIN_EVIDENCE - 1, own="personal") == "personal"  # too few to trust a loss
    assert pick(perfect, loss, MIN_EVIDENCE, own="personal") == "local_only"  # default vs local-only by loss
    assert pick(perfect, {**loss, "local_only": 1.0}, 20, own="personal") == "personal"  # a derived one: never
    assert pick(acc, loss, 40, own="local_only") == "local_only"
    with pytest.raises(P.MethodError):
        pick({}, {}, 3)
    with pytest.raises(P.MethodError, match="by default"):
        pick(acc, loss, 4, own="global")


def test_validation_split_is_stratified_disjoint_and_keeps_lone_examples():
    y = np.array([0] * 10 + [1] * 5 + [2])
    x = np.arange(len(y), dtype=np.float32)[:, None]
    xt, yt, xv, yv = validation_split(x, y, 0.2, seed=3)
    assert sorted(np.concatenate([xt, xv]).ravel().tolist()) == list(range(len(y)))
    assert len(yv) == round(0.2 * len(y))
    assert 2 in yt and 2 not in yv  # a class with one example stays in training
    assert np.sum(yv == 0) == 2 and np.sum(yv == 1) == 1  # in proportion
    tiny = np.array([0, 0, 1, 1, 2, 2, 3])  # every class too small for its share: still one held out
    assert len(validation_split(tiny[:, None], tiny, 0.1, seed=0)[3]) == 1
    xt0, _, xv0, _ = validation_split(x, y, 0.0)
    assert len(xv0) == 0 and len(xt0) == len(y)


def test_the_fleet_default_is_local_only_only_when_the_fleet_says_so():
    fleet = [{"personal": 0.8, "local_only": 0.9}, {"personal": 0.7, "local_only": 0.75}, {"personal": 0.9}]
    assert fleet_default("personal", fleet) == "local_only"
    assert fleet_default("personal", [{"personal": 0.8, "local_only": 0.8}]) == "personal"
    assert fleet_default("personal", []) == "personal"


def test_with_shared_keeps_batch_norm_statistics_the_server_leaves_on_the_device():
    spec = nets.cnn(batch_norm=True)
    for name in ("fedavg", "ditto"):
        setup = Setup.create(spec, name, {"ft_epochs": 1})
        stats = [k for k in setup.split.shared if k.endswith(("running_mean", "running_var"))]
        assert stats
        narrowed = setup.with_shared([k for k in setup.split.shared if k not in stats])
        assert set(stats) <= set(narrowed.split.local) and not set(stats) & set(narrowed.split.served)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((16, 2, 8, 8)).astype(np.float32)
        y = rng.integers(0, 3, 16).astype(np.int64)
        base = {k: narrowed.init[k] for k in narrowed.split.served}
        res = run_round(narrowed, narrowed.trainer(), base, {}, x, y, TrainSettings(epochs=1, batch_size=8))
        assert set(stats) <= set(res.local) and not set(stats) & set(res.shared)
        assert not np.array_equal(res.local[stats[0]], narrowed.init[stats[0]])  # trained, and kept
        with pytest.raises(P.MethodError, match="which the server does not ask for"):
            setup.with_shared(setup.split.shared[1:] if not setup.split.shared[0].endswith("mean")
                              else setup.split.shared[:-1])
        with pytest.raises(P.MethodError, match="does not share"):
            setup.with_shared((*setup.split.shared, "personal/x"))
