"""Every memory mode computes the same numbers; swap cleans up; budgets choose or refuse."""

import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from fedpers.nn import BudgetError, Trainer, compile
from fedpers.nn.budget import BASELINE_SLACK_BYTES
from fedpers.nn.layers.kernels import numba_available

from tests import nets
from tests.probes import modules_after, open_files_under


def data_for(spec, n=40, seed=0):
    rng = np.random.default_rng(seed)
    shape = spec.layers[0].input_shape
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    classes = {"cross": None}.get(spec.loss)
    out = spec.layers[-1].unit or 5
    y = rng.integers(0, out, n) if classes is None else None
    return x, y


def train(spec, mode, micro=1, steps=20, batch=8, lookahead=2, kernels="numpy"):
    x, y = data_for(spec)
    t = Trainer(spec, memory=mode, micro_batch=micro, lookahead=lookahead, seed=3, kernels=kernels)
    per_epoch = len(x) // batch
    t.fit(x, y, epochs=steps // per_epoch, batch_size=batch, shuffle=False)
    return t


def assert_same_weights(a: Trainer, b: Trainer, rtol=1e-6):
    wa, wb = a.get_weights(), b.get_weights()
    assert wa.keys() == wb.keys()
    for k in wa:
        scale = max(np.abs(wa[k]).max(), 1e-12)
        assert np.abs(wa[k] - wb[k]).max() / scale <= rtol, k


NETS = {
    "mlp": lambda: nets.mlp(),
    "cnn_bn": lambda: nets.cnn(batch_norm=True, stride=2),
    "residual": nets.residual,
    "partly_frozen": lambda: nets.cnn(batch_norm=False, frozen=("c1", "c2")),
    "frozen_middle": lambda: nets.mlp(frozen=("fc2",)),
}


@pytest.mark.parametrize("net", sorted(NETS))
def test_planned_and_swap_equal_naive(net):
    spec = NETS[net]()
    naive = train(spec, "naive")
    changed = naive.get_weights()
    fresh = Trainer(spec, seed=3).get_weights()
    assert any(not np.array_equal(changed[k], fresh[k]) for k in fresh), "training changed nothing"
    for mode in ("planned", "swap"):
        assert_same_weights(naive, train(spec, mode))


BACKEND_NETS = {**NETS, "cnn_bn": lambda: nets.cnn(batch_norm=False, stride=2)}


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
@pytest.mark.parametrize("net", sorted(BACKEND_NETS))
def test_numba_kernels_train_the_weights_the_numpy_ones_do(net):
    """The two kernel backends differ only in rounding (summation order, fused vs separate ops).
    (Without batch norm: a conv bias in front of it has a zero gradient plus rounding noise.)"""
    spec = BACKEND_NETS[net]()
    reference = train(spec, "planned")
    assert_same_weights(reference, train(spec, "planned", kernels="numba"), rtol=2e-5)
    assert_same_weights(reference, train(spec, "swap", micro=2, kernels="numba"), rtol=2e-5)


@pytest.mark.parametrize("net", ["mlp", "residual", "partly_frozen"])
def test_micro_batches_equal_whole_batches_without_batch_norm(net):
    spec = NETS[net]()
    whole = train(spec, "planned")
    for micro in (2, 4):
        assert_same_weights(whole, train(spec, "planned", micro=micro), rtol=2e-5)
    assert_same_weights(whole, train(spec, "swap", micro=2), rtol=2e-5)


def test_planned_arena_is_smaller_and_near_the_lower_bound():
    spec = nets.cnn()
    naive = compile(spec, 16, mode="naive", allocate=False)
    planned = compile(spec, 16, mode="planned", allocate=False)
    swap = compile(spec, 16, mode="swap", lookahead=1, allocate=False)
    assert planned.plan.total < naive.plan.total
    assert planned.plan.total <= 1.05 * planned.lower_bound_bytes
    assert swap.plan.total <= planned.plan.total
    assert any(g.swapped for g in swap.groups)


def test_micro_batching_shrinks_the_activation_window():
    spec = nets.cnn(batch_norm=False)
    sizes = [compile(spec, 32, micro_batch=m, allocate=False).plan.total for m in (1, 2, 4)]
    assert sizes[0] > sizes[1] > sizes[2]


def test_frozen_prefix_saves_no_activation_or_gradient():
    spec = nets.cnn(batch_norm=False, frozen=("c1", "c2"))
    c = compile(spec, 8, allocate=False)
    names = {t.name for t in c.tensors}
    assert "c1.weight:grad" not in names and "c2.weight:grad" not in names
    assert "out.weight:grad" in names
    # nothing before `out` trains, so no derivative flows below it and conv outputs die in forward
    assert not any(t.role == "deriv" and t.name.startswith(("c1", "c2", "r1")) for t in c.tensors)
    n_fwd = len(c.nodes)
    for t in c.tensors:
        if t.name.startswith(("c1:", "c2:", "r1:")):
            assert max(t.touches) < n_fwd, t.name


def test_swap_moves_bytes_through_one_file_closed_after_fit(tmp_path):
    spec = nets.cnn(batch_norm=False)
    x, y = data_for(spec)
    t = Trainer(spec, memory="swap", lookahead=1, swap_dir=str(tmp_path), seed=0)
    held: list[list[str]] = []
    t.fit(x, y, epochs=1, batch_size=8, shuffle=False, progress=lambda *_: held.append(open_files_under(tmp_path)))
    rep = t.memory_report()
    assert rep.swap_out_bytes > 0 and rep.swap_in_bytes == rep.swap_out_bytes
    assert held and all(len(h) == 1 for h in held)  # one swap file, open for the whole fit
    assert open_files_under(tmp_path) == []


def test_swap_file_gone_after_an_exception_mid_epoch(tmp_path):
    spec = nets.mlp()
    x, y = data_for(spec)
    t = Trainer(spec, memory="swap", lookahead=1, swap_dir=str(tmp_path), seed=0)
    held: list[list[str]] = []

    def boom(step, total, loss, acc):
        assert list(tmp_path.iterdir()) == []  # unlinked while still in use
        held.append(open_files_under(tmp_path))
        if step == 2:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        t.fit(x, y, epochs=1, batch_size=8, progress=boom)
    assert len(held) == 2 and all(len(h) == 1 and h[0].endswith("(deleted)") for h in held)
    assert open_files_under(tmp_path) == []  # the exception still closed the swap file


def test_swap_file_gone_after_sigint(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, numpy as np, sys
        signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (a `&` job)
        sys.path.insert(0, {os.getcwd()!r})
        from tests import nets
        from fedpers.nn import Trainer
        spec = nets.mlp()
        x = np.random.default_rng(0).standard_normal((4000, 1, 1, 12)).astype(np.float32)
        y = np.random.default_rng(1).integers(0, 4, 4000)
        from tests.probes import modules_after, open_files_under
        t = Trainer(spec, memory="swap", lookahead=1, swap_dir={str(tmp_path)!r})
        def progress(step, total, loss, acc):
            if step == 5:
                print("training, swap files open:", len(open_files_under({str(tmp_path)!r})), flush=True)
                os.kill(os.getpid(), signal.SIGINT)
        try:
            t.fit(x, y, epochs=50, batch_size=8, progress=progress)
        finally:
            print("interrupted, swap files open:", len(open_files_under({str(tmp_path)!r})), flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    assert proc.stdout.splitlines() == ["training, swap files open: 1", "interrupted, swap files open: 0"]


BASELINE = 50 << 20  # the process RSS the budget tests pretend to measure


@pytest.fixture
def fixed_rss(monkeypatch):
    """A budget is for the process: these tests fix what the process holds, so the choice is exact."""
    from fedpers.nn import rss

    monkeypatch.setattr(rss, "rss_bytes", lambda: BASELINE)


def test_budget_picks_the_fastest_plan_predicted_to_fit(fixed_rss):
    from fedpers.nn.budget import predict_growth

    spec = nets.cnn(batch_norm=False)
    _, planned = predict_growth(spec, 16, "numpy", "planned", 1, 1, 2)
    t = Trainer(spec, memory_budget=BASELINE + planned, kernels="numpy")
    t.compile(16)
    assert (t.choice.mode, t.choice.micro_batch, t.choice.peak_bytes) == ("planned", 1, BASELINE + planned)
    t = Trainer(spec, memory_budget=BASELINE + planned - 64, kernels="numpy")
    t.compile(16)
    assert t.choice.mode.startswith("swap") or t.choice.micro_batch > 1
    assert t.choice.peak_bytes <= BASELINE + planned - 64
    assert t.memory_report().arena_bytes == t.choice.arena_bytes


def test_budget_below_the_minimum_names_the_smallest_and_trains_nothing(fixed_rss):
    spec = nets.cnn(batch_norm=False)
    x, y = data_for(spec)
    t = Trainer(spec, memory_budget="1KiB", kernels="numpy")
    before = t.get_weights()
    with pytest.raises(BudgetError, match=r"raise the budget to at least \d+MiB") as err:
        t.fit(x, y, epochs=1, batch_size=8)
    smallest = int(str(err.value).split("at least ")[1].split("MiB")[0])
    after = t.get_weights()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    ok = Trainer(spec, memory_budget=f"{smallest}MiB", kernels="numpy")
    ok.fit(x, y, epochs=1, batch_size=8)
    assert ok.choice.peak_bytes <= smallest << 20
    # tight but for the room left for the baseline's run-to-run variation: 1 MiB less than that fails
    below = smallest - BASELINE_SLACK_BYTES // (1 << 20) - 1
    with pytest.raises(BudgetError):
        Trainer(spec, memory_budget=f"{below}MiB", kernels="numpy").compile(8)


def test_a_budget_weighs_numba_without_loading_it():
    """Without --kernels a budget may choose the numba backend (faster) when it fits: weighing it
    loads neither numba nor llvmlite, and a small budget falls back to numpy."""
    code = textwrap.dedent("""
        import sys
        from fedpers.nn import Trainer, rss
        from tests import nets
        spec = nets.cnn(batch_norm=False)
        t = Trainer(spec, memory_budget=rss.rss_bytes() + (40 << 20))
        t.compile(16)
        assert t.choice.kernels == "numpy", t.choice
        assert "numba" not in sys.modules and "llvmlite" not in sys.modules
        big = Trainer(spec, memory_budget="4GiB")
        big.compile(16)
        print(big.choice.kernels)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("numba" if numba_available() else "numpy")


def test_memory_modes_registry_is_what_compile_accepts():
    """MEMORY_MODES (for CLI choices and help) names exactly the modes compile runs; it imports light."""
    from fedpers.nn import DEFAULT_MEMORY_MODE, MEMORY_MODES, memory_modes_help

    spec = nets.mlp()
    assert list(MEMORY_MODES) == ["naive", "planned", "swap", "swap-all"] and DEFAULT_MEMORY_MODE in MEMORY_MODES
    for mode in MEMORY_MODES:
        assert compile(spec, 8, mode=mode, allocate=False).mode == mode
    with pytest.raises(ValueError, match="naive"):
        compile(spec, 8, mode="paged", allocate=False)
    text = memory_modes_help()
    assert all(f"{m}: {d}" in text for m, d in MEMORY_MODES.items()) and text.count("(default)") == 1
    mods = modules_after("from fedpers.nn import MEMORY_MODES, memory_modes_help\nassert memory_modes_help()")
    assert "fedpers.nn.modes" in mods and not {"numba", "numpy", "fedpers.nn.graph"} & mods


def test_relu_saves_sign_bits_unless_a_reader_keeps_its_output_anyway():
    """relu before a pooling layer saves 1 bit per element and its output dies after the pooling's
    forward; relu before a conv keeps no bits (the conv keeps that output for dW anyway)."""
    from fedpers.models import path
    from fedpers.nn import load_ini

    c = compile(load_ini(path("vgg_small.ini")), 4, allocate=False)
    by_name = {t.name: t for t in c.tensors}
    n_forward = len(c.nodes)
    bits = by_name["conv1_2/relu:signs"]
    assert bits.nbytes * 32 == by_name["conv1_2/relu:out"].nbytes
    assert max(c.groups[by_name["conv1_2/relu:out"].group].touches) < n_forward  # free before backward
    assert "conv1_1/relu:signs" not in by_name  # conv1_2 reads conv1_1/relu's output in calc-gradient
    assert max(c.groups[by_name["conv1_1/relu:out"].group].touches) >= n_forward


# ---- swap-all: weights, accumulators and optimizer state in the swap file ----------------------
SWAP_ALL_NETS = {
    "mlp_adam": lambda: nets.mlp(opt="adam"),
    "cnn_bn": lambda: nets.cnn(batch_norm=True, stride=2),
    "residual": nets.residual,
    "partly_frozen": lambda: nets.cnn(batch_norm=False, frozen=("c1", "c2")),
}


@pytest.mark.parametrize("net", sorted(SWAP_ALL_NETS))
@pytest.mark.parametrize(("micro", "lookahead"), [(1, 1), (1, 2), (2, 1), (4, 2)])
def test_swap_all_trains_bit_identical_weights(net, micro, lookahead):
    """Weights, statistics, accumulators and optimizer state that go through the swap file come
    back bit for bit: training gives exactly the weights of planned mode, over several fits."""
    spec = SWAP_ALL_NETS[net]()
    x, y = data_for(spec, n=48)
    ref = Trainer(spec, memory="planned", micro_batch=micro, seed=3)
    t = Trainer(spec, memory="swap-all", micro_batch=micro, lookahead=lookahead, seed=3)
    for trainer in (ref, t):
        for _ in range(2):
            trainer.fit(x, y, epochs=1, batch_size=8, shuffle=False)
    assert t.compile(8).homes, "nothing was swapped"
    wa, wb = ref.get_weights(), t.get_weights()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    np.testing.assert_array_equal(ref.predict(x), t.predict(x))


def test_swap_all_keeps_weights_out_of_the_arena_and_round_trips_them(tmp_path):
    """On VGG-small the arena holds a window of the weights, not all of them; weights set between
    fits are read back bit for bit, and the swap file is one unlinked file held by the trainer."""
    from fedpers.models import path
    from fedpers.nn import load_ini

    spec = load_ini(path("vgg_small.ini"))
    t = Trainer(spec, memory="swap-all", micro_batch=4, swap_dir=str(tmp_path))
    c = t.compile(8)
    weights = t.get_weights()
    assert set(c.homes) >= set(weights) - {"output.weight", "output.bias"}
    planned = compile(spec, 8, mode="planned", micro_batch=4, allocate=False)
    assert c.plan.total < planned.plan.total - t.weights_bytes  # more than every weight's bytes saved
    rng = np.random.default_rng(5)
    new = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in weights.items()}
    t.set_weights(new)
    back = t.get_weights()
    for k in new:
        np.testing.assert_array_equal(back[k], new[k], err_msg=k)
    held = open_files_under(tmp_path)
    assert len(held) == 1 and held[0].endswith("(deleted)") and list(tmp_path.iterdir()) == []
    t.close()  # the arena goes; the weights stay in the file, readable
    for k in new:
        np.testing.assert_array_equal(t.get_weights()[k], new[k])
    del t
    gc.collect()
    assert open_files_under(tmp_path) == []  # the last descriptor of the unlinked file is closed


def test_swap_all_carries_state_across_replanning_and_optimizer_resets():
    """A new batch size or frozen layers re-plan: weights and optimizer state move from one swap
    file to the next, exactly as in planned mode."""
    spec = nets.mlp(opt="adam")
    x, y = data_for(spec, n=48)
    runs = []
    for mode in ("planned", "swap-all"):
        t = Trainer(spec, memory=mode, seed=3, lookahead=1)
        t.fit(x, y, epochs=1, batch_size=8, shuffle=False)
        t.fit(x, y, epochs=1, batch_size=12, shuffle=False)
        t.set_frozen(["fc1"])
        t.fit(x, y, epochs=1, batch_size=12, shuffle=False)
        t.reset_optimizer()
        t.set_frozen([])
        t.fit(x, y, epochs=1, batch_size=8, shuffle=False)
        runs.append(t.get_weights())
    for k in runs[0]:
        np.testing.assert_array_equal(runs[0][k], runs[1][k], err_msg=k)


def test_swap_all_after_a_failed_step_holds_what_planned_mode_holds(monkeypatch):
    """A step that raises mid-backward: swap-all writes back what it changed, so the weights read
    afterwards are those planned mode leaves (some layers updated, the rest not)."""
    spec = nets.mlp()
    x, y = data_for(spec, n=48)
    got = []
    for mode in ("planned", "swap-all"):
        t = Trainer(spec, memory=mode, seed=3, lookahead=1)
        c = t.compile(8)
        layer = next(n.layer for n in c.nodes if n.name == "fc1")
        calls = {"n": 0}
        real = layer.calc_gradient

        def failing(run, real=real, calls=calls):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected")
            real(run)

        monkeypatch.setattr(layer, "calc_gradient", failing)
        with pytest.raises(RuntimeError, match="injected"):
            t.fit(x, y, epochs=1, batch_size=8, shuffle=False)
        got.append(t.get_weights())
    for k in got[0]:
        np.testing.assert_array_equal(got[0][k], got[1][k], err_msg=k)


def test_swap_all_evaluation_reads_weights_a_window_at_a_time():
    """Evaluating a swap-all model streams its weights from the swap file like training does: the
    evaluation plan holds a few layers' weights, not the model's."""
    from fedpers.models import path
    from fedpers.nn import load_ini

    spec = load_ini(path("vgg_small.ini"))
    t = Trainer(spec, memory="swap-all", micro_batch=4, lookahead=1)
    train = t.compile(8)
    c, swapper = t._inference(2)
    try:
        weights = sum(ti.nbytes for ti in c.tensors if ti.role in ("weight", "stat"))
        assert set(c.homes) == set(train.homes) & set(t.get_weights())
        assert c.plan.total < weights / 2
        assert swapper is not None
    finally:
        swapper.close()
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    planned = Trainer(spec, memory="planned")
    np.testing.assert_array_equal(t.predict(x, batch_size=2), planned.predict(x, batch_size=2))
