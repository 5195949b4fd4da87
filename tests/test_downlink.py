"""Little bandwidth down: versions published as old + compressed step, rebuilt by devices bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from fedpers import codec, wire
from fedpers.modelsteps import apply_steps, rebuilt_matches
from fedpers.server.downlink import RESIDUAL, STEP, Downlink
from fedpers.store import ModelStore

SHAPES = {"fc.weight": (64, 32), "fc.bias": (32,), "bn.running_var": (32,)}


def _weights(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
    out["bn.running_var"] = np.abs(out["bn.running_var"]) + np.float32(0.1)
    return out


def _publish_chain(dl: Downlink, store: ModelStore, n: int) -> list[dict[str, np.ndarray]]:
    """Versions 0..n: each the optimizer's target (a random walk) published through the downlink."""
    published = [_weights(0)]
    store.save_version(0, published[0])
    target = dict(published[0])
    for v in range(1, n + 1):
        target = {k: w + (0.05 * np.random.default_rng(v).standard_normal(w.shape)).astype(np.float32)
                  for k, w in target.items()}
        target["bn.running_var"] = np.abs(target["bn.running_var"])
        new, extra = dl.publish(v, published[-1], target)
        store.save_version(v, new, extra=extra)
        published.append(new)
    return published


def test_a_device_rebuilds_every_version_bit_for_bit(tmp_path) -> None:
    dl = Downlink(codec.parse_codec("int4+zstd"), max_steps=4)
    store = ModelStore(tmp_path)
    versions = _publish_chain(dl, store, 6)
    for have in range(6):
        for version in range(have + 1, 7):
            full = wire.arrays_to_blob(versions[version])
            blob = dl.steps_blob(store, have, version, full)
            if version - have > 4:
                assert blob is None  # too far back: the device gets the weights
                continue
            steps = wire.model_steps_from_blob(blob)
            rebuilt = apply_steps(versions[have], steps)
            assert rebuilt_matches(rebuilt, steps)
            for k in SHAPES:
                np.testing.assert_array_equal(rebuilt[k], versions[version][k])  # bit for bit
            assert len(blob) < len(full) / 4 * (version - have)  # int4 + zstd steps are small
    assert float(versions[-1]["bn.running_var"].min()) >= 0
    assert all(codec.codec_for(k, dl.codec).name == "fp32" for k in ("bn.running_var",))


def test_error_feedback_keeps_the_published_model_close_to_the_optimizers(tmp_path) -> None:
    """The server's optimizer steps from the published model; what a lossy step leaves out is carried into
    the next, so the published model stays within one carried rest of every step applied exactly."""
    lossy = Downlink(codec.parse_codec("int4"))
    published = _weights(0)
    ideal = {k: w.astype(np.float64) for k, w in published.items()}  # every intended step, exactly
    for v in range(1, 31):
        intended = {k: np.float32(0.01) * np.sign(np.random.default_rng(v).standard_normal(w.shape)).astype(np.float32)
                    for k, w in published.items() if k != "bn.running_var"}
        target = {k: published[k] + d for k, d in intended.items()}
        published, _ = lossy.publish(v, {k: published[k] for k in intended}, target)
        for k, d in intended.items():
            ideal[k] += d
        np.testing.assert_allclose(ideal["fc.weight"] - published["fc.weight"], lossy.residual["fc.weight"],
                                   atol=1e-5)
    gap = float(np.abs(ideal["fc.weight"] - published["fc.weight"]).max())
    assert gap < 0.02  # 30 steps of 0.01 in int4 codes: never more than about one step behind


def test_a_restart_continues_with_the_stored_rest(tmp_path) -> None:
    store = ModelStore(tmp_path)
    dl = Downlink(codec.parse_codec("int8"))
    versions = _publish_chain(dl, store, 3)
    restarted = Downlink(codec.parse_codec("int8"))
    restarted.load(store.load_version(3).extra)
    for k in SHAPES:
        np.testing.assert_array_equal(restarted.residual[k], dl.residual[k])
    target = {k: w + np.float32(0.1) for k, w in versions[3].items()}
    a, _ = dl.publish(4, versions[3], target)
    b, _ = restarted.publish(4, versions[3], target)
    for k in SHAPES:
        np.testing.assert_array_equal(a[k], b[k])
    assert STEP in store.load_version(3).extra and any(k.startswith(RESIDUAL) for k in store.load_version(3).extra)


def test_without_a_codec_versions_are_exact_and_downloads_whole(tmp_path) -> None:
    dl = Downlink(None)
    new, extra = dl.publish(1, _weights(0), _weights(1))
    assert extra == {} and all(np.array_equal(new[k], _weights(1)[k]) for k in SHAPES)
    assert dl.steps_blob(ModelStore(tmp_path), 0, 1, b"") is None


def test_a_step_that_does_not_fit_the_held_model_is_refused() -> None:
    held = _weights(0)
    bad = wire.ModelSteps(0, 1, ((wire.array_to_wire("other.weight", np.zeros(3, np.float32)),),), b"")
    with pytest.raises(wire.MalformedMessage, match="other.weight"):
        apply_steps(held, bad)
    with pytest.raises(wire.MalformedMessage, match="do not add up"):
        wire.model_steps_from_blob(wire.model_steps_to_blob(wire.ModelSteps(2, 1, (), b"")))


@pytest.mark.slow
def test_devices_download_only_steps_over_grpc(tmp_path) -> None:
    """A simulated federation with a downlink codec: after their first model, devices download steps,
    every rebuilt version matches the server's bit for bit, and they receive several times fewer bytes."""
    from pathlib import Path

    from fedpers.client import sim

    model = Path(__file__).parent / "data" / "digits_mlp_personal.ini"
    runs = {}
    for downlink in ("none", "int4+zstd"):
        runs[downlink] = sim.simulate(sim.SimConfig(devices=3, rounds=3, local_epochs=1, model=model, seed=5,
                                                    min_devices=3, downlink_codec=downlink, keep_work=True,
                                                    report_dir=tmp_path / downlink, quiet=True))
    logs = "".join(p.read_text() for p in (tmp_path / "int4+zstd" / "work" / "logs").glob("device-*.log"))
    assert logs.count("compressed step(s)") >= 3 * 3  # rounds 2, 3 and the final model, per device
    assert "does not match the server's" not in logs
    down = {k: r.summary.bytes_down for k, r in runs.items()}
    assert down["int4+zstd"] < down["none"] / 2, down
    assert runs["int4+zstd"].summary.version == runs["none"].summary.version == 3
