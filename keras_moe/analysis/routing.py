"""Gate and expert statistics: which experts are used, and by what.

The functions here work on NumPy arrays of gates or routing decisions, and
`collect_gates` / `collect_routing` produce those arrays from a model and
data, so the same statistics serve any model of the package.
"""

import dataclasses

import keras
import numpy as np


def _batches(data, batch_size):
    """Yields `(x, y_or_None)` batches from arrays, tuples or datasets."""
    if isinstance(data, np.ndarray):
        data = (data,)
    if isinstance(data, tuple) and all(
        hasattr(a, "shape") for a in data if a is not None
    ):
        x = data[0]
        y = data[1] if len(data) > 1 else None
        for start in range(0, len(x), batch_size):
            stop = start + batch_size
            yield x[start:stop], None if y is None else y[start:stop]
        return
    for batch in data:
        if isinstance(batch, (tuple, list)):
            yield batch[0], batch[1] if len(batch) > 1 else None
        else:
            yield batch, None


def gate_function(model):
    """A function from a batch of inputs to the gates of a DeepMoE model.

    The gates are read from the model's graph (see
    `keras_moe.models.deepmoe_outputs`); raises a `ValueError` for a
    model without gates.
    """
    from keras_moe.models import deepmoe_outputs

    outputs = deepmoe_outputs(model)
    return lambda x: outputs(x, training=False)["gates"]


