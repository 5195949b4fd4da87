import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fedpers.nn import DataError, LayerSpec, ModelSpec, Trainer, WeightError, load_ini
from fedpers.nn.layers.dropout import DropoutState
from fedpers.nn.layers.kernels import numba_available

from tests import nets
from tests.probes import modules_after, open_files_under

MODELS = Path(__file__).resolve().parent.parent / "common" / "models"


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    p = np.random.default_rng(0).permutation(len(x))
    tr, te = p[: int(0.8 * len(x))], p[int(0.8 * len(x)) :]
    return x[tr], d.target[tr], x[te], d.target[te]


def test_digits_cnn_reaches_95_percent(digits):
    x, y, xt, yt = digits
    t = Trainer(load_ini(MODELS / "digits_cnn.ini"), seed=0)
    t.fit(x, y, epochs=10, seed=0)
    assert t.evaluate(xt, yt).accuracy >= 0.95
    probs = t.predict(xt[:7])
    assert probs.shape == (7, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_weights_round_trip_through_npz(tmp_path):
    spec = nets.mlp()
    a = Trainer(spec, seed=1)
    a.save_weights(str(tmp_path / "w.npz"))
    b = Trainer(spec, seed=2)
    b.load_weights(str(tmp_path / "w.npz"))
    wa, wb = a.get_weights(), b.get_weights()
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert set(np.load(tmp_path / "w.npz").files) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
                                                      "out.weight", "out.bias"}
    assert wa["fc1.weight"].shape == (12, 16)  # (in_features, out_features)


def test_set_weights_names_what_is_wrong():
    t = Trainer(nets.mlp())
    w = t.get_weights()
    with pytest.raises(WeightError, match="missing: out.bias"):
        t.set_weights({k: v for k, v in w.items() if k != "out.bias"})
    with pytest.raises(WeightError, match="unknown: nope"):
        t.set_weights({**w, "nope": np.zeros(3)})
    with pytest.raises(WeightError, match=r"wrong shape: fc1.weight \(3, 3\)"):
        t.set_weights({**w, "fc1.weight": np.zeros((3, 3))})
    t.set_weights({"out.bias": np.ones(4)}, strict=False)
    assert np.array_equal(t.get_weights()["out.bias"], np.ones(4))


def test_bad_data_is_refused():
    t = Trainer(nets.mlp())
    with pytest.raises(DataError, match="input is 1:1:12"):
        t.fit(np.zeros((8, 5), np.float32), np.zeros(8, np.int64))
    with pytest.raises(DataError, match="labels must be in"):
        t.fit(np.zeros((8, 12), np.float32), np.full(8, 9))
    with pytest.raises(DataError, match="integer class labels"):
        t.fit(np.zeros((8, 12), np.float32), np.zeros(8, np.float32))


def test_adam_step_matches_a_hand_computation():
    x = np.random.default_rng(0).standard_normal((4, 12)).astype(np.float32)
    y = np.array([0, 1, 2, 3])
    # the gradient at the initial weights, from one plain SGD step of the same net (w1 = w0 - lr g)
    sgd_spec = nets.mlp(opt="sgd")
    sgd = Trainer(sgd_spec, seed=0)
    before = sgd.get_weights()
    sgd.fit(x, y, epochs=1, batch_size=4, shuffle=False)
    grads = {k: (before[k] - w) / sgd_spec.optimizer.learning_rate for k, w in sgd.get_weights().items()}
    spec = nets.mlp(opt="adam")
    t = Trainer(spec, seed=0)
    assert all(np.array_equal(before[k], w) for k, w in t.get_weights().items())  # same initial weights
    t.fit(x, y, epochs=1, batch_size=4, shuffle=False)
    after = t.get_weights()
    # Adam's first step: m = (1-b1) g, v = (1-b2) g^2, bias-corrected to g and g^2: w1 = w0 - lr g / (|g| + eps)
    o = spec.optimizer
    assert set(after) == set(grads) and len(after) == 6
    for k, g in grads.items():
        want = before[k] - o.learning_rate * g / (np.abs(g) + o.epsilon)
        np.testing.assert_allclose(after[k], want, rtol=1e-4, atol=1e-6, err_msg=k)
        moved = np.abs(g) > 1e-4  # every weight with a real gradient moved by ~lr, against its gradient's sign
        assert moved.any(), k
        step = after[k] - before[k]
        assert np.all(np.sign(step[moved]) == -np.sign(g[moved])), k
        np.testing.assert_allclose(np.abs(step[moved]), o.learning_rate, rtol=1e-2, err_msg=k)


