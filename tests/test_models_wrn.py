import keras
import numpy as np
import pytest

from keras_moe.layers import PatchExpertChoiceMoE
from keras_moe.models import WRN_PRESETS
from keras_moe.models import WideResNet
from tests.testing import to_numpy

TINY_PMOE = dict(num_experts=2, patches_per_expert=2, patch_size=2)


def tiny(**kwargs):
    config = dict(
        depth=10, widening_factor=1, num_classes=3, input_shape=(16, 16, 3)
    )
    return WideResNet(**{**config, **kwargs})


def images(batch, seed=0, size=16):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, size, size, 3)).astype("float32")


def describe(model):
    """(class, name, weight shapes) of every layer."""
    return [
        (
            type(layer).__name__,
            layer.name,
            [tuple(w.shape) for w in layer.weights],
        )
        for layer in model.layers
    ]


@pytest.mark.parametrize(
    "pmoe, depth, blocks", [(None, 10, 3), (TINY_PMOE, 10, 3), (None, 16, 6)]
)
def test_output_shapes(pmoe, depth, blocks):
    model = tiny(depth=depth, pmoe=pmoe)
    assert tuple(model(images(2)).shape) == (2, 3)
    adds = [
        layer for layer in model.layers if isinstance(layer, keras.layers.Add)
    ]
    assert len(adds) == blocks
    # Widths 16k, 32k, 64k; maps 16, 8, 4.
    last = model.get_layer(f"block{blocks}_add").output
    assert tuple(last.shape) == (None, 4, 4, 64)
    if pmoe is None:
        assert model.pmoe_layer is None
    else:
        assert isinstance(model.pmoe_layer, PatchExpertChoiceMoE)
        # Without expert_filters: the block width over the experts.
        assert model.pmoe_layer.expert_filters == 32


def test_plain_and_pmoe_differ_only_in_the_last_conv():
    plain = describe(tiny())
    pmoe = describe(tiny(pmoe=TINY_PMOE))
    replaced = plain.index(("Conv2D", "block3_conv2", [(3, 3, 64, 64)]))
    moe_index = [d[0] for d in pmoe].index("PatchExpertChoiceMoE")
    assert replaced == moe_index
    assert plain[:replaced] + plain[replaced + 1 :] == (
        pmoe[:moe_index] + pmoe[moe_index + 1 :]
    )


def test_pmoe_sees_the_pre_activation_and_keeps_the_shortcut():
    model = tiny(pmoe=TINY_PMOE)
    probe = keras.Model(
        model.input,
        [
            model.get_layer("block3_2_relu").output,
            model.get_layer("block3_proj").output,
            model.get_layer("block3_add").output,
        ],
    )
    pre_activation, shortcut, block_out = to_numpy(probe(images(2, seed=3)))
    assert pre_activation.min() >= 0
    moe_out = to_numpy(model.pmoe_layer(pre_activation))
    np.testing.assert_allclose(block_out, shortcut + moe_out, atol=1e-5)
    # Routing really is sparse: most of the pMoE output is zero.
    zero_fraction = np.mean(moe_out == 0)
    assert zero_fraction >= 0.5


def wrn10_parameters(k, num_classes):
    """Parameters of the plain WRN-10-k, counted by hand."""
    w1, w2, w3 = 16 * k, 32 * k, 64 * k
    convs = (
        3 * 3 * 3 * 16  # stem
        + 3 * 3 * 16 * w1
        + 3 * 3 * w1 * w1
        + (16 * w1 if w1 != 16 else 0)  # block 1 and its projection
        + 3 * 3 * w1 * w2
        + 3 * 3 * w2 * w2
        + w1 * w2  # block 2
        + 3 * 3 * w2 * w3
        + 3 * 3 * w3 * w3
        + w2 * w3  # block 3
    )
    # Every batch normalization has 4 parameters per channel.
    norms = 4 * (16 + 2 * w1 + 2 * w2 + 2 * w3)
    return convs + norms + w3 * num_classes + num_classes


def test_plain_parameter_count():
    assert tiny().count_params() == wrn10_parameters(1, 3)
    assert wrn10_parameters(10, 2) == 7_434_738