def collect_gates(model, data, gate_fn=None, batch_size=128, max_batches=None):
    """Runs a gated network on data and gathers every layer's gates.

    Args:
        model: a DeepMoE network: any functional model with `GatedConv2D`
            layers (the gates are read from its graph, see
            `keras_moe.models.deepmoe_outputs`), a `DeepMoETrainer`, or
            anything when `gate_fn` is given.
        data: an array of inputs, an `(x, y)` tuple of arrays, or an
            iterable of `(x, y)` batches such as a `tf.data.Dataset`.
        gate_fn: optional function from a batch of inputs to the list of
            gate tensors `(batch, C_l)`.
        batch_size: batch size used for arrays.
        max_batches: optional int, stop after this many batches.

    Returns:
        `(gates, labels)`: a list with one `(num_examples, C_l)` array per
        gated layer, and the labels as an array (or `None` without labels).
    """
    gate_fn = gate_fn or gate_function(model)
    per_layer, labels = None, []
    for i, (x, y) in enumerate(_batches(data, batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        gates = [keras.ops.convert_to_numpy(g) for g in gate_fn(x)]
        if per_layer is None:
            per_layer = [[] for _ in gates]
        for store, gate in zip(per_layer, gates):
            store.append(gate.astype("float32"))
        if y is not None:
            labels.append(np.asarray(keras.ops.convert_to_numpy(y)))
    if per_layer is None:
        raise ValueError("`data` yielded no batch.")
    gates = [np.concatenate(store) for store in per_layer]
    return gates, np.concatenate(labels) if labels else None


@dataclasses.dataclass
class GateStatistics:
    """Statistics of gates over a set of examples, per gated layer.

    Attributes:
        layer_names: names of the gated layers.
        num_examples: number of examples the statistics cover.
        density: `(L,)` fraction of gates that are non-zero.
        mean_gate: `(L,)` mean gate value.
        dead_fraction: `(L,)` fraction of channels whose gate is zero for
            every example (experts never used).
        collapsed_fraction: `(L,)` fraction of examples whose gates of that
            layer are all zero (the layer passes no signal for them).
        histograms: one `(counts, bin_edges)` pair per layer.
        class_patterns: with labels, one `(num_classes, C_l)` array of mean
            gates per class for each layer; else `None`.
        classes: the class values of the rows of `class_patterns`.
        channels: `(L,)` number of gates (channels) of each layer.
    """

    layer_names: list
    num_examples: int
    density: np.ndarray
    mean_gate: np.ndarray
    dead_fraction: np.ndarray
    collapsed_fraction: np.ndarray
    histograms: list
    class_patterns: list = None
    classes: np.ndarray = None
    channels: np.ndarray = None

    @property
    def overall_density(self):
        """Fraction of all gates, over every layer, that are non-zero."""
        return float(
            np.sum(self.density * self.channels) / np.sum(self.channels)
        )

    def as_scalars(self):
        """A flat dict of floats, ready for logs, History and TensorBoard."""
        scalars = {"gate_density": self.overall_density}
        for i, name in enumerate(self.layer_names):
            scalars[f"gate_density/{name}"] = float(self.density[i])
            scalars[f"dead_channels/{name}"] = float(self.dead_fraction[i])
        return scalars


def gate_statistics(gates, labels=None, layer_names=None, bins=20):
    """Density, histograms and per-class patterns of DeepMoE gates.

    Args:
        gates: a list of `(num_examples, C_l)` arrays, one per gated layer
            (for example from `collect_gates`).
        labels: optional `(num_examples,)` integer labels for the per-class
            mean gate patterns (the paper's gate-embedding analysis).
        layer_names: optional names of the layers; `layer_0`, ... otherwise.
        bins: number of histogram bins.

    Returns:
        A `GateStatistics`.

    Example:

    ```python
    gates = [np.array([[0.0, 1.0], [0.0, 3.0]]), np.array([[0.0], [0.0]])]
    stats = keras_moe.analysis.gate_statistics(gates, labels=np.array([0, 1]))
    stats.density.tolist()  # [0.5, 0.0]
    stats.dead_fraction.tolist()  # [0.5, 1.0]
    stats.collapsed_fraction.tolist()  # [0.0, 1.0]
    ```
    """
    if isinstance(gates, np.ndarray):
        gates = [gates]
    gates = [np.asarray(g, dtype="float64") for g in gates]
    if not gates or any(g.ndim != 2 for g in gates):
        raise ValueError(
            "`gates` must be a non-empty list of (num_examples, channels) "
            f"arrays. Received shapes: {[np.shape(g) for g in gates]}"
        )
    num_examples = len(gates[0])
    if any(len(g) != num_examples for g in gates):
        raise ValueError(
            "Every layer's gates must cover the same examples. Received "
            f"shapes: {[g.shape for g in gates]}"
        )
    layer_names = layer_names or [f"layer_{i}" for i in range(len(gates))]
    if len(layer_names) != len(gates):
        raise ValueError(
            f"`layer_names` must have one name per layer ({len(gates)}). "
            f"Received: layer_names={layer_names!r}"
        )
    active = [g > 0 for g in gates]
    class_patterns = classes = None
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != num_examples:
            raise ValueError(
                f"`labels` must have one entry per example ({num_examples})."
                f" Received: {len(labels)} labels"
            )
        classes = np.unique(labels)
        class_patterns = [
            np.stack([g[labels == c].mean(axis=0) for c in classes])
            for g in gates
        ]
    return GateStatistics(
        layer_names=list(layer_names),
        num_examples=num_examples,
        density=np.array([a.mean() for a in active]),
        mean_gate=np.array([g.mean() for g in gates]),
        dead_fraction=np.array([(~a.any(axis=0)).mean() for a in active]),
        collapsed_fraction=np.array([(~a.any(axis=1)).mean() for a in active]),
        histograms=[np.histogram(g, bins=bins) for g in gates],
        class_patterns=class_patterns,
        classes=classes,
        channels=np.array([g.shape[1] for g in gates]),
    )


def expert_load(gates):
    """Load of soft-gated experts (`MixtureOfExperts`).

    Args:
        gates: `(num_examples, num_experts)` mixture weights.

    Returns:
        A dict with `"mean_gate"`, `(num_experts,)` the average weight of
        each expert (its share of the work), and `"top_fraction"`, the
        fraction of examples for which each expert has the largest weight.
    """
    gates = np.asarray(gates, dtype="float64")
    if gates.ndim != 2:
        raise ValueError(
            "`gates` must have shape (num_examples, num_experts). "
            f"Received: {gates.shape}"
        )
    top = np.bincount(gates.argmax(axis=1), minlength=gates.shape[1])
    return {
        "mean_gate": gates.mean(axis=0),
        "top_fraction": top / len(gates),
    }


@dataclasses.dataclass
class PatchRoutingStatistics:
    """How the experts of a `PatchExpertChoiceMoE` choose patches.

    Attributes:
        selection_counts: `(num_experts, grid_h, grid_w)`, how often each
            expert selected each patch position.
        selection_frequency: the same divided by the number of examples.
        coverage: mean fraction of an example's patches selected by at
            least one expert.
        overlap: `(num_experts, num_experts)` mean Jaccard similarity of the
            sets of patches two experts select for the same example.
        position_entropy: `(num_experts,)` entropy of each expert's
            selection frequencies over positions, normalized to [0, 1]
            (0: always the same patches whatever the input).
        mean_gate_by_rank: `(num_experts, patches_per_expert)` mean gating
            value of the patch an expert ranks first, second, ...
        class_selection: with labels, `(num_classes, num_experts, grid_h,
            grid_w)` selection frequencies per class; else `None`.
        classes: the class values of `class_selection`.
    """

    selection_counts: np.ndarray
    selection_frequency: np.ndarray
    coverage: float
    overlap: np.ndarray
    position_entropy: np.ndarray
    mean_gate_by_rank: np.ndarray
    class_selection: np.ndarray = None
    classes: np.ndarray = None

    def as_scalars(self, prefix="experts"):
        """A flat dict of floats, ready for logs and TensorBoard."""
        num_experts = len(self.position_entropy)
        off_diagonal = self.overlap[~np.eye(num_experts, dtype=bool)]
        return {
            f"{prefix}/coverage": float(self.coverage),
            f"{prefix}/mean_overlap": float(off_diagonal.mean())
            if off_diagonal.size
            else 0.0,
            f"{prefix}/min_position_entropy": float(
                self.position_entropy.min()
            ),
        }


def patch_routing_statistics(indices, gates, grid_shape, labels=None):
    """Statistics of expert-choice patch routing.

    Args:
        indices: `(num_examples, num_experts, patches_per_expert)` selected
            patch indices (row-major over the patch grid), as returned by
            `PatchExpertChoiceMoE.route` or `collect_routing`.
        gates: gating values of the same shape.
        grid_shape: `(grid_h, grid_w)`, the patch grid.
        labels: optional `(num_examples,)` labels for per-class selections.

    Returns:
        A `PatchRoutingStatistics`.
    """
    indices = np.asarray(indices)
    gates = np.asarray(gates, dtype="float64")
    if indices.ndim != 3 or gates.shape != indices.shape:
        raise ValueError(
            "`indices` and `gates` must both have shape (num_examples, "
            f"num_experts, patches_per_expert). Received: {indices.shape} "
            f"and {gates.shape}"
        )
    grid_h, grid_w = grid_shape
    num_patches = grid_h * grid_w
    if indices.size and (indices.min() < 0 or indices.max() >= num_patches):
        raise ValueError(
            f"`indices` must lie in [0, {num_patches}) for "
            f"grid_shape={tuple(grid_shape)}."
        )
    num_examples, num_experts, _ = indices.shape
    selected = np.zeros((num_examples, num_experts, num_patches), bool)
    np.put_along_axis(selected, indices, True, axis=-1)
    counts = selected.sum(axis=0).reshape(num_experts, grid_h, grid_w)
    frequency = counts / max(num_examples, 1)
    coverage = selected.any(axis=1).mean()
    counts_int = selected.astype("int64")
    intersection = np.einsum("nsp,ntp->nst", counts_int, counts_int)
    sizes = selected.sum(-1)
    union = sizes[:, :, None] + sizes[:, None, :] - intersection
    overlap = (intersection / np.maximum(union, 1)).mean(axis=0)
    p = frequency.reshape(num_experts, -1)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    entropy = entropy / np.log(num_patches) if num_patches > 1 else entropy
    class_selection = classes = None
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        classes = np.unique(labels)
        class_selection = np.stack(
            [
                selected[labels == c]
                .mean(axis=0)
                .reshape(num_experts, grid_h, grid_w)
                for c in classes
            ]
        )
    return PatchRoutingStatistics(
        selection_counts=counts,
        selection_frequency=frequency,
        coverage=float(coverage),
        overlap=overlap,
        position_entropy=entropy,
        mean_gate_by_rank=gates.mean(axis=0),
        class_selection=class_selection,
        classes=classes,
    )


def collect_routing(model, layer, data, batch_size=128, max_batches=None):
    """Gathers the routing decisions of a `PatchExpertChoiceMoE` in a model.

    Args:
        model: a functional model containing `layer`.
        layer: the `PatchExpertChoiceMoE` layer (or its name).
        data: an array of inputs, an `(x, y)` tuple of arrays, or an
            iterable of `(x, y)` batches.
        batch_size: batch size used for arrays.
        max_batches: optional int, stop after this many batches.

    Returns:
        `(routing, labels)`: a dict of `"indices"`, `"gates"` and
        `"routing_values"` arrays over all examples, and the labels (or
        `None`).
    """
    if isinstance(layer, str):
        layer = model.get_layer(layer)
    features = keras.Model(model.input, layer.input)
    routing, labels = {}, []
    for i, (x, y) in enumerate(_batches(data, batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        decision = layer.route(features(x, training=False))
        for key, value in decision.items():
            routing.setdefault(key, []).append(
                keras.ops.convert_to_numpy(value)
            )
        if y is not None:
            labels.append(np.asarray(keras.ops.convert_to_numpy(y)))
    routing = {key: np.concatenate(v) for key, v in routing.items()}
    return routing, np.concatenate(labels) if labels else None


def gate_embedding_shuffling(
    embed, classify, x, y, target_class, groups, num_repeats=20, seed=0
):
    """DeepMoE's gate-embedding shuffling analysis (its figure 4).

    For each input of `target_class`, the gate embedding `e` is replaced by
    the embedding of a random input of another class, and the accuracy on
    `target_class` is measured. If the embedding captures semantics,
    embeddings from classes of the same coarse group (in-group) keep the
    accuracy much higher than embeddings from other groups (out-of-group).

    Args:
        embed: function from a batch of inputs to their embeddings `e`.
        classify: function from `(inputs, embeddings)` to class logits or
            probabilities, running the network with the given embeddings.
        x: inputs covering `target_class` and the other classes.
        y: `(num_examples,)` integer labels.
        target_class: the class `A` whose inputs get foreign embeddings.
        groups: mapping (dict or array) from class to its coarse group,
            for example the CIFAR-100 coarse label of each fine label.
        num_repeats: random embeddings drawn per input and source class.
        seed: seed of the draws.

    Returns:
        A dict with `"accuracy"`: `{source_class: accuracy}`, `"in_group"`
        and `"out_of_group"`: the mean accuracies over source classes of
        the same and of other groups, and `"own"`: the accuracy with the
        inputs' own embeddings.
    """
    y = np.asarray(y).reshape(-1)
    group_of = (
        (lambda c: groups[c])
        if isinstance(groups, dict)
        else (lambda c: np.asarray(groups)[c])
    )
    target = np.flatnonzero(y == target_class)
    if target.size == 0:
        raise ValueError(f"No example of target_class={target_class!r} in `y`.")
    embeddings = keras.ops.convert_to_numpy(embed(x))
    rng = np.random.default_rng(seed)
    x_target = np.repeat(np.asarray(x)[target], num_repeats, axis=0)

    def accuracy(e):
        logits = keras.ops.convert_to_numpy(classify(x_target, e))
        return float(np.mean(logits.argmax(axis=-1) == target_class))

    own = accuracy(np.repeat(embeddings[target], num_repeats, axis=0))
    results = {}
    for source in np.unique(y):
        if source == target_class:
            continue
        donors = np.flatnonzero(y == source)
        chosen = rng.choice(donors, size=len(x_target), replace=True)
        results[int(source)] = accuracy(embeddings[chosen])
    own_group = group_of(target_class)
    in_group = [a for c, a in results.items() if group_of(c) == own_group]
    out_group = [a for c, a in results.items() if group_of(c) != own_group]
    return {
        "accuracy": results,
        "in_group": float(np.mean(in_group)) if in_group else float("nan"),
        "out_of_group": float(np.mean(out_group))
        if out_group
        else float("nan"),
        "own": own,
    }


def discriminative_routing(
    routing_values, labels, positions, top=1, expert_for_class=None
):
    """How often the routers send the class-deciding patch to its expert.

    pMoE's analysis (Lemma 4.1, Assumption 4.4) rests on routers that rank
    the class-discriminative patch of an input among the first patches of
    one expert. Given where that patch is in each input (as returned by
    `keras_moe.data.make_patch_digits`), this measures, for each class, the
    fraction of its inputs whose discriminative patch is among the `top`
    highest-scored patches of the class's expert: pMoE figure 8 (separate
    training: expert `c` is the router trained for class `c`, pass
    `expert_for_class=range(num_classes)`; `top = l`) and figure 9 (joint
    training: `top=1`, the patch with the largest gating value; the
    expert of a class is the one that most often ranks its discriminative
    patch first, found from the data).

    Args:
        routing_values: `(num_examples, num_patches, num_experts)` routing
            values `<w_s, x^(j)>`, as in the `"routing_values"` of
            `PatchExpertChoiceMoE.route` or `collect_routing`.
        labels: `(num_examples,)` integer class labels.
        positions: `(num_examples,)` index of each input's discriminative
            patch, row-major over the patch grid.
        top: int, how many of an expert's highest-scored patches count.
        expert_for_class: optional sequence mapping each class (0, 1, ...)
            to its expert. Defaults to the expert with the highest rate.

    Returns:
        A dict with `"rate"`: the fraction over all inputs, `"per_class"`:
        `{class: fraction}`, and `"experts"`: `{class: expert}`.

    Example:

    ```python
    # Two inputs, 3 patches, 2 experts; the deciding patch is 2, then 0.
    values = np.array([[[0.1, 0.0], [0.2, 0.1], [0.9, 0.0]],
                       [[0.0, 0.8], [0.1, 0.9], [0.3, 0.1]]])
    result = keras_moe.analysis.discriminative_routing(
        values, labels=[0, 1], positions=[2, 0], top=2)
    result["per_class"]  # {0: 1.0, 1: 1.0}
    result["experts"]  # {0: 0, 1: 1}
    ```

    Reference:
        M. N. R. Chowdhury et al., "Patch-level Routing in Mixture-of-Experts
        is Provably Sample-efficient for Convolutional Neural Networks",
        ICML 2023, section 5.1, figures 8-9.
    """
    values = np.asarray(routing_values)
    labels = np.asarray(labels).reshape(-1)
    positions = np.asarray(positions).reshape(-1)
    if values.ndim != 3 or not (len(values) == len(labels) == len(positions)):
        raise ValueError(
            "`routing_values` must be (num_examples, num_patches, "
            "num_experts) with one label and position per example. "
            f"Received: routing_values of shape {values.shape}, "
            f"{len(labels)} labels, {len(positions)} positions"
        )
    num_patches, num_experts = values.shape[1:]
    if (
        isinstance(top, bool)
        or not isinstance(top, (int, np.integer))
        or not 1 <= top <= num_patches
    ):
        raise ValueError(
            f"`top` must be an integer in [1, {num_patches}]. "
            f"Received: top={top!r}"
        )
    ranked = np.argsort(-values, axis=1, kind="stable")[:, :top, :]
    hits = (ranked == positions[:, None, None]).any(axis=1)
    per_class, experts, total = {}, {}, 0.0
    for c in np.unique(labels):
        rates = hits[labels == c].mean(axis=0)
        if expert_for_class is None:
            expert = int(np.argmax(rates))
        else:
            expert = int(expert_for_class[int(c)])
            if not 0 <= expert < num_experts:
                raise ValueError(
                    f"`expert_for_class` maps class {int(c)} to expert "
                    f"{expert}, but there are {num_experts} experts."
                )
        per_class[int(c)] = float(rates[expert])
        experts[int(c)] = expert
        total += rates[expert] * np.sum(labels == c)
    return {
        "rate": float(total / max(len(labels), 1)),
        "per_class": per_class,
        "experts": experts,
    }
