import keras
import numpy as np
import pytest

from keras_moe import analysis
from keras_moe.layers import GatedConv2D
from keras_moe.layers import PatchExpertChoiceMoE
from keras_moe.layers import ShallowEmbedding
from keras_moe.layers import SparseGatingHeads
from tests.testing import BACKEND


def plain_cnn(padding="same"):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding=padding, use_bias=False)(inputs)
    x = keras.layers.Conv2D(6, 3, strides=2, padding="valid", use_bias=False)(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(5, use_bias=False)(x)
    return keras.Model(inputs, outputs)


def test_dense_counts_by_hand():
    report = analysis.flop_report(plain_cnn())
    conv1 = 8 * 8 * 3 * 3 * 3 * 4
    conv2 = 3 * 3 * 3 * 3 * 4 * 6  # 3x3 output, valid, stride 2
    dense = 54 * 5
    assert [r["dense_macs"] for r in report.layers] == [conv1, conv2, dense]
    assert [r["dense_flops"] for r in report.layers] == [
        2 * conv1,
        2 * conv2,
        2 * dense,
    ]
    assert report.dense_macs == report.effective_macs == conv1 + conv2 + dense
    assert report.dense_flops == 2 * report.dense_macs
    assert "| total |" in report.table() and "MMACs" in report.table()


def resnet_macs_by_hand(blocks_per_stage, classes=10):
    """Multiply-adds of a CIFAR ResNet with 1x1 projection shortcuts."""
    macs = 32 * 32 * 9 * 3 * 16  # stem
    channels = 16
    for stage, width in enumerate((16, 32, 64)):
        side = 32 >> stage
        for block in range(blocks_per_stage):
            if block == 0 and width != channels:
                macs += side * side * channels * width  # projection
            macs += side * side * 9 * channels * width
            macs += side * side * 9 * width * width
            channels = width
    return macs + 64 * classes


def test_resnet_macs_match_the_papers():
    from keras_moe.models import DeepMoEResNet

    resnet20 = DeepMoEResNet(20, variant="narrow", gated=False)
    macs = analysis.flop_report(resnet20).dense_macs
    assert macs == resnet_macs_by_hand(3)
    # He et al. count ResNet-20 at 41 M multiply-adds ("FLOPs"); the
    # projection shortcuts add 0.4 M.
    assert macs / 1e6 == pytest.approx(41, abs=0.5)


def chain_model():
    """conv -> ReLU -> gated conv A -> ReLU -> gated conv B -> output."""
    inputs = keras.Input((6, 6, 2))
    e = ShallowEmbedding(4, num_layers=1, filters=2)(inputs)
    gates_a, gates_b = SparseGatingHeads([4, 4])(e)
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.ReLU()(x)
    x = GatedConv2D(4, 3, padding="same", name="a")(x, gates_a)
    x = keras.layers.ReLU()(x)
    x = GatedConv2D(3, 1, name="b")(x, gates_b)
    return keras.Model(inputs, {"logits": x, "gates": [gates_a, gates_b]})


def test_chained_gated_layers_are_thinned_at_both_ends():
    model = chain_model()
    ones = np.ones((1, 4), "float32")
    quarter = np.array([[0, 2, 0, 0]], "float32")
    rows = {
        r["name"]: r
        for r in analysis.flop_report(model, gates=[ones, quarter]).layers
    }
    conv = 36 * 9 * 2 * 4
    a = 36 * 9 * 4 * 4
    b = 36 * 1 * 4 * 3
    assert rows["conv"]["effective_macs"] == conv  # feeds A: all 4 gates on
    # A computes the 1 of its 4 outputs that B's gate keeps.
    assert rows["a"]["effective_macs"] == a / 4
    assert rows["b"]["effective_macs"] == b / 4
    rows = {
        r["name"]: r
        for r in analysis.flop_report(model, gates=[quarter, ones]).layers
    }
    assert rows["conv"]["effective_macs"] == conv / 4
    assert rows["a"]["effective_macs"] == a / 4
    assert rows["b"]["effective_macs"] == b


def test_effective_cost_is_averaged_per_example():
    model = chain_model()
    # Example 0: A keeps 1 input and B 2 of A's outputs; example 1: A keeps
    # 4 inputs and B 1 output. The product of the fractions is taken per
    # example, then averaged (not the product of the averages).
    gates_a = np.array([[1, 0, 0, 0], [1, 1, 1, 1]], "float32")
    gates_b = np.array([[1, 1, 0, 0], [0, 0, 0, 1]], "float32")
    rows = {
        r["name"]: r
        for r in analysis.flop_report(model, gates=[gates_a, gates_b]).layers
    }
    a = 36 * 9 * 4 * 4
    assert rows["a"]["effective_macs"] == pytest.approx(
        a * (1 / 4 * 2 / 4 + 4 / 4 * 1 / 4) / 2
    )
    assert rows["conv"]["effective_macs"] == pytest.approx(
        36 * 9 * 2 * 4 * (1 / 4 + 4 / 4) / 2
    )


def test_non_channelwise_layers_stop_the_thinning():
    inputs = keras.Input((6, 6, 2))
    e = ShallowEmbedding(4, num_layers=1, filters=2)(inputs)
    (gates,) = SparseGatingHeads([4])(e)
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.Activation("softmax")(x)  # mixes the channels
    x = GatedConv2D(3, 1, name="gated")(x, gates)
    model = keras.Model(inputs, {"logits": x, "gates": [gates]})
    g = np.array([[1, 0, 0, 0]], "float32")
    rows = {r["name"]: r for r in analysis.flop_report(model, gates=[g]).layers}
    assert rows["conv"]["active_fraction"] == 1.0
    assert rows["gated"]["active_fraction"] == 0.25


def test_gated_network_effective_macs():
    inputs = keras.Input((8, 8, 3))
    e = ShallowEmbedding(4, num_layers=2, filters=4)(inputs)
    (gates,) = SparseGatingHeads([6])(e)
    x = keras.layers.Conv2D(6, 3, padding="same", name="producer")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = GatedConv2D(5, 3, padding="same", name="gated")(x, gates)
    model = keras.Model(inputs, {"logits": x, "gates": [gates]})
    # Gates: 3 of 6 channels active for example 0, 6 of 6 for example 1.
    g = np.array([[1, 0, 2, 0, 3, 0], [1, 1, 1, 1, 1, 1]], "float32")
    report = analysis.flop_report(model, gates=[g])
    rows = {r["name"]: r for r in report.layers}
    producer = 64 * 9 * 3 * 6
    gated = 64 * 9 * 6 * 5
    assert rows["producer"]["active_fraction"] == 0.75
    assert rows["gated"]["effective_macs"] == 0.75 * gated
    assert rows["producer"]["effective_macs"] == 0.75 * producer
    embedding = [r for r in report.layers if r["type"] == "ShallowEmbedding"]
    assert embedding[0]["active_fraction"] == 1.0
    saved = 0.25 * (gated + producer)
    assert report.effective_macs == pytest.approx(report.dense_macs - saved)
    with pytest.raises(ValueError, match="one array per GatedConv2D"):
        analysis.flop_report(model, gates=[g, g])


def test_grouped_and_depthwise_convolutions():
    inputs = keras.Input((4, 4, 4))
    e = ShallowEmbedding(2, num_layers=1, filters=2)(inputs)
    g1, g2 = SparseGatingHeads([4, 4])(e)
    x = keras.layers.Conv2D(4, 1, groups=2, name="grouped")(inputs)
    x = GatedConv2D(4, 1, name="g1")(x, g1)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = GatedConv2D(2, 1, name="g2")(x, g2)
    model = keras.Model(inputs, {"logits": x, "gates": [g1, g2]})
    gate1 = np.array([[1, 1, 0, 0]], "float32")  # group 0 only
    gate2 = np.array([[0, 1, 1, 0]], "float32")
    rows = {
        r["name"]: r
        for r in analysis.flop_report(model, gates=[gate1, gate2]).layers
    }
    # The grouped conv: each group maps 2 inputs to 2 outputs; only group
    # 0's outputs are needed.
    assert rows["grouped"]["effective_macs"] == 16 * 2 * 2
    # g1: 2 of 4 inputs; its outputs feed the depthwise conv, and through
    # it g2, which keeps 2 of 4.
    assert rows["g1"]["effective_macs"] == 16 * 2 * 2
    assert rows["dw"]["effective_macs"] == 16 * 9 * 2
    assert rows["g2"]["effective_macs"] == 16 * 2 * 2


def test_patch_moe_counts_only_selected_patches():
    inputs = keras.Input((8, 8, 4))
    moe = PatchExpertChoiceMoE(2, 3, 2, expert_filters=5, name="moe")
    model = keras.Model(inputs, moe(inputs))
    (row,) = analysis.flop_report(model).layers
    routing = 16 * (2 * 2 * 4) * 2
    experts = 2 * 3 * (2 * 2 * 3 * 3 * 4 * 5)
    assert row["dense_macs"] == routing + experts


@pytest.mark.parametrize(
    "placement, expert_positions",
    [
        # Every expert on the whole 8x8 map.
        ("masked", 64),
        # Only the l = 3 selected 2x2 patches (the halo is the convolution's
        # input, not its output).
        ("halo", 3 * 2 * 2),
    ],
)
def test_patch_moe_counts_where_the_experts_run(placement, expert_positions):
    inputs = keras.Input((8, 8, 4))
    moe = PatchExpertChoiceMoE(
        2,
        3,
        2,
        expert_filters=5,
        expert_use_pre_activation=True,
        placement=placement,
        name="moe",
    )
    model = keras.Model(inputs, moe(inputs))
    (row,) = analysis.flop_report(model).layers
    routing = 16 * (2 * 2 * 4) * 2
    experts = 2 * expert_positions * (3 * 3 * 4 * 5)
    assert row["dense_macs"] == routing + experts


@pytest.mark.skipif(BACKEND != "jax", reason="XLA's cost analysis")
def test_matches_jax_cost_analysis():
    import jax

    # XLA leaves out the multiplications with "same" padding's zeros, which
    # the papers' convention (and ours) counts: compare without padding.
    model = plain_cnn(padding="valid")
    x = np.zeros((1, 8, 8, 3), "float32")
    values = [v.value for v in model.trainable_variables]

    def forward(values, x):
        return model.stateless_call(values, [], x)[0]

    cost = jax.jit(forward).lower(values, x).compile().cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    # XLA counts two FLOPs per multiply-add.
    assert analysis.flop_report(model).dense_flops == pytest.approx(
        cost["flops"], rel=1e-3
    )


@pytest.mark.skipif(BACKEND != "torch", reason="torch's FLOP counter")
def test_matches_torch_flop_counter():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = plain_cnn()
    x = torch.zeros((1, 8, 8, 3))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    # torch counts two FLOPs per multiply-add.
    assert analysis.flop_report(model).dense_flops == counter.get_total_flops()
