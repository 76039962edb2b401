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
    conv1 = 2 * 8 * 8 * 3 * 3 * 3 * 4
    conv2 = 2 * 3 * 3 * 3 * 3 * 4 * 6  # 3x3 output, valid, stride 2
    dense = 2 * 54 * 5
    assert [r["dense"] for r in report.layers] == [conv1, conv2, dense]
    assert report.dense == report.effective == conv1 + conv2 + dense
    assert "| total |" in report.table()


def test_gated_network_effective_flops():
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
    assert rows["producer"]["active_fraction"] == 0.75
    assert rows["gated"]["effective"] == 0.75 * rows["gated"]["dense"]
    assert rows["producer"]["effective"] == 0.75 * rows["producer"]["dense"]
    embedding = [r for r in report.layers if r["type"] == "ShallowEmbedding"]
    assert embedding[0]["active_fraction"] == 1.0
    saved = 0.25 * (rows["gated"]["dense"] + rows["producer"]["dense"])
    assert report.effective == pytest.approx(report.dense - saved)
    dense, terms = analysis.gated_flop_terms(model)
    assert dense == report.dense
    assert terms == [rows["gated"]["dense"] + rows["producer"]["dense"]]
    with pytest.raises(ValueError, match="one array per GatedConv2D"):
        analysis.flop_report(model, gates=[g, g])


def test_patch_moe_counts_only_selected_patches():
    inputs = keras.Input((8, 8, 4))
    moe = PatchExpertChoiceMoE(2, 3, 2, expert_filters=5, name="moe")
    model = keras.Model(inputs, moe(inputs))
    (row,) = analysis.flop_report(model).layers
    routing = 2 * 16 * (2 * 2 * 4) * 2
    experts = 2 * 3 * (2 * 2 * 2 * 3 * 3 * 4 * 5)
    assert row["dense"] == routing + experts


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
    assert analysis.flop_report(model).dense == pytest.approx(
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
    assert analysis.flop_report(model).dense == counter.get_total_flops()
