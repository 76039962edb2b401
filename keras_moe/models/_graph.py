"""Reads the graph of a functional model from public layer attributes."""

import keras
from keras import tree

from keras_moe.layers import GatedConv2D

# Layers that act on each channel separately: a subset of their input
# channels gives the same subset of their output channels.
CHANNELWISE = (
    keras.layers.BatchNormalization,
    keras.layers.ReLU,
    keras.layers.Activation,
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

    def gated_producer(self, gated_layer):
        """The convolution whose outputs a `GatedConv2D`'s gates select.

        Follows the gated layer's input back through single-use
        channel-wise layers; returns `None` when no plain `Conv2D` produces
        it that way.
        """
        tensor = tree.flatten(gated_layer.input)[0]
        while True:
            if len(self.consumers.get(id(tensor), [])) != 1:
                return None
            layer = self.producer.get(id(tensor))
            if isinstance(layer, CHANNELWISE):
                tensor = layer.input
                continue
            if type(layer) is keras.layers.Conv2D and layer.groups == 1:
                return layer
            return None

    def gated_layers(self):
        """The `GatedConv2D` layers, in the order of `model.layers`."""
        return [
            layer
            for layer in self.model.layers
            if isinstance(layer, GatedConv2D)
        ]