def run_cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "fedpers.client", *args], capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def digits_file(digits, tmp_path_factory):
    x, y, xt, yt = digits
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, x=x[:256], y=y[:256], x_test=xt[:64], y_test=yt[:64])
    return path


def _dropout_net() -> ModelSpec:
    return ModelSpec(
        layers=(
            LayerSpec("in", "input", input_shape=(1, 1, 12)),
            LayerSpec("fc", "fully_connected", unit=16, activation="relu"),
            LayerSpec("drop", "dropout", dropout_rate=0.3),
            LayerSpec("out", "fully_connected", unit=4),
        ),
        batch_size=8,
    )


def test_run_records_are_typed_shared_and_reused():
    """One Feed per compiled graph (every context holds the same object, fit reuses it); a node's
    LayerState is shared by its steps; a misspelled field is an AttributeError, not a new key."""
    t = Trainer(_dropout_net(), seed=0)
    c = t.compile(8)
    assert {id(run.feed) for per in c.contexts for run in per.values()} == {id(c.feed)}
    with pytest.raises(AttributeError):
        c.feed.batch_x = np.zeros(3)  # the old string key
    di = next(i for i, n in enumerate(c.nodes) if n.layer.kind == "dropout")
    state = c.contexts[di]["forward"].state
    assert isinstance(state, DropoutState) and state is c.contexts[di]["calc_deriv"].state
    with pytest.raises(AttributeError):
        state.actve = True
    assert all(per["forward"].state is None for n, per in zip(c.nodes, c.contexts, strict=True) if n is not c.nodes[di])
    feed = c.feed
    x = np.random.default_rng(0).standard_normal((32, 1, 1, 12)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 4, 32)
    t.fit(x, y, epochs=1, batch_size=8)
    assert t.compile(8).feed is feed and feed.y.shape == (8,) and feed.loss_sum > 0
    assert state.active  # the last training forward applied a mask


@pytest.mark.parametrize("kernels", ["numpy", pytest.param("numba", marks=pytest.mark.skipif(
    not numba_available(), reason="numba is not installed"))])
def test_a_model_imports_only_the_layer_modules_it_uses(kernels):
    """Training an all-fully_connected model loads no conv, pooling, batch-norm or dropout kernels (of
    either backend), and the numpy backend loads no numba at all."""
    mods = modules_after(
        "import numpy as np, fedpers.models as models\n"
        "from fedpers.nn import Trainer, load_ini\n"
        f"t = Trainer(load_ini(models.path('mlp.ini')), kernels={kernels!r})\n"
        "t.fit(np.zeros((4, 1, 1, 784), np.float32), np.zeros(4, np.int64), epochs=1, batch_size=2)"
    )
    assert {"fedpers.nn.trainer", "fedpers.nn.layers.fully_connected"} <= mods
    assert ("numba" in mods) == (kernels == "numba") and ("llvmlite" in mods) == (kernels == "numba")
    unused = {f"fedpers.nn.{pkg}.{m}" for pkg in ("layers", "jit")
              for m in ("conv2d", "pooling2d", "batch_normalization", "dropout", "addition")}
    assert not unused & mods, sorted(unused & mods)


def test_cli_train_json(digits_file, tmp_path):
    out = tmp_path / "w.npz"
    proc = run_cli("train", str(MODELS / "digits_cnn.ini"), "--data", str(digits_file), "--epochs", "2",
                   "--batch", "32", "--no-shuffle", "--json", "--save-weights", str(out))
    rep = json.loads(proc.stdout)
    assert rep["steps"] == 16 and 0 <= rep["accuracy"] <= 1 and rep["step_seconds"] > 0
    mem = rep["memory"]
    for key in ("naive_bytes", "arena_bytes", "lower_bound_bytes", "weights_bytes", "optimizer_bytes",
                "swap_out_bytes", "swap_in_bytes", "swap_wait_seconds", "rss_baseline_bytes", "rss_peak_bytes"):
        assert key in mem
    assert mem["arena_bytes"] <= mem["naive_bytes"]
    assert mem["rss_peak_bytes"] >= mem["rss_baseline_bytes"] > 0
    assert out.exists() and "conv1.weight" in np.load(out).files
    again = run_cli("train", str(MODELS / "digits_cnn.ini"), "--data", str(digits_file), "--epochs", "2",
                    "--batch", "32", "--no-shuffle", "--json", "--memory", "swap", "--lookahead", "1")
    assert json.loads(again.stdout)["loss"] == pytest.approx(rep["loss"], rel=1e-6)
    assert json.loads(again.stdout)["memory"]["swap_out_bytes"] > 0


