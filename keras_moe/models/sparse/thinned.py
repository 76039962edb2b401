"""Layers computed on a subset of their channels, with the model's weights.

A `Thinned` layer computes its `source` layer (a convolution, a gated
convolution, batch normalization, ...) on some of its input and output
channels only. It gathers the slices of the source's weights it needs at
every call, so it always computes with the source's current weights
(trained, loaded, or with new batch-normalization statistics): nothing is
copied that could go stale. The channel indices are tensors (constants in
eager execution, int32 variables in a compiled pruned network, assigned
before each pass).
"""

import keras
from keras import ops

from keras_moe.layers import GatedConv2D


def _conv(source, x, kernel, bias):
    y = ops.conv(
        x,
        kernel,
        strides=source.strides,
        padding=source.padding,
        dilation_rate=source.dilation_rate,
        data_format="channels_last",
    )
    if bias is not None:
        y = y + ops.cast(bias, y.dtype)
    if source.activation is not None:
        y = source.activation(y)
    return y


def _take(values, index, axis):
    return values if index is None else ops.take(values, index, axis=axis)


def _scatter_channels(x, index, channels):
    """`x`, whose channels are `index` of `channels`, with the others 0."""
    onehot = ops.one_hot(index, channels, dtype=x.dtype)
    return ops.matmul(x, onehot)


class Thinned(keras.layers.Layer):
    """`source` computed on the channels `input_index` -> `output_index`.

    Args:
        source: the model's layer.
        input_index: for a `GatedConv2D`, the input channels it convolves
            (its input arrives with exactly those channels, in that order);
            `None` for all.
        output_index: the output channels computed; `None` for all. For a
            channel-wise layer (batch normalization, a depthwise
            convolution, PReLU) its input arrives with those channels.
    """

    def __init__(self, source, input_index=None, output_index=None, **kwargs):
        super().__init__(dtype=source.dtype_policy, **kwargs)
        self.source = source
        self.input_index = input_index
        self.output_index = output_index

    def call(self, x, gates=None):
        source = self.source
        if isinstance(source, GatedConv2D):
            return self._gated(x, gates)
        if isinstance(source, keras.layers.BatchNormalization):
            return self._batch_norm(x)
        if type(source) is keras.layers.DepthwiseConv2D:
            kernel = _take(source.kernel, self.output_index, 2)
            y = ops.depthwise_conv(
                x,
                kernel,
                strides=source.strides,
                padding=source.padding,
                dilation_rate=source.dilation_rate,
                data_format="channels_last",
            )
            if source.use_bias:
                y = y + ops.cast(
                    _take(source.bias, self.output_index, 0), y.dtype
                )
            return source.activation(y)
        if isinstance(source, keras.layers.PReLU):
            alpha = ops.cast(
                _take(source.alpha, self.output_index, -1), x.dtype
            )
            return ops.where(x >= 0, x, alpha * x)
        if isinstance(source, keras.layers.Conv2D) and source.groups == 1:
            kernel = _take(source.kernel, self.output_index, 3)
            bias = None
            if source.use_bias:
                bias = _take(source.bias, self.output_index, 0)
            return _conv(source, x, kernel, bias)
        # Other layers (grouped convolutions): all outputs, then the ones
        # asked for.
        return _take(source(x), self.output_index, -1)

    def _gated(self, x, gates):
        source = self.source
        if source.groups > 1:
            # A grouped kernel cannot be sliced by input channel: put the
            # active channels back in place (the others are 0, as their
            # gates are), run the layer, keep the outputs asked for.
            if self.input_index is not None:
                x = _scatter_channels(
                    x, self.input_index, source.kernel.shape[2] * source.groups
                )
            return _take(source(x, gates), self.output_index, -1)
        gates = _take(ops.cast(gates, x.dtype), self.input_index, 1)
        kernel = _take(source.kernel, self.input_index, 2)
        kernel = _take(kernel, self.output_index, 3)
        bias = None
        if source.use_bias:
            bias = _take(source.bias, self.output_index, 0)
        return _conv(source, x * gates[:, None, None, :], kernel, bias)

    def _batch_norm(self, x):
        source = self.source
        index = self.output_index
        mean = _take(source.moving_mean, index, 0)
        variance = _take(source.moving_variance, index, 0)
        scale = ops.rsqrt(ops.cast(variance, "float32") + source.epsilon)
        if source.gamma is not None:
            scale = scale * ops.cast(_take(source.gamma, index, 0), "float32")
        shift = -ops.cast(mean, "float32") * scale
        if source.beta is not None:
            shift = shift + ops.cast(_take(source.beta, index, 0), "float32")
        return x * ops.cast(scale, x.dtype) + ops.cast(shift, x.dtype)

    def compute_output_spec(self, x, gates=None):
        # The source's output spec, with the channels that are computed.
        if isinstance(self.source, GatedConv2D):
            shape = self.source.compute_output_shape(x.shape)
        elif isinstance(self.source, keras.layers.Conv2D):
            shape = self.source.compute_output_shape(x.shape)
        elif type(self.source) is keras.layers.DepthwiseConv2D:
            shape = self.source.compute_output_shape(x.shape)
        else:
            shape = tuple(x.shape)
        if self.output_index is not None:
            shape = (*shape[:-1], int(self.output_index.shape[0]))
        return keras.KerasTensor(shape, dtype=self.compute_dtype)


class TakeChannels(keras.layers.Layer):
    """The channels `index` (an int32 tensor or variable) of the last
    axis."""

    def __init__(self, index, **kwargs):
        super().__init__(**kwargs)
        self.index = index

    def call(self, x):
        return ops.take(x, self.index, axis=-1)

    def compute_output_spec(self, x):
        shape = (*x.shape[:-1], int(self.index.shape[0]))
        return keras.KerasTensor(shape, dtype=x.dtype)


class Reused(keras.layers.Layer):
    """Calls one of the model's layers inside another graph.

    Calling the model's layer itself on new symbolic tensors would add a
    node to the model's graph; called from inside this layer, it is part
    of this layer's computation instead.
    """

    def __init__(self, layer, **kwargs):
        super().__init__(dtype=layer.dtype_policy, **kwargs)
        self.layer = layer

    def call(self, *args, **kwargs):
        return self.layer(*args, **kwargs)
