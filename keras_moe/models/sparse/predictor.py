"""Inference that computes only the channels the gates keep."""

import collections
import contextlib
import weakref

import keras
import numpy as np
from keras import ops
from keras import tree

from keras_moe.layers import GatedConv2D
from keras_moe.models._graph import ChannelAnalysis
from keras_moe.models._graph import FunctionalGraph
from keras_moe.models._graph import ids
from keras_moe.models.sparse.plan import ChannelPlan
from keras_moe.models.sparse.plan import Walk
from keras_moe.models.sparse.plan import make_plan

STRATEGIES = ("union", "grouped", "per_example")


def _no_gradient_tracking():
    """Inference needs no autograd graph (only PyTorch builds one eagerly)."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def _check_positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer"
            f"{' or None' if allow_none else ''}. Received: {name}={value!r}"
        )
    return value


def _check_model(model):
    if not isinstance(model, keras.Model):
        FunctionalGraph(model)  # raises the ValueError that says why
    for layer in model.layers:
        data_format = getattr(layer, "data_format", "channels_last")
        if isinstance(
            layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
        ) and (data_format != "channels_last"):
            raise ValueError(
                "Sparse inference supports channels-last models only. "
                f"Layer {layer.name!r} has data_format={data_format!r}."
            )
    analysis = ChannelAnalysis(model)
    if not analysis.gated_layers:
        raise ValueError(
            "`model` has no GatedConv2D layer: there is nothing to skip. "
            f"Received: model={model.name!r}"
        )
    return analysis


def _as_inputs(model, x):
    """`x` as a list of arrays, checked against the model's inputs."""
    inputs = list(x) if isinstance(x, (list, tuple)) else [x]
    if len(inputs) != len(model.inputs):
        raise ValueError(
            f"`x` must hold {len(model.inputs)} input(s) for model "
            f"{model.name!r}. Received {len(inputs)}."
        )
    arrays = []
    for expected, value in zip(model.inputs, inputs):
        array = np.asarray(ops.convert_to_numpy(value))
        want = tuple(expected.shape[1:])
        got = tuple(array.shape[1:])
        if len(want) != len(got) or any(
            w is not None and w != g for w, g in zip(want, got)
        ):
            raise ValueError(
                f"Input {expected.name!r} of model {model.name!r} has shape "
                f"(batch, {', '.join(str(d) for d in want)}). Received an "
                f"array of shape {array.shape}."
            )
        arrays.append(array)
    sizes = {len(a) for a in arrays}
    if len(sizes) > 1:
        raise ValueError(
            "Every input of `x` must have the same number of examples. "
            f"Received {sorted(sizes)}."
        )
    return arrays


def _channel_costs(analysis):
    """Multiply-adds a channel of each gate costs, per example: its share
    of the gated convolution and of the layers producing it."""
    costs = np.zeros(len(analysis.gated_layers))

    def macs(layer):
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            return 0.0
        spatial = float(np.prod(layer.output.shape[1:-1]))
        return spatial * float(np.prod(kernel.shape))

    for i, layer in enumerate(analysis.gated_layers):
        costs[i] += macs(layer) / layer.kernel.shape[2] / layer.groups
    for layer in analysis.graph.model.layers:
        gates = analysis.output_gates.get(layer.name)
        if gates and getattr(layer, "kernel", None) is not None:
            per_channel = macs(layer) / layer.output.shape[-1]
            for gate in gates:
                costs[gate] += per_channel / len(gates)
    return costs


