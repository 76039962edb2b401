import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe.layers import MixtureOfExperts
from tests.testing import gradients
from tests.testing import is_zero_gradient
from tests.testing import run_layer_test
from tests.testing import to_numpy


def relu(x):
    return np.maximum(x, 0.0)


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


def weights(layer):
    return to_numpy(layer.kernel), to_numpy(layer.bias)


@pytest.mark.parametrize("gate_hidden_units", [None, 6])
def test_matches_equation(gate_hidden_units):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 7)).astype("float32")
    moe = MixtureOfExperts(
        3,
        expert_units=4,
        gate_hidden_units=gate_hidden_units,
    )
    z, gates = to_numpy(moe(x, return_gates=True))
    h = x.astype("float64")
    if gate_hidden_units:
        w, b = weights(moe.gate_hidden)
        h = relu(h @ w + b)
    w, b = weights(moe.gate_logits)
    g = softmax(h @ w + b)
    experts = [
        relu(x @ weights(e)[0] + weights(e)[1]) for e in moe.expert_layers
    ]
    expected = sum(g[:, i, None] * experts[i] for i in range(3))
    np.testing.assert_allclose(gates, g, atol=1e-6)
    np.testing.assert_allclose(gates.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(z, expected, atol=1e-5)


def test_stacks_and_trains_with_fit():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 10)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    inputs = keras.Input((10,))
    z1 = MixtureOfExperts(4, expert_units=16, gate_hidden_units=8)(inputs)
    z2 = MixtureOfExperts(4, expert_units=16, gate_hidden_units=8)(z1)
    outputs = keras.layers.Dense(2, activation="softmax")(z2)
    model = keras.Model(inputs, outputs)
    model.compile(
        keras.optimizers.Adam(0.01),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = model.fit(x, y, epochs=15, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert history.history["accuracy"][-1] > 0.8


def test_pause_heuristic_freezes_an_overused_expert():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 5)).astype("float32")
    moe = MixtureOfExperts(3, expert_units=4, balancing="pause")
    moe(x)
    # Expert 0 has taken far more than its share so far.
    moe.assignment_totals.assign(np.array([30.0, 5.0, 5.0], "float32"))
    np.testing.assert_array_equal(
        to_numpy(moe.paused_experts()), [True, False, False]
    )
    weight_grads, _ = gradients(
        moe,
        (x,),
        lambda z: ops.sum(ops.square(z)),
        call_kwargs={"training": True},
    )
    assert is_zero_gradient(weight_grads[moe.expert_layers[0].kernel.path])
    assert np.any(weight_grads[moe.expert_layers[1].kernel.path])
    assert np.any(weight_grads[moe.gate_logits.kernel.path])
    # Not paused at inference, and no pausing without training.
    weight_grads, _ = gradients(moe, (x,), lambda z: ops.sum(ops.square(z)))
    assert np.any(weight_grads[moe.expert_layers[0].kernel.path])


def test_pause_heuristic_in_fit_and_its_time_limit():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 5)).astype("float32")
    inputs = keras.Input((5,))
    moe = MixtureOfExperts(
        2,
        expert_units=3,
        balancing="pause",
        balance_steps=2,
        balance_threshold=1.5,
    )
    model = keras.Model(inputs, keras.layers.Dense(1)(moe(inputs)))
    model.compile(keras.optimizers.SGD(0.1), "mse")
    moe.assignment_totals.assign(np.array([100.0, 1.0], "float32"))
    paused_kernel = to_numpy(moe.expert_layers[0].kernel)
    other_kernel = to_numpy(moe.expert_layers[1].kernel)
    model.fit(x, np.ones((16, 1)), batch_size=8, epochs=1, verbose=0)
    np.testing.assert_array_equal(
        to_numpy(moe.expert_layers[0].kernel), paused_kernel
    )
    assert not np.array_equal(
        to_numpy(moe.expert_layers[1].kernel), other_kernel
    )
    totals = to_numpy(moe.assignment_totals)
    assert totals.sum() == pytest.approx(101.0 + 16.0, rel=1e-5)
    assert float(to_numpy(moe.balance_step)) == 2.0
    # After `balance_steps` batches the heuristic stops.
    model.fit(x, np.ones((16, 1)), batch_size=8, epochs=1, verbose=0)
    assert not np.array_equal(
        to_numpy(moe.expert_layers[0].kernel), paused_kernel
    )


