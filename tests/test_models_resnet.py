import keras
import numpy as np
import pytest

from keras_moe.layers import GatedConv2D
from keras_moe.layers import ShallowEmbedding
from keras_moe.models import DEEPMOE_RESNET_PRESETS
from keras_moe.models import DeepMoEResNet
from keras_moe.models import deepmoe_outputs
from tests.testing import to_numpy


def tiny(**kwargs):
    config = dict(
        depth=8,
        num_classes=3,
        input_shape=(16, 16, 3),
        embedding_layers=2,
        embedding_filters=4,
    )
    return DeepMoEResNet(**{**config, **kwargs})


def test_output_contract():
    model = tiny()
    x = np.random.default_rng(0).random((2, 16, 16, 3)).astype("float32")
    assert tuple(model(x).shape) == (2, 3)  # logits, like any classifier
    out = deepmoe_outputs(model)(x)
    assert set(out) == {"logits", "embedding_probs", "gates"}
    np.testing.assert_array_equal(to_numpy(out["logits"]), to_numpy(model(x)))
    assert tuple(out["embedding_probs"].shape) == (2, 3)
    np.testing.assert_allclose(
        to_numpy(out["embedding_probs"]).sum(-1), 1.0, atol=1e-5
    )
    assert len(out["gates"]) == len(model.gated_layers) == 3
    for gate, layer in zip(out["gates"], model.gated_layers):
        # Each gate vector covers the gated convolution's input channels.
        assert gate.shape[-1] == layer.kernel.shape[2]


def test_wide_doubles_the_gated_channels_and_baseline_has_no_gates():
    wide, narrow = tiny(variant="wide"), tiny(variant="narrow")
    assert [g.kernel.shape[2] for g in wide.gated_layers] == [32, 64, 128]
    assert [g.kernel.shape[2] for g in narrow.gated_layers] == [16, 32, 64]
    plain = tiny(variant="narrow", gated=False)
    assert not any(isinstance(layer, GatedConv2D) for layer in plain.layers)
    assert not any(
        isinstance(layer, ShallowEmbedding) for layer in plain.layers
    )
    out = plain(np.zeros((1, 16, 16, 3), "float32"))
    assert tuple(out.shape) == (1, 3)

    def conv_widths(model):
        return [
            layer.kernel.shape
            for layer in model.layers
            if isinstance(layer, keras.layers.Conv2D)
        ]

    # Same code path: the plain network has exactly the narrow convolutions.
    assert conv_widths(plain) == conv_widths(narrow)


@pytest.mark.parametrize(
    "kwargs, params",
    [
        (dict(depth=20), 0.27e6),
        (dict(depth=56), 0.85e6),
        (dict(depth=18, input_shape=(224, 224, 3), num_classes=1000), 11.7e6),
        (dict(depth=50, input_shape=(224, 224, 3), num_classes=1000), 25.6e6),
    ],
)
def test_plain_parameter_counts_match_published(kwargs, params):
    model = DeepMoEResNet(variant="narrow", gated=False, **kwargs)
    # Projection shortcuts (option B) add about 1% on CIFAR.
    assert model.count_params() == pytest.approx(params, rel=0.02)


def test_bottlenecks():
    kwargs = dict(depth=50, input_shape=(224, 224, 3), num_classes=10)
    a = DeepMoEResNet(bottleneck="A", **kwargs)
    b = DeepMoEResNet(bottleneck="B", **kwargs)
    assert len(a.gated_layers) == 32 and len(b.gated_layers) == 16
    # B widens only the 3x3: fewer parameters than A.
    assert b.count_params() < a.count_params()
    first = a.gated_layers[0]
    assert first.kernel_size == (3, 3) and first.kernel.shape[2] == 128
    assert b.gated_layers[0].kernel_size == (1, 1)


def test_wide_bottleneck_b_is_6_percent_smaller_than_resnet101():
    # DeepMoE section 5.1: wide DeepMoE-ResNet-50 with bottleneck B has
    # "6% less parameters ... than the standard ResNet-101" (44.55 M).
    model = DeepMoEResNet.from_preset("wide_deepmoe_resnet50b_imagenet")
    gating = sum(
        model.get_layer(name).count_params()
        for name in ("embedding", "gating_heads")
    )
    assert (model.count_params() - gating) / 44.55e6 == pytest.approx(
        0.94, abs=0.005
    )


@pytest.mark.parametrize(
    "preset, base_macs",
    [
        ("wide_deepmoe_resnet18_imagenet", 1.8e9),
        ("wide_deepmoe_resnet34_imagenet", 3.6e9),
        ("wide_deepmoe_resnet50a_imagenet", 3.8e9),
    ],
)
def test_imagenet_embedding_costs_about_2_percent(preset, base_macs):
    from keras_moe.analysis import flop_report

    report = flop_report(DeepMoEResNet.from_preset(preset))
    gating = sum(
        r["dense_macs"]
        for r in report.layers
        if r["name"] in ("embedding", "gating_heads")
    )
    # The paper: "roughly 2% of the computation of the base models" (the
    # standard ResNets' multiply-adds, as He et al. publish them).
    assert 0.01 < gating / base_macs < 0.03


def test_unknown_keyword_raises():
    with pytest.raises(TypeError, match="num_clases"):
        DeepMoEResNet(8, num_clases=100)
    with pytest.raises(TypeError, match="embeding_dim"):
        DeepMoEResNet.from_preset(
            "wide_deepmoe_resnet20_cifar10", embeding_dim=4
        )


def test_config_round_trip_and_saving(tmp_path):
    model = tiny()
    x = np.random.default_rng(1).random((2, 16, 16, 3)).astype("float32")
    revived = DeepMoEResNet.from_config(model.get_config())
    assert revived.get_config() == model.get_config()
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    expected = to_numpy(deepmoe_outputs(model)(x))
    actual = to_numpy(deepmoe_outputs(loaded)(x))
    np.testing.assert_allclose(actual["logits"], expected["logits"], atol=1e-5)
    for a, b in zip(actual["gates"], expected["gates"]):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_fit_on_logits():
    model = tiny(gated=False)
    model.compile(
        "sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    x = np.random.default_rng(2).random((8, 16, 16, 3)).astype("float32")
    history = model.fit(x, np.arange(8) % 3, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_presets():
    assert "wide_deepmoe_resnet56_cifar10" in DEEPMOE_RESNET_PRESETS
    assert "wide_deepmoe_resnet50a_imagenet" in DEEPMOE_RESNET_PRESETS
    model = DeepMoEResNet.from_preset(
        "wide_deepmoe_resnet20_cifar100", embedding_layers=2
    )
    assert model.num_classes == 100 and model.depth == 20
    with pytest.raises(ValueError, match="preset='resnet7'"):
        DeepMoEResNet.from_preset("resnet7")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(depth=21), "depth=21"),
        (dict(depth=19, input_shape=(224, 224, 3)), "depth=19"),
        (dict(num_classes=0), "num_classes=0"),
        (dict(variant="huge"), "variant='huge'"),
        (dict(bottleneck="C"), "bottleneck='C'"),
        (dict(input_shape=(32, 32)), "input_shape"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeepMoEResNet(**kwargs)