def group_examples(masks, costs, max_groups):
    """Splits examples into groups of similar gate patterns.

    Cost-weighted k-means on the examples' binary gate patterns: two
    examples are close when the channels that only one of them uses cost
    few multiply-adds. The first centres are the costliest example and
    then, one by one, the example farthest from the centres so far.

    Args:
        masks: one boolean `(examples, C_l)` array per gate.
        costs: `(L,)` multiply-adds per channel of each gate.
        max_groups: int, the number of groups at most.

    Returns:
        A list of index arrays, one per non-empty group.
    """
    features = np.concatenate(
        [m.astype("float32") * np.sqrt(c) for m, c in zip(masks, costs)],
        axis=1,
    )
    num = len(features)
    k = min(max_groups, num)
    centres = [int(np.argmax((features**2).sum(1)))]
    distance = ((features - features[centres[0]]) ** 2).sum(1)
    while len(centres) < k and distance.max() > 0:
        centres.append(int(np.argmax(distance)))
        distance = np.minimum(
            distance, ((features - features[centres[-1]]) ** 2).sum(1)
        )
    centre_values = features[centres]
    assignment = None
    for _ in range(20):
        d = ((features[:, None, :] - centre_values[None]) ** 2).sum(-1)
        new = np.argmin(d, axis=1)
        if assignment is not None and np.array_equal(new, assignment):
            break
        assignment = new
        centre_values = np.stack(
            [
                features[assignment == j].mean(0)
                if np.any(assignment == j)
                else centre_values[j]
                for j in range(len(centre_values))
            ]
        )
    return [
        np.flatnonzero(assignment == j)
        for j in range(len(centre_values))
        if np.any(assignment == j)
    ]


def _resolve(key, plan):
    kind = key[0]
    if kind == "in":
        return plan.inputs[key[1]]
    if kind == "out":
        return plan.outputs[key[1]]
    has, need = _resolve(key[1], plan), _resolve(key[2], plan)
    return np.searchsorted(has, need).astype("int32")


class _Program:
    """A compiled pruned network for one set of channel counts."""

    def __init__(self, model, feeds, variables):
        self.model = model
        self.feeds = feeds  # ids of the tensors fed, in input order
        self.variables = variables  # plan key -> int32 variable

    def assign(self, plan):
        for key, variable in self.variables.items():
            variable.assign(_resolve(key, plan))


