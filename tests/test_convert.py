import keras
import numpy as np
import pytest

from keras_moe.analysis import flop_report
from keras_moe.layers import GatedConv2D
from keras_moe.layers import PatchExpertChoiceMoE
from keras_moe.layers import SparseGatingHeads
from keras_moe.models import default_gated_layers
from keras_moe.models import default_pmoe_layer
from keras_moe.models import sparse_predict
from keras_moe.models import to_deepmoe
from keras_moe.models import to_pmoe
from keras_moe.training import DeepMoETrainer
from tests.testing import BACKEND
from tests.testing import to_numpy


def sequential_cnn(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(8, 3, padding="same", name="c1"),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.ReLU(),
            keras.layers.Conv2D(8, 3, padding="same", name="c2"),
            keras.layers.BatchNormalization(name="bn2"),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(16, 3, padding="same", name="c3"),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4, name="logits"),
        ]
    )


def with_statistics(model, seed=1):
    """Non-trivial batch-norm statistics, as a trained model has."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            width = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(size=width))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=width))
            layer.gamma.assign(rng.uniform(0.5, 1.5, size=width))
    return model


def residual_block():
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    y = keras.layers.Conv2D(4, 3, padding="same", name="inner1")(x)
    y = keras.layers.BatchNormalization()(y)
    y = keras.layers.ReLU()(y)
    y = keras.layers.Conv2D(4, 3, padding="same", name="inner2")(y)
    x = keras.layers.Add()([x, y])
    x = keras.layers.Conv2D(4, 1, name="after_add")(x)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def test_default_selection_gates_convolutions_fed_by_a_convolution():
    # inner2 reads inner1's channels alone; inner1 reads the stem's output,
    # which the addition reads too; after_add reads a sum.
    assert default_gated_layers(residual_block()) == ["inner2"]
    assert default_gated_layers(sequential_cnn()) == ["c2", "c3"]


@pytest.mark.parametrize("widen", [1, 2])
def test_sequential_cnn_converts_to_the_same_function(widen):
    cnn = with_statistics(sequential_cnn())
    moe = to_deepmoe(cnn, widen=widen, num_classes=4)
    x = np.random.default_rng(2).random((3, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(moe(x)), to_numpy(cnn(x)), rtol=1e-5, atol=1e-5
    )
    gated = [layer for layer in moe.layers if isinstance(layer, GatedConv2D)]
    assert [layer.name for layer in gated] == ["c2", "c3"]
    assert [layer.kernel.shape[2] for layer in gated] == [8 * widen] * 2
    # c1 and c2 produce the gated channels (c2 is gated itself); c3 feeds
    # the classifier and keeps its width.
    assert moe.get_layer("c1").filters == 8 * widen
    assert moe.get_layer("c2").filters == 8 * widen
    assert moe.get_layer("bn2").moving_mean.shape[0] == 8 * widen
    assert moe.get_layer("c3").filters == 16
    # New layers: nothing is shared with the original.
    shared = {id(w) for w in moe.weights} & {id(w) for w in cnn.weights}
    assert not shared


def test_converted_network_trains_counts_and_runs_sparse():
    cnn = with_statistics(sequential_cnn())
    moe = to_deepmoe(cnn, widen=2, num_classes=4)
    trainer = DeepMoETrainer(moe, lambda_gate=1.0)
    trainer.compile(optimizer="sgd", metrics=["accuracy"])
    rng = np.random.default_rng(3)
    x = rng.random((16, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 4, 16)
    history = trainer.fit(x, y, epochs=1, batch_size=8, verbose=0).history
    assert np.isfinite(history["loss"][0]) and history["gate_loss"][0] > 0
    # Switch half of every head's channels off: the cost falls, and the
    # sparse path computes what the dense one does.
    (heads,) = [
        layer for layer in moe.layers if isinstance(layer, SparseGatingHeads)
    ]
    for head in heads.heads:
        kernel = to_numpy(head.kernel)
        kernel[:, ::2] = -1.0
        head.kernel.assign(kernel)
    report = flop_report(moe, data=x)
    assert report.effective_macs < 0.8 * report.dense_macs
    np.testing.assert_allclose(
        sparse_predict(moe, x), to_numpy(moe(x)), rtol=1e-4, atol=1e-4
    )


def keras_application(widen):
    keras.utils.set_random_seed(4)
    model = keras.applications.ResNet50V2(
        weights=None, input_shape=(32, 32, 3), classes=10
    )
    return model, to_deepmoe(model, widen=widen, num_classes=10)


@pytest.mark.parametrize("widen", [1, 2])
def test_residual_network_converts_to_the_same_function(widen):
    model = with_statistics(residual_block())
    moe = to_deepmoe(model, widen=widen, num_classes=2)
    x = np.random.default_rng(7).random((3, 8, 8, 4)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(moe(x)), to_numpy(model(x)), rtol=1e-5, atol=1e-5
    )
    # inner2 is gated; inner1 produces its inputs and is widened.
    assert moe.get_layer("inner1").filters == 4 * widen
    assert moe.get_layer("inner2").kernel.shape[2] == 4 * widen
    assert moe.get_layer("stem").filters == 4


@pytest.mark.skipif(
    BACKEND != "torch",
    reason="building ResNet50V2 compiles an XLA program per weight shape on "
    "jax and takes minutes; the conversion is backend-independent graph "
    "surgery, checked on every backend with the networks above",
)
def test_resnet50v2_converts_trains_and_runs_sparse():
    model, moe = keras_application(widen=1)
    rng = np.random.default_rng(5)
    x = rng.random((4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(moe(x)), to_numpy(model(x)), rtol=1e-4, atol=1e-6
    )
    gated = [layer for layer in moe.layers if isinstance(layer, GatedConv2D)]
    # The 3x3 and last 1x1 convolutions of its 16 bottlenecks.
    assert len(gated) == 32
    assert gated[0].name == "conv2_block1_2_conv"

    trainer = DeepMoETrainer(moe, lambda_gate=1.0, from_logits=False)
    trainer.compile(optimizer="sgd")
    y = rng.integers(0, 10, 4)
    history = trainer.fit(x, y, epochs=1, batch_size=4, verbose=0).history
    assert np.isfinite(history["loss"][0])
    heads = moe.get_layer("gating_heads")
    for head in heads.heads:
        kernel = to_numpy(head.kernel)
        kernel[:, 1::2] = -1.0
        head.kernel.assign(kernel)
    report = flop_report(moe, data=x)
    assert report.effective_macs < 0.8 * report.dense_macs
    np.testing.assert_allclose(
        sparse_predict(moe, x), to_numpy(moe(x)), rtol=1e-3, atol=1e-5
    )

    # The pMoE conversion of the same network: its last stride-1
    # convolution becomes a pMoE layer, the rest keeps its weights.
    pmoe = to_pmoe(model, num_experts=4)
    layer = pmoe.get_layer(default_pmoe_layer(model))
    assert isinstance(layer, PatchExpertChoiceMoE)
    for name in ("conv1_conv", "predictions"):
        for new, old in zip(
            pmoe.get_layer(name).weights, model.get_layer(name).weights
        ):
            np.testing.assert_array_equal(to_numpy(new), to_numpy(old))
    pmoe.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    history = pmoe.fit(x, y, epochs=1, batch_size=4, verbose=0).history
    assert np.isfinite(history["loss"][0])


def test_invalid_conversions():
    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="functional"):
        to_deepmoe(Subclassed())
    cnn = sequential_cnn()
    with pytest.raises(ValueError, match="widen=0"):
        to_deepmoe(cnn, widen=0)
    with pytest.raises(ValueError, match="'logits'"):
        to_deepmoe(cnn, gated_layers=["logits"])
    with pytest.raises(ValueError, match="'c1'"):
        # c1 reads the input: there is no producer to widen.
        to_deepmoe(cnn, gated_layers=["c1"], widen=2)
    with pytest.raises(ValueError, match="already has GatedConv2D"):
        to_deepmoe(to_deepmoe(cnn))


def pmoe_cnn_source(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(8, 3, padding="same", name="c1"),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.ReLU(),
            keras.layers.Conv2D(8, 3, strides=2, padding="same", name="c2"),
            keras.layers.Conv2D(
                16, 3, padding="same", activation="relu", name="c3"
            ),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4, name="logits"),
        ]
    )


def test_to_pmoe_replaces_the_last_convolution_by_its_experts():
    cnn = with_statistics(pmoe_cnn_source())
    assert default_pmoe_layer(cnn) == "c3"
    moe = to_pmoe(cnn, num_experts=4, patch_size=2, patches_per_expert=16)
    layer = moe.get_layer("c3")
    assert isinstance(layer, PatchExpertChoiceMoE)
    # 8x8 map in 2x2 patches: n = 16, and l = n: every expert selects every
    # patch. With the default "halo" placement expert j computes filters
    # 4j..4j+3 of c3 on the map multiplied by its gates (the authors'
    # formulation), which c3 itself computes on that masked map.
    assert layer.num_patches == 16
    x = np.random.default_rng(8).random((3, 16, 16, 3)).astype("float32")
    features = keras.Model(moe.input, moe.get_layer("c2").output)
    h = to_numpy(features(x))
    out, routing = layer(h, return_routing=True)
    out = np.maximum(to_numpy(out), 0.0)  # the activation follows the layer
    indices = to_numpy(routing["indices"])
    gates = to_numpy(routing["gates"])
    c3 = cnn.get_layer("c3")
    for j in range(4):
        gate_map = np.zeros((3, 4, 4), "float32")
        for b in range(3):
            for slot in range(16):
                r, c = divmod(int(indices[b, j, slot]), 4)
                gate_map[b, r, c] = gates[b, j, slot]
        gate_map = np.repeat(np.repeat(gate_map, 2, axis=1), 2, axis=2)
        expected = to_numpy(c3(h * gate_map[..., None]))[..., 4 * j : 4 * j + 4]
        np.testing.assert_allclose(
            out[..., 4 * j : 4 * j + 4], expected, rtol=1e-4, atol=1e-5
        )
    # The other layers keep their weights, batch-norm statistics included.
    for name in ("c1", "bn1", "c2", "logits"):
        for new, old in zip(
            moe.get_layer(name).weights, cnn.get_layer(name).weights
        ):
            np.testing.assert_array_equal(to_numpy(new), to_numpy(old))
    # About the parameters of the convolution: the routers add 2*2*8*4.
    params = layer.count_params()
    assert params == cnn.get_layer("c3").count_params() + 2 * 2 * 8 * 4
    # The routers are trained through the output.
    trainer = moe
    trainer.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = trainer.fit(
        x, np.array([0, 1, 2]), epochs=1, batch_size=3, verbose=0
    ).history
    assert np.isfinite(history["loss"][0])


def test_to_pmoe_defaults_and_bad_input():
    cnn = pmoe_cnn_source()
    moe = to_pmoe(cnn)
    layer = moe.get_layer("c3")
    # 8x8 map: 2x2 patches (a quarter of each side), n = 16, l = n / k = 4.
    assert layer.patch_size == (2, 2)
    assert layer.patches_per_expert == 4
    assert layer.placement == "halo"
    x = np.random.default_rng(9).random((2, 16, 16, 3)).astype("float32")
    assert to_numpy(moe(x)).shape == (2, 4)
    with pytest.raises(ValueError, match="'c2'"):
        to_pmoe(cnn, layer="c2")  # strides 2
    with pytest.raises(ValueError, match="num_experts=3"):
        to_pmoe(cnn, num_experts=3)
    with pytest.raises(ValueError, match="already has PatchExpertChoiceMoE"):
        to_pmoe(moe)
