import keras
import numpy as np
import pytest
from keras import ops

from keras_moe.layers import GatedConv2D
from keras_moe.layers import ShallowEmbedding
from keras_moe.layers import SparseGatingHeads
from keras_moe.models import sparse_predict
from tests.testing import to_numpy


def gated_resnet(seed=0):
    """Two residual blocks whose second convolution is gated."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    e, probs = ShallowEmbedding(5, num_layers=2, filters=4, num_classes=3)(
        inputs
    )
    g1, g2 = SparseGatingHeads(
        [8, 8], kernel_initializer=keras.initializers.RandomNormal(0.0, 1.0)
    )(e)
    x = keras.layers.Conv2D(6, 3, padding="same", name="stem")(inputs)
    for i, gates in enumerate((g1, g2)):
        shortcut = x
        y = keras.layers.Conv2D(8, 3, padding="same", name=f"conv1_{i}")(x)
        y = keras.layers.BatchNormalization(name=f"bn1_{i}")(y)
        y = keras.layers.ReLU()(y)
        y = GatedConv2D(6, 3, padding="same", name=f"gated_{i}")(y, gates)
        y = keras.layers.BatchNormalization()(y)
        x = keras.layers.ReLU()(keras.layers.Add()([shortcut, y]))
    logits = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(
        inputs, {"logits": logits, "embedding_probs": probs, "gates": [g1, g2]}
    )
    # Non-trivial batch-norm statistics, so that skipping must slice them.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            rng = np.random.default_rng(len(layer.name))
            width = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(size=width))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=width))
            layer.gamma.assign(rng.uniform(0.5, 1.5, size=width))
            layer.beta.assign(rng.normal(size=width))
    return model


@pytest.mark.parametrize("strategy", ["union", "per_example"])
def test_matches_dense_outputs(strategy):
    model = gated_resnet()
    x = np.random.default_rng(1).random((4, 8, 8, 3)).astype("float32")
    dense = to_numpy(model(x, training=False))
    gates = dense["gates"]
    assert 0.2 < np.mean([np.mean(g == 0) for g in gates]) < 0.8
    sparse = to_numpy(sparse_predict(model, x, strategy=strategy))
    assert set(sparse) == set(dense)
    np.testing.assert_allclose(
        sparse["logits"], dense["logits"], rtol=1e-4, atol=1e-4
    )
    for a, b in zip(sparse["gates"], gates):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_computes_only_active_channels_and_their_producers():
    model = gated_resnet()
    x = np.random.default_rng(2).random((1, 8, 8, 3)).astype("float32")
    gates = to_numpy(model(x))["gates"]
    _, channels = sparse_predict(model, x, return_channels=True)
    for i, g in enumerate(gates):
        active = int(np.sum(g[0] != 0))
        assert 0 < active < 8
        assert channels[0][f"gated_{i}"] == (active, 8)
        # The producing convolution computed only those channels too.
        assert channels[0][f"conv1_{i}"] == (active, 8)
    assert "stem" not in channels[0]


def test_union_over_the_batch_and_batch_size():
    model = gated_resnet()
    x = np.random.default_rng(3).random((6, 8, 8, 3)).astype("float32")
    gates = to_numpy(model(x))["gates"]
    outputs, channels = sparse_predict(
        model, x, batch_size=3, return_channels=True
    )
    assert len(channels) == 2
    union = int(np.sum(np.any(gates[0][:3] != 0, axis=0)))
    assert channels[0]["gated_0"] == (union, 8)
    np.testing.assert_allclose(
        to_numpy(outputs["logits"]),
        to_numpy(model(x)["logits"]),
        rtol=1e-4,
        atol=1e-4,
    )


def test_all_gates_zero():
    inputs = keras.Input((6, 6, 2))
    gates = keras.Input((2,))
    y = GatedConv2D(3, 3, padding="same", bias_initializer="ones")(
        inputs, gates
    )
    model = keras.Model([inputs, gates], y)
    x = np.ones((2, 6, 6, 2), "float32")
    g = np.zeros((2, 2), "float32")
    out = ops.convert_to_numpy(sparse_predict(model, [x, g]))
    np.testing.assert_allclose(out, ops.convert_to_numpy(model([x, g])))
    np.testing.assert_allclose(out, 1.0)


def test_invalid_arguments():
    model = gated_resnet()
    x = np.zeros((1, 8, 8, 3), "float32")
    with pytest.raises(ValueError, match="strategy='dense'"):
        sparse_predict(model, x, strategy="dense")
    with pytest.raises(ValueError, match="functional"):
        sparse_predict(keras.layers.Dense(2), x)
