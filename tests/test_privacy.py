"""Differential privacy: device-side clipping + Gaussian noise, and epsilon from dp-accounting."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from fedpers import privacy, wire
from fedpers.client.privacy import clip_and_noise, privatize_weights
from fedpers.server.config import ConfigError, ServerConfig
from fedpers.server.model import layout_from_specs
from fedpers.server.rounds import Coordinator

from tests.server_helpers import FakeSpec, header, join_device, make_coordinator, random_delta, update_blob


def test_clip_scales_the_whole_delta_to_the_norm() -> None:
    d = {"a": np.full(100, 3.0, np.float32), "b": np.full(44, -4.0, np.float32)}
    out = clip_and_noise(d, clip_norm=2.0, noise_multiplier=0.0)
    norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in out.values()))
    assert norm == pytest.approx(2.0, rel=1e-6)
    np.testing.assert_allclose(out["a"] / out["a"][0], 1.0)  # the direction is kept
    small = {"a": np.full(4, 0.1, np.float32)}
    np.testing.assert_array_equal(clip_and_noise(small, 5.0, 0.0)["a"], small["a"])  # inside: unchanged


def test_noise_has_the_stated_std_and_is_not_reproducible() -> None:
    d = {"w": np.zeros(200_000, np.float32)}
    a = clip_and_noise(d, clip_norm=0.5, noise_multiplier=2.0)["w"]
    b = clip_and_noise(d, clip_norm=0.5, noise_multiplier=2.0)["w"]
    assert a.dtype == np.float32 and float(np.std(a)) == pytest.approx(1.0, rel=0.02)
    assert not np.array_equal(a, b)  # OS entropy: the server cannot regenerate and subtract it


def test_privatize_weights_changes_only_shared_tensors() -> None:
    base = {"s": np.ones(3, np.float32), "p": np.zeros(2, np.float32)}
    trained = {"s": np.full(3, 11.0, np.float32), "p": np.ones(2, np.float32)}
    out = privatize_weights(trained, base, ["s"], clip_norm=1.0, noise_multiplier=0.0)
    assert np.linalg.norm(out["s"] - base["s"]) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_array_equal(out["p"], trained["p"])


def test_epsilon_comes_from_dp_accounting_and_behaves() -> None:
    import dp_accounting

    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(1.5), 7)
    assert privacy.epsilon(1.5, 7, 1e-5) == pytest.approx(acc.get_epsilon(1e-5))
    assert privacy.epsilon(1.0, 10, 1e-5) > privacy.epsilon(1.0, 5, 1e-5) > 0
    assert privacy.epsilon(2.0, 10, 1e-5) < privacy.epsilon(1.0, 10, 1e-5)
    assert privacy.epsilon(0.0, 3, 1e-5) == math.inf and privacy.epsilon(1.0, 0, 1e-5) == 0.0
    assert privacy.epsilon_of([1.0] * 4, 1e-5) == pytest.approx(privacy.epsilon(1.0, 4, 1e-5))
    mixed = privacy.epsilon_of([1.0, 2.0, 2.0], 1e-5)
    assert privacy.epsilon(2.0, 3, 1e-5) < mixed < privacy.epsilon(1.0, 3, 1e-5)


def test_dp_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(privacy.PrivacyError, match="dp_noise needs dp_clip"):
        privacy.DPConfig(clip_norm=0.0, noise_multiplier=1.0)
    with pytest.raises(privacy.PrivacyError, match="dp_delta"):
        privacy.DPConfig(clip_norm=1.0, delta=2.0)
    from fedpers import models
    from fedpers.server.app import build_coordinator

    cnn = models.path("digits_cnn_personal.ini")  # has batch norm
    with pytest.raises(ConfigError, match="--bn-stats local"):
        build_coordinator(ServerConfig(model=cnn, store=tmp_path / "a", dp_clip=1.0, dp_noise=1.0, insecure=True))
    c = build_coordinator(ServerConfig(model=cnn, store=tmp_path / "b", dp_clip=1.0, dp_noise=1.0, bn_stats="local",
                                       insecure=True))
    assert c.training.dp_clip_norm == 1.0 and not any("running" in k for k in c.layout.shared)
    c.state.close()


def test_each_closed_round_reports_the_epsilon_spent(tmp_path: Path) -> None:
    c: Coordinator = make_coordinator(tmp_path, min_devices=1, rounds=3)
    from dataclasses import replace

    c.training = replace(c.training, dp_clip_norm=1.0, dp_noise_multiplier=1.2, dp_delta=1e-5)
    a = join_device(c, "enroll-me", "d").device_id
    for seed in (1, 2):
        t = c.get_task(a)
        assert t.config.dp_clip_norm == 1.0 and t.config.dp_noise_multiplier == 1.2
        blob = update_blob(random_delta(seed))
        c.accept_update(a, header(t, blob), wire.chunk_blob(blob, 64))
    eps = [r.metrics["dp_epsilon"] for r in c.status().rounds]
    assert eps == pytest.approx([privacy.epsilon(1.2, 1, 1e-5), privacy.epsilon(1.2, 2, 1e-5)])


def test_local_batch_norm_statistics_are_neither_served_nor_shared() -> None:
    specs = {"bn.gamma": FakeSpec("bn.gamma", "bn", (3,), True, False),
             "bn.running_mean": FakeSpec("bn.running_mean", "bn", (3,), True, False),
             "bn.running_var": FakeSpec("bn.running_var", "bn", (3,), True, False)}
    shared = layout_from_specs("", specs)
    assert shared.shared == ("bn.gamma", "bn.running_mean", "bn.running_var")
    local = layout_from_specs("", specs, local_stats=True)
    assert local.shared == ("bn.gamma",) and set(local.shapes) == {"bn.gamma"}


def test_the_default_norm_bound_makes_room_for_dp_noise(tmp_path: Path) -> None:
    from fedpers.server import guard

    c = make_coordinator(tmp_path / "a", min_devices=1)
    plain = c.norm_bound
    from fedpers.server import aggregate as ag
    from fedpers.server import state as st
    from fedpers.server.rounds import Coordinator, RoundPolicy
    from fedpers.store import ModelStore

    from tests.server_helpers import LAYOUT, Clock, initial_weights

    dp = Coordinator(state=st.MemoryState(), store=ModelStore(tmp_path / "b"), layout=LAYOUT,
                     initial_weights=initial_weights(), aggregator=ag.WeightedMean(),
                     optimizer=ag.make_optimizer("fedavg"), policy=RoundPolicy(min_devices=1),
                     training=wire.TrainingConfig(dp_clip_norm=10.0, dp_noise_multiplier=4.0), clock=Clock())
    assert dp.norm_bound == pytest.approx(guard.dp_norm_bound(10.0, 4.0, LAYOUT.shared_params))
    assert dp.norm_bound > plain
    rng = np.random.default_rng(0)
    noised = clip_and_noise({k: rng.standard_normal(s).astype(np.float32) for k, s in LAYOUT.shared_shapes.items()},
                            10.0, 4.0)
    norm = float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in noised.values())))
    assert norm < dp.norm_bound
