"""Shared test helpers, in the spirit of KerasHub's `run_layer_test`."""

import os

import keras
import numpy as np
from keras import ops
from keras import tree

BACKEND = keras.backend.backend()
JIT_BACKENDS = ("jax", "tensorflow")


def to_numpy(structure):
    return tree.map_structure(
        lambda t: None if t is None else ops.convert_to_numpy(t), structure
    )


def _as_tuple(input_data):
    if isinstance(input_data, (list, tuple)):
        return tuple(input_data)
    return (input_data,)


def _float_outputs(outputs):
    return [
        t
        for t in tree.flatten(outputs)
        if keras.backend.standardize_dtype(t.dtype).startswith(
            ("float", "bfloat")
        )
    ]


def _training_model(inputs, outputs):
    """A model whose single output is a weighted mean of every float output.

    The layer's outputs may be nested (tuples, lists, dicts, int routing
    indices); folding them into one scalar per example makes one `fit` step
    exercise gradients through all of them. The weights vary along each
    output, so that outputs with a constant mean (softmax probabilities)
    still get a gradient.
    """

    def fold(t):
        flat = ops.reshape(ops.cast(t, "float32"), (ops.shape(t)[0], -1))
        weights = np.linspace(-1.0, 1.0, flat.shape[-1]).astype("float32")
        weighted = ops.multiply(flat, ops.convert_to_tensor(weights))
        return ops.mean(weighted, axis=-1, keepdims=True)

    terms = [
        keras.layers.Lambda(fold, output_shape=(1,))(t)
        for t in _float_outputs(outputs)
    ]
    target = terms[0] if len(terms) == 1 else keras.layers.Add()(terms)
    return keras.Model(inputs, target)


