"""Analytic cost counting: multiply-adds, dense and under measured gates.

The papers count "FLOPs" as multiply-adds (MACs): DeepMoE's table 4 and
the FLOPs of the ResNet papers reproduce exactly when one multiply-add
counts once. Every figure here is in multiply-adds and named so; FLOPs
(two per multiply-add, as hardware counters and `torch`'s FLOP counter
count) stand beside them where a report shows both. Counted: convolutions
(`Conv2D`, `GatedConv2D`, `DepthwiseConv2D`), `Dense` layers, and the
sub-layers of `ShallowEmbedding`, `SparseGatingHeads`,
`PatchExpertChoiceMoE` and `MixtureOfExperts`. Batch normalization,
activations, pooling and additions are not counted (they are a small
fraction and the papers leave them out).

Effective multiply-adds follow the papers' metric. A zero gate removes an
input channel of its `GatedConv2D` and, through batch normalization and
other channel-wise layers, the same output channel of the layer that
produces it (see `keras_moe.models` for the rule). So, for one example,
a convolution costs its dense multiply-adds times the fraction of its
input channels that are active times the fraction of its output channels
that are needed (per group, for grouped convolutions), and a chain of
gated convolutions is thinned at both ends of every link. The report
averages that over the examples.
"""

import dataclasses

import keras
import numpy as np

from keras_moe.analysis.routing import collect_gates
from keras_moe.layers import MixtureOfExperts
from keras_moe.layers import PatchExpertChoiceMoE
from keras_moe.layers import ShallowEmbedding
from keras_moe.layers import SparseGatingHeads
from keras_moe.models._graph import ChannelAnalysis
from keras_moe.models._graph import is_convolution


def _conv_macs(layer, output_shape):
    # Every output position costs one multiply-add per kernel weight
    # (also for grouped and depthwise kernels, whose shape already excludes
    # the other groups' input channels).
    spatial = float(np.prod(output_shape[1:-1]))
    return spatial * float(np.prod(layer.kernel.shape))


def _output_shape(layer, input_shape):
    if layer.data_format == "channels_first":
        raise ValueError(
            "Cost counting supports channels-last layers. Received layer "
            f"{layer.name!r} with data_format='channels_first'."
        )
    return layer.compute_output_shape(input_shape)


def layer_macs(layer, input_shape):
    """Dense multiply-adds of one layer for one example.

    Args:
        layer: a built layer.
        input_shape: the layer's (first) input shape, batch included.

    Returns:
        Multiply-adds for a single example; 0 for layers that are not
        counted.

    Example:

    ```python
    conv = keras.layers.Conv2D(4, 3, padding="same")
    conv.build((None, 8, 8, 3))
    keras_moe.analysis.layer_macs(conv, (None, 8, 8, 3))  # 6912.0
    ```
    """
    input_shape = tuple(input_shape)
    if is_convolution(layer):
        return _conv_macs(layer, _output_shape(layer, input_shape))
    if isinstance(layer, keras.layers.Dense):
        positions = (
            float(np.prod(input_shape[1:-1])) if len(input_shape) > 2 else 1.0
        )
        return positions * float(np.prod(layer.kernel.shape))
    if isinstance(layer, ShallowEmbedding):
        total, shape = 0.0, input_shape
        for conv in layer.convs:
            shape = conv.compute_output_shape(shape)
            total += _conv_macs(conv, shape)
        total += layer_macs(layer.projection, (None, shape[-1]))
        if layer.class_head is not None:
            total += layer_macs(layer.class_head, (None, layer.embedding_dim))
        return total
    if isinstance(layer, SparseGatingHeads):
        return sum(layer_macs(head, input_shape) for head in layer.heads)
    if isinstance(layer, PatchExpertChoiceMoE):
        # Routing values for every patch, then the experts: on l patches
        # each ("patch"), on the whole masked map ("masked"), or their
        # convolutions' outputs on l patches ("halo").
        routing = layer.num_patches * layer.patch_dim * layer.num_experts
        if layer.placement == "masked":
            experts = sum(
                layer_macs(expert, (None, *layer.map_shape))
                for expert in layer.expert_layers
            )
        elif layer.placement == "halo":
            convs = [
                expert.layers[-1]
                if isinstance(expert, keras.Sequential)
                else expert
                for expert in layer.expert_layers
            ]
            experts = sum(
                layer.patches_per_expert
                * float(np.prod(layer.patch_size))
                * float(np.prod(conv.kernel.shape))
                for conv in convs
            )
        else:
            patch = (
                None,
                *layer.patch_size,
                layer.patch_dim // int(np.prod(layer.patch_size)),
            )
            experts = sum(
                layer.patches_per_expert * layer_macs(expert, patch)
                for expert in layer.expert_layers
            )
        return routing + experts
    if isinstance(layer, MixtureOfExperts):
        features = (None, int(np.prod(input_shape[1:])))
        total = sum(
            layer_macs(expert, input_shape) for expert in layer.expert_layers
        )
        if layer.gate_hidden is not None:
            total += layer_macs(layer.gate_hidden, features)
            features = (None, layer.gate_hidden_units)
        return total + layer_macs(layer.gate_logits, features)
    if isinstance(layer, keras.Model):
        return sum(
            layer_macs(sub, sub.input.shape)
            for sub in layer.layers
            if not isinstance(sub, keras.layers.InputLayer)
        )
    return 0.0


