"""Aggregators and server optimizers against hand computations with plain numpy."""

import numpy as np
import pytest
from fedpers.server import aggregate as ag


def _deltas(seed: int, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
            for _ in range(n)]


BASE = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}


def test_weighted_mean_matches_numpy() -> None:
    deltas, weights = _deltas(0, 5), [10, 1, 30, 7, 2]
    agg = ag.WeightedMean()
    agg.start(1, BASE)
    for d, w in zip(deltas, weights, strict=True):
        agg.add(d, w)
    got = agg.result()
    for k in BASE:
        want = sum(w * d[k].astype(np.float64) for d, w in zip(deltas, weights, strict=True)) / sum(weights)
        np.testing.assert_allclose(got[k], want, rtol=1e-6)
        assert got[k].dtype == np.float32
    assert agg.count == 5 and agg.total_weight == 50


def test_running_sum_memory_does_not_grow_with_updates() -> None:
    agg = ag.WeightedMean()
    agg.start(1, BASE)
    for d in _deltas(1, 20):
        agg.add(d, 1)
    assert set(agg._sums) == {"w", "b"} and agg._sums["w"].shape == (3, 4)


def test_empty_round_has_no_result_and_start_resets() -> None:
    agg = ag.WeightedMean()
    agg.start(1, BASE)
    assert agg.result() is None
    agg.add(_deltas(2, 1)[0], 3)
    agg.start(2, BASE)
    assert agg.result() is None and agg.round_id == 2


def test_clipped_mean_matches_numpy() -> None:
    deltas, weights, bound = _deltas(3, 4), [1, 2, 3, 4], 2.0
    deltas[0] = {k: v * 100 for k, v in deltas[0].items()}  # far above the bound
    agg = ag.ClippedMean(bound)
    agg.start(1, BASE)
    for d, w in zip(deltas, weights, strict=True):
        agg.add(d, w)
    got = agg.result()
    clipped = []
    for d in deltas:
        norm = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in d.values()))
        clipped.append({k: v * min(1.0, bound / norm) for k, v in d.items()})
    for k in BASE:
        want = sum(w * c[k] for c, w in zip(clipped, weights, strict=True)) / sum(weights)
        np.testing.assert_allclose(got[k], want, rtol=1e-5)


def test_aggregator_refuses_mismatched_delta_without_changing_sums() -> None:
    agg = ag.WeightedMean()
    agg.start(1, BASE)
    good = _deltas(4, 1)[0]
    agg.add(good, 2)
    before = {k: v.copy() for k, v in agg._sums.items()}
    with pytest.raises(ag.AggregationError, match="differ"):
        agg.add({"w": good["w"]}, 1)
    with pytest.raises(ag.AggregationError, match="shape"):
        agg.add({"w": good["w"], "b": np.zeros(5, np.float32)}, 1)
    with pytest.raises(ag.AggregationError, match="weight"):
        agg.add(good, 0)
    with pytest.raises(ag.AggregationError, match="weight"):
        agg.add(good, float("nan"))
    for k in before:
        np.testing.assert_array_equal(agg._sums[k], before[k])
    assert agg.count == 1
    with pytest.raises(ag.AggregationError, match="before start"):
        ag.WeightedMean().add(good, 1)


def test_fedavg_step() -> None:
    base, d = _deltas(5, 1)[0], _deltas(6, 1)[0]
    got = ag.FedAvg(lr=0.5).step(base, d)
    for k in base:
        np.testing.assert_allclose(got[k], base[k] + 0.5 * d[k], rtol=1e-6)
    np.testing.assert_allclose(ag.FedAvg().step(base, d)["w"], base["w"] + d["w"], rtol=1e-6)


def test_fedavgm_two_steps_and_state_round_trip() -> None:
    base, d1, d2 = _deltas(7, 1)[0], _deltas(8, 1)[0], _deltas(9, 1)[0]
    opt = ag.FedAvgM(lr=1.0, beta=0.9)
    b1 = opt.step(base, d1)
    for k in base:
        np.testing.assert_allclose(b1[k], base[k] + d1[k], rtol=1e-6)
    restarted = ag.FedAvgM(lr=1.0, beta=0.9)
    restarted.load_state(opt.state())
    b2 = restarted.step(b1, d2)
    for k in base:
        m = 0.9 * d1[k] + d2[k]
        np.testing.assert_allclose(b2[k], b1[k] + m, rtol=1e-5)


def test_fedadam_step_against_hand_computation() -> None:
    base, d1, d2 = _deltas(10, 1)[0], _deltas(11, 1)[0], _deltas(12, 1)[0]
    lr, b1, b2, tau = 0.01, 0.9, 0.99, 1e-3
    opt = ag.FedAdam()
    assert (opt.lr, opt.beta1, opt.beta2, opt.tau) == (lr, b1, b2, tau)
    new1 = opt.step(base, d1)
    restarted = ag.FedAdam()
    restarted.load_state(opt.state())
    new2 = restarted.step(new1, d2)
    for k in base:
        m = (1 - b1) * d1[k].astype(np.float64)
        v = (1 - b2) * d1[k].astype(np.float64) ** 2
        want1 = base[k] + lr * (m / (1 - b1)) / (np.sqrt(v / (1 - b2)) + tau)
        np.testing.assert_allclose(new1[k], want1, rtol=1e-5, atol=1e-7)
        m = b1 * m + (1 - b1) * d2[k]
        v = b2 * v + (1 - b2) * d2[k].astype(np.float64) ** 2
        want2 = new1[k] + lr * (m / (1 - b1**2)) / (np.sqrt(v / (1 - b2**2)) + tau)
        np.testing.assert_allclose(new2[k], want2, rtol=1e-5, atol=1e-7)
    assert int(restarted.state()["t"]) == 2


def test_factories() -> None:
    assert isinstance(ag.make_optimizer("fedavg"), ag.FedAvg)
    assert ag.make_optimizer("fedavgm", 0.5).lr == 0.5
    assert ag.make_optimizer("fedadam").lr == 0.01
    with pytest.raises(ValueError, match="unknown strategy"):
        ag.make_optimizer("sgd")
    assert isinstance(ag.make_aggregator(None), ag.WeightedMean)
    assert isinstance(ag.make_aggregator(1.5), ag.ClippedMean)
    with pytest.raises(ValueError):
        ag.ClippedMean(0)


def test_global_norm() -> None:
    assert ag.global_norm({"a": np.array([3.0], np.float32), "b": np.array([[4.0]], np.float32)}) == 5.0


def test_strategy_names_agree_between_common_and_the_server() -> None:
    from fedpers.strategies import STRATEGIES

    assert list(ag.OPTIMIZERS) == list(STRATEGIES)
    for name in STRATEGIES:
        assert ag.make_optimizer(name).name == name