@pytest.mark.parametrize(
    "preset, expected",
    [
        # 8 experts of 3x3x640x80 (+ bias), routers on 4x4x640 patches.
        ("wrn10_10_pmoe_celeba", 8 * (3 * 3 * 640 * 80 + 80) + 4 * 4 * 640 * 8),
        # 4 experts of 1x1x640x160 (+ bias), routers on 1x1x640 patches.
        ("wrn10_10_pmoe_cifar10", 4 * (640 * 160 + 160) + 640 * 4),
    ],
)
def test_parameter_counts_of_the_paper_configurations(preset, expected):
    # Shapes only: no need to draw 7.5 M random initial values.
    with keras.StatelessScope(initialize_variables=False):
        model = WideResNet.from_preset(preset)
    layer = model.pmoe_layer
    assert layer.output_channels == 640
    assert layer.count_params() == expected
    assert expected == {"wrn10_10_pmoe_celeba": 3_768_960}.get(preset, 412_800)
    # The rest is WRN-10-10 less its last convolution, 3x3x640x640.
    replaced = 3 * 3 * 640 * 640
    assert replaced == 3_686_400
    plain = wrn10_parameters(10, model.num_classes)
    assert model.count_params() == plain - replaced + expected


def test_fit_trains():
    keras.utils.set_random_seed(0)
    model = tiny(pmoe=TINY_PMOE, num_classes=2)
    x = images(16, seed=1)
    # A learnable rule: the class is the sign of the mean red value.
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype("int32")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = [to_numpy(w) for w in model.trainable_weights]
    history = model.fit(x, y, batch_size=8, epochs=8, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0]
    after = dict(zip([w.path for w in model.trainable_weights], before))
    for w in model.trainable_weights:
        assert not np.array_equal(to_numpy(w), after[w.path]), w.path
    assert any("router" in w.path for w in model.trainable_weights)


@pytest.mark.parametrize(
    "pmoe",
    [
        None,
        dict(TINY_PMOE, expert_filters=32, gating="softmax_all"),
        dict(
            TINY_PMOE,
            experts=[keras.layers.Conv2D(64, 1), keras.layers.Conv2D(64, 1)],
            combine="sum",
        ),
    ],
    ids=["plain", "pmoe", "custom_experts"],
)
@pytest.mark.parametrize("architecture", ["paper", "authors"])
def test_config_round_trip_and_saving(tmp_path, pmoe, architecture):
    model = tiny(pmoe=pmoe, dropout_rate=0.1, architecture=architecture)
    x = images(2, seed=4)
    config = model.get_config()
    revived = WideResNet.from_config(config)
    assert revived.get_config() == config
    if pmoe is not None:
        # A fresh layer, not the configuration's layer objects.
        assert revived.pmoe_layer is not model.pmoe_layer
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, WideResNet)
    np.testing.assert_allclose(
        to_numpy(loaded(x)), to_numpy(model(x)), atol=1e-5
    )


def test_dropout_between_the_convolutions():
    model = tiny(dropout_rate=0.3)
    dropouts = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.Dropout)
    ]
    assert [layer.name for layer in dropouts] == [
        "block1_dropout",
        "block2_dropout",
        "block3_dropout",
    ]
    assert not any(
        isinstance(layer, keras.layers.Dropout) for layer in tiny().layers
    )


def test_dtype_reaches_every_layer():
    model = tiny(pmoe=TINY_PMOE, dtype="mixed_float16")
    for layer in model.layers[1:]:
        assert layer.dtype_policy.name == "mixed_float16", layer.name
    assert model.pmoe_layer.compute_dtype == "float16"
    assert all(w.dtype == "float32" for w in model.weights)


def test_presets():
    assert set(WRN_PRESETS) == {
        "wrn10_10_celeba",
        "wrn10_10_pmoe_celeba",
        "wrn10_10_cifar10",
        "wrn10_10_pmoe_cifar10",
        "authors_wrn10_10_celeba",
        "authors_wrn10_10_pmoe_celeba",
        "authors_wrn10_10_cifar10",
        "authors_wrn10_10_pmoe_cifar10",
        "authors_wrn10_10_pmoe_cifar10_imagenet_noise",
    }
    celeba = WRN_PRESETS["wrn10_10_pmoe_celeba"]
    assert celeba["input_shape"] == (64, 64, 3)
    assert celeba["pmoe"]["gating"] == "softmax"
    with pytest.raises(ValueError, match="preset='wrn28_10'"):
        WideResNet.from_preset("wrn28_10")


@pytest.mark.parametrize(
    "preset, expected",
    [
        # The authors' code: CelebA with 4 classes, CIFAR-10 with 10.
        ("authors_wrn10_10_celeba", 7_439_396),
        ("authors_wrn10_10_cifar10", 7_443_242),
        ("authors_wrn10_10_pmoe_celeba", 7_333_796),
        ("authors_wrn10_10_pmoe_cifar10", 3_971_242),
        ("authors_wrn10_10_pmoe_cifar10_imagenet_noise", 3_971_242),
    ],
)
def test_parameter_counts_of_the_authors_networks(preset, expected):
    with keras.StatelessScope(initialize_variables=False):
        model = WideResNet.from_preset(preset)
    assert model.count_params() == expected