def layer_flops(layer, input_shape):
    """Dense FLOPs of one layer for one example: `2 * layer_macs`.

    Args:
        layer: a built layer.
        input_shape: the layer's (first) input shape, batch included.

    Returns:
        FLOPs (two per multiply-add) for a single example.
    """
    return 2.0 * layer_macs(layer, input_shape)


@dataclasses.dataclass
class CostTerm:
    """How the gates thin one layer's multiply-adds.

    For one example, the layer costs `unit_macs * sum_g a_g * b_g` over
    its `groups`, where `a_g` and `b_g` are the numbers of active input
    and needed output channels of group `g` (all of them where
    `input_gate` or `output_gates` is `None`).

    Attributes:
        name: the layer's name.
        dense_macs: its dense multiply-adds per example.
        groups: channel groups (1, or the groups of a grouped or
            depthwise convolution).
        in_channels: its input channels.
        out_channels: its output channels.
        input_gate: index of the gate that selects its inputs, or `None`.
        output_gates: indices of the gates whose union selects its
            outputs, or `None`.
    """

    name: str
    dense_macs: float
    groups: int
    in_channels: int
    out_channels: int
    input_gate: int = None
    output_gates: tuple = None

    def effective_macs(self, masks):
        """Multiply-adds per example under boolean gate masks.

        Args:
            masks: one `(examples, C_l)` boolean array per gate.

        Returns:
            A `(examples,)` float array.
        """
        a = _group_counts(
            masks, (self.input_gate,), self.in_channels, self.groups
        )
        b = _group_counts(
            masks, self.output_gates, self.out_channels, self.groups
        )
        unit = self.dense_macs / (
            self.in_channels * self.out_channels / self.groups
        )
        return unit * np.sum(a * b, axis=-1)


def _group_counts(masks, gates, channels, groups):
    if gates is None or gates == (None,):
        return np.full((1, groups), channels / groups)
    mask = masks[gates[0]]
    for gate in gates[1:]:
        mask = mask | masks[gate]
    return mask.reshape(len(mask), groups, -1).sum(axis=-1).astype("float64")


def cost_terms(model):
    """The layers whose multiply-adds the gates of `model` thin.

    Args:
        model: a built functional model.

    Returns:
        `(dense_macs, terms)`: the dense multiply-adds per example of the
        whole model, and a `CostTerm` for every convolution or `Dense`
        layer that a gate thins (at its inputs, outputs or both). Gate
        indices follow the `GatedConv2D` layers in the order of
        `model.layers`.
    """
    analysis = ChannelAnalysis(model)
    dense_total, terms = 0.0, []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        dense = layer_macs(layer, _first_input(layer).shape)
        dense_total += dense
        input_gate = analysis.input_gate.get(layer.name)
        output_gates = analysis.output_gates.get(layer.name)
        if dense == 0 or not is_convolution(layer):
            continue
        if input_gate is None and output_gates is None:
            continue
        in_channels = int(_first_input(layer).shape[-1])
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            groups = in_channels
            out_channels = in_channels * layer.depth_multiplier
        else:
            groups, out_channels = layer.groups, layer.filters
        terms.append(
            CostTerm(
                layer.name,
                dense,
                groups,
                in_channels,
                out_channels,
                input_gate,
                output_gates,
            )
        )
    return dense_total, terms


