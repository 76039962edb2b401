"""A smaller network without the channels that are never active."""

import keras
import numpy as np
from keras import ops
from keras import tree

from keras_moe.layers import GatedConv2D
from keras_moe.layers import SparseGatingHeads
from keras_moe.models._graph import ids
from keras_moe.models._graph import is_channelwise
from keras_moe.models.sparse.plan import make_plan
from keras_moe.models.sparse.predictor import _as_inputs
from keras_moe.models.sparse.predictor import _check_model


@keras.saving.register_keras_serializable(package="keras_moe")
class SelectChannels(keras.layers.Layer):
    """Keeps the channels `indices` of the last axis (a fixed list).

    Used by `prune_inactive_channels` where a gate tensor does not come
    from a `SparseGatingHeads` layer that could be narrowed itself.

    Args:
        indices: list of ints, the channels kept, in order.
        **kwargs: base layer keyword arguments.
    """

    def __init__(self, indices, **kwargs):
        super().__init__(**kwargs)
        self.indices = [int(i) for i in indices]

    def call(self, x):
        return ops.take(x, np.asarray(self.indices, "int32"), axis=-1)

    def compute_output_shape(self, x_shape):
        return (*x_shape[:-1], len(self.indices))

    def get_config(self):
        return {**super().get_config(), "indices": self.indices}


def _narrow(layer, in_index=None, out_index=None):
    """A copy of `layer` on some channels, holding slices of its weights."""
    config = dict(layer.get_config())
    config["name"] = layer.name
    weights = {
        w.path.split("/")[-1]: ops.convert_to_numpy(w) for w in layer.weights
    }
    if isinstance(layer, keras.layers.BatchNormalization):
        new = type(layer).from_config(config)
        new.build((*layer.input.shape[:-1], len(out_index)))
        for name in ("gamma", "beta", "moving_mean", "moving_variance"):
            if getattr(layer, name, None) is not None:
                getattr(new, name).assign(weights[name][out_index])
        return new
    if type(layer) is keras.layers.DepthwiseConv2D:
        new = type(layer).from_config(config)
        new.build((*layer.input.shape[:-1], len(out_index)))
        new.kernel.assign(weights["kernel"][:, :, out_index])
        if layer.use_bias:
            new.bias.assign(weights["bias"][out_index])
        return new
    kernel = weights["kernel"]
    bias = weights.get("bias")
    if in_index is not None:
        kernel = kernel[:, :, in_index]
    if out_index is not None:
        kernel = kernel[..., out_index]
        if bias is not None:
            bias = bias[out_index]
        config["filters"] = len(out_index)
    new = type(layer).from_config(config)
    if isinstance(layer, GatedConv2D):
        new.build((None, None, None, kernel.shape[2]), (None, kernel.shape[2]))
    else:
        new.build((None, None, None, kernel.shape[2]))
    new.kernel.assign(kernel)
    if bias is not None:
        new.bias.assign(bias)
    return new


def _narrow_heads(heads, keep):
    """A copy of `SparseGatingHeads` whose head `i` has the channels
    `keep[i]` (all of them where `keep[i]` is `None`)."""
    config = dict(heads.get_config())
    widths = [
        heads.channels[i] if k is None else len(k) for i, k in enumerate(keep)
    ]
    config["channels"] = widths
    new = SparseGatingHeads.from_config(config)
    new.build((None, heads.heads[0].kernel.shape[0]))
    for head, narrow, k in zip(heads.heads, new.heads, keep):
        kernel = ops.convert_to_numpy(head.kernel)
        narrow.kernel.assign(kernel if k is None else kernel[:, k])
        if head.use_bias:
            bias = ops.convert_to_numpy(head.bias)
            narrow.bias.assign(bias if k is None else bias[k])
    return new