def test_cli_train_refuses_bad_data_with_exit_2(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 3, 3), np.float32), y=np.zeros(4, np.int64))
    proc = run_cli("train", str(MODELS / "digits_cnn.ini"), "--data", str(bad), check=False)
    assert proc.returncode == 2 and "shape" in proc.stderr
    wrong_key = tmp_path / "wrong.npz"
    np.savez(wrong_key, features=np.zeros((4, 1, 8, 8), np.float32), y=np.zeros(4, np.int64))
    proc = run_cli("train", str(MODELS / "digits_cnn.ini"), "--data", str(wrong_key), check=False)
    assert proc.returncode == 2 and "'x'" in proc.stderr


def test_cli_budget_too_small_exit_2(digits_file):
    proc = run_cli("train", str(MODELS / "digits_cnn.ini"), "--data", str(digits_file), "--memory-budget", "2KiB",
                   check=False)
    assert proc.returncode == 2 and "raise the budget to at least" in proc.stderr


def test_cli_plan_table_json_and_png(tmp_path):
    proc = run_cli("plan", str(MODELS / "digits_cnn.ini"), "--batch", "16", "--json")
    plan = json.loads(proc.stdout)
    tot = plan["totals"]
    assert tot["arena_bytes"] <= tot["naive_bytes"] and tot["lower_bound_bytes"] <= tot["arena_bytes"]
    assert any(r["name"] == "conv1.weight" for r in plan["tensors"])
    png = tmp_path / "plan.png"
    text = run_cli("plan", str(MODELS / "digits_cnn.ini"), "--memory", "swap", "--png", str(png)).stdout
    assert "arena_bytes" in text and "lower_bound_bytes" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_train_saves_to_the_models_save_path(digits_file, tmp_path):
    target = tmp_path / "out" / "trained.npz"
    text = (MODELS / "digits_cnn.ini").read_text().replace("batch_size = 32", f"batch_size = 32\nSave_Path = {target}")
    model = tmp_path / "model.ini"
    model.write_text(text)
    run_cli("train", str(model), "--data", str(digits_file), "--epochs", "1")
    saved = np.load(target)
    assert "output.weight" in saved.files and saved["output.weight"].shape == (64, 10)
    assert [p.name for p in target.parent.iterdir()] == ["trained.npz"]  # no temp file left behind


def test_cli_train_ctrl_c_exits_130_with_its_swap_file_already_unlinked(digits_file, tmp_path):
    import signal
    import time

    swap = tmp_path / "swap"
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedpers.client", "train", str(MODELS / "digits_cnn.ini"),
             "--data", str(digits_file), "--epochs", "100000", "--memory", "swap", "--lookahead", "1",
             "--swap-dir", str(swap)],
            stderr=err_file, stdout=subprocess.DEVNULL, text=True)
    try:
        # training has started once the process holds its swap file open
        deadline = time.monotonic() + 120
        held: list[str] = []
        while not held and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            held = open_files_under(swap, proc.pid)
        time.sleep(0.3)  # inside the epoch loop by now
        # while training: one swap file open, already unlinked (so no exit path can leave it behind)
        held = open_files_under(swap, proc.pid)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    err = err_path.read_text()
    assert proc.returncode == 130 and "interrupted" in err
    assert len(held) == 1 and held[0].endswith("(deleted)"), held


def test_cli_train_init_weights_names_what_is_missing_or_misshaped(digits_file, tmp_path):
    w = Trainer(load_ini(MODELS / "digits_cnn.ini")).get_weights()
    bad = tmp_path / "bad.npz"
    w.pop("conv1.bias")
    w["fc1.weight"] = np.zeros((3, 3), np.float32)
    np.savez(bad, **w)
    proc = run_cli("train", str(MODELS / "digits_cnn.ini"), "--data", str(digits_file), "--init-weights", str(bad),
                   check=False)
    assert proc.returncode == 2
    assert "missing: conv1.bias" in proc.stderr and "wrong shape: fc1.weight (3, 3)" in proc.stderr


