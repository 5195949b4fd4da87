"""Small model specs shared by the trainer tests (Python API, not INI)."""

from __future__ import annotations

from fedpers.nn import LayerSpec, ModelSpec, OptimizerSpec


def mlp(loss: str = "cross", opt: str = "sgd", frozen: tuple[str, ...] = ()) -> ModelSpec:
    return ModelSpec(
        layers=(
            LayerSpec("in", "input", input_shape=(1, 1, 12)),
            LayerSpec("fc1", "fully_connected", unit=16, activation="relu", trainable="fc1" not in frozen),
            LayerSpec("fc2", "fully_connected", unit=10, activation="tanh", trainable="fc2" not in frozen),
            LayerSpec("out", "fully_connected", unit=4, activation="softmax" if loss == "cross" else None,
                      trainable="out" not in frozen),
        ),
        loss=loss,
        optimizer=OptimizerSpec(opt, learning_rate=0.05, momentum=0.9 if opt == "sgd" else 0.0),
    )


def cnn(batch_norm: bool = True, stride: int = 1, frozen: tuple[str, ...] = ()) -> ModelSpec:
    layers = [
        LayerSpec("in", "input", input_shape=(2, 8, 8)),
        LayerSpec("c1", "conv2d", filters=4, kernel_size=(3, 3), padding="same", trainable="c1" not in frozen),
    ]
    if batch_norm:
        layers.append(LayerSpec("bn1", "batch_normalization", activation="relu", trainable="bn1" not in frozen))
    else:
        layers.append(LayerSpec("r1", "activation", activation="relu"))
    layers += [
        LayerSpec("c2", "conv2d", filters=6, kernel_size=(3, 3), stride=(stride, stride), padding=(1, 1),
                  activation="sigmoid", trainable="c2" not in frozen),
        LayerSpec("p1", "pooling2d", pool_size=(2, 2), pooling="max"),
        LayerSpec("flat", "flatten"),
        LayerSpec("out", "fully_connected", unit=3, activation="softmax", trainable="out" not in frozen),
    ]
    return ModelSpec(layers=tuple(layers), optimizer=OptimizerSpec("adam", learning_rate=0.01))


def residual() -> ModelSpec:
    """A DAG: x -> c1 -> relu -> (c2 -> bn? no) + skip -> addition -> pool -> fc."""
    return ModelSpec(
        layers=(
            LayerSpec("in", "input", input_shape=(3, 6, 6)),
            LayerSpec("c1", "conv2d", filters=4, kernel_size=(3, 3), padding="same", activation="relu"),
            LayerSpec("c2", "conv2d", filters=4, kernel_size=(3, 3), padding="same", activation="tanh"),
            LayerSpec("c3", "conv2d", filters=4, kernel_size=(1, 1), input_layers=("c1",)),
            LayerSpec("add", "addition", input_layers=("c2", "c3", "c1"), activation="relu"),
            LayerSpec("gap", "pooling2d", pooling="global_average"),
            LayerSpec("flat", "flatten"),
            LayerSpec("out", "fully_connected", unit=5, activation="softmax"),
        ),
        optimizer=OptimizerSpec("sgd", learning_rate=0.1, momentum=0.5),
    )
