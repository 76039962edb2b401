"""Inference that computes only the channels the gates keep.

A DeepMoE network computed densely multiplies switched-off channels by zero;
`sparse_predict` skips them instead. For every `GatedConv2D` it

- convolves only the input channels whose gate is non-zero (the gated
  convolution's cost scales with its active input channels), and
- asks the layers that produce those input channels for the active ones
  only, through any chain of channel-wise layers (batch normalization,
  ReLU and other activations) back to the producing convolution, which then
  computes only those output channels.

The result equals the dense computation (up to floating-point rounding).
It runs eagerly, because the shapes depend on the gates; under `jit` or
XLA, use the dense model.

The graph is read through public Keras API only (`model.layers`,
`layer.input`, `layer.output`), so it works for functional models in which
every layer is called once, such as the models of this package.
"""

import contextlib

import keras
import numpy as np
from keras import ops
from keras import tree

from keras_moe.layers import GatedConv2D
from keras_moe.models._graph import CHANNELWISE
from keras_moe.models._graph import FunctionalGraph
from keras_moe.models._graph import ids as _ids

STRATEGIES = ("union", "per_example")


def _no_gradient_tracking():
    """Inference needs no autograd graph (only PyTorch builds one eagerly)."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


class _Executor:
    """Pull-based evaluation in which a tensor can be asked for a subset of
    its channels."""

    def __init__(self, graph, inputs):
        self.graph = graph
        self.values = dict(zip(_ids(graph.model.inputs), tree.flatten(inputs)))
        self.computed_channels = {}

    def full(self, tensor):
        key = id(tensor)
        if key not in self.values:
            layer = self.graph.producer[key]
            if isinstance(layer, GatedConv2D):
                value = self._gated(layer)
            elif isinstance(layer.input, (list, tuple)):
                # Layers with several tensor inputs (merge layers) take
                # them as one list.
                value = layer([self.full(t) for t in layer.input])
            else:
                value = layer(self.full(layer.input))
            # A layer with several outputs fills all of them at once.
            for out_id, out_value in zip(
                _ids(layer.output), tree.flatten(value)
            ):
                self.values[out_id] = out_value
        return self.values[key]

    def _gated(self, layer):
        x_tensor, gates_tensor = tree.flatten(layer.input)
        gates = self.full(gates_tensor)
        active = np.flatnonzero(
            np.any(ops.convert_to_numpy(gates) != 0, axis=0)
        )
        x = self.channels(x_tensor, active)
        self.computed_channels[layer.name] = (len(active), gates.shape[-1])
        return _gated_conv(layer, x, ops.take(gates, active, axis=1), active)

    def channels(self, tensor, active):
        """The value of `tensor` restricted to the `active` channels.

        Through a single-use chain of channel-wise layers, the producing
        convolution computes only those output channels.
        """
        key = id(tensor)
        producer = self.graph.producer.get(key)
        single_use = len(self.graph.consumers.get(key, [])) == 1
        if key in self.values or producer is None or not single_use:
            return ops.take(self.full(tensor), active, axis=-1)
        if isinstance(producer, CHANNELWISE):
            return _channelwise(
                producer, self.channels(producer.input, active), active
            )
        if type(producer) is keras.layers.Conv2D and producer.groups == 1:
            self.computed_channels[producer.name] = (
                len(active),
                producer.filters,
            )
            return _conv_subset(producer, self.full(producer.input), active)
        return ops.take(self.full(tensor), active, axis=-1)


def _channelwise(layer, x, active):
    if isinstance(layer, keras.layers.BatchNormalization):
        mean = ops.take(layer.moving_mean, active)
        variance = ops.take(layer.moving_variance, active)
        scale = ops.rsqrt(variance + layer.epsilon)
        if layer.gamma is not None:
            scale = scale * ops.take(layer.gamma, active)
        shift = -mean * scale
        if layer.beta is not None:
            shift = shift + ops.take(layer.beta, active)
        return x * ops.cast(scale, x.dtype) + ops.cast(shift, x.dtype)
    return layer(x)


def _conv_subset(layer, x, active):
    y = ops.conv(
        x,
        ops.take(layer.kernel, active, axis=3),
        strides=layer.strides,
        padding=layer.padding,
        dilation_rate=layer.dilation_rate,
        data_format="channels_last",
    )
    if layer.use_bias:
        y = y + ops.take(layer.bias, active)
    if layer.activation is not None:
        y = layer.activation(y)
    return y


def _gated_conv(layer, x, gates, active):
    if len(active) == 0:
        shape = layer.compute_output_shape((None, *x.shape[1:-1], 1))
        y = ops.zeros((ops.shape(x)[0], *shape[1:]), dtype=x.dtype)
    else:
        y = ops.conv(
            x * ops.cast(gates, x.dtype)[:, None, None, :],
            ops.take(layer.kernel, active, axis=2),
            strides=layer.strides,
            padding=layer.padding,
            dilation_rate=layer.dilation_rate,
            data_format="channels_last",
        )
    if layer.use_bias:
        y = y + layer.bias
    if layer.activation is not None:
        y = layer.activation(y)
    return y


def sparse_predict(
    model, x, strategy="union", batch_size=None, return_channels=False
):
    """Runs a gated network computing only the channels its gates keep.

    Batching strategies:

    - `"union"`: one pass per batch, keeping every channel that is active
      for at least one example of the batch. Outputs are exact; the saving
      shrinks as the batch grows unless the examples share their zero
      gates.
    - `"per_example"`: one pass per example, each with its own channels:
      the full saving for every example, at the price of batch-1 calls
      (best for latency-bound, small-batch inference).

    Args:
        model: a functional model containing `GatedConv2D` layers, in which
            every layer is called once (such as the DeepMoE models of
            `keras_moe.models`), with channels-last data.
        x: a batch of inputs (array or tensor), or a list of them for a
            model with several inputs.
        strategy: `"union"` or `"per_example"`.
        batch_size: optional int; with `"union"`, split `x` into batches of
            this size.
        return_channels: bool; also return, for every pass, a dict from
            layer name to `(computed, total)` channels: input channels for
            a `GatedConv2D`, output channels for a convolution that
            produces gated channels.

    Returns:
        The model's outputs for `x`, with the same structure as
        `model(x)`; with `return_channels`, a tuple of the outputs and the
        list of per-pass channel dicts.

    Example:

    ```python
    inputs = keras.Input((8, 8, 4))
    gates = keras.Input((4,))
    y = keras_moe.layers.GatedConv2D(3, 3, padding="same")(inputs, gates)
    model = keras.Model([inputs, gates], y)
    x = np.random.rand(2, 8, 8, 4).astype("float32")
    g = np.array([[1.0, 0.0, 0.5, 0.0], [0.0, 0.0, 2.0, 0.0]], "float32")
    sparse = keras_moe.models.sparse_predict(model, [x, g])
    dense = model([x, g])
    diff = keras.ops.convert_to_numpy(sparse - dense)
    bool(np.abs(diff).max() < 1e-5)  # True
    ```
    """
    if strategy not in STRATEGIES:
        raise ValueError(
            f"`strategy` must be one of {list(STRATEGIES)}. "
            f"Received: strategy={strategy!r}"
        )
    graph = FunctionalGraph(model)
    for layer in model.layers:
        data_format = getattr(layer, "data_format", "channels_last")
        if isinstance(layer, (keras.layers.Conv2D, GatedConv2D)) and (
            data_format != "channels_last"
        ):
            raise ValueError(
                "sparse_predict supports channels-last models only. "
                f"Layer {layer.name!r} has data_format={data_format!r}."
            )
    inputs = list(x) if isinstance(x, (list, tuple)) else [x]
    num = int(inputs[0].shape[0])
    step = 1 if strategy == "per_example" else (batch_size or num)
    pieces, channels = [], []
    with _no_gradient_tracking():
        for start in range(0, num, step):
            batch = [t[start : start + step] for t in inputs]
            executor = _Executor(graph, batch)
            pieces.append([executor.full(t) for t in model.outputs])
            channels.append(executor.computed_channels)
    flat = [
        piece[0] if len(pieces) == 1 else ops.concatenate(piece, axis=0)
        for piece in zip(*pieces)
    ]
    outputs = tree.pack_sequence_as(model.output, flat)
    return (outputs, channels) if return_channels else outputs
