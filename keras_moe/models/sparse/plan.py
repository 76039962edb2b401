"""Which channels every layer computes for a pattern of active gates, and
the walk of the graph that computes only those.

The rule comes from `keras_moe.models._graph.ChannelAnalysis`, which FLOP
counting uses too: a `GatedConv2D` convolves its active input channels; a
layer whose outputs reach only gated convolutions through channel-wise
layers computes the channels that one of those gates keeps.
"""

import dataclasses

import keras
import numpy as np
from keras import ops
from keras import tree

from keras_moe.layers import GatedConv2D
from keras_moe.models._graph import ids
from keras_moe.models._graph import is_channelwise
from keras_moe.models.sparse.thinned import Reused
from keras_moe.models.sparse.thinned import TakeChannels
from keras_moe.models.sparse.thinned import Thinned


@dataclasses.dataclass
class ChannelPlan:
    """Channel indices (sorted int32 arrays) for one pass.

    Attributes:
        inputs: gated layer name -> the input channels it convolves.
        outputs: layer name -> the output channels it computes, for the
            layers the gates thin; the others compute all.
    """

    inputs: dict
    outputs: dict

    def signature(self):
        """The sizes of every index: what a compiled network depends on."""
        return tuple(
            (kind, name, len(index))
            for kind, table in (("in", self.inputs), ("out", self.outputs))
            for name, index in sorted(table.items())
        )