class SparsePredictor:
    """Compiled inference of a gated network on its active channels only.

    For every pass, the predictor computes the gates, works out which
    channels every layer needs (a `GatedConv2D` its active input channels;
    a layer whose outputs reach only gated convolutions through
    channel-wise layers, the channels one of those gates keeps: the rule
    `keras_moe.analysis.flop_report` counts by), and runs a pruned network
    that computes only those. The pruned network runs compiled, through
    Keras' `predict_on_batch` (`jax.jit`, a `tf.function`; eager on
    torch, as Keras predicts there). Outputs equal the dense model's up to
    floating-point rounding, in the dtype of the model's outputs.

    Weights: the pruned network gathers the slices of the model's weights
    it needs inside its compiled program, at every pass, from the model's
    own variables (kernels, biases, batch-normalization scales and moving
    statistics). Nothing is copied, so the outputs always follow the
    current weights, after training, `set_weights`, loading or a change of
    the moving statistics. (Gathering costs about one read of the sliced
    weights per pass, which is cheaper than checking them for changes.)

    Caching: a pruned network depends only on how many channels each layer
    computes, rounded up to a multiple of `channels / count_buckets`
    (padded with channels whose gates are zero for the whole pass, which
    contribute exactly nothing). It is built and compiled the first time
    those counts occur and kept (at most `max_cached`, least recently used
    out first); a pass with other channels but the same counts only
    assigns new channel indices.

    Batching strategies:

    - `"union"`: one pass per batch of `batch_size`, keeping every channel
      active for some example of the batch. The saving shrinks as the
      batch grows unless its examples share their zero gates.
    - `"grouped"`: each batch is split into at most `max_groups`
      sub-batches of examples with similar gate patterns (cost-weighted
      k-means, `group_examples`), one union pass each: most of the
      per-example saving with batches that stay large.
    - `"per_example"`: one batch-1 pass per example, with its own channels:
      the whole saving, at the price of batch-1 calls.

    A fixed top-k per layer is not offered: DeepMoE's gates are not top-k
    (the number of active channels is learned per example), and forcing
    one would change the outputs.

    Args:
        model: a functional model containing `GatedConv2D` layers, each
            layer called once (such as the DeepMoE models of
            `keras_moe.models`), channels-last.
        strategy: `"union"`, `"grouped"` or `"per_example"`.
        count_buckets: int, how many different channel counts a layer may
            have: more buckets compute fewer padding channels but compile
            more pruned networks.
        max_cached: int, the number of pruned networks kept.
        max_groups: int, the sub-batches per batch with `"grouped"`.

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
        count_buckets=16,
        max_cached=8,
        max_groups=8,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(
                f"`strategy` must be one of {list(STRATEGIES)}. "
                f"Received: strategy={strategy!r}"
            )
        self.count_buckets = _check_positive_int("count_buckets", count_buckets)
        self.max_cached = _check_positive_int("max_cached", max_cached)
        self.max_groups = _check_positive_int("max_groups", max_groups)
        self.analysis = _check_model(model)
        self.model = model
        self.strategy = strategy
        self._costs = _channel_costs(self.analysis)
        self._split_outputs()
        self._cache = collections.OrderedDict()
        self._stats = {"hits": 0, "misses": 0}

    def _split_outputs(self):
        """Separates what the gate pass computes from the pruned pass."""
        graph, model = self.analysis.graph, self.model
        input_ids = set(ids(model.inputs))
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
        for layer in self.analysis.gated_layers:
            tensor = tree.flatten(layer.input)[1]
            gate_tensors.append(tensor)
        self._gate_tensors = gate_tensors
        flat_outputs = tree.flatten(model.outputs)
        self._late = [t for t in flat_outputs if after_gated(t)]
        if not self._late:
            raise ValueError(
                "No output of `model` depends on a GatedConv2D: there is "
                f"nothing to skip. Received: model={model.name!r}"
            )
        early = []
        for tensor in [*gate_tensors, *flat_outputs]:
            if not after_gated(tensor) and id(tensor) not in ids(early):
                early.append(tensor)
        self._computed_early = [t for t in early if id(t) not in input_ids]
        self._gate_model = (
            keras.Model(model.inputs, self._computed_early)
            if self._computed_early
            else None
        )
        # Gates computed inside the model enter the pruned network as
        # inputs, so that the gate pass is not repeated.
        self._internal_gates = [
            t
            for t in {id(t): t for t in gate_tensors}.values()
            if id(t) not in input_ids
        ]

    def _early_values(self, inputs):
        values = dict(zip(ids(self.model.inputs), inputs))
        if self._gate_model is not None:
            outputs = tree.flatten(
                self._gate_model.predict_on_batch(list(inputs))
            )
            values.update(
                zip(
                    ids(self._computed_early),
                    (np.asarray(ops.convert_to_numpy(o)) for o in outputs),
                )
            )
        return values

    def _build(self, plan):
        model = self.model
        feedable = [*model.inputs, *self._internal_gates]
        known = {
            id(t): keras.Input(t.shape[1:], dtype=t.dtype) for t in feedable
        }
        variables = {}

        def index(key, array):
            if key not in variables:
                variables[key] = keras.Variable(
                    array, dtype="int32", trainable=False, name="channels"
                )
            return variables[key]

        walk = Walk(self.analysis, known, plan, index)
        outputs = [walk.full(t) for t in self._late]
        feeds = [t for t in feedable if id(t) in walk.used]
        pruned = keras.Model(
            [known[id(t)] for t in feeds],
            outputs,
            name=f"{model.name}_sparse",
        )
        # Compile the way the model predicts densely (XLA or not).
        pruned.jit_compile = model.jit_compile
        return _Program(pruned, [id(t) for t in feeds], variables)

    def _program(self, plan):
        signature = plan.signature()
        if signature in self._cache:
            self._stats["hits"] += 1
            self._cache.move_to_end(signature)
        else:
            self._stats["misses"] += 1
            self._cache[signature] = self._build(plan)
            if len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return self._cache[signature]

    def _passes(self, values, rows):
        """The row groups of one batch, by the strategy."""
        if self.strategy == "per_example":
            return [np.array([i]) for i in range(rows)]
        if self.strategy == "grouped" and rows > 1:
            masks = [values[id(t)] != 0 for t in self._gate_tensors]
            return group_examples(masks, self._costs, self.max_groups)
        return [np.arange(rows)]

    def _run(self, values, rows):
        """Late outputs for the rows of a batch, and the channels used."""
        masks = [
            np.any(values[id(t)][rows] != 0, axis=0) for t in self._gate_tensors
        ]
        plan = make_plan(self.analysis, masks, buckets=self.count_buckets)
        program = self._program(plan)
        program.assign(plan)
        feed = [values[key][rows] for key in program.feeds]
        outputs = tree.flatten(program.model.predict_on_batch(feed))
        return [np.asarray(ops.convert_to_numpy(o)) for o in outputs], plan

    def predict(self, x, batch_size=128, return_channels=False):
        """Runs the model on `x`, computing only the needed channels.

        Args:
            x: a batch of inputs (array or tensor), or a list of them for a
                model with several inputs.
            batch_size: int, the examples per batch: the gates are
                computed per batch, and with `"union"` and `"grouped"` the
                passes are made per batch. Defaults to 128.
            return_channels: bool; also return, for every pass, a dict from
                layer name to `(computed, total)` channels: input channels
                for a `GatedConv2D`, output channels for a layer the gates
                thin (under `"<name>/outputs"` for a `GatedConv2D` whose
                outputs are thinned too).

        Returns:
            The model's outputs for `x` (NumPy arrays in the dtype of the
            model's outputs), with the structure of `model(x)`; with
            `return_channels`, a tuple of the outputs and the list of
            per-pass channel dicts.
        """
        batch_size = _check_positive_int("batch_size", batch_size)
        inputs = _as_inputs(self.model, x)
        num = len(inputs[0])
        flat_outputs = tree.flatten(self.model.outputs)
        pieces = {id(t): [] for t in flat_outputs}
        channels = []
        for start in range(0, num, batch_size):
            batch = [t[start : start + batch_size] for t in inputs]
            rows = len(batch[0])
            values = self._early_values(batch)
            late = {id(t): [None] * rows for t in self._late}
            for group in self._passes(values, rows):
                outputs, plan = self._run(values, group)
                channels.append(_channels(self.analysis, plan))
                for tensor, output in zip(self._late, outputs):
                    for i, row in enumerate(group):
                        late[id(tensor)][row] = output[i]
            for tensor in flat_outputs:
                if id(tensor) in late:
                    pieces[id(tensor)].append(np.stack(late[id(tensor)]))
                else:
                    pieces[id(tensor)].append(values[id(tensor)])
        flat = []
        for tensor in flat_outputs:
            dtype = keras.backend.standardize_dtype(tensor.dtype)
            if pieces[id(tensor)]:
                flat.append(
                    np.concatenate(pieces[id(tensor)]).astype(dtype, copy=False)
                )
            else:
                flat.append(np.zeros((0, *tensor.shape[1:]), dtype))
        outputs = tree.pack_sequence_as(self.model.output, flat)
        return (outputs, channels) if return_channels else outputs

    __call__ = predict

    def passes(self, x, batch_size=128):
        """The examples that `predict` computes together, pass by pass.

        Runs only the gate part of the model. With `"union"` a pass is a
        batch; with `"grouped"` a sub-batch of similar gate patterns; with
        `"per_example"` one example. Each pass computes the union of the
        channels its examples use, so the work a strategy does on `x` is
        the cost of every example's gates replaced by its pass's union.

        Args:
            x: the inputs, as for `predict`.
            batch_size: int, as for `predict`. Defaults to 128.

        Returns:
            A list of integer arrays of indices into `x`, one per pass, in
            the order `predict` runs them.
        """
        batch_size = _check_positive_int("batch_size", batch_size)
        inputs = _as_inputs(self.model, x)
        result = []
        for start in range(0, len(inputs[0]), batch_size):
            batch = [t[start : start + batch_size] for t in inputs]
            values = self._early_values(batch)
            for group in self._passes(values, len(batch[0])):
                result.append(start + np.asarray(group, dtype="int64"))
        return result

    def cache_info(self):
        """Cache statistics.

        Returns:
            A dict: `"hits"` and `"misses"` (passes that found or built
            their pruned network), `"compiled"` (pruned networks held) and
            `"max_cached"`.
        """
        return {
            **self._stats,
            "compiled": len(self._cache),
            "max_cached": self.max_cached,
        }

    def clear_cache(self):
        """Drops the pruned networks (their compiled programs with them)."""
        self._cache.clear()


def _channels(analysis, plan):
    graph = analysis.graph.model
    used = {
        name: (
            len(index),
            tree.flatten(graph.get_layer(name).input)[0].shape[-1],
        )
        for name, index in plan.inputs.items()
    }
    for name, index in plan.outputs.items():
        total = graph.get_layer(name).output.shape[-1]
        # A gated layer whose outputs are thinned too (chained gates).
        key = f"{name}/outputs" if name in used else name
        used[key] = (len(index), total)
    return used


def _eager(model, analysis, inputs, strategy, batch_size):
    """One walk of the graph per pass, with the exact channels."""
    num = len(inputs[0])
    costs = _channel_costs(analysis)
    flat_outputs = tree.flatten(model.outputs)
    gate_tensors = [tree.flatten(g.input)[1] for g in analysis.gated_layers]
    empty = ChannelPlan({}, {})
    pieces, channels = [], []
    with _no_gradient_tracking():
        for start in range(0, num, batch_size):
            batch = [t[start : start + batch_size] for t in inputs]
            rows = len(batch[0])
            known = dict(zip(ids(model.inputs), batch))
            gates = Walk(analysis, known, empty, None, rows)
            gate_values = {id(t): gates.full(t) for t in gate_tensors}
            masks = [
                np.asarray(ops.convert_to_numpy(v)) != 0
                for v in (gate_values[id(t)] for t in gate_tensors)
            ]
            if strategy == "per_example":
                groups = [np.array([i]) for i in range(rows)]
            elif strategy == "grouped" and rows > 1:
                groups = group_examples(masks, costs, 8)
            else:
                groups = [np.arange(rows)]
            parts = [None] * rows
            for group in groups:
                plan = make_plan(analysis, [m[group].any(0) for m in masks])
                given = {
                    key: ops.take(value, group, axis=0)
                    for key, value in {**known, **gate_values}.items()
                }
                walk = Walk(
                    analysis,
                    given,
                    plan,
                    lambda key, array: ops.convert_to_tensor(array),
                    len(group),
                )
                outputs = [walk.full(t) for t in flat_outputs]
                channels.append(_channels(analysis, plan))
                for i, row in enumerate(group):
                    parts[row] = [o[i] for o in outputs]
            pieces.append(
                [ops.stack([p[j] for p in parts]) for j in range(len(parts[0]))]
            )
    flat = [
        ops.cast(
            piece[0] if len(pieces) == 1 else ops.concatenate(piece, axis=0),
            tensor.dtype,
        )
        for tensor, piece in zip(flat_outputs, zip(*pieces))
    ]
    return tree.pack_sequence_as(model.output, flat), channels


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
    batch_size=128,
    return_channels=False,
    compiled=True,
):
    """Runs a gated network computing only the channels its gates keep.

    With `compiled=True` (the default), this is `SparsePredictor(model,
    strategy).predict(x, ...)` with a predictor kept for the model (and
    strategy), so that its compiled pruned networks are reused from call
    to call; see `SparsePredictor` for the rule, the caching and the
    batching strategies. With `compiled=False`, the graph is walked
    eagerly, layer by layer, computing exactly the needed channels of
    every pass (no compilation, no cache): slower for repeated calls,
    useful for one-off calls or debugging.

    Args:
        model: a functional model containing `GatedConv2D` layers, each
            layer called once (such as the DeepMoE models of
            `keras_moe.models`), channels-last.
        x: a batch of inputs (array or tensor), or a list of them for a
            model with several inputs.
        strategy: `"union"`, `"grouped"` or `"per_example"` (see
            `SparsePredictor`).
        batch_size: int, the examples per batch (per union, with
            `"union"`). Defaults to 128.
        return_channels: bool; also return, for every pass, a dict from
            layer name to `(computed, total)` channels.
        compiled: bool, whether to run the cached, compiled pruned
            networks or to walk the graph eagerly.

    Returns:
        The model's outputs for `x`, with the structure of `model(x)`
        (NumPy arrays when compiled, tensors otherwise); with
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
    batch_size = _check_positive_int("batch_size", batch_size)
    if compiled:
        return _predictor(model, strategy).predict(
            x, batch_size=batch_size, return_channels=return_channels
        )
    analysis = _check_model(model)
    inputs = _as_inputs(model, x)
    if len(inputs[0]) == 0:
        outputs = _predictor(model, strategy).predict(inputs)
        return (outputs, []) if return_channels else outputs
    outputs, channels = _eager(model, analysis, inputs, strategy, batch_size)
    return (outputs, channels) if return_channels else outputs
