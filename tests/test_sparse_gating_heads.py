import keras
import numpy as np
import pytest
from keras import ops

from keras_moe.layers import GatedConv2D
from keras_moe.layers import ShallowEmbedding
from keras_moe.layers import SparseGatingHeads
from keras_moe.layers import gate_l1
from tests.testing import gradients
from tests.testing import run_layer_test


def random_embedding(batch=4, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, dim))
    e = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return e.astype("float32")


def test_matches_equation():
    e = random_embedding()
    heads = SparseGatingHeads(
        [3, 5], kernel_initializer=keras.initializers.RandomNormal(0.0, 1.0)
    )
    gates = heads(e)
    assert len(gates) == 2
    for head, gate in zip(heads.heads, gates):
        kernel = ops.convert_to_numpy(head.kernel)
        expected = np.maximum(e @ kernel, 0.0)  # eq. 6: ReLU(W_g e)
        np.testing.assert_allclose(
            ops.convert_to_numpy(gate), expected, atol=1e-6
        )
    # With a zero-mean kernel about half of the gates are exactly zero.
    flat = np.concatenate([ops.convert_to_numpy(g).ravel() for g in gates])
    assert 0 < np.mean(flat == 0.0) < 1


def test_starts_near_dense():
    e = random_embedding(batch=8, dim=10)
    gates = SparseGatingHeads([16, 32, 64])(e)
    for gate in gates:
        gate = ops.convert_to_numpy(gate)
        assert np.all(gate > 0.5) and np.all(gate < 1.5)


def test_sparsity_loss():
    e = random_embedding()
    heads = SparseGatingHeads([3, 5], lambda_gate=0.25)
    gates = [ops.convert_to_numpy(g) for g in heads(e)]
    expected = sum(np.abs(g).sum(axis=-1).mean() for g in gates)  # eq. 8
    np.testing.assert_allclose(
        ops.convert_to_numpy(gate_l1(gates)), expected, rtol=1e-6
    )
    # The default reduction divides eq. 8 by the number of gates, 3 + 5.
    mean = expected / 8
    np.testing.assert_allclose(
        ops.convert_to_numpy(gate_l1(gates, reduction="mean")), mean, rtol=1e-6
    )
    assert len(heads.losses) == 1
    np.testing.assert_allclose(
        ops.convert_to_numpy(heads.losses[0]), 0.25 * mean, rtol=1e-6
    )
    summed = SparseGatingHeads([3, 5], lambda_gate=0.25, gate_reduction="sum")
    summed.build(e.shape)
    summed.set_weights(heads.get_weights())
    summed(e)
    np.testing.assert_allclose(
        ops.convert_to_numpy(summed.losses[0]), 0.25 * expected, rtol=1e-6
    )
    assert SparseGatingHeads([3]).losses == []


def test_gradient_flows_through_gates_into_heads_and_embedding():
    rng = np.random.default_rng(3)
    images = rng.normal(size=(4, 16, 16, 3)).astype("float32")

    class Block(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.embedding = ShallowEmbedding(6, num_layers=2, filters=4)
            self.heads = SparseGatingHeads([3])
            self.conv = GatedConv2D(2, 3, padding="same")

        def call(self, x):
            gates = self.heads(self.embedding(x))
            return self.conv(x, gates[0])

    block = Block()
    block(images)
    weight_grads, _ = gradients(
        block, (images,), lambda out: ops.mean(ops.square(out - 1.0))
    )
    for layer in [block.heads.heads[0], *block.embedding.convs]:
        assert np.any(weight_grads[layer.kernel.path]), layer.name


def test_layer_contract(tmp_path):
    run_layer_test(
        SparseGatingHeads,
        dict(channels=[4, 2, 3], lambda_gate=0.01),
        random_embedding(),
        expected_output_shape=[(4, 4), (4, 2), (4, 3)],
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(channels=[]), "channels"),
        (dict(channels=8), "channels=8"),
        (dict(channels=[4, 0]), "channels=0"),
        (dict(channels=[4], lambda_gate=-1.0), "lambda_gate=-1.0"),
        (dict(channels=[4], lambda_gate="high"), "lambda_gate"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseGatingHeads(**kwargs)


def test_invalid_input_rank():
    with pytest.raises(ValueError, match="inputs_shape"):
        SparseGatingHeads([4])(np.zeros((2, 3, 4), "float32"))
