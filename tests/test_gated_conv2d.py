import keras
import numpy as np
import pytest
from keras import ops

from keras_moe.layers import GatedConv2D
from tests.testing import BACKEND
from tests.testing import conv2d_reference
from tests.testing import gradients
from tests.testing import is_zero_gradient
from tests.testing import run_layer_test
from tests.testing import to_numpy


def gated_conv_reference(x, gates, kernel, bias, **conv_kwargs):
    """DeepMoE eq. 5: z = sum_i g_i (K_i * x_i), one expert per channel."""
    out = 0.0
    for i in range(x.shape[-1]):
        expert = conv2d_reference(
            x[..., i : i + 1], kernel[:, :, i : i + 1, :], **conv_kwargs
        )
        out = out + gates[:, i, None, None, None] * expert
    return out + bias


def random_inputs(batch=2, size=7, channels=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, size, size, channels)).astype("float32")
    gates = rng.uniform(0.1, 2.0, size=(batch, channels)).astype("float32")
    gates[0, 1] = 0.0
    gates[1, channels - 1] = 0.0
    return x, gates


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        dict(kernel_size=3, padding="same"),
        dict(kernel_size=3, padding="valid", strides=2),
        dict(kernel_size=(3, 3), padding="same", dilation_rate=2),
        dict(kernel_size=1, padding="valid"),
    ],
)
def test_matches_equation(conv_kwargs):
    x, gates = random_inputs()
    layer = GatedConv2D(4, bias_initializer="random_normal", **conv_kwargs)
    out = ops.convert_to_numpy(layer(x, gates))
    kernel = ops.convert_to_numpy(layer.kernel)
    bias = ops.convert_to_numpy(layer.bias)
    kernel_size = conv_kwargs["kernel_size"]
    if isinstance(kernel_size, int):
        kernel_size = (kernel_size, kernel_size)
    # One k x k slice per input channel (expert) and output channel.
    assert kernel.shape == (*kernel_size, 5, 4)
    expected = gated_conv_reference(
        x.astype("float64"),
        gates,
        kernel,
        bias,
        strides=conv_kwargs.get("strides", 1),
        padding=conv_kwargs["padding"],
        dilation_rate=conv_kwargs.get("dilation_rate", 1),
    )
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_channels_first_matches_channels_last():
    x, gates = random_inputs()
    last = GatedConv2D(3, 3, padding="same", data_format="channels_last")
    first = GatedConv2D(3, 3, padding="same", data_format="channels_first")
    last.build(x.shape, gates.shape)
    first.build(np.transpose(x, (0, 3, 1, 2)).shape, gates.shape)
    first.set_weights(last.get_weights())
    out_last = ops.convert_to_numpy(last(x, gates))
    call_first = first
    if BACKEND == "tensorflow":
        import tensorflow as tf

        # TensorFlow's CPU Conv2D kernel takes NHWC only (as for
        # keras.layers.Conv2D); XLA compiles channels-first convolutions.
        call_first = tf.function(first, jit_compile=True)
    out_first = ops.convert_to_numpy(
        call_first(np.transpose(x, (0, 3, 1, 2)), gates)
    )
    np.testing.assert_allclose(
        np.transpose(out_first, (0, 2, 3, 1)), out_last, atol=1e-5
    )


def test_zero_gates_contribute_nothing():
    x, gates = random_inputs()
    layer = GatedConv2D(4, 3, padding="same")
    out = ops.convert_to_numpy(layer(x, gates))
    # Anything in a channel whose gate is zero must leave the output as is.
    perturbed = x.copy()
    perturbed[0, ..., 1] = 1e4
    perturbed[1, ..., 4] = -1e4
    np.testing.assert_array_equal(
        ops.convert_to_numpy(layer(perturbed, gates)), out
    )
    # All gates zero: only the bias is left.
    zero = ops.convert_to_numpy(layer(x, np.zeros_like(gates)))
    np.testing.assert_array_equal(zero, np.zeros_like(zero))