def run_layer_test(
    layer_cls,
    init_kwargs,
    input_data,
    expected_output_shape,
    call_kwargs=None,
    tmp_path=None,
    run_training=True,
    run_mixed_precision=True,
    atol=1e-5,
):
    """Runs the checks every public layer must pass.

    Config round trip, eager call, symbolic call in a functional model with
    matching shapes, one `fit` step that changes trainable weights, XLA /
    `jit` compiled training on jax and tensorflow, `.keras` save and load
    with identical outputs, and calls under `mixed_float16` and
    `mixed_bfloat16` with the same weights, whose outputs must be the
    float32 outputs within the formats' precision.

    Args:
        layer_cls: the layer class.
        init_kwargs: constructor arguments.
        input_data: a NumPy array or a tuple of them (positional inputs).
        expected_output_shape: the output shape, or a nested structure of
            shapes matching the layer's output structure.
        call_kwargs: extra call arguments.
        tmp_path: a directory for the saved model.
        run_training: whether to run the `fit` checks.
        run_mixed_precision: whether to run the mixed-precision checks.
        atol: tolerance of the save/load comparison.
    """
    call_kwargs = call_kwargs or {}
    inputs = _as_tuple(input_data)
    # Weights drawn the same at every run: the mixed-precision comparison
    # is then the same at every run too.
    keras.utils.set_random_seed(0)

    # Config round trip.
    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    revived = layer_cls.from_config(
        keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(layer)
        ).get_config()
    )
    assert revived.get_config() == config

    # Eager call.
    outputs = layer(*inputs, **call_kwargs)
    assert layer.built
    _assert_shapes(outputs, expected_output_shape)

    # Symbolic call in a functional model.
    symbolic_inputs = [
        keras.Input(shape=x.shape[1:], dtype=x.dtype) for x in inputs
    ]
    symbolic_layer = layer_cls(**init_kwargs)
    symbolic_outputs = symbolic_layer(*symbolic_inputs, **call_kwargs)
    _assert_shapes(symbolic_outputs, expected_output_shape, ignore_batch=True)
    model = keras.Model(symbolic_inputs, symbolic_outputs)
    expected = to_numpy(model(list(inputs)))

    if tmp_path is not None:
        path = os.path.join(str(tmp_path), "model.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
        actual = to_numpy(loaded(list(inputs)))
        flat_actual, flat_expected = (
            tree.flatten(actual),
            tree.flatten(expected),
        )
        assert len(flat_actual) == len(flat_expected)
        for a, b in zip(flat_actual, flat_expected):
            np.testing.assert_allclose(a, b, atol=atol)

    if run_training:
        trainer = _training_model(symbolic_inputs, symbolic_outputs)
        for jit_compile in (False, True):
            if jit_compile and BACKEND not in JIT_BACKENDS:
                continue
            before = [
                ops.convert_to_numpy(w) for w in trainer.trainable_weights
            ]
            trainer.compile(
                optimizer=keras.optimizers.SGD(0.1),
                loss="mse",
                jit_compile=jit_compile,
            )
            batch = inputs[0].shape[0]
            trainer.fit(
                list(inputs),
                np.ones((batch, 1), "float32"),
                batch_size=batch,
                epochs=1,
                verbose=0,
            )
            after = [ops.convert_to_numpy(w) for w in trainer.trainable_weights]
            changed = [not np.array_equal(b, a) for b, a in zip(before, after)]
            assert any(changed), "one fit step changed no trainable weight"

    if run_mixed_precision:
        for policy, tolerance in MIXED_PRECISION_TOLERANCE.items():
            _check_mixed_precision(
                layer_cls,
                {**init_kwargs, "dtype": policy},
                layer,
                inputs,
                outputs,
                expected_output_shape,
                call_kwargs,
                tolerance,
            )
    return layer, outputs


# Relative to the largest float32 output: a few units of each format's
# precision (2^-11 for float16, 2^-8 for bfloat16) after the sums of a
# layer. A wrong cast, a dropped scale or an overflow is far larger.
MIXED_PRECISION_TOLERANCE = {"mixed_float16": 1e-2, "mixed_bfloat16": 5e-2}


def _check_mixed_precision(
    layer_cls,
    init_kwargs,
    reference,
    inputs,
    expected,
    expected_output_shape,
    call_kwargs,
    tolerance,
):
    """The layer under a mixed policy, with the float32 layer's weights,
    must give its outputs within `tolerance` and keep float32 weights."""
    mixed = layer_cls(**init_kwargs)
    mixed(*inputs, **call_kwargs)
    mixed.set_weights(reference.get_weights())
    for weight in mixed.weights:
        assert keras.backend.standardize_dtype(weight.dtype) == "float32"
    actual = mixed(*inputs, **call_kwargs)
    _assert_shapes(actual, expected_output_shape)
    policy = init_kwargs["dtype"]
    for a, b in zip(tree.flatten(actual), tree.flatten(expected)):
        a, b = ops.convert_to_numpy(a), ops.convert_to_numpy(b)
        if not np.issubdtype(b.dtype, np.floating):
            np.testing.assert_array_equal(a, b, err_msg=policy)
            continue
        a = a.astype("float32")
        assert np.all(np.isfinite(a)), policy
        scale = max(float(np.max(np.abs(b))), 1e-6)
        np.testing.assert_allclose(
            a, b, rtol=0, atol=tolerance * scale, err_msg=policy
        )


def _assert_shapes(outputs, expected, ignore_batch=False):
    flat_outputs = tree.flatten(outputs)
    flat_expected = _flatten_shapes(expected)
    assert len(flat_outputs) == len(flat_expected), (
        f"{len(flat_outputs)} outputs, expected {len(flat_expected)}"
    )
    for tensor, shape in zip(flat_outputs, flat_expected):
        actual = tuple(tensor.shape)
        if ignore_batch:
            actual, shape = actual[1:], tuple(shape)[1:]
        assert actual == tuple(shape), f"shape {actual}, expected {shape}"


def _flatten_shapes(structure):
    """Flattens a nested structure whose leaves are shape tuples."""
    if isinstance(structure, tuple) and all(
        isinstance(d, int) or d is None for d in structure
    ):
        return [structure]
    if isinstance(structure, dict):
        return [
            s
            for key in sorted(structure)
            for s in _flatten_shapes(structure[key])
        ]
    return [s for item in structure for s in _flatten_shapes(item)]


def gradients(layer, inputs, loss_fn, call_kwargs=None):
    """Gradients of `loss_fn(layer(*inputs))` on the current backend.

    Args:
        layer: a built layer.
        inputs: tuple of NumPy arrays, the positional call inputs.
        loss_fn: maps the layer's outputs to a scalar (with `keras.ops`).
        call_kwargs: extra call arguments.

    Returns:
        `(weight_grads, input_grads)`: dicts from `variable.path` to a NumPy
        gradient (or `None` where the backend reports no gradient), and a
        list with one gradient per input.
    """
    call_kwargs = call_kwargs or {}
    weights = layer.trainable_weights
    if BACKEND == "jax":
        import jax

        non_trainable = [v.value for v in layer.non_trainable_weights]

        def objective(trainable_values, input_values):
            outputs, _ = layer.stateless_call(
                trainable_values, non_trainable, *input_values, **call_kwargs
            )
            return loss_fn(outputs)

        weight_grads, input_grads = jax.grad(objective, argnums=(0, 1))(
            [v.value for v in weights], [np.asarray(x) for x in inputs]
        )
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        tensors = [tf.convert_to_tensor(x) for x in inputs]
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            loss = loss_fn(layer(*tensors, **call_kwargs))
        grads = tape.gradient(loss, [v.value for v in weights] + tensors)
        weight_grads, input_grads = grads[: len(weights)], grads[len(weights) :]
    else:
        import torch

        tensors = [torch.tensor(x, requires_grad=True) for x in inputs]
        for v in weights:
            v.value.grad = None
        loss = loss_fn(layer(*tensors, **call_kwargs))
        loss.backward()
        weight_grads = [v.value.grad for v in weights]
        input_grads = [t.grad for t in tensors]
    weight_grads = {
        v.path: None if g is None else ops.convert_to_numpy(g)
        for v, g in zip(weights, weight_grads)
    }
    input_grads = [
        None if g is None else ops.convert_to_numpy(g) for g in input_grads
    ]
    return weight_grads, input_grads


def is_zero_gradient(grad):
    """True where the backend reports no gradient or an all-zero one."""
    return grad is None or not np.any(grad)


def conv2d_reference(
    x, kernel, bias=None, strides=1, padding="valid", dilation_rate=1
):
    """Channels-last 2D convolution written with loops (DeepMoE eq. 2).

    `z[b, s, t, o] = sum_{i,u,v} K[u, v, i, o] x[b, s*st+u*d, t*st+v*d, i]`.
    """
    batch, height, width, _ = x.shape
    k_h, k_w, _, filters = kernel.shape
    if padding == "same":
        out_h = -(-height // strides)
        out_w = -(-width // strides)
        pad_h = max(
            (out_h - 1) * strides + (k_h - 1) * dilation_rate + 1 - height, 0
        )
        pad_w = max(
            (out_w - 1) * strides + (k_w - 1) * dilation_rate + 1 - width, 0
        )
        x = np.pad(
            x,
            (
                (0, 0),
                (pad_h // 2, pad_h - pad_h // 2),
                (pad_w // 2, pad_w - pad_w // 2),
                (0, 0),
            ),
        )
    else:
        out_h = (height - (k_h - 1) * dilation_rate - 1) // strides + 1
        out_w = (width - (k_w - 1) * dilation_rate - 1) // strides + 1
    z = np.zeros((batch, out_h, out_w, filters), dtype="float64")
    for s in range(out_h):
        for t in range(out_w):
            for u in range(k_h):
                for v in range(k_w):
                    patch = x[
                        :,
                        s * strides + u * dilation_rate,
                        t * strides + v * dilation_rate,
                        :,
                    ]
                    z[:, s, t, :] += patch @ kernel[u, v]
    if bias is not None:
        z += bias
    return z
