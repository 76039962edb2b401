"""Inference that computes only the channels the gates keep.

A DeepMoE network computed densely multiplies switched-off channels by zero;
`sparse_predict` and `SparsePredictor` skip them instead. For every
`GatedConv2D` they

- convolve only the input channels whose gate is non-zero (the gated
  convolution's cost scales with its active input channels), and
- ask the layers that produce those input channels for the active ones
  only, through any chain of channel-wise layers (batch normalization,
  ReLU and other activations) back to the producing convolution, which then
  computes only those output channels.

The result equals the dense computation (up to floating-point rounding).

Compiled execution (`SparsePredictor`, used by `sparse_predict`): the gates
are computed first, by the part of the model that produces them; then a
pruned copy of the network runs through Keras' compiled `predict_on_batch`
(`jax.jit` on JAX, a `tf.function` on TensorFlow, as the dense model
predicts; PyTorch predicts eagerly). In the pruned copy, every thinned
layer is a narrower layer of the same kind (a `Conv2D` with fewer filters,
a `BatchNormalization` over fewer channels, a `GatedConv2D` with fewer
input channels) holding slices of the original weights. A pruned network
depends only on how many channels each gated layer keeps, so it is built
and compiled once per set of counts and cached; the slices of a new
pattern with the same counts are loaded into it (on the device) before it
runs, and a recurring pattern runs with no work but the pruned network.

The graph is read through public Keras API only (`model.layers`,
`layer.input`, `layer.output`), so it works for functional models in which
every layer is called once, such as the models of this package.
"""

import collections
import contextlib
import weakref

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
        if len(active) == 0:
            return _gated_zeros(layer, x)
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
    """A `GatedConv2D` on the input channels `active` (at least one)."""
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


def _gated_zeros(layer, x):
    """A `GatedConv2D` whose gates are all zero: its bias, activated."""
    shape = layer.compute_output_shape((None, *x.shape[1:-1], 1))
    y = ops.zeros((ops.shape(x)[0], *shape[1:]), dtype=x.dtype)
    if layer.use_bias:
        y = y + layer.bias
    if layer.activation is not None:
        y = layer.activation(y)
    return y


class _TakeChannels(keras.layers.Layer):
    """The channels `index` (an int32 variable) of the last axis."""

    def __init__(self, index, **kwargs):
        super().__init__(**kwargs)
        self.index = index

    def call(self, x):
        return ops.take(x, self.index, axis=-1)


class _Columns(keras.layers.Layer):
    """The columns `start:stop` of a 2D input."""

    def __init__(self, start, stop, **kwargs):
        super().__init__(**kwargs)
        self.start = start
        self.stop = stop

    def call(self, x):
        return x[:, self.start : self.stop]


class _Probe(keras.layers.Layer):
    """A few values of some weights, read at every call.

    Where variables are changed in place (TensorFlow), comparing the probe
    with its value when the slices were taken tells whether the model's
    weights have changed since.
    """

    def __init__(self, weights, **kwargs):
        super().__init__(**kwargs)
        self.probed = list(weights)

    def call(self, x):
        values = []
        for weight in self.probed:
            size = int(np.prod(weight.shape))
            positions = np.unique(np.linspace(0, size - 1, 4).astype(int))
            flat = ops.reshape(ops.cast(weight, "float32"), (-1,))
            values.append(ops.take(flat, positions))
        return ops.expand_dims(ops.concatenate(values), 0)


