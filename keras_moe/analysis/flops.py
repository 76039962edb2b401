"""Analytic FLOP counting: dense, and effective under measured gates.

One multiply-add counts as 2 FLOPs. Counted: convolutions (`Conv2D`,
`GatedConv2D`, `DepthwiseConv2D`), `Dense` layers, and the sub-layers of
`ShallowEmbedding`, `SparseGatingHeads`, `PatchExpertChoiceMoE` and
`MixtureOfExperts`. Batch normalization, activations, pooling and additions
are not counted (they are a small fraction and the papers leave them out).

Effective FLOPs follow the papers' metric: a `GatedConv2D` costs its dense
FLOPs times the fraction of its input channels whose gate is non-zero, and
the convolution that produces those channels (through batch normalization
and activations only) costs its dense FLOPs times the same fraction, since
switched-off outputs need not be computed. Fractions are averaged over the
examples of the data given.
"""

import dataclasses

import keras
import numpy as np

from keras_moe.analysis.routing import collect_gates
from keras_moe.layers import MixtureOfExperts
from keras_moe.layers import PatchExpertChoiceMoE
from keras_moe.layers import ShallowEmbedding
from keras_moe.layers import SparseGatingHeads
from keras_moe.models._graph import FunctionalGraph


def _conv_flops(layer, output_shape):
    # Every output position costs one multiply-add per kernel weight
    # (also for depthwise kernels, whose shape already excludes the other
    # input channels).
    spatial = float(np.prod(output_shape[1:-1]))
    return 2.0 * spatial * float(np.prod(layer.kernel.shape))


def _output_shape(layer, input_shape):
    if layer.data_format == "channels_first":
        raise ValueError(
            "FLOP counting supports channels-last layers. Received layer "
            f"{layer.name!r} with data_format='channels_first'."
        )
    return layer.compute_output_shape(input_shape)


def layer_flops(layer, input_shape):
    """Dense FLOPs of one layer for one example.

    Args:
        layer: a built layer.
        input_shape: the layer's (first) input shape, batch included.

    Returns:
        FLOPs (2 per multiply-add) for a single example; 0 for layers that
        are not counted.
    """
    input_shape = tuple(input_shape)
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
        return _conv_flops(layer, _output_shape(layer, input_shape))
    if isinstance(layer, keras.layers.Dense):
        positions = (
            float(np.prod(input_shape[1:-1])) if len(input_shape) > 2 else 1.0
        )
        return 2.0 * positions * float(np.prod(layer.kernel.shape))
    if isinstance(layer, ShallowEmbedding):
        total, shape = 0.0, input_shape
        for conv in layer.convs:
            shape = conv.compute_output_shape(shape)
            total += _conv_flops(conv, shape)
        total += layer_flops(layer.projection, (None, shape[-1]))
        if layer.class_head is not None:
            total += layer_flops(layer.class_head, (None, layer.embedding_dim))
        return total
    if isinstance(layer, SparseGatingHeads):
        return sum(layer_flops(head, input_shape) for head in layer.heads)
    if isinstance(layer, PatchExpertChoiceMoE):
        # Routing values for every patch, then each expert on l patches.
        routing = 2.0 * layer.num_patches * layer.patch_dim * layer.num_experts
        patch = (
            None,
            *layer.patch_size,
            layer.patch_dim // int(np.prod(layer.patch_size)),
        )
        experts = sum(
            layer.patches_per_expert * layer_flops(expert, patch)
            for expert in layer.expert_layers
        )
        return routing + experts
    if isinstance(layer, MixtureOfExperts):
        features = (None, int(np.prod(input_shape[1:])))
        total = sum(
            layer_flops(expert, input_shape) for expert in layer.expert_layers
        )
        if layer.gate_hidden is not None:
            total += layer_flops(layer.gate_hidden, features)
            features = (None, layer.gate_hidden_units)
        return total + layer_flops(layer.gate_logits, features)
    if isinstance(layer, keras.Model):
        return sum(
            layer_flops(sub, sub.input.shape)
            for sub in layer.layers
            if not isinstance(sub, keras.layers.InputLayer)
        )
    return 0.0


