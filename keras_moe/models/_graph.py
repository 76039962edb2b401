"""Reads the graph of a functional model from public layer attributes, and
works out which channels each layer must compute under DeepMoE gates."""

import keras
from keras import tree

from keras_moe.layers import GatedConv2D

# Element-wise activations: each output depends on its own input only.
# (Softmax and log-softmax mix channels and are not among them.)
ELEMENTWISE_ACTIVATIONS = frozenset(
    {
        "celu",
        "elu",
        "exponential",
        "gelu",
        "hard_sigmoid",
        "hard_silu",
        "hard_swish",
        "leaky_relu",
        "linear",
        "mish",
        "relu",
        "relu6",
        "selu",
        "sigmoid",
        "silu",
        "softplus",
        "softsign",
        "sparse_plus",
        "squareplus",
        "swish",
        "tanh",
        "tanh_shrink",
    }
)

# Layers that map channel c of their input to channel c of their output,
# whatever else they do (pooling, padding, normalization per channel).
_CHANNEL_PRESERVING = (
    keras.layers.BatchNormalization,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.PReLU,
    keras.layers.Dropout,
    keras.layers.SpatialDropout2D,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.Identity,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.ZeroPadding2D,
    keras.layers.Cropping2D,
)


def activation_name(activation):
    """The registered name of an activation function, or `None`."""
    try:
        name = keras.activations.serialize(activation)
    except (TypeError, ValueError):
        return None
    if isinstance(name, dict):
        name = name.get("config", name.get("class_name"))
    return name if isinstance(name, str) else None


def is_elementwise(activation):
    return activation_name(activation) in ELEMENTWISE_ACTIVATIONS


def is_channelwise(layer):
    """Whether output channel `c` of `layer` depends on input channel `c`
    only, on channels-last maps (so a channel subset passes through)."""
    if isinstance(layer, keras.layers.Activation):
        return is_elementwise(layer.activation)
    if isinstance(layer, keras.layers.BatchNormalization):
        return layer.axis in (-1, [-1]) or _is_last_axis(layer)
    if isinstance(layer, keras.layers.PReLU):
        return True
    if isinstance(layer, _CHANNEL_PRESERVING):
        return getattr(layer, "data_format", "channels_last") == (
            "channels_last"
        )
    if type(layer) is keras.layers.DepthwiseConv2D:
        return layer.depth_multiplier == 1 and is_elementwise(layer.activation)
    return False


def _is_last_axis(layer):
    axis = layer.axis
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    rank = len(layer.input.shape)
    return [a % rank for a in axes] == [rank - 1]


def is_convolution(layer):
    """Layers whose cost is counted per (input, output) channel pair."""
    return isinstance(
        layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
    )


def ids(structure):
    return [id(t) for t in tree.flatten(structure)]


class FunctionalGraph:
    """The functional graph of a model, read from public layer attributes."""

    def __init__(self, model):
        if not isinstance(model, keras.Model) or not hasattr(model, "inputs"):
            raise ValueError(
                "`model` must be a functional Keras model. "
                f"Received: model={model!r}"
            )
        self.model = model
        self.producer = {}
        self.consumers = {}
        for layer in model.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            for tensor_id in ids(layer.output):
                self.producer[tensor_id] = layer
            for tensor_id in ids(layer.input):
                self.consumers.setdefault(tensor_id, []).append(layer)
        for tensor_id in ids(model.outputs):
            # A model output is a consumer that needs every channel.
            self.consumers.setdefault(tensor_id, []).append(None)

    def gated_layers(self):
        """The `GatedConv2D` layers, in the order of `model.layers`."""
        return [
            layer
            for layer in self.model.layers
            if isinstance(layer, GatedConv2D)
        ]


class ChannelAnalysis:
    """Which gates select the input and output channels of every layer.

    DeepMoE's gates act on the input channels of a `GatedConv2D`. A channel
    whose gate is zero is not needed, so neither is that channel of
    whatever produced it: following a layer's output forward through
    channel-wise layers (batch normalization, element-wise activations,
    dropout, pooling, padding, depthwise convolutions), if every path ends
    at the feature input of gated convolutions, the layer must compute only
    the channels that one of those gates keeps. Otherwise (an addition, a
    concatenation, a model output, any layer that mixes channels) it must
    compute all of them.

    Attributes:
        graph: the `FunctionalGraph`.
        gated_layers: the `GatedConv2D` layers in the order of
            `model.layers`; gate `i` is the gate tensor of layer `i`.
        input_gate: layer name -> index of the gate that selects the
            layer's input channels (a `GatedConv2D`'s own gate), or `None`.
        output_gates: layer name -> tuple of the indices of the gates whose
            union selects the layer's output channels, or `None` when all
            are needed.
    """

    def __init__(self, model):
        self.graph = FunctionalGraph(model)
        self.gated_layers = self.graph.gated_layers()
        self._index = {
            id(layer): i for i, layer in enumerate(self.gated_layers)
        }
        self._forward_cache = {}
        self.input_gate = {}
        self.output_gates = {}
        for layer in model.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            self.input_gate[layer.name] = self._index.get(id(layer))
            outputs = tree.flatten(layer.output)
            thinnable = len(outputs) == 1 and (
                not hasattr(layer, "activation")
                or is_elementwise(layer.activation)
            )
            self.output_gates[layer.name] = (
                self._needed(outputs[0]) if thinnable else None
            )

    def _needed(self, tensor):
        key = id(tensor)
        if key not in self._forward_cache:
            self._forward_cache[key] = self._walk(tensor)
        return self._forward_cache[key]

    def _walk(self, tensor):
        consumers = self.graph.consumers.get(id(tensor), [])
        if not consumers:
            return None
        selected = set()
        for consumer in consumers:
            if consumer is None:
                return None
            if isinstance(consumer, GatedConv2D):
                x, _ = tree.flatten(consumer.input)
                if x is not tensor:
                    return None
                selected.add(self._index[id(consumer)])
            elif is_channelwise(consumer) and _single_input(consumer):
                found = self._needed(consumer.output)
                if found is None:
                    return None
                selected.update(found)
            else:
                return None
        return tuple(sorted(selected))


def _single_input(layer):
    return len(tree.flatten(layer.input)) == 1
