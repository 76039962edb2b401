"""Finds the tensors of the DeepMoE objective in any functional model."""

import keras
from keras import tree

from keras_moe.layers import GatedConv2D
from keras_moe.layers import ShallowEmbedding


def _unwrap(model):
    """A `DeepMoETrainer` (or anything with a `network`) -> its network."""
    network = getattr(model, "network", None)
    return network if isinstance(network, keras.Model) else model


def _check_functional(model):
    try:
        graph = bool(model.inputs) and bool(model.outputs)
    except (AttributeError, ValueError):
        graph = False
    if not isinstance(model, keras.Model) or not graph:
        raise ValueError(
            "DeepMoE training and analysis read the model's graph, so the "
            "model must be a functional (or built Sequential) Keras model "
            f"whose layers are called once. Received: model={model!r}"
        )


def find_deepmoe_tensors(model):
    """The symbolic tensors of the DeepMoE objective in a model's graph.

    Args:
        model: a functional or Sequential Keras model.

    Returns:
        `(logits, gates, embedding_probs)`: the logits tensor, the list of
        gate tensors (one per `GatedConv2D`, in the order of
        `model.layers`), and the embedding's class probabilities (or
        `None` when the model has none).

    Raises:
        ValueError: when the model has no logits or no gates.
    """
    _check_functional(model)
    outputs = model.output
    logits = outputs
    if isinstance(outputs, dict):
        logits = outputs.get("logits")
    elif isinstance(outputs, (list, tuple)):
        logits = outputs[0] if len(outputs) == 1 else None
    gated = [layer for layer in model.layers if isinstance(layer, GatedConv2D)]
    gates = [tree.flatten(layer.input)[1] for layer in gated]
    if not gates and isinstance(outputs, dict):
        gates = list(tree.flatten(outputs.get("gates", [])))
    probs = (
        outputs.get("embedding_probs") if isinstance(outputs, dict) else None
    )
    if probs is None:
        candidates = [
            layer
            for layer in model.layers
            if isinstance(layer, ShallowEmbedding)
            and layer.num_classes is not None
        ]
        if len(candidates) > 1:
            raise ValueError(
                "The model has several ShallowEmbedding layers with class "
                f"probabilities ({[layer.name for layer in candidates]}): "
                "return the one for the embedding loss as the output "
                "'embedding_probs'."
            )
        if candidates:
            probs = tree.flatten(candidates[0].output)[1]
    problems = []
    if logits is None:
        problems.append(
            "no logits: the model must output one tensor of logits, or a "
            "dict with a 'logits' entry"
        )
    if not gates:
        problems.append(
            "no gates: the model must contain GatedConv2D layers (gated by "
            "SparseGatingHeads, for example), or output a dict with a "
            "'gates' list"
        )
    if problems:
        raise ValueError(
            f"Model {model.name!r} is not a DeepMoE network: "
            + "; ".join(problems)
            + ". Build one from keras_moe.layers (ShallowEmbedding -> "
            "SparseGatingHeads -> GatedConv2D), use a builder of "
            "keras_moe.models, or convert a CNN with "
            "keras_moe.models.to_deepmoe."
        )
    return logits, gates, probs


def deepmoe_outputs(model):
    """A model that returns the tensors of the DeepMoE objective.

    DeepMoE's loss (eq. 7) needs three things from a network: its logits,
    the gates of every gated layer (for `L_g`) and the embedding's class
    probabilities (for `L_e`). This reads them from the graph of any
    functional or Sequential model built from the layers of
    `keras_moe.layers`: the logits are the model's output (or its
    `"logits"` entry), the gates are the second inputs of its
    `GatedConv2D` layers, and the class probabilities are the second
    output of its `ShallowEmbedding` (when built with `num_classes`). A
    model whose output is a dict with `"gates"` and `"embedding_probs"`
    entries (and no `GatedConv2D` layers) is read from its outputs.

    The returned model shares every layer and weight with `model`.
    `keras_moe.training.DeepMoETrainer`, `keras_moe.analysis.collect_gates`
    and the FLOP counting use it.

    Args:
        model: a functional or Sequential Keras model, or a
            `DeepMoETrainer` (its network is used).

    Returns:
        A `keras.Model` with the inputs of `model` returning a dict:
        `"logits"`, `"gates"` (a list with one `(batch, C_l)` tensor per
        gated layer, in the order of `model.layers`) and, when the model
        has them, `"embedding_probs"`.

    Raises:
        ValueError: when the model has no logits or no gates; the message
            says what it must provide.

    Example:

    ```python
    network = keras_moe.models.DeepMoEResNet(8, num_classes=10)
    outputs = keras_moe.models.deepmoe_outputs(network)
    y = outputs(np.zeros((2, 32, 32, 3), "float32"))
    sorted(y)  # ['embedding_probs', 'gates', 'logits']
    len(y["gates"]) == len(network.gated_layers)  # True
    ```
    """
    model = _unwrap(model)
    logits, gates, probs = find_deepmoe_tensors(model)
    outputs = {"logits": logits, "gates": gates}
    if probs is not None:
        outputs["embedding_probs"] = probs
    return keras.Model(
        model.input, outputs, name=f"{model.name}_deepmoe_outputs"
    )
