import keras
import numpy as np
import pytest

from keras_moe.analysis import flop_report
from keras_moe.layers import GatedConv2D
from keras_moe.models import DeepMoEDRN
from keras_moe.models import DeepMoEVGG16
from keras_moe.models import deepmoe_outputs
from keras_moe.training import DeepMoETrainer
from tests.testing import to_numpy


def conv_widths(model):
    return [
        layer.filters
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D)
        and layer.name.startswith("conv")
    ]


# DeepMoE table 6, read from the paper: the 13 convolutions' widths.
PAPER_TABLE_6 = {
    None: [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512],
    "W1-High": [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 1536, 512, 512],
    "W1-Mid": [64, 64, 128, 128, 2990, 256, 256, 512, 512, 512, 512, 512, 512],
    "W4-Low": [512, 512, 615, 615, 256, 256, 256, 512, 512, 512, 512, 512, 512],
    "W13-All": [128, 128, 256, 256, 405, 405, 405] + [615] * 6,
}
# DeepMoE table 4 ("Params" control): parameters in millions and FLOPs
# (multiply-adds) in units of 1e8, of the dense widened networks.
PAPER_TABLE_4 = {
    "W1-High": (24.15, 3.51),
    "W1-Mid": (24.16, 9.18),
    "W4-Low": (24.18, 43.16),
    "W13-All": (24.18, 8.15),
}


@pytest.mark.parametrize("widening", list(PAPER_TABLE_6))
def test_vgg_widths_are_table_6(widening):
    model = DeepMoEVGG16(num_classes=10, widening=widening, gated=False)
    assert conv_widths(model) == PAPER_TABLE_6[widening]


@pytest.mark.parametrize("widening", list(PAPER_TABLE_4))
def test_vgg_sizes_are_table_4(widening):
    model = DeepMoEVGG16(num_classes=100, widening=widening, gated=False)
    # The paper counts the convolutions' weights.
    params = sum(
        int(np.prod(layer.kernel.shape))
        for layer in model.layers
        if layer.name.startswith("conv")
    )
    # Multiply-adds of the 13 3x3 convolutions at 32x32, by hand: every
    # output position costs 9 * in * out; the side halves after 2, 4, 7
    # and 10 convolutions.
    macs, channels = 0, 3
    for i, width in enumerate(PAPER_TABLE_6[widening]):
        side = 32 >> sum(i > p for p in (1, 3, 6, 9))
        macs, channels = macs + side * side * 9 * channels * width, width
    paper_params, paper_macs = PAPER_TABLE_4[widening]
    assert round(params / 1e6, 2) == paper_params
    assert round(macs / 1e8, 2) == paper_macs
    report = flop_report(model)
    convs = sum(
        r["dense_macs"] for r in report.layers if r["name"][:4] == "conv"
    )
    assert convs == macs


def test_vgg_gates_every_convolution():
    model = DeepMoEVGG16(num_classes=10)
    x = np.zeros((2, 32, 32, 3), "float32")
    out = deepmoe_outputs(model)(x)
    # A gating head after each of the 13 convolutions: 12 gate the next
    # convolution's inputs, the last one the classifier's.
    assert len(model.gated_layers) == len(out["gates"]) == 13
    assert [g.shape[-1] for g in out["gates"]] == PAPER_TABLE_6[None]
    for gate, layer in zip(out["gates"], model.gated_layers):
        assert gate.shape[-1] == layer.kernel.shape[2]
    assert model.gated_layers[-1].name == "classifier"
    assert tuple(out["logits"].shape) == (2, 10)
    assert not any(
        isinstance(layer, GatedConv2D)
        for layer in DeepMoEVGG16(num_classes=10, gated=False).layers
    )