def _bucket(count, channels, count_buckets):
    """`count` rounded up to a multiple of `channels / count_buckets`."""
    step = max(1, -(-channels // count_buckets))
    return int(min(channels, max(1, -(-count // step) * step)))


def _padded_index(active, size):
    """`size` sorted channel indices: the active ones, then inactive ones."""
    chosen = np.flatnonzero(active)
    if len(chosen) < size:
        chosen = np.sort(
            np.concatenate(
                [chosen, np.flatnonzero(~active)[: size - len(chosen)]]
            )
        )
    return chosen.astype("int32")


def _narrow_copy(layer, **overrides):
    """A new layer like `layer`, with some constructor arguments changed."""
    config = {**layer.get_config(), **overrides}
    config["name"] = f"{layer.name}_sparse"
    return type(layer).from_config(config)


class _Gathered(keras.layers.Layer):
    """A thinned layer that gathers its weights at every call.

    `source` is the model's layer (a producing `Conv2D`, a
    `BatchNormalization` or a `GatedConv2D`), `index` the int32 variable
    of the channels kept.
    """

    def __init__(self, source, index, **kwargs):
        super().__init__(**kwargs)
        self.source = source
        self.index = index

    def call(self, x, gates=None):
        if isinstance(self.source, GatedConv2D):
            return _gated_conv(self.source, x, gates, self.index)
        if isinstance(self.source, keras.layers.BatchNormalization):
            return _channelwise(self.source, x, self.index)
        return _conv_subset(self.source, x, self.index)


class _PrunedBuilder:
    """Builds the pruned functional graph for given channel counts.

    Mirrors `_Executor` on symbolic tensors: original layers are called
    again where nothing is thinned (sharing their weights). With
    `copy_weights`, the thinned layers are narrower copies (a `Conv2D`
    with fewer filters, a `BatchNormalization` over fewer channels, a
    `GatedConv2D` with fewer input channels) whose weights are loaded as
    slices of the originals; otherwise `_Gathered` layers gather the
    originals' weights at every call. A thinned `GatedConv2D` takes its
    gates already sliced, as an input; `_TakeChannels` selects the
    channels of a tensor that other layers need in full.
    """

    def __init__(self, graph, known, sizes, copy_weights):
        self.graph = graph
        self.values = dict(known)
        self.known = set(known)
        self.used = set()  # the known tensors the graph uses
        self.sizes = sizes
        self.copy_weights = copy_weights
        # The sliced gates of every thinned gated layer, side by side in
        # one input, in the order of `sizes`.
        self.gate_columns, stop = {}, 0
        for name, size in sizes.items():
            if size < graph.model.get_layer(name).kernel.shape[2]:
                self.gate_columns[name] = (stop, stop + size)
                stop += size
        self.gates = keras.Input((stop,), name="active_gates")
        self.gates_used = False
        self.indices = {}  # gated layer name -> index variable, if needed
        self.loaders = []  # (narrow layer, original layer, gated layer name)

    def full(self, tensor):
        key = id(tensor)
        if key in self.known:
            self.used.add(key)
        if key not in self.values:
            layer = self.graph.producer[key]
            if isinstance(layer, GatedConv2D):
                value = self._gated(layer)
            elif isinstance(layer.input, (list, tuple)):
                value = layer([self.full(t) for t in layer.input])
            else:
                value = layer(self.full(layer.input))
            for out_id, out_value in zip(
                _ids(layer.output), tree.flatten(value)
            ):
                self.values[out_id] = out_value
        return self.values[key]

    def index(self, gated_name):
        if gated_name not in self.indices:
            self.indices[gated_name] = keras.Variable(
                np.arange(self.sizes[gated_name], dtype="int32"),
                dtype="int32",
                trainable=False,
                name=f"{gated_name}_active_channels",
            )
        return self.indices[gated_name]

    def thinned(self, layer, gated_name, **overrides):
        """The thinned version of `layer`, for `gated_name`'s channels."""
        if not self.copy_weights:
            return _Gathered(layer, self.index(gated_name))
        narrow = _narrow_copy(layer, **overrides)
        self.loaders.append((narrow, layer, gated_name))
        return narrow

    def _gated(self, layer):
        x_tensor, gates_tensor = tree.flatten(layer.input)
        size = self.sizes[layer.name]
        if size == x_tensor.shape[-1]:
            return layer(self.full(x_tensor), self.full(gates_tensor))
        self.gates_used = True
        gates = _Columns(*self.gate_columns[layer.name])(self.gates)
        x = self.channels(x_tensor, layer.name)
        return self.thinned(layer, layer.name)(x, gates)

    def channels(self, tensor, gated_name):
        """`tensor` restricted to the channels `gated_name` keeps."""
        key = id(tensor)
        producer = self.graph.producer.get(key)
        single_use = len(self.graph.consumers.get(key, [])) == 1
        if key not in self.values and producer is not None and single_use:
            if isinstance(producer, keras.layers.BatchNormalization):
                return self.thinned(producer, gated_name)(
                    self.channels(producer.input, gated_name)
                )
            if isinstance(producer, CHANNELWISE):
                return producer(self.channels(producer.input, gated_name))
            if type(producer) is keras.layers.Conv2D and producer.groups == 1:
                size = self.sizes[gated_name]
                return self.thinned(producer, gated_name, filters=size)(
                    self.full(producer.input)
                )
        return _TakeChannels(self.index(gated_name))(self.full(tensor))


def _load_slices(narrow, layer, index):
    """Assigns `layer`'s weights at the channels `index` to `narrow`."""
    if isinstance(layer, GatedConv2D):
        narrow.kernel.assign(ops.take(layer.kernel, index, axis=2))
        if layer.use_bias:
            # A copy: JAX must not see one buffer in two variables.
            narrow.bias.assign(ops.copy(layer.bias))
    elif isinstance(layer, keras.layers.BatchNormalization):
        for name in ("gamma", "beta", "moving_mean", "moving_variance"):
            if getattr(layer, name, None) is not None:
                getattr(narrow, name).assign(
                    ops.take(getattr(layer, name), index)
                )
    else:
        narrow.kernel.assign(ops.take(layer.kernel, index, axis=3))
        if layer.use_bias:
            narrow.bias.assign(ops.take(layer.bias, index))


def _version(variable):
    """A count of the changes of a torch variable, `None` elsewhere."""
    if keras.backend.backend() == "torch":
        value = variable.value
        return (value.data_ptr(), value._version)
    return None


class _Program:
    """A pruned network for one set of channel counts, and its state."""

    def __init__(self, model, feeds, gate_columns, indices, loaders, probed):
        self.model = model
        self.feeds = feeds  # ids of the tensors fed first, in input order
        self.gate_columns = gate_columns  # the layers of the gates input
        self.indices = indices
        self.loaders = loaders
        self.probed = probed  # source weights whose changes are watched
        self.loaded = None  # the channel indices whose slices are held
        self.versions = None  # the watched weights' versions then
        self.probe = None  # or the probe's value then (TensorFlow)

    def load(self, indices, key):
        for name, variable in self.indices.items():
            variable.assign(indices[name])
        for narrow, layer, name in self.loaders:
            _load_slices(narrow, layer, indices[name])
        self.loaded = key
        self.versions = [_version(v) for v in self.probed]
        self.probe = None

    def is_current(self):
        """Whether the watched weights kept their versions (torch)."""
        return all(
            old is None or old == _version(v)
            for old, v in zip(self.versions, self.probed)
        )


class SparsePredictor:
    """Compiled inference of a gated network on its active channels only.

    For every batch, the predictor computes the gates, finds the channels
    of every `GatedConv2D` whose gates are non-zero, and runs a pruned
    copy of the network that convolves only those input channels and
    computes only those outputs of the convolutions producing them (see
    the module's description). The pruned network runs compiled, through
    Keras' `predict_on_batch`, on every backend (on torch, Keras predicts
    eagerly, as for the dense model). Outputs equal the dense model's up
    to floating-point rounding.

    Caching: a pruned network depends only on the number of channels each
    gated layer keeps, rounded up to a multiple of `channels /
    count_buckets` (padded with channels whose gates are zero for the
    whole batch, which contribute exactly nothing). It is built and
    compiled the first time those counts occur, and kept (at most
    `max_cached` of them, least recently used out first). Its narrow
    layers hold slices of the model's weights for the pattern it last ran
    (which channels are kept): a pass with the same pattern runs the
    compiled network and nothing else; a pass with another pattern first
    gathers the new slices on the device (about one weight-sized copy,
    instead of a compilation). Every pass also reads a few values of the
    sliced weights of the model: if the model's weights have changed
    (training, `set_weights`, loading), the slices are taken again, so
    outputs always follow the current weights. (A change that leaves all
    the sampled values alone, such as editing a few weights by hand, is
    not noticed: call `clear_cache()` after such a change.)

    Batching strategies:

    - `"union"`: one pass per batch, keeping every channel that is active
      for at least one example of the batch. The saving shrinks as the
      batch grows unless the examples share their zero gates (same class,
      frozen or pruned gates, channels that no example uses); the batch
      keeps its parallelism. At batch 1 it is the per-example saving.
    - `"per_example"`: one batch-1 pass per example, each with its own
      channels: the full saving for every example, at the price of
      batch-1 calls (for latency-bound, small-batch inference).
    - A fixed top-k per layer is not offered: it would change the outputs
      of a DeepMoE network, whose gates are not top-k (the number of
      active channels is learned per example). The count buckets are the
      exact variant of it: k is the active count rounded up, and the
      padding channels have zero gates.

    Args:
        model: a functional model containing `GatedConv2D` layers, in which
            every layer is called once (such as the DeepMoE models of
            `keras_moe.models`), with channels-last data.
        strategy: `"union"` or `"per_example"`.
        copy_weights: bool or None. `True`: the thinned layers hold
            slices of the model's weights, gathered once per zero pattern
            (the fastest when patterns recur, as with `"union"`). `False`:
            they gather the weights they need at every call (no copies,
            better when every pass has a new pattern, as with
            `"per_example"`). `None` (default): `True` for `"union"`,
            `False` for `"per_example"`.
        count_buckets: int >= 1, how many different active-channel counts
            a layer may have (the rounding of the counts): more buckets
            compute fewer padding channels but compile more pruned
            networks.
        max_cached: int >= 1, the number of pruned networks kept.

    Example:

    ```python
    inputs = keras.Input((8, 8, 4))
    gates = keras.Input((4,))
    y = keras_moe.layers.GatedConv2D(3, 3, padding="same")(inputs, gates)
    model = keras.Model([inputs, gates], y)
    predictor = keras_moe.models.SparsePredictor(model)
    x = np.random.rand(2, 8, 8, 4).astype("float32")
    g = np.array([[1.0, 0.0, 0.5, 0.0], [0.0, 0.0, 2.0, 0.0]], "float32")
    sparse = predictor.predict([x, g])
    dense = keras.ops.convert_to_numpy(model([x, g]))
    bool(np.abs(sparse - dense).max() < 1e-5)  # True
    # Another pattern with as many active channels: no new compilation.
    g2 = np.array([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]], "float32")
    sparse = predictor.predict([x, g2])
    predictor.cache_info()["compiled"]  # 1
    ```
    """

    def __init__(
        self,
        model,
        strategy="union",
        copy_weights=None,
        count_buckets=16,
        max_cached=8,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(
                f"`strategy` must be one of {list(STRATEGIES)}. "
                f"Received: strategy={strategy!r}"
            )
        if copy_weights is None:
            copy_weights = strategy == "union"
        if not isinstance(copy_weights, bool):
            raise ValueError(
                "`copy_weights` must be a bool or None. "
                f"Received: copy_weights={copy_weights!r}"
            )
        for name, value in (
            ("count_buckets", count_buckets),
            ("max_cached", max_cached),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or (value < 1)
            ):
                raise ValueError(
                    f"`{name}` must be a positive integer. "
                    f"Received: {name}={value!r}"
                )
        graph = FunctionalGraph(model)
        _check_channels_last(model)
        self.model = model
        self.strategy = strategy
        self.copy_weights = copy_weights
        self.count_buckets = count_buckets
        self.max_cached = max_cached
        self._graph = graph
        self._gated = graph.gated_layers()
        if not self._gated:
            raise ValueError(
                "`model` has no GatedConv2D layer: there is nothing to "
                f"skip. Received: model={model.name!r}"
            )
        self._producers = {
            layer.name: graph.gated_producer(layer) for layer in self._gated
        }
        self._split_outputs()
        self._cache = collections.OrderedDict()
        self._stats = {"hits": 0, "misses": 0, "reloads": 0}

    def _split_outputs(self):
        """Separates what the gate pass computes from the pruned pass."""
        graph, model = self._graph, self.model
        input_ids = set(_ids(model.inputs))
        downstream = {}

        def after_gated(tensor):
            key = id(tensor)
            if key not in downstream:
                layer = graph.producer.get(key)
                downstream[key] = layer is not None and (
                    isinstance(layer, GatedConv2D)
                    or any(after_gated(t) for t in tree.flatten(layer.input))
                )
            return downstream[key]

        gate_tensors = []
        for layer in self._gated:
            tensor = tree.flatten(layer.input)[1]
            if id(tensor) not in {id(t) for t in gate_tensors}:
                gate_tensors.append(tensor)
        self._gate_tensors = gate_tensors
        flat_outputs = tree.flatten(model.outputs)
        self._late_outputs = [t for t in flat_outputs if after_gated(t)]
        if not self._late_outputs:
            raise ValueError(
                "No output of `model` depends on a GatedConv2D: there is "
                f"nothing to skip. Received: model={model.name!r}"
            )
        # Tensors the gate pass returns: the gates and the outputs that
        # do not depend on a gated layer (such as the embedding's).
        early = list(gate_tensors)
        for tensor in flat_outputs:
            if not after_gated(tensor) and id(tensor) not in _ids(early):
                early.append(tensor)
        self._early = early
        computed = [t for t in early if id(t) not in input_ids]
        self._gate_model = (
            keras.Model(model.inputs, computed) if computed else None
        )
        self._computed_early = computed
        # Gates computed inside the model enter the pruned network as
        # inputs, so that the gate pass is not repeated.
        self._internal_gates = [
            t for t in gate_tensors if id(t) not in input_ids
        ]
        # torch counts the in-place changes of a tensor; JAX and TensorFlow
        # variables are compared through a probe of a few of their values.
        self._probe_weights = keras.backend.backend() != "torch"

    def _early_values(self, inputs):
        """Values of the gate pass: `{id(tensor): array}`."""
        values = dict(zip(_ids(self.model.inputs), inputs))
        if self._gate_model is not None:
            outputs = self._gate_model.predict_on_batch(list(inputs))
            outputs = tree.flatten(outputs)
            values.update(zip(_ids(self._computed_early), outputs))
        return values

    def _build(self, signature):
        gate_inputs = {
            id(t): keras.Input(t.shape[1:], dtype=t.dtype)
            for t in self._internal_gates
        }
        known = dict(zip(_ids(self.model.inputs), self.model.inputs))
        known.update(gate_inputs)
        sizes = {
            layer.name: size for layer, size in zip(self._gated, signature)
        }
        builder = _PrunedBuilder(self._graph, known, sizes, self.copy_weights)
        outputs = [builder.full(t) for t in self._late_outputs]
        probed = [
            layer.kernel
            for _, layer, _ in builder.loaders
            if not isinstance(layer, keras.layers.BatchNormalization)
        ]
        if probed and self._probe_weights:
            outputs.append(_Probe(probed)(builder.full(self.model.inputs[0])))
        # The pruned network takes the model inputs and computed gates it
        # uses, then the sliced gates of its narrow gated layers.
        feeds = [
            t
            for t in [*self.model.inputs, *self._internal_gates]
            if id(t) in builder.used
        ]
        columns = list(builder.gate_columns) if builder.gates_used else []
        model = keras.Model(
            [
                *(known[id(t)] for t in feeds),
                *([builder.gates] if columns else []),
            ],
            outputs,
            name=f"{self.model.name}_sparse",
        )
        # Compile the way the model predicts densely (XLA or not).
        model.jit_compile = self.model.jit_compile
        return _Program(
            model,
            [id(t) for t in feeds],
            columns,
            builder.indices,
            builder.loaders,
            probed,
        )

    def _program(self, signature):
        if signature in self._cache:
            self._stats["hits"] += 1
            self._cache.move_to_end(signature)
        else:
            self._stats["misses"] += 1
            self._cache[signature] = self._build(signature)
            if len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return self._cache[signature]

    def _run(self, values):
        """One pruned pass, given the inputs and the gate-pass values."""
        gates, indices, signature, channels = {}, {}, [], {}
        for layer in self._gated:
            gates[layer.name] = values[id(tree.flatten(layer.input)[1])]
            active = np.any(gates[layer.name] != 0, axis=0)
            size = _bucket(int(active.sum()), active.size, self.count_buckets)
            signature.append(size)
            indices[layer.name] = _padded_index(active, size)
            channels[layer.name] = (size, active.size)
            producer = self._producers[layer.name]
            if producer is not None:
                channels[producer.name] = (size, producer.filters)
        program = self._program(tuple(signature))
        key = b"".join(indices[name].tobytes() for name in sorted(indices))
        if program.loaded != key:
            program.load(indices, key)
        elif not program.is_current():
            self._stats["reloads"] += 1
            program.load(indices, key)
        feed = [values[key] for key in program.feeds]
        if program.gate_columns:
            feed.append(
                np.concatenate(
                    [gates[n][:, indices[n]] for n in program.gate_columns],
                    axis=1,
                )
            )
        outputs = tree.flatten(program.model.predict_on_batch(feed))
        if self._probe_weights and program.probed:
            *outputs, probe = outputs
            if program.probe is None:
                program.probe = probe
            elif not np.array_equal(probe, program.probe):
                self._stats["reloads"] += 1
                program.load(indices, key)
                outputs = tree.flatten(program.model.predict_on_batch(feed))
                *outputs, program.probe = outputs
        values = dict(values)
        values.update(zip(_ids(self._late_outputs), outputs))
        flat = [values[id(t)] for t in tree.flatten(self.model.outputs)]
        return flat, channels

    def predict(self, x, batch_size=None, return_channels=False):
        """Runs the model on `x`, computing only the active channels.

        Args:
            x: a batch of inputs (array or tensor), or a list of them for a
                model with several inputs.
            batch_size: optional int; with `"union"`, split `x` into
                batches of this size (one union each).
            return_channels: bool; also return, for every pass, a dict from
                layer name to `(computed, total)` channels: input channels
                for a `GatedConv2D`, output channels for a convolution that
                produces gated channels.

        Returns:
            The model's outputs for `x` (NumPy arrays), with the same
            structure as `model(x)`; with `return_channels`, a tuple of
            the outputs and the list of per-pass channel dicts.
        """
        inputs = list(x) if isinstance(x, (list, tuple)) else [x]
        inputs = [np.asarray(ops.convert_to_numpy(t)) for t in inputs]
        num = len(inputs[0])
        if self.strategy == "per_example":
            step = 1
        else:
            step = _check_batch_size(batch_size) or max(num, 1)
        pieces, channels = [], []
        for start in range(0, num, step):
            batch = [t[start : start + step] for t in inputs]
            if self.strategy == "per_example":
                # One gate pass for all the examples.
                if start == 0:
                    everything = self._early_values(inputs)
                values = {
                    k: v[start : start + step] for k, v in everything.items()
                }
            else:
                values = self._early_values(batch)
            flat, used = self._run(values)
            pieces.append(flat)
            channels.append(used)
        flat = [
            piece[0] if len(pieces) == 1 else np.concatenate(piece, axis=0)
            for piece in zip(*pieces)
        ]
        outputs = tree.pack_sequence_as(self.model.output, flat)
        return (outputs, channels) if return_channels else outputs

    __call__ = predict

    def cache_info(self):
        """Cache statistics.

        Returns:
            A dict: `"hits"` and `"misses"` (passes that found or built
            their pruned network), `"reloads"` (passes that found the
            model's weights changed and sliced them again), `"compiled"`
            (pruned networks held) and `"max_cached"`.
        """
        return {
            **self._stats,
            "compiled": len(self._cache),
            "max_cached": self.max_cached,
        }

    def clear_cache(self):
        """Drops the pruned networks (their compiled programs with them)."""
        self._cache.clear()


def _check_batch_size(batch_size):
    if batch_size is not None and (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size < 1
    ):
        raise ValueError(
            "`batch_size` must be a positive integer or None. "
            f"Received: batch_size={batch_size!r}"
        )
    return batch_size


def _check_channels_last(model):
    for layer in model.layers:
        data_format = getattr(layer, "data_format", "channels_last")
        if isinstance(layer, (keras.layers.Conv2D, GatedConv2D)) and (
            data_format != "channels_last"
        ):
            raise ValueError(
                "Sparse inference supports channels-last models only. "
                f"Layer {layer.name!r} has data_format={data_format!r}."
            )


# One predictor per model and setting, for `sparse_predict`.
_PREDICTORS = weakref.WeakKeyDictionary()


def _predictor(model, strategy):
    if not isinstance(model, keras.Model):
        FunctionalGraph(model)  # raises the ValueError that says why
    per_model = _PREDICTORS.setdefault(model, {})
    if strategy not in per_model:
        per_model[strategy] = SparsePredictor(model, strategy=strategy)
    return per_model[strategy]


def sparse_predict(
    model,
    x,
    strategy="union",
    batch_size=None,
    return_channels=False,
    compiled=True,
):
    """Runs a gated network computing only the channels its gates keep.

    With `compiled=True` (the default), this is `SparsePredictor(model,
    strategy).predict(x, ...)` with a predictor kept for the model (and
    strategy), so that its compiled pruned networks are reused from call
    to call; see `SparsePredictor` for the caching and the batching
    strategies. With `compiled=False`, the network is walked eagerly,
    layer by layer, computing exactly the active channels of every pass
    (no compilation, no cache): slower for repeated calls, useful for
    one-off calls or debugging.

    Args:
        model: a functional model containing `GatedConv2D` layers, in which
            every layer is called once (such as the DeepMoE models of
            `keras_moe.models`), with channels-last data.
        x: a batch of inputs (array or tensor), or a list of them for a
            model with several inputs.
        strategy: `"union"` (one pass per batch, over the channels active
            for any of its examples) or `"per_example"` (one pass per
            example, with its own channels).
        batch_size: optional int; with `"union"`, split `x` into batches of
            this size.
        return_channels: bool; also return, for every pass, a dict from
            layer name to `(computed, total)` channels: input channels for
            a `GatedConv2D`, output channels for a convolution that
            produces gated channels.
        compiled: bool, whether to run the cached, compiled pruned
            networks or to walk the graph eagerly.

    Returns:
        The model's outputs for `x`, with the same structure as
        `model(x)` (NumPy arrays when compiled, tensors otherwise); with
        `return_channels`, a tuple of the outputs and the list of per-pass
        channel dicts.

    Example:

    ```python
    inputs = keras.Input((8, 8, 4))
    gates = keras.Input((4,))
    y = keras_moe.layers.GatedConv2D(3, 3, padding="same")(inputs, gates)
    model = keras.Model([inputs, gates], y)
    x = np.random.rand(2, 8, 8, 4).astype("float32")
    g = np.array([[1.0, 0.0, 0.5, 0.0], [0.0, 0.0, 2.0, 0.0]], "float32")
    dense = keras.ops.convert_to_numpy(model([x, g]))
    sparse = keras_moe.models.sparse_predict(model, [x, g])
    bool(np.abs(sparse - dense).max() < 1e-5)  # True
    eager = keras_moe.models.sparse_predict(model, [x, g], compiled=False)
    eager = keras.ops.convert_to_numpy(eager)
    bool(np.abs(eager - dense).max() < 1e-5)  # True
    ```
    """
    if strategy not in STRATEGIES:
        raise ValueError(
            f"`strategy` must be one of {list(STRATEGIES)}. "
            f"Received: strategy={strategy!r}"
        )
    if not isinstance(compiled, bool):
        raise ValueError(
            f"`compiled` must be a bool. Received: compiled={compiled!r}"
        )
    if compiled:
        return _predictor(model, strategy).predict(
            x, batch_size=batch_size, return_channels=return_channels
        )
    graph = FunctionalGraph(model)
    _check_channels_last(model)
    _check_batch_size(batch_size)
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
