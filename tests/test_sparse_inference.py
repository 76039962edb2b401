import keras
import numpy as np
import pytest
from keras import ops

from keras_moe.layers import GatedConv2D
from keras_moe.layers import ShallowEmbedding
from keras_moe.layers import SparseGatingHeads
from keras_moe.models import SparsePredictor
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


@pytest.mark.parametrize(
    "strategy, compiled",
    [
        ("union", True),
        ("grouped", True),
        ("per_example", True),
        ("union", False),
        ("grouped", False),
        ("per_example", False),
    ],
)
def test_matches_dense_outputs(strategy, compiled):
    model = gated_resnet()
    x = np.random.default_rng(1).random((4, 8, 8, 3)).astype("float32")
    dense = to_numpy(model(x, training=False))
    gates = dense["gates"]
    assert 0.2 < np.mean([np.mean(g == 0) for g in gates]) < 0.8
    sparse = to_numpy(
        sparse_predict(model, x, strategy=strategy, compiled=compiled)
    )
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


def gated_pair(channels=8):
    """A model whose gates are an input: any pattern can be asked for."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((6, 6, 3))
    gates = keras.Input((channels,))
    y = keras.layers.Conv2D(channels, 3, padding="same", name="producer")(
        inputs
    )
    y = keras.layers.BatchNormalization(name="bn")(y)
    y = keras.layers.ReLU()(y)
    y = GatedConv2D(4, 3, padding="same", name="gated")(y, gates)
    model = keras.Model([inputs, gates], y)
    bn = model.get_layer("bn")
    rng = np.random.default_rng(5)
    bn.moving_mean.assign(rng.normal(size=channels))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=channels))
    return model


def pattern(active, batch=2, channels=8):
    gates = np.zeros((batch, channels), "float32")
    gates[:, active] = np.linspace(0.5, 1.5, len(active))
    return gates


def test_compiles_once_per_channel_count():
    model = gated_pair()
    x = np.random.default_rng(6).random((2, 6, 6, 3)).astype("float32")
    predictor = SparsePredictor(model)
    patterns = [[0, 3, 5], [1, 2, 7], [0, 3, 5], [0, 1, 2, 3, 4]]
    for i, active in enumerate(patterns):
        g = pattern(active)
        out, channels = predictor.predict([x, g], return_channels=True)
        np.testing.assert_allclose(
            out, to_numpy(model([x, g])), rtol=1e-5, atol=1e-5
        )
        assert channels[0]["gated"] == (len(active), 8)
        assert channels[0]["producer"] == (len(active), 8)
    info = predictor.cache_info()
    # Three active channels twice in new places, then five: two networks.
    assert (info["misses"], info["hits"], info["compiled"]) == (2, 2, 2)
    predictor.clear_cache()
    assert predictor.cache_info()["compiled"] == 0


def test_least_recently_used_network_is_dropped():
    model = gated_pair()
    x = np.random.default_rng(7).random((1, 6, 6, 3)).astype("float32")
    predictor = SparsePredictor(model, max_cached=1)
    for active in ([0], [0, 1], [0]):
        predictor.predict([x, pattern(active, batch=1)])
    info = predictor.cache_info()
    assert (info["misses"], info["hits"], info["compiled"]) == (3, 0, 1)


def test_count_buckets_pad_with_zero_gates():
    model = gated_pair()
    x = np.random.default_rng(8).random((2, 6, 6, 3)).astype("float32")
    g = pattern([1, 4, 6])
    predictor = SparsePredictor(model, count_buckets=2)
    out, channels = predictor.predict([x, g], return_channels=True)
    # Counts round up to a multiple of 8 / 2: four channels computed.
    assert channels[0]["gated"] == (4, 8)
    np.testing.assert_allclose(
        out, to_numpy(model([x, g])), rtol=1e-5, atol=1e-5
    )


def test_outputs_follow_changed_weights():
    model = gated_pair()
    x = np.random.default_rng(9).random((2, 6, 6, 3)).astype("float32")
    g = pattern([2, 3, 6])
    predictor = SparsePredictor(model)
    before = predictor.predict([x, g])
    rng = np.random.default_rng(10)
    # Positive values keep the batch-norm variances valid.
    model.set_weights(
        [
            rng.uniform(0.5, 1.5, w.shape).astype("float32")
            for w in model.weights
        ]
    )
    after = predictor.predict([x, g])
    assert np.abs(after - before).max() > 1e-2
    np.testing.assert_allclose(
        after, to_numpy(model([x, g])), rtol=1e-4, atol=1e-4
    )


def test_outputs_follow_batch_norm_statistics_changed_by_training():
    model = gated_pair()
    x = np.random.default_rng(12).random((4, 6, 6, 3)).astype("float32")
    g = pattern([1, 2, 5], batch=4)
    predictor = SparsePredictor(model)
    before = predictor.predict([x, g])
    # Training-mode passes move the moving statistics (and nothing else).
    for _ in range(10):
        model([x * 3.0 + 1.0, g], training=True)
    after = predictor.predict([x, g])
    dense = to_numpy(model([x, g], training=False))
    assert np.abs(dense - before).max() > 1e-2
    np.testing.assert_allclose(after, dense, rtol=1e-4, atol=1e-4)


def test_sparse_predict_reuses_its_compiled_networks():
    model = gated_pair()
    x = np.random.default_rng(11).random((2, 6, 6, 3)).astype("float32")
    for active in ([1, 5], [0, 7]):
        sparse_predict(model, [x, pattern(active)])
    predictor = SparsePredictor(model)
    assert predictor.cache_info()["compiled"] == 0
    from keras_moe.models.sparse import predictor as sparse

    kept = sparse._predictor(model, "union").cache_info()
    assert (kept["misses"], kept["hits"]) == (1, 1)


def test_invalid_arguments():
    model = gated_resnet()
    x = np.zeros((1, 8, 8, 3), "float32")
    with pytest.raises(ValueError, match="strategy='dense'"):
        sparse_predict(model, x, strategy="dense")
    with pytest.raises(ValueError, match="functional"):
        sparse_predict(keras.layers.Dense(2), x)
    with pytest.raises(ValueError, match="compiled='yes'"):
        sparse_predict(model, x, compiled="yes")
    with pytest.raises(ValueError, match="batch_size=0"):
        sparse_predict(model, x, batch_size=0)
    with pytest.raises(ValueError, match="count_buckets=0"):
        SparsePredictor(model, count_buckets=0)
    with pytest.raises(ValueError, match="max_cached=-1"):
        SparsePredictor(model, max_cached=-1)
    with pytest.raises(ValueError, match="max_groups=0"):
        SparsePredictor(model, strategy="grouped", max_groups=0)
    inputs = keras.Input((4,))
    plain = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="no GatedConv2D"):
        SparsePredictor(plain)


def between(layer_fn, channels=8, groups=1, seed=13):
    """conv -> `layer_fn` -> gated conv, with the gates as an input."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 4))
    gates = keras.Input((channels,))
    y = keras.layers.Conv2D(channels, 3, padding="same", name="producer")(
        inputs
    )
    y = layer_fn(y)
    y = GatedConv2D(
        4, 3, padding="same", groups=groups, use_bias=True, name="gated"
    )(y, gates)
    return keras.Model([inputs, gates], y)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize(
    "name, layer_fn, groups",
    [
        ("grouped gated conv", lambda y: y, 2),
        ("softmax between", lambda y: keras.layers.Activation("softmax")(y), 1),
        ("pooling between", lambda y: keras.layers.MaxPooling2D(2)(y), 1),
        (
            "depthwise between",
            lambda y: keras.layers.DepthwiseConv2D(3, padding="same")(y),
            1,
        ),
    ],
)
def test_layers_between_and_grouped_gated_convs(
    name, layer_fn, groups, compiled
):
    model = between(layer_fn, groups=groups)
    x = np.random.default_rng(14).random((3, 6, 6, 4)).astype("float32")
    g = pattern([0, 3, 6], batch=3)
    sparse = sparse_predict(model, [x, g], compiled=compiled)
    np.testing.assert_allclose(
        to_numpy(sparse), to_numpy(model([x, g])), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("compiled", [True, False])
def test_all_gates_zero_in_a_model(compiled):
    model = between(keras.layers.ReLU())
    x = np.random.default_rng(15).random((2, 6, 6, 4)).astype("float32")
    g = np.zeros((2, 8), "float32")
    sparse = sparse_predict(model, [x, g], compiled=compiled)
    np.testing.assert_allclose(
        to_numpy(sparse), to_numpy(model([x, g])), rtol=1e-5, atol=1e-5
    )


def test_chained_gated_layers_compute_both_ends_thinned():
    from tests.test_flops import chain_model

    model = chain_model()
    x = np.random.default_rng(16).random((2, 6, 6, 2)).astype("float32")
    (heads,) = [
        layer for layer in model.layers if isinstance(layer, SparseGatingHeads)
    ]
    kernel = -np.ones((4, 4), "float32")
    kernel[:, 1] = 1.0
    heads.heads[1].kernel.assign(kernel)  # gate B keeps channel 1 only
    dense = to_numpy(model(x))
    for compiled in (True, False):
        sparse, channels = sparse_predict(
            model, x, compiled=compiled, return_channels=True
        )
        np.testing.assert_allclose(
            to_numpy(sparse["logits"]), dense["logits"], rtol=1e-4, atol=1e-4
        )
        # A computes the one output B reads.
        assert channels[0]["a/outputs"] == (1, 4)
        assert channels[0]["b"] == (1, 4)


def test_wrong_input_shapes_and_empty_batches():
    model = gated_resnet()
    with pytest.raises(ValueError, match=r"\(batch, 8, 8, 3\)"):
        sparse_predict(model, np.zeros((2, 16, 16, 3), "float32"))
    with pytest.raises(ValueError, match=r"\(2, 8, 8, 4\)"):
        sparse_predict(model, np.zeros((2, 8, 8, 4), "float32"))
    for compiled in (True, False):
        empty = sparse_predict(
            model, np.zeros((0, 8, 8, 3), "float32"), compiled=compiled
        )
        assert tuple(to_numpy(empty["logits"]).shape) == (0, 3)


def test_gates_are_computed_per_batch():
    model = gated_resnet()
    predictor = SparsePredictor(model, strategy="per_example")
    seen = []
    gate_model = predictor._gate_model
    original = gate_model.predict_on_batch

    def record(inputs):
        seen.append(len(inputs[0]))
        return original(inputs)

    gate_model.predict_on_batch = record
    x = np.random.default_rng(17).random((5, 8, 8, 3)).astype("float32")
    out = predictor.predict(x, batch_size=2)
    assert seen == [2, 2, 1]
    np.testing.assert_allclose(
        out["logits"], to_numpy(model(x))["logits"], rtol=1e-4, atol=1e-4
    )


def test_outputs_have_the_models_dtype():
    keras.config.set_dtype_policy("mixed_float16")
    model = gated_pair()
    keras.config.set_dtype_policy("float32")
    x = np.random.default_rng(18).random((2, 6, 6, 3)).astype("float32")
    g = pattern([1, 4])
    expected = keras.backend.standardize_dtype(model.outputs[0].dtype)
    for compiled in (True, False):
        out = sparse_predict(model, [x, g], compiled=compiled)
        assert keras.backend.standardize_dtype(out.dtype) == expected


def test_group_examples_splits_by_pattern():
    from keras_moe.models.sparse import group_examples

    a = np.array([1, 1, 0, 0], bool)
    b = np.array([0, 0, 1, 1], bool)
    masks = [np.stack([a, b, a, b, a])]
    groups = group_examples(masks, np.ones(1), max_groups=2)
    assert sorted(map(list, groups)) == [[0, 2, 4], [1, 3]]
    assert len(group_examples(masks, np.ones(1), max_groups=1)) == 1


def calibrated_network():
    from keras_moe.models import DeepMoEResNet

    network = DeepMoEResNet(
        8, num_classes=3, input_shape=(16, 16, 3), embedding_layers=2
    )
    heads = network.get_layer("gating_heads")
    rng = np.random.default_rng(19)
    for head in heads.heads:
        kernel = rng.normal(0.0, 1.0, head.kernel.shape).astype("float32")
        kernel[:, ::3] = -5.0  # never active
        head.kernel.assign(kernel)
    return network


def gated_of(model):
    return [layer for layer in model.layers if isinstance(layer, GatedConv2D)]


def test_prune_inactive_channels(tmp_path):
    from keras_moe.analysis import flop_report
    from keras_moe.models import prune_inactive_channels

    network = calibrated_network()
    x = np.random.default_rng(20).random((8, 16, 16, 3)).astype("float32")
    pruned = prune_inactive_channels(network, x)
    np.testing.assert_allclose(
        to_numpy(pruned(x)), to_numpy(network(x)), rtol=1e-4, atol=1e-4
    )
    # A third of the gated channels are gone, with their producers' outputs.
    assert pruned.count_params() < 0.85 * network.count_params()
    assert (
        flop_report(pruned).dense_macs < 0.85 * flop_report(network).dense_macs
    )
    for old, new in zip(gated_of(network), gated_of(pruned)):
        assert new.kernel.shape[2] <= old.kernel.shape[2] * 2 // 3 + 1
    # Still gated where the gates vary, and a standalone model.
    assert gated_of(pruned)
    shared = {id(w) for w in pruned.weights} & {id(w) for w in network.weights}
    assert not shared
    path = str(tmp_path / "pruned.keras")
    pruned.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        to_numpy(loaded(x)), to_numpy(pruned(x)), rtol=1e-5, atol=1e-5
    )


