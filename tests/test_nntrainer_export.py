"""Models out: NNTrainer's weight-file layout (order, bytes, Adam block, counters), NNTrainer's raw
data files, the export / predict / evaluate commands, and their errors (exit 2 with a message)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fedpers.client.__main__ import main as client_main
from fedpers.client.personal import DeviceState, PersonalStore
from fedpers.export import read_weights, write_model
from fedpers.nn import DataError, Trainer, init_weights, load_ini, parse_ini
from fedpers.nn.nntrainer_format import (
    FormatError,
    bin_layout,
    decode_bin,
    encode_bin,
    encode_raw_data,
    nntrainer_layer_order,
    one_hot,
    read_raw_data,
)
from fedpers.server.__main__ import main as server_main
from fedpers.store import ModelStore, atomic_write_bytes

SMALL = """\
[Model]
Epochs = 2
batch_size = 8
loss = cross
[Optimizer]
Type = adam
Learning_rate = 0.01
[in]
Type = input
Input_Shape = 1:1:6
[fc1]
Type = fully_connected
Unit = 5
[bn]
Type = batch_normalization
Activation = relu
[out]
Type = fully_connected
Unit = 3
Activation = softmax
personal = true
"""


def _data(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 1, 1, 6)).astype(np.float32)
    y = (x[:, 0, 0, :3].argmax(axis=1)).astype(np.int64)
    return x, y


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- the .bin layout ------------------------------------------------------------------------------


def test_layer_order_is_nntrainers_reverse_postorder() -> None:
    chain = parse_ini(SMALL)
    assert nntrainer_layer_order(chain) == ["in", "fc1", "bn", "out"]
    # a shortcut branch written after the main path comes first (NNTrainer's DFS sees it last)
    residual = parse_ini(
        "[in]\nType = input\nInput_Shape = 2:4:4\n"
        "[main1]\nType = conv2d\nfilters = 2\nkernel_size = 3\npadding = same\n"
        "[main2]\nType = conv2d\nfilters = 2\nkernel_size = 3\npadding = same\n"
        "[short]\nType = conv2d\nfilters = 2\nkernel_size = 1\ninput_layers = in\n"
        "[add]\nType = addition\ninput_layers = main2, short\n"
        "[flat]\nType = flatten\n[out]\nType = fully_connected\nUnit = 2\n")
    assert nntrainer_layer_order(residual) == ["in", "short", "main1", "main2", "add", "flat", "out"]
    assert [e.name for e in bin_layout(residual)] == [
        "short.weight", "short.bias", "main1.weight", "main1.bias", "main2.weight", "main2.bias", "out.weight",
        "out.bias"]


def test_bin_bytes_match_a_hand_layout() -> None:
    spec = parse_ini(SMALL)
    w = init_weights(spec, 3)
    rng = np.random.default_rng(1)
    w = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in w.items()}
    adam = {k: (np.full(v.shape, 1.0, np.float32), np.full(v.shape, 2.0, np.float32)) for k, v in w.items()}
    data = encode_bin(spec, w, adam=adam, epoch=3, iteration=17)
    f4 = lambda *names: b"".join(w[n].astype("<f4").tobytes() for n in names)  # noqa: E731
    trained = ["fc1.weight", "fc1.bias", "bn.gamma", "bn.beta", "out.weight", "out.bias"]
    expected = (f4("fc1.weight", "fc1.bias", "bn.running_mean", "bn.running_var", "bn.gamma", "bn.beta",
                   "out.weight", "out.bias")
                + b"adam" + b"".join(adam[n][0].tobytes() + adam[n][1].tobytes() for n in trained)
                + np.array([3, 17], "<u4").tobytes())
    assert data == expected
    back = decode_bin(spec, data)
    assert (back.epoch, back.iteration) == (3, 17) and sorted(back.adam) == sorted(trained)
    for k in w:
        np.testing.assert_array_equal(back.weights[k], w[k])
    np.testing.assert_array_equal(back.adam["bn.gamma"][1], adam["bn.gamma"][1])


def test_bin_forms_nntrainer_reads_and_what_it_refuses() -> None:
    spec = parse_ini(SMALL)
    w = init_weights(spec, 0)
    weights_only = b"".join(np.asarray(w[e.name], "<f4").tobytes() for e in bin_layout(spec))
    assert decode_bin(spec, weights_only).adam is None  # NNTrainer's reader tolerates the rest missing
    fresh = decode_bin(spec, encode_bin(spec, w))
    assert all((m == 0).all() and (v == 0).all() for m, v in fresh.adam.values()) and fresh.iteration == 0
    sgd = parse_ini(SMALL.replace("Type = adam", "Type = sgd"))
    assert len(encode_bin(sgd, w)) == len(weights_only) + 8  # no Adam block for sgd
    with pytest.raises(FormatError, match="weights alone take"):
        decode_bin(spec, weights_only[:-4])
    with pytest.raises(FormatError, match="left after the weights"):
        decode_bin(spec, weights_only + b"xyz")
    with pytest.raises(FormatError, match="has shape"):
        encode_bin(spec, {**w, "fc1.bias": np.zeros(7, np.float32)})
    conv_fc = parse_ini("[in]\nType = input\nInput_Shape = 2:3:3\n[fc]\nType = fully_connected\nUnit = 2\n")
    with pytest.raises(FormatError, match="put a flatten layer before it"):
        bin_layout(conv_fc)


# ---- raw data files -------------------------------------------------------------------------------


def test_raw_data_round_trip_and_errors(tmp_path: Path) -> None:
    spec = parse_ini(SMALL)
    x, y = _data(10)
    path = tmp_path / "d.dat"
    path.write_bytes(encode_raw_data(x, one_hot(y, 3)))
    assert path.stat().st_size == 10 * (6 + 3) * 4
    rx, ry = read_raw_data(path, spec)
    np.testing.assert_array_equal(rx, x)
    np.testing.assert_array_equal(ry, y)
    mse = parse_ini(SMALL.replace("loss = cross", "loss = mse"))
    _, targets = read_raw_data(path, mse)
    np.testing.assert_array_equal(targets, one_hot(y, 3))
    (tmp_path / "short.dat").write_bytes(path.read_bytes()[:-4])
    with pytest.raises(DataError, match="whole number of examples"):
        read_raw_data(tmp_path / "short.dat", spec)
    soft = one_hot(y, 3) * 0.5
    (tmp_path / "soft.dat").write_bytes(encode_raw_data(x, soft))
    with pytest.raises(DataError, match="not one-hot"):
        read_raw_data(tmp_path / "soft.dat", spec)


def test_train_reads_the_models_own_data_files(tmp_path: Path, capsys) -> None:
    x, y = _data(48)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.dat").write_bytes(encode_raw_data(x[:40], one_hot(y[:40], 3)))
    (tmp_path / "data" / "valid.dat").write_bytes(encode_raw_data(x[40:], one_hot(y[40:], 3)))
    model = _write(tmp_path / "m.ini", SMALL + "[train_set]\ntype = file\npath = data/train.dat\n"
                                              "[valid_set]\ntype = file\npath = data/valid.dat\n")
    assert client_main(["train", str(model), "--json", "--no-shuffle"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["steps"] == 2 * 5 and "test_accuracy" in rep  # 40 examples, batch 8, 2 epochs; valid set held out
    bare = _write(tmp_path / "bare.ini", SMALL)
    assert client_main(["train", str(bare)]) == 2
    assert "names no training data" in capsys.readouterr().err


# ---- export, predict, evaluate --------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A small model trained a few steps, its weights, and a data file."""
    root = tmp_path_factory.mktemp("trained")
    model = _write(root / "model.ini", SMALL)
    spec = load_ini(model)
    x, y = _data(40)
    t = Trainer(spec, seed=1)
    t.fit(x, y, epochs=3, batch_size=8, shuffle=False)
    np.savez(root / "data.npz", x=x, y=y)
    return {"root": root, "model": model, "spec": spec, "weights": t.get_weights(), "x": x, "y": y,
            "eval": t.evaluate(x, y), "pred": t.predict(x)}