def test_balancing_loss():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 5)).astype("float32")
    moe = MixtureOfExperts(
        3, expert_units=2, balancing="loss", balance_loss_weight=0.5
    )
    _, gates = to_numpy(moe(x, training=True, return_gates=True))
    importance = gates.sum(0)
    expected = 0.5 * importance.var() / importance.mean() ** 2
    assert len(moe.losses) == 1
    np.testing.assert_allclose(to_numpy(moe.losses[0]), expected, rtol=1e-4)
    moe(x, training=False)
    assert moe.losses == []


def test_layer_contract(tmp_path):
    run_layer_test(
        MixtureOfExperts,
        dict(
            num_experts=3,
            expert_units=4,
            gate_hidden_units=5,
            balancing="pause",
        ),
        np.random.default_rng(5).normal(size=(4, 6)).astype("float32"),
        expected_output_shape=(4, 4),
        tmp_path=tmp_path,
    )


def test_layer_contract_with_custom_experts(tmp_path):
    experts = [
        keras.Sequential(
            [keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)]
        )
        for _ in range(2)
    ]
    run_layer_test(
        MixtureOfExperts,
        dict(num_experts=2, experts=experts, balancing="loss"),
        np.random.default_rng(6).normal(size=(4, 6)).astype("float32"),
        expected_output_shape=(4, 3),
        tmp_path=tmp_path,
        run_mixed_precision=False,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_experts=0, expert_units=4), "num_experts=0"),
        (dict(num_experts=2), "expert_units"),
        (dict(num_experts=2, expert_units=-1), "expert_units=-1"),
        (dict(num_experts=2, experts=[keras.layers.Dense(2)]), "experts"),
        (
            dict(num_experts=2, expert_units=4, balancing="switch"),
            "balancing='switch'",
        ),
        (
            dict(num_experts=2, expert_units=4, balance_threshold=0.5),
            "balance_threshold=0.5",
        ),
        (
            dict(num_experts=2, expert_units=4, balance_steps=0),
            "balance_steps=0",
        ),
        (
            dict(num_experts=2, expert_units=4, balance_loss_weight=-1),
            "balance_loss_weight=-1",
        ),
        (
            dict(num_experts=2, expert_units=4, gate_hidden_units=0),
            "gate_hidden_units=0",
        ),
        # Non-finite values would switch balancing off without a word.
        (
            dict(num_experts=2, expert_units=4, balance_threshold=math.nan),
            "balance_threshold=nan",
        ),
        (
            dict(num_experts=2, expert_units=4, balance_threshold=math.inf),
            "balance_threshold=inf",
        ),
        (
            dict(num_experts=2, expert_units=4, balance_loss_weight=math.nan),
            "balance_loss_weight=nan",
        ),
        (
            dict(num_experts=2, expert_units=4, balance_loss_weight=math.inf),
            "balance_loss_weight=inf",
        ),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixtureOfExperts(**kwargs)


def test_experts_with_different_outputs_are_rejected():
    moe = MixtureOfExperts(
        2, experts=[keras.layers.Dense(2), keras.layers.Dense(3)]
    )
    with pytest.raises(ValueError, match="same shape"):
        moe(np.zeros((2, 4), "float32"))


def test_the_docstring_says_what_the_default_gating_network_is():
    moe = MixtureOfExperts(3, expert_units=4)
    moe.build((None, 7))
    # Linear by default: no hidden layer before the softmax.
    assert moe.gate_hidden is None
    doc = " ".join(MixtureOfExperts.__doc__.split())
    assert "the gating network is linear" in doc
    assert "ReLU hidden layer followed by a softmax" not in doc