def _bucket(count, channels, buckets):
    """`count` rounded up to a multiple of `channels / buckets` (>= 1)."""
    if buckets is None:
        return count
    step = max(1, -(-channels // buckets))
    return int(min(channels, max(1, -(-count // step) * step)))


def _padded(active, size):
    """`size` sorted channel indices: the active ones, then inactive ones
    (whose gates are zero, so they contribute nothing)."""
    chosen = np.flatnonzero(active)
    if len(chosen) < size:
        extra = np.flatnonzero(~active)[: size - len(chosen)]
        chosen = np.sort(np.concatenate([chosen, extra]))
    return chosen.astype("int32")


def make_plan(analysis, masks, buckets=None):
    """The channels of one pass.

    Args:
        analysis: a `ChannelAnalysis` of the model.
        masks: one boolean `(C_l,)` array per gate: the channels active for
            some example of the pass.
        buckets: `None` for the exact channels; or an int, the number of
            different counts a layer may have: counts are rounded up and
            the indices padded with channels whose gates are zero.

    Returns:
        A `ChannelPlan`.
    """
    padded = [
        _padded(mask, _bucket(int(mask.sum()), mask.size, buckets))
        for mask in masks
    ]
    inputs = {
        layer.name: padded[i] for i, layer in enumerate(analysis.gated_layers)
    }
    outputs = {}
    for name, gates in analysis.output_gates.items():
        if not gates:
            continue
        if len(gates) == 1:
            outputs[name] = padded[gates[0]]
            continue
        union = np.zeros(masks[gates[0]].size, bool)
        for gate in gates:
            union[padded[gate]] = True
        outputs[name] = _padded(
            union, _bucket(int(union.sum()), union.size, buckets)
        )
    return ChannelPlan(inputs, outputs)


class Walk:
    """Computes the outputs of a model through the channels of a plan.

    Pull-based: asking for a tensor computes what it needs. A value is
    held with the channel indices it has (`None`: all of them). Layers the
    plan thins become `Thinned` layers; the others are the model's layers,
    called again. The same walk runs eagerly on arrays (the exact
    channels, for one pass) and on symbolic tensors (a pruned network to
    compile, whose indices are variables assigned before each pass).

    Args:
        analysis: the model's `ChannelAnalysis`.
        known: `{id(tensor): value}` of the tensors given (the model's
            inputs, the gates).
        plan: a `ChannelPlan`.
        index: a function `(key, array) -> tensor` that makes the index
            tensors; `key` says which plan entry the array comes from.
    """

    def __init__(self, analysis, known, plan, index, batch=None):
        self.analysis = analysis
        self.graph = analysis.graph
        self.plan = plan
        self.index = index
        self.batch = batch
        self.values = {key: (value, None) for key, value in known.items()}
        self.used = set()

    def full(self, tensor):
        return self.get(tensor, None)

    def get(self, tensor, need):
        """`tensor`'s value with the channels `need` (`None`: all)."""
        key = id(tensor)
        if key not in self.values:
            self._compute(self.graph.producer[key])
        self.used.add(key)
        value, has = self.values[key]
        if need is None:
            if has is not None:
                raise RuntimeError(
                    f"Internal error: tensor of {self.graph.producer[key]} "
                    "was thinned but is needed whole."
                )
            return value
        if has is not None and np.array_equal(has[1], need[1]):
            return value
        if has is None:
            return TakeChannels(self.index(need[0], need[1]))(value)
        positions = np.searchsorted(has[1], need[1]).astype("int32")
        return TakeChannels(self.index(("pos", has[0], need[0]), positions))(
            value
        )

    def _compute(self, layer):
        out = self.plan.outputs.get(layer.name)
        need = None if out is None else (("out", layer.name), out)
        if need is not None and len(out) == 0:
            # No channel is needed (eager passes only: compiled ones keep
            # at least one): nothing to compute.
            value = ops.zeros(
                (self.batch, *layer.output.shape[1:-1], 0),
                dtype=layer.compute_dtype,
            )
        elif isinstance(layer, GatedConv2D) and (
            layer.name in self.plan.inputs
        ):
            if len(self.plan.inputs[layer.name]) == 0:
                value = self._bias_only(layer, need)
            else:
                value = self._gated(layer, need)
        elif isinstance(layer, GatedConv2D):
            x, gates = tree.flatten(layer.input)
            value = Reused(layer)(self.full(x), self.full(gates))
        elif need is not None and is_channelwise(layer):
            value = self._channelwise(layer, need)
        elif need is not None:
            value = Thinned(layer, output_index=self._index(need))(
                self.full(layer.input)
            )
        else:
            inputs = layer.input
            if isinstance(inputs, (list, tuple)):
                value = Reused(layer)([self.full(t) for t in inputs])
            else:
                value = Reused(layer)(self.full(inputs))
        for tensor_id, item in zip(ids(layer.output), tree.flatten(value)):
            self.values[tensor_id] = (item, need)

    def _bias_only(self, layer, need):
        """A gated convolution whose gates are all zero: its bias."""
        width = layer.filters if need is None else len(need[1])
        value = ops.zeros(
            (self.batch, *layer.output.shape[1:-1], width),
            dtype=layer.compute_dtype,
        )
        if layer.use_bias:
            bias = layer.bias if need is None else ops.take(layer.bias, need[1])
            value = value + ops.cast(bias, value.dtype)
        return layer.activation(value)

    def _index(self, need):
        return None if need is None else self.index(*need)

    def _gated(self, layer, need):
        x, gates = tree.flatten(layer.input)
        active = self.plan.inputs[layer.name]
        select = (("in", layer.name), active)
        return Thinned(
            layer,
            input_index=self.index(*select),
            output_index=self._index(need),
        )(self.get(x, select), self.full(gates))

    def _channelwise(self, layer, need):
        x = self.get(layer.input, need)
        if isinstance(
            layer,
            (
                keras.layers.BatchNormalization,
                keras.layers.DepthwiseConv2D,
                keras.layers.PReLU,
            ),
        ):
            return Thinned(layer, output_index=self._index(need))(x)
        if _takes_training(layer):
            return Reused(layer)(x, training=False)
        return Reused(layer)(x)


def _takes_training(layer):
    return isinstance(
        layer,
        (
            keras.layers.Dropout,
            keras.layers.SpatialDropout2D,
            keras.layers.GaussianNoise,
            keras.layers.GaussianDropout,
        ),
    )
