"""NNTrainer's weight-file layout (order, bytes, Adam block, counters) and its raw data files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fedpers.client.__main__ import main as client_main
from fedpers.nn import DataError, init_weights, parse_ini
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