def test_zero_epochs_batch_or_rate_is_refused_not_replaced_by_the_default():
    t = Trainer(nets.mlp(), seed=0)
    x, y = np.zeros((8, 12), np.float32), np.zeros(8, np.int64)
    for kw in ({"epochs": 0}, {"batch_size": 0}, {"learning_rate": 0.0}):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be > 0"):
            t.fit(x, y, **kw)


def test_cli_train_says_when_it_holds_out_a_test_split(digits, tmp_path):
    x, y, _, _ = digits
    path = tmp_path / "no_test.npz"
    np.savez(path, x=x[:100], y=y[:100])
    proc = run_cli("train", str(MODELS / "digits_cnn.ini"), "--data", str(path), "--epochs", "1", "--holdout",
                   "0.3", "--drop-last", "--json")
    assert "has no test split: holding out 30% (30 examples) as the test split" in proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["steps"] == 70 // 32  # 70 training examples, batch 32, the partial batch dropped
    bad = run_cli("train", str(MODELS / "digits_cnn.ini"), "--data", str(path), "--holdout", "1", check=False)
    assert bad.returncode == 2 and "argument --holdout" in bad.stderr
def test_freed_weight_sized_buffers_go_back_to_the_system():
    """With the trainer's heap setting, freeing a few weight-sized arrays returns their pages (glibc's
    default keeps them in the heap once its mmap threshold has grown), and the baseline is trimmed."""
    code = textwrap.dedent("""
        import numpy as np
        from fedpers.nn import rss
        assert rss.steady_heap()
        start = rss.rss_bytes()
        for _ in range(3):
            blocks = [np.ones(2_000_000, np.float32) for _ in range(4)]  # 8 MB each
            del blocks
        rss.trim_heap()
        print(rss.rss_bytes() - start)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) < 4 << 20


def test_evaluation_runs_in_training_micro_steps_and_fits_release_activations():
    """evaluate/predict default to a training micro-step's batch (no more activation memory than
    training); after a fit only the persistent tensors are kept in the arena."""
    spec = nets.mlp()
    x = np.random.default_rng(0).standard_normal((32, 1, 1, 12)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 4, 32)
    t = Trainer(spec, micro_batch=4)
    t.fit(x, y, epochs=1, batch_size=16, shuffle=False)
    before = t.get_weights()
    t.evaluate(x, y)
    assert set(t._infer) == {4}
    c = t.compile(16)
    kept = c.kept_between_fits()
    assert sum(n for _, n in kept) == sum(ti.nbytes for ti in c.tensors if ti.pinned)
    after = t.get_weights()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    np.testing.assert_allclose(t.predict(x), t.predict(x, batch_size=32), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["xavier_uniform", "he_uniform", "xavier_normal", "he_normal"])
def test_initial_weights_are_one_big_draw_rounded_chunk_by_chunk(init):
    """initialize() draws in chunks (bounded float64 temporaries) and gets the values of one draw."""
    from fedpers.nn.init import CHUNK, initialize
    from fedpers.nn.layers.base import WeightRequest

    req = WeightRequest("w", (3, CHUNK + 11), init, True, fan_in=40, fan_out=30)
    got = initialize(np.random.default_rng(4), req)
    rng = np.random.default_rng(4)
    scale = {"xavier_uniform": np.sqrt(6 / 70), "he_uniform": np.sqrt(6 / 40),
             "xavier_normal": np.sqrt(2 / 70), "he_normal": np.sqrt(2 / 40)}[init]
    ref = rng.uniform(-scale, scale, req.shape) if init.endswith("uniform") else rng.standard_normal(req.shape) * scale
    np.testing.assert_array_equal(got, ref.astype(np.float32))


def test_a_trainer_draws_its_initial_weights_only_when_they_are_needed():
    """Before its first plan a Trainer holds no weights: they are drawn a layer at a time when read
    or planned (so a model's initial weights are never all in memory at once), with the values of
    init_weights."""
    from fedpers.nn import init_weights

    spec = nets.cnn(batch_norm=True)
    t = Trainer(spec, seed=5)
    assert t._store.arrays == {}
    ref = init_weights(spec, seed=5)
    got = t.get_weights()
    assert t._store.arrays == {} and got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
    t.compile(4)
    for k, v in t.get_weights().items():
        np.testing.assert_array_equal(v, ref[k])