def test_vgg_zero_last_gate_removes_a_feature_from_the_classifier():
    model = DeepMoEVGG16(num_classes=10, embedding_layers=2)
    classifier = model.get_layer("classifier")
    features = keras.Model(model.input, classifier.input)
    gates = keras.Model(model.input, classifier.input[1])
    x = np.random.default_rng(0).random((2, 32, 32, 3)).astype("float32")
    pooled = to_numpy(features(x))[:, 0, 0]
    gate = to_numpy(gates(x))
    gate[:, :256] = 0.0  # as if the head had switched them off
    kernel = to_numpy(classifier.kernel)[0, 0]
    bias = to_numpy(classifier.bias)
    expected = (pooled * gate) @ kernel + bias
    got = to_numpy(classifier(features(x), gate))[:, 0, 0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_vgg_round_trip(tmp_path):
    model = DeepMoEVGG16(num_classes=4, embedding_layers=2, embedding_filters=4)
    x = np.random.default_rng(0).random((2, 32, 32, 3)).astype("float32")
    path = str(tmp_path / "vgg.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        to_numpy(loaded(x)), to_numpy(model(x)), atol=1e-5
    )


def test_drn_dilates_and_keeps_output_stride_8():
    model = DeepMoEDRN(
        num_classes=5,
        input_shape=(32, 32, 3),
        embedding_layers=3,
        embedding_filters=4,
    )
    out = deepmoe_outputs(model)(np.zeros((1, 32, 32, 3), "float32"))
    assert tuple(out["logits"].shape) == (1, 32, 32, 5)
    assert "embedding_probs" not in out
    assert len(out["gates"]) == len(model.gated_layers) == 32
    classifier = model.get_layer("classifier")
    assert tuple(classifier.output.shape[1:3]) == (4, 4)  # stride 8
    dilations = {
        layer.name.split("_")[0]: layer.dilation_rate
        for layer in model.layers
        if layer.name.endswith("conv2")
    }
    assert dilations["block1"] == (1, 1)
    assert dilations["block8"] == (2, 2)  # stage 4
    assert dilations["block16"] == (4, 4)  # stage 5
    plain = DeepMoEDRN(
        num_classes=19, input_shape=(32, 32, 3), variant="narrow", gated=False
    )
    # ResNet-50's convolutions without the 1000-way classifier.
    assert plain.count_params() == pytest.approx(23.5e6, rel=0.01)


def test_drn_stage_blocks_and_widths():
    model = DeepMoEDRN(
        num_classes=3,
        input_shape=(16, 24, 3),
        embedding_layers=2,
        embedding_filters=4,
        stage_blocks=(1, 2, 1, 1),
        stage_widths=(4, 8, 8, 16),
    )
    assert [layer.name for layer in model.gated_layers][-2:] == [
        "block5_conv2",
        "block5_conv3",
    ]
    assert model.get_layer("stem_conv").filters == 4
    assert model.get_layer("block5_conv3").filters == 4 * 16
    # Wide: the gated inner convolutions have twice the stage width.
    assert model.get_layer("block3_conv2").filters == 2 * 8
    assert model.get_layer("block4_conv2").dilation_rate == (2, 2)
    assert tuple(model.get_layer("classifier").output.shape[1:3]) == (2, 3)
    x = np.random.default_rng(0).random((2, 16, 24, 3)).astype("float32")
    assert tuple(model(x).shape) == (2, 16, 24, 3)
    config = model.get_config()
    assert config["stage_blocks"] == (1, 2, 1, 1)
    clone = DeepMoEDRN.from_config(config)
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(
        to_numpy(clone(x)), to_numpy(model(x)), atol=1e-5
    )


def test_drn_trains_with_ignore_label_and_mean_iou():
    model = DeepMoEDRN(
        num_classes=3,
        input_shape=(16, 16, 3),
        variant="narrow",
        embedding_layers=2,
        embedding_filters=4,
    )
    trainer = DeepMoETrainer(model, lambda_gate=1e-3, mu=0.0, ignore_class=255)
    trainer.compile(
        optimizer="sgd",
        metrics=[
            keras.metrics.MeanIoU(3, sparse_y_pred=False, ignore_class=255)
        ],
    )
    rng = np.random.default_rng(1)
    x = rng.random((4, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 3, size=(4, 16, 16))
    y[:, :4] = 255
    logs = trainer.fit(x, y, epochs=1, verbose=0).history
    assert np.isfinite(logs["loss"][0]) and "mean_io_u" in logs
    logits = to_numpy(model(x))
    valid = y != 255
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    labels = np.where(valid, y, 0)
    picked = np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    expected = -(picked * valid).sum() / valid.sum()
    ev = trainer.evaluate(x, y, return_dict=True, verbose=0)
    assert ev["base_loss"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (DeepMoEVGG16, dict(widening="W2"), "widening='W2'"),
        (DeepMoEVGG16, dict(input_shape=(16, 16, 3)), "input_shape"),
        (DeepMoEDRN, dict(input_shape=(30, 32, 3)), "input_shape"),
        (DeepMoEDRN, dict(num_classes=0), "num_classes=0"),
        (DeepMoEDRN, dict(bottleneck="Z"), "bottleneck='Z'"),
        (DeepMoEDRN, dict(stage_blocks=(3, 4, 6)), "stage_blocks"),
        (DeepMoEDRN, dict(stage_widths=(8, 8, 0, 8)), "stage_widths"),
    ],
)
def test_invalid_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)