def test_exports_round_trip_and_evaluate_as_the_trainer_did(trained, tmp_path: Path, capsys) -> None:
    spec, w = trained["spec"], trained["weights"]
    npz = write_model(tmp_path / "m.npz", spec, w)
    nnt = write_model(tmp_path / "m.bin", spec, w)
    assert [p.name for p in nnt.paths] == ["m.bin", "m.ini"] and any("personal" in n for n in nnt.notes)
    for path in (tmp_path / "m.npz", tmp_path / "m.bin"):
        back = read_weights(path, spec)
        assert sorted(back) == sorted(w) and all(np.array_equal(back[k], w[k]) for k in w)
    ini = load_ini(tmp_path / "m.ini")  # NNTrainer's model file: Save_Path names the .bin, no fedpers-only keys
    assert ini.save_path == "m.bin" and not any(ls.personal for ls in ini.layers)
    assert "personal" not in (tmp_path / "m.ini").read_text()
    for weights in (npz.paths[0], nnt.paths[0]):
        assert client_main(["evaluate", str(trained["model"]), "--weights", str(weights), "--data",
                            str(trained["root"] / "data.npz"), "--json"]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert rep["loss"] == pytest.approx(trained["eval"].loss, rel=1e-6)
        assert rep["accuracy"] == trained["eval"].accuracy and rep["examples"] == 40
    # NNTrainer's own pair: its model file over its weight file
    assert client_main(["evaluate", str(tmp_path / "m.ini"), "--weights", str(tmp_path / "m.bin"), "--data",
                        str(trained["root"] / "data.npz"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(trained["eval"].loss, rel=1e-6)


def test_predict_writes_npz_and_csv(trained, tmp_path: Path, capsys) -> None:
    w = tmp_path / "w.npz"
    write_model(w, trained["spec"], trained["weights"])
    common = [str(trained["model"]), "--weights", str(w), "--data", str(trained["root"] / "data.npz")]
    assert client_main(["predict", *common, "--out", str(tmp_path / "p.npz")]) == 0
    with np.load(tmp_path / "p.npz") as p:
        np.testing.assert_allclose(p["outputs"], trained["pred"], rtol=1e-6)
        np.testing.assert_array_equal(p["labels"], trained["pred"].argmax(axis=1))
    assert client_main(["predict", *common, "--out", str(tmp_path / "p.csv")]) == 0
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "label,out0,out1,out2" and len(lines) == 41
    row = [float(v) for v in lines[1].split(",")]
    assert row[0] == trained["pred"][0].argmax() and row[1:] == pytest.approx(trained["pred"][0], rel=1e-6)
    assert "40 predictions" in capsys.readouterr().out


def test_evaluate_on_the_models_test_set(trained, tmp_path: Path, capsys) -> None:
    (tmp_path / "t.dat").write_bytes(encode_raw_data(trained["x"], one_hot(trained["y"], 3)))
    model = _write(tmp_path / "m.ini", SMALL + "[test_set]\ntype = file\npath = t.dat\n")
    w = tmp_path / "w.npz"
    write_model(w, trained["spec"], trained["weights"])
    assert client_main(["evaluate", str(model), "--weights", str(w)]) == 0
    out = capsys.readouterr().out
    assert "examples 40" in out and "test set" in out
    assert f"accuracy {trained['eval'].accuracy:.4f}" in out


def _device_state(root: Path, trained: dict) -> Path:
    state = root / "dev"
    state.mkdir()
    (state / "model.ini").write_text(trained["model"].read_text())
    w = trained["weights"]
    base = {k: v for k, v in w.items() if not k.startswith("out.")}
    local = {k: v for k, v in w.items() if k.startswith("out.")}
    PersonalStore(state).save(DeviceState(name="dev-a", device_id=3, base_version=4, local=local, base=base,
                                          base_kept=5))
    return state


def test_device_state_keeps_its_base_and_exports_its_personalized_model(trained, tmp_path: Path, capsys) -> None:
    state = _device_state(tmp_path, trained)
    loaded = PersonalStore(state).load()
    assert loaded.base_kept == 5 and sorted(loaded.base) == ["bn.beta", "bn.gamma", "bn.running_mean",
                                                              "bn.running_var", "fc1.bias", "fc1.weight"]
    assert client_main(["export", "--state", str(state), "--out", str(tmp_path / "p.bin"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["paths"] == [str(tmp_path / "p.bin"), str(tmp_path / "p.ini")]
    assert any("base version 5" in n for n in rep["notes"])
    back = read_weights(tmp_path / "p.bin", trained["spec"])
    assert all(np.array_equal(back[k], trained["weights"][k]) for k in back)
    assert client_main(["evaluate", "--state", str(state), "--data", str(trained["root"] / "data.npz"),
                        "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == trained["eval"].accuracy


def test_server_export_of_a_stored_version(trained, tmp_path: Path, capsys) -> None:
    store = tmp_path / "store"
    ms = ModelStore(store)
    served = {k: v for k, v in trained["weights"].items() if not k.startswith("out.")}
    ms.save_version(0, {k: np.zeros_like(v) for k, v in served.items()})
    ms.save_version(1, served)
    atomic_write_bytes(store / "model.ini", trained["model"].read_bytes())
    in_flight = store / "models" / "v000000000002.fpst.tmp-123"  # a running server's unfinished write
    in_flight.write_bytes(b"partial")
    assert server_main(["export", "--store", str(store), "--out", str(tmp_path / "v.npz"), "--json"]) == 0
    assert in_flight.exists()  # export only reads the store
    rep = json.loads(capsys.readouterr().out)
    assert rep["version"] == 1 and any("out.weight" in n and "personal" in n for n in rep["notes"])
    with np.load(tmp_path / "v.npz") as got:
        np.testing.assert_array_equal(got["fc1.weight"], served["fc1.weight"])
        np.testing.assert_array_equal(got["out.weight"], init_weights(trained["spec"], 0)["out.weight"])
    assert server_main(["export", "--store", str(store), "--version", "0", "--out", str(tmp_path / "v0.bin")]) == 0
    assert (read_weights(tmp_path / "v0.bin", trained["spec"])["fc1.weight"] == 0).all()


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["export", "--state", "{tmp}/nowhere", "--out", "{tmp}/x.npz"], "no such state directory"),
        (["export", "--state", "{tmp}/nobase", "--out", "{tmp}/x.npz"], "keeps no base model"),
        (["export", "--state", "{tmp}/dev", "--out", "{tmp}/x.txt"], "--format npz|nntrainer"),
        (["export", "--state", "{tmp}/dev", "--out", "{tmp}/no/dir/x.npz"], "no such folder"),
        (["predict", "{model}", "--data", "{data}", "--out", "{tmp}/p.npz"], "give MODEL.ini with --weights"),
        (["predict", "{model}", "--weights", "{w}", "--data", "{data}", "--out", "{tmp}/p.txt"], "name the output"),
        (["evaluate", "{model}", "--weights", "{tmp}/w.bin", "--data", "{data}"], "weights alone take"),
        (["evaluate", "{model}", "--weights", "{w}"], "names no [test_set]"),
        (["evaluate", "{model}", "--weights", "{w}", "--data", "{tmp}/bad.dat"], "whole number of examples"),
        (["evaluate", "{model}", "--weights", "{w}", "--data", "{tmp}/missing.npz"], "no such data file"),
        (["evaluate", "{tmp}/nowhere.ini", "--weights", "{w}", "--data", "{data}"], "nowhere.ini: no such model file"),
    ],
)
def test_cli_errors_exit_2_naming_the_problem(trained, tmp_path: Path, capsys, argv: list[str], words: str) -> None:
    _device_state(tmp_path, trained)
    PersonalStore(tmp_path / "nobase").save(DeviceState(name="x"))
    (tmp_path / "nobase" / "model.ini").write_text(trained["model"].read_text())
    write_model(tmp_path / "w.npz", trained["spec"], trained["weights"])
    (tmp_path / "w.bin").write_bytes(b"\0" * 12)
    (tmp_path / "bad.dat").write_bytes(b"\0" * 13)
    subs = {"tmp": str(tmp_path), "model": str(trained["model"]), "data": str(trained["root"] / "data.npz"),
            "w": str(tmp_path / "w.npz")}
    assert client_main([a.format(**subs) for a in argv]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_server_export_errors_exit_2(tmp_path: Path, capsys) -> None:
    assert server_main(["export", "--store", str(tmp_path), "--out", str(tmp_path / "v.npz")]) == 2
    assert "not a fedpers-server store" in capsys.readouterr().err
    ModelStore(tmp_path)
    assert server_main(["export", "--store", str(tmp_path), "--out", str(tmp_path / "v.npz")]) == 2
    assert "--model" in capsys.readouterr().err
    (tmp_path / "model.ini").write_text(SMALL)
    assert server_main(["export", "--store", str(tmp_path), "--out", str(tmp_path / "v.npz")]) == 2
    assert "no model version" in capsys.readouterr().err
    assert server_main(["export", "--store", str(tmp_path), "--version", "7", "--out", str(tmp_path / "v.npz")]) == 2
    assert "version 7" in capsys.readouterr().err


def test_cli_error_in_a_fresh_process_has_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fedpers.client", "export", "--state", str(tmp_path / "none"),
                           "--out", str(tmp_path / "x.npz")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no such state directory" in proc.stderr and "Traceback" not in proc.stderr