@pytest.mark.parametrize(
    "preset", ["wrn10_10_pmoe_cifar10", "authors_wrn10_10_pmoe_cifar10"]
)
def test_preset_overrides_compose(preset):
    # A narrower width: the experts (and the authors' last convolution)
    # follow it.
    model = WideResNet.from_preset(preset, widening_factor=1)
    assert model.pmoe_layer.expert_filters == 16
    assert model.pmoe_layer.output_channels == 64
    assert model.pmoe_layer.input.shape[-1] == 64
    # Values the user sets win; a pmoe dict updates the preset's.
    model = WideResNet.from_preset(
        preset, widening_factor=1, pmoe=dict(expert_filters=64, combine="sum")
    )
    assert model.pmoe_layer.expert_filters == 64
    assert model.pmoe_layer.combine == "sum"
    assert model.pmoe_layer.num_experts == 4
    model = WideResNet.from_preset(
        preset, widening_factor=1, pmoe=dict(placement="halo")
    )
    assert model.pmoe_layer.placement == "halo"
    assert model.pmoe_layer.patches_per_expert == 16
    plain = WideResNet.from_preset(preset, widening_factor=1, pmoe=None)
    assert plain.pmoe_layer is None
    if preset.startswith("authors"):
        # No addition around the authors' MoE: any width goes.
        model = WideResNet.from_preset(
            preset, widening_factor=1, pmoe=dict(expert_filters=8)
        )
        assert model.pmoe_layer.output_channels == 32
    else:
        with pytest.raises(ValueError, match="must have 64 channels; it gives"):
            WideResNet.from_preset(
                preset, widening_factor=1, pmoe=dict(expert_filters=8)
            )


def test_the_authors_architecture():
    model = tiny(architecture="authors", pmoe=TINY_PMOE)
    convs = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D)
    ]
    # Biases and Glorot kernels; projections in the first block of every
    # group (also 16 -> 16 channels), from the block's input as it comes.
    assert all(conv.use_bias for conv in convs)
    assert all(
        isinstance(conv.kernel_initializer, keras.initializers.GlorotUniform)
        for conv in convs
    )
    assert model.get_layer("block1_proj").input is (
        model.get_layer("stem_conv").output
    )
    assert model.get_layer("block2_proj").input is (
        model.get_layer("block1_add").output
    )
    # The third group is BN -> ReLU -> conv(stride 2) -> pMoE -> final BN.
    adds = [
        layer.name
        for layer in model.layers
        if isinstance(layer, keras.layers.Add)
    ]
    assert adds == ["block1_add", "block2_add"]
    stage = model.get_layer("block3_conv1")
    assert stage.strides == (2, 2) and stage.filters == 64
    layer = model.pmoe_layer
    assert layer.input is stage.output
    assert model.get_layer("final_bn").input is layer.output
    # The authors' pMoE layer: their gating, placement, experts, routers.
    assert (layer.placement, layer.gating) == ("masked", "softmax_all")
    assert layer.expert_use_pre_activation and layer.expert_use_bias
    bn, relu, conv = layer.expert_layers[0].layers
    assert isinstance(bn, keras.layers.BatchNormalization)
    assert isinstance(conv.kernel_initializer, keras.initializers.GlorotUniform)
    assert bn.momentum == 0.9  # the network's batch normalization
    router = to_numpy(layer.router)
    assert 0.5e-4 < router.std() < 2e-4
    # So every gate starts near 1/n.
    _, routing = layer(
        images(2, size=4)[..., :1] * np.ones(64), return_routing=True
    )
    np.testing.assert_allclose(to_numpy(routing["gates"]), 1 / 4, atol=1e-3)
    assert tuple(model(images(2)).shape) == (2, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(depth=12), "depth=12"),
        (dict(depth=4), "depth=4"),
        (dict(widening_factor=0), "widening_factor=0"),
        (dict(num_classes=1.5), "num_classes=1.5"),
        (dict(input_shape=(16, 16)), "input_shape"),
        (dict(dropout_rate=1.0), "dropout_rate=1.0"),
        (dict(pmoe="pmoe"), "pmoe='pmoe'"),
        (dict(pmoe=dict(TINY_PMOE, expert_filters=16)), "64 channels"),
        (dict(pmoe=dict(TINY_PMOE, num_experts=3)), "num_experts"),
        (dict(pmoe=dict(TINY_PMOE, patch_size=3)), "patch_size"),
        (dict(pmoe=dict(TINY_PMOE, gating="top1")), "gating='top1'"),
        (dict(architecture="tf"), "architecture='tf'"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)