def test_gradients_reach_kernel_and_gates_but_not_switched_off_channels():
    x, gates = random_inputs()
    gates[1, 1] = 0.0  # channel 1 is off for the whole batch
    layer = GatedConv2D(4, 3, padding="same")
    layer.build(x.shape, gates.shape)
    weight_grads, input_grads = gradients(
        layer, (x, gates), lambda out: ops.sum(ops.square(out))
    )
    kernel_grad = weight_grads[layer.kernel.path]
    assert np.any(kernel_grad)
    np.testing.assert_array_equal(kernel_grad[:, :, 1, :], 0.0)
    assert np.all(np.any(kernel_grad[:, :, [0, 2, 3, 4], :], axis=(0, 1, 3)))
    assert not is_zero_gradient(weight_grads[layer.bias.path])
    gate_grad = input_grads[1]
    assert gate_grad.shape == gates.shape
    assert np.all(gate_grad != 0)


def test_layer_contract(tmp_path):
    x, gates = random_inputs(batch=4, size=8, channels=3)
    run_layer_test(
        GatedConv2D,
        dict(filters=6, kernel_size=3, strides=2, padding="same"),
        (x, gates),
        expected_output_shape=(4, 4, 4, 6),
        tmp_path=tmp_path,
    )


@pytest.mark.skipif(
    BACKEND not in ("jax", "tensorflow"), reason="XLA compilation"
)
def test_compiles_under_xla():
    x, gates = random_inputs()
    layer = GatedConv2D(4, 3, padding="same")
    eager = ops.convert_to_numpy(layer(x, gates))
    if BACKEND == "jax":
        import jax

        values = [v.value for v in layer.trainable_weights]

        @jax.jit
        def run(values, x, gates):
            return layer.stateless_call(values, [], x, gates)[0]

        compiled = run(values, x, gates)
    else:
        import tensorflow as tf

        compiled = tf.function(layer, jit_compile=True)(x, gates)
    np.testing.assert_allclose(to_numpy(compiled), eager, atol=1e-5)


def test_in_functional_model_with_fit():
    images = keras.Input((8, 8, 3))
    gate_input = keras.Input((3,))
    hidden = GatedConv2D(4, 3, padding="same", activation="relu")(
        images, gate_input
    )
    logits = keras.layers.Dense(2)(
        keras.layers.GlobalAveragePooling2D()(hidden)
    )
    model = keras.Model([images, gate_input], logits)
    model.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    rng = np.random.default_rng(1)
    history = model.fit(
        [rng.normal(size=(16, 8, 8, 3)), rng.uniform(size=(16, 3))],
        rng.integers(0, 2, 16),
        epochs=2,
        verbose=0,
    )
    assert np.isfinite(history.history["loss"]).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(filters=0, kernel_size=3), "filters"),
        (dict(filters=-2, kernel_size=3), "filters"),
        (dict(filters=4, kernel_size=0), "kernel_size"),
        (dict(filters=4, kernel_size=3, strides=0), "strides"),
        (dict(filters=4, kernel_size=3, padding="full"), "padding"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GatedConv2D(**kwargs)


def test_invalid_inputs():
    x, gates = random_inputs()
    with pytest.raises(ValueError, match="gates_shape=\\(2, 4\\)"):
        GatedConv2D(4, 3)(x, gates[:, :4])
    with pytest.raises(ValueError, match="gates_shape"):
        GatedConv2D(4, 3)(x, gates[:, :, None])
    with pytest.raises(ValueError, match="found ndim=3"):
        GatedConv2D(4, 3)(x[0], gates)


def test_gates_are_checked_at_every_call():
    x, gates = random_inputs()
    layer = GatedConv2D(4, 3)
    layer(x, gates)
    # Built already: the same error as when building, not one from the
    # backend (or a silent broadcast of one row of gates to the batch).
    with pytest.raises(ValueError, match="gates_shape=\\(2, 4\\)"):
        layer(x, gates[:, :4])
    with pytest.raises(ValueError, match="gates_shape=\\(1, 5\\)"):
        layer(x, gates[:1])
    with pytest.raises(ValueError, match="gates_shape=\\(1, 5\\)"):
        GatedConv2D(4, 3)(x, gates[:1])
    # Symbolic: the batch is unknown, the number of channels is checked.
    images = keras.Input((7, 7, 5))
    assert layer(images, keras.Input((5,))).shape == (None, 5, 5, 4)
    with pytest.raises(ValueError, match="gates_shape=\\(None, 4\\)"):
        layer(images, keras.Input((4,)))