def _first_input(layer):
    inputs = layer.input
    return inputs[0] if isinstance(inputs, (list, tuple)) else inputs


@dataclasses.dataclass
class FlopReport:
    """Dense and effective multiply-adds per layer and in total, per example.

    Attributes:
        layers: list of dicts with `"name"`, `"type"`, `"dense_macs"` and
            `"effective_macs"`, the same in FLOPs (`"dense_flops"`,
            `"effective_flops"`, two per multiply-add), and
            `"active_fraction"` (effective over dense; 1 for layers the
            gates do not thin).
        dense_macs: total dense multiply-adds per example.
        effective_macs: total effective multiply-adds per example.
    """

    layers: list
    dense_macs: float
    effective_macs: float

    @property
    def dense_flops(self):
        """Total dense FLOPs per example (two per multiply-add)."""
        return 2.0 * self.dense_macs

    @property
    def effective_flops(self):
        """Total effective FLOPs per example (two per multiply-add)."""
        return 2.0 * self.effective_macs

    @property
    def ratio(self):
        """Effective over dense cost."""
        return self.effective_macs / self.dense_macs if self.dense_macs else 1.0

    def table(self):
        """The report as a markdown table, in millions of multiply-adds."""
        lines = [
            "| layer | type | dense MMACs | effective MMACs | active |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in self.layers:
            lines.append(
                f"| {row['name']} | {row['type']} | "
                f"{row['dense_macs'] / 1e6:.2f} | "
                f"{row['effective_macs'] / 1e6:.2f} | "
                f"{row['active_fraction']:.2f} |"
            )
        lines.append(
            f"| total | | {self.dense_macs / 1e6:.2f} | "
            f"{self.effective_macs / 1e6:.2f} | {self.ratio:.2f} |"
        )
        return "\n".join(lines)


def flop_report(model, gates=None, data=None, gate_fn=None, max_batches=None):
    """Counts a functional model's dense and effective multiply-adds.

    Effective multiply-adds are those the gates leave (see the module
    docstring): per example, every convolution costs its dense
    multiply-adds times its active input fraction times its needed output
    fraction, averaged over the examples.

    Args:
        model: a built functional model (channels-last).
        gates: optional list of `(num_examples, C_l)` gate arrays, one per
            `GatedConv2D` in the order of `model.layers`.
        data: optional data to measure the gates on instead (inputs, an
            `(x, y)` tuple or a dataset); the gates are read from the
            model's graph, or computed by `gate_fn`.
        gate_fn: see `keras_moe.analysis.collect_gates`.
        max_batches: optional limit on the batches of `data` used.

    Returns:
        A `FlopReport` per example. Without gates or data, effective equals
        dense.

    Example:

    ```python
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    model = keras.Model(inputs, x)
    report = keras_moe.analysis.flop_report(model)
    report.dense_macs  # 6912.0
    report.dense_flops  # 13824.0
    ```
    """
    if gates is None and data is not None:
        gates, _ = collect_gates(
            model, data, gate_fn=gate_fn, max_batches=max_batches
        )
    _, terms = cost_terms(model)
    num_gated = len(ChannelAnalysis(model).gated_layers)
    effective = {}
    if gates is not None:
        if len(gates) != num_gated:
            raise ValueError(
                f"`gates` must have one array per GatedConv2D ({num_gated})."
                f" Received {len(gates)} arrays."
            )
        masks = [np.asarray(gate) != 0 for gate in gates]
        sizes = {len(mask) for mask in masks}
        if len(sizes) > 1:
            raise ValueError(
                "Every gate array must have one row per example. Received "
                f"arrays with {sorted(sizes)} rows."
            )
        for term in terms:
            effective[term.name] = float(np.mean(term.effective_macs(masks)))
    rows = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        dense = layer_macs(layer, _first_input(layer).shape)
        if dense == 0:
            continue
        macs = effective.get(layer.name, dense)
        rows.append(
            {
                "name": layer.name,
                "type": type(layer).__name__,
                "dense_macs": dense,
                "effective_macs": macs,
                "dense_flops": 2.0 * dense,
                "effective_flops": 2.0 * macs,
                "active_fraction": macs / dense,
            }
        )
    return FlopReport(
        layers=rows,
        dense_macs=sum(r["dense_macs"] for r in rows),
        effective_macs=sum(r["effective_macs"] for r in rows),
    )