@dataclasses.dataclass
class FlopReport:
    """Dense and effective FLOPs per layer and in total, per example.

    Attributes:
        layers: list of dicts with `"name"`, `"type"`, `"dense"` and
            `"effective"` FLOPs, and `"active_fraction"` (1 for layers the
            gates do not thin).
        dense: total dense FLOPs per example.
        effective: total effective FLOPs per example.
    """

    layers: list
    dense: float
    effective: float

    @property
    def ratio(self):
        """Effective over dense FLOPs."""
        return self.effective / self.dense if self.dense else 1.0

    def table(self):
        """The report as a markdown table."""
        lines = [
            "| layer | type | dense MFLOPs | effective MFLOPs | active |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in self.layers:
            lines.append(
                f"| {row['name']} | {row['type']} | {row['dense'] / 1e6:.2f}"
                f" | {row['effective'] / 1e6:.2f} | "
                f"{row['active_fraction']:.2f} |"
            )
        lines.append(
            f"| total | | {self.dense / 1e6:.2f} | "
            f"{self.effective / 1e6:.2f} | {self.ratio:.2f} |"
        )
        return "\n".join(lines)


def gated_flop_terms(model):
    """How each gated layer's active fraction scales the model's FLOPs.

    Returns:
        `(dense_total, terms)`: the dense FLOPs per example of the whole
        model, and one entry per `GatedConv2D` (in the order of
        `model.layers`) with the dense FLOPs that scale with that layer's
        active input fraction (the gated convolution plus its producing
        convolution). Effective FLOPs are
        `dense_total - sum(term * (1 - active_fraction))`.
    """
    report = flop_report(model)
    by_name = {row["name"]: row["dense"] for row in report.layers}
    graph = FunctionalGraph(model)
    terms = []
    for gated in graph.gated_layers():
        term = by_name[gated.name]
        producer = graph.gated_producer(gated)
        if producer is not None:
            term += by_name[producer.name]
        terms.append(term)
    return report.dense, terms


def flop_report(model, gates=None, data=None, gate_fn=None, max_batches=None):
    """Counts a functional model's dense and effective FLOPs per example.

    Args:
        model: a built functional model (channels-last).
        gates: optional list of `(num_examples, C_l)` gate arrays, one per
            `GatedConv2D` in the order of `model.layers`.
        data: optional data to measure the gates on instead (inputs, an
            `(x, y)` tuple or a dataset), for a model that returns a dict
            with `"gates"` or with `gate_fn`.
        gate_fn: see `keras_moe.analysis.collect_gates`.
        max_batches: optional limit on the batches of `data` used.

    Returns:
        A `FlopReport`. Without gates or data, effective equals dense.

    Example:

    ```python
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    model = keras.Model(inputs, x)
    keras_moe.analysis.flop_report(model).dense  # 13824.0
    ```
    """
    if gates is None and data is not None:
        gates, _ = collect_gates(
            model, data, gate_fn=gate_fn, max_batches=max_batches
        )
    graph = FunctionalGraph(model)
    gated = graph.gated_layers()
    fractions = {}
    if gates is not None:
        if len(gates) != len(gated):
            raise ValueError(
                f"`gates` must have one array per GatedConv2D ({len(gated)})."
                f" Received {len(gates)} arrays."
            )
        for layer, gate in zip(gated, gates):
            fraction = float(np.mean(np.asarray(gate) != 0))
            fractions[layer.name] = fraction
            producer = graph.gated_producer(layer)
            if producer is not None:
                fractions[producer.name] = fraction
    rows = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        inputs = layer.input
        first = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
        dense = layer_flops(layer, first.shape)
        if dense == 0:
            continue
        fraction = fractions.get(layer.name, 1.0)
        rows.append(
            {
                "name": layer.name,
                "type": type(layer).__name__,
                "dense": dense,
                "effective": dense * fraction,
                "active_fraction": fraction,
            }
        )
    return FlopReport(
        layers=rows,
        dense=sum(r["dense"] for r in rows),
        effective=sum(r["effective"] for r in rows),
    )