def prune_inactive_channels(model, data, batch_size=128):
    """Removes the channels whose gates are zero on every example of `data`.

    DeepMoE gates switch channels off per example; a channel that no
    example of a calibration set uses can be removed for good. This
    returns a smaller functional model: every `GatedConv2D` keeps only the
    input channels active for some calibration example, the layers that
    produce them (through batch normalization and other channel-wise
    layers) compute only those, and every gating head outputs only those
    gates. Layers the gates do not thin are copied as they are. The new
    model is still gated where the gates vary: a kept channel is still
    switched on and off per example.

    Outputs equal the original's on every calibration example, and on any
    input whose active channels are all kept. An input that would switch
    on a removed channel loses that channel's contribution: its outputs
    differ from the original's. Calibrate on data that covers the inputs
    to expect (the training set, or a large sample of it), and check
    `keras_moe.analysis.collect_gates` on new data when in doubt.

    The returned model has new layers (sharing no variable with `model`),
    saves as a `.keras` file and exports with `model.export`.

    Args:
        model: a functional model with `GatedConv2D` layers (such as the
            DeepMoE networks of `keras_moe.models`), channels-last.
        data: calibration inputs: an array (or a list of arrays for
            several inputs).
        batch_size: int, examples per batch for the gate pass.

    Returns:
        A `keras.Model` with the inputs and outputs of `model`.

    Example:

    ```python
    network = keras_moe.models.DeepMoEResNet(
        8, num_classes=3, input_shape=(16, 16, 3), embedding_layers=2)
    heads = network.get_layer("gating_heads")
    for head in heads.heads:  # switch every other channel off for good
        kernel = keras.ops.convert_to_numpy(head.kernel)
        kernel[:, ::2] = -1.0
        head.kernel.assign(kernel)
    x = np.random.rand(4, 16, 16, 3).astype("float32")
    pruned = keras_moe.models.prune_inactive_channels(network, x)
    pruned.count_params() < network.count_params()  # True
    dense = keras.ops.convert_to_numpy(network(x))
    small = keras.ops.convert_to_numpy(pruned(x))
    bool(np.abs(small - dense).max() < 1e-4)  # True
    ```
    """
    from keras_moe.models.sparse.predictor import SparsePredictor

    analysis = _check_model(model)
    inputs = _as_inputs(model, data)
    if len(inputs[0]) == 0:
        raise ValueError("`data` must hold at least one calibration example.")
    predictor = SparsePredictor(model)
    gate_tensors = predictor._gate_tensors
    masks = [np.zeros(t.shape[-1], bool) for t in gate_tensors]
    for start in range(0, len(inputs[0]), batch_size):
        values = predictor._early_values(
            [t[start : start + batch_size] for t in inputs]
        )
        for i, tensor in enumerate(gate_tensors):
            masks[i] |= np.any(values[id(tensor)] != 0, axis=0)
    for layer, mask in zip(analysis.gated_layers, masks):
        if layer.groups > 1:
            # A grouped kernel cannot lose input channels: keep them all.
            mask[:] = True
        elif not mask.any():
            # No calibration example uses the layer: it outputs its bias.
            # One channel (with zero gates) keeps it a valid convolution.
            mask[0] = True
    plan = make_plan(analysis, masks)
    return _rebuild(model, analysis, plan)


def _rebuild(model, analysis, plan):
    graph = analysis.graph
    gate_of = {
        id(tree.flatten(layer.input)[1]): i
        for i, layer in enumerate(analysis.gated_layers)
    }
    new_inputs = [
        keras.Input(t.shape[1:], dtype=t.dtype, name=t.name)
        for t in model.inputs
    ]
    values = {
        key: (value, None) for key, value in zip(ids(model.inputs), new_inputs)
    }
    narrowed_heads = {}

    def get(tensor, need=None):
        key = id(tensor)
        if key not in values:
            compute(graph.producer[key])
        value, has = values[key]
        if need is None:
            return value
        if has is not None and np.array_equal(has, need):
            return value
        positions = need if has is None else np.searchsorted(has, need)
        return SelectChannels(positions)(value)

    def gate(tensor, keep):
        """The gate tensor, narrowed to the channels `keep`."""
        producer = graph.producer.get(id(tensor))
        if isinstance(producer, SparseGatingHeads):
            if id(producer) not in narrowed_heads:
                outputs = tree.flatten(producer.output)
                selections = [
                    plan.inputs[analysis.gated_layers[gate_of[id(t)]].name]
                    if id(t) in gate_of
                    else None
                    for t in outputs
                ]
                narrow = _narrow_heads(producer, selections)
                narrowed_heads[id(producer)] = tree.flatten(
                    narrow(get(producer.input))
                )
            position = [id(t) for t in tree.flatten(producer.output)].index(
                id(tensor)
            )
            return narrowed_heads[id(producer)][position]
        return SelectChannels(keep)(get(tensor))

    def compute(layer):
        out = plan.outputs.get(layer.name)
        if isinstance(layer, GatedConv2D):
            x, gates = tree.flatten(layer.input)
            keep = plan.inputs[layer.name]
            if layer.groups > 1:
                value = _narrow(layer, out_index=out)(get(x, keep), get(gates))
            else:
                new = _narrow(layer, in_index=keep, out_index=out)
                value = new(get(x, keep), gate(gates, keep))
        elif out is not None and is_channelwise(layer):
            if isinstance(
                layer,
                (keras.layers.BatchNormalization, keras.layers.DepthwiseConv2D),
            ):
                value = _narrow(layer, out_index=out)(get(layer.input, out))
            else:
                value = _clone(layer)(get(layer.input, out))
        elif (
            out is not None
            and type(layer) is keras.layers.Conv2D
            and (layer.groups == 1)
        ):
            value = _narrow(layer, out_index=out)(get(layer.input))
        else:
            out = None
            new = _clone(layer)
            inputs = layer.input
            if isinstance(inputs, (list, tuple)):
                value = new([get(t) for t in inputs])
            else:
                value = new(get(inputs))
        for key, item in zip(ids(layer.output), tree.flatten(value)):
            values[key] = (item, out)

    outputs = tree.map_structure(get, model.output)
    inputs = tree.pack_sequence_as(model.input, new_inputs)
    return keras.Model(inputs, outputs, name=f"{model.name}_pruned")


def _clone(layer):
    """A new layer with `layer`'s configuration and weights."""
    new = type(layer).from_config(layer.get_config())
    if layer.weights:
        shapes = tree.map_structure(lambda t: t.shape, layer.input)
        new.build(shapes)
        new.set_weights(layer.get_weights())
    return new