def test_pruning_drops_what_calibration_never_used():
    from keras_moe.models import prune_inactive_channels

    model = gated_pair()
    x = np.random.default_rng(21).random((2, 6, 6, 3)).astype("float32")
    pruned = prune_inactive_channels(model, [x, pattern([0, 1, 2])])
    assert pruned.get_layer("gated").kernel.shape[2] == 3
    # The same channels: the same outputs.
    g = pattern([0, 2])
    np.testing.assert_allclose(
        to_numpy(pruned([x, g])), to_numpy(model([x, g])), rtol=1e-5, atol=1e-5
    )
    # A channel calibration never used is gone: its contribution too.
    g = pattern([0, 5])
    assert (
        np.abs(to_numpy(pruned([x, g])) - to_numpy(model([x, g]))).max() > 1e-3
    )


def test_passes_follow_the_strategy():
    model = gated_pair()
    x = np.random.default_rng(23).random((5, 6, 6, 3)).astype("float32")
    a = pattern([0, 1], batch=1)[0]
    b = pattern([6, 7], batch=1)[0]
    g = np.stack([a, b, a, b, a])
    union = SparsePredictor(model).passes([x, g], batch_size=2)
    assert [list(p) for p in union] == [[0, 1], [2, 3], [4]]
    single = SparsePredictor(model, strategy="per_example").passes([x, g])
    assert [list(p) for p in single] == [[0], [1], [2], [3], [4]]
    grouped = SparsePredictor(model, strategy="grouped", max_groups=2)
    assert sorted(map(list, grouped.passes([x, g]))) == [[0, 2, 4], [1, 3]]
    with pytest.raises(ValueError, match="batch_size"):
        grouped.passes([x, g], batch_size=0)
