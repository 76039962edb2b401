"""Turns an existing Keras CNN, trained or not, into a DeepMoE or pMoE net."""

import keras
import numpy as np
from keras import tree

from keras_moe.layers import GatedConv2D
from keras_moe.layers import ShallowEmbedding
from keras_moe.layers import SparseGatingHeads
from keras_moe.layers._validation import check_positive_int
from keras_moe.models._graph import FunctionalGraph
from keras_moe.models._graph import is_channelwise


def _functional(model, converted=GatedConv2D):
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`model` must be a Keras model. Received: model={model!r}"
        )
    try:
        graph = bool(model.inputs) and bool(model.outputs)
    except (AttributeError, ValueError):
        graph = False
    if not graph:
        raise ValueError(
            "`model` must be a functional or built Sequential Keras model "
            "(subclassed models have no graph to rewrite). Received: "
            f"model={model.name!r}"
        )
    if any(isinstance(layer, converted) for layer in model.layers):
        raise ValueError(
            f"Model {model.name!r} already has {converted.__name__} layers; "
            "convert a plain CNN."
        )
    if any(
        isinstance(layer, keras.Model)
        and not isinstance(layer, keras.layers.InputLayer)
        for layer in model.layers
    ):
        raise ValueError(
            f"Model {model.name!r} nests models: flatten it first (for "
            "example by building it from the nested model's layers)."
        )
    return FunctionalGraph(model)


def _chain(graph, conv):
    """The channel-wise layers between `conv` and the convolution that
    produces its inputs for it alone, and that convolution; `None` when
    there is none."""
    tensor = tree.flatten(conv.input)[0]
    chain = []
    while True:
        if len(graph.consumers.get(id(tensor), [])) != 1:
            return None
        layer = graph.producer.get(id(tensor))
        if layer is None:
            return None
        if type(layer) is keras.layers.Conv2D or isinstance(
            layer, keras.layers.Conv2D
        ):
            if layer.data_format != "channels_last":
                return None
            return layer, chain[::-1]
        if not is_channelwise(layer) or len(tree.flatten(layer.input)) != 1:
            return None
        chain.append(layer)
        tensor = layer.input


def default_gated_layers(model):
    """The convolutions `to_deepmoe` gates by default.

    A `Conv2D` is gated when its input channels are produced, for it alone,
    by another convolution, through channel-wise layers only (batch
    normalization, element-wise activations, pooling, padding, depthwise
    convolutions): the inner convolutions of residual blocks (DeepMoE's
    ResNets gate those), every convolution after the first in a VGG-like
    chain, the projection of an inverted residual. A zero gate then
    removes an output channel of the producing convolution too.

    Args:
        model: a functional or Sequential Keras model.

    Returns:
        The names of those layers, in the order of `model.layers`.
    """
    graph = _functional(model)
    return [
        layer.name
        for layer in model.layers
        if type(layer) is keras.layers.Conv2D
        and layer.groups == 1
        and layer.data_format == "channels_last"
        and _chain(graph, layer) is not None
    ]


def _clone(layer, **overrides):
    config = {**layer.get_config(), **overrides}
    return type(layer).from_config(config)


def _new_values(initializer, shape, dtype):
    values = keras.initializers.get(initializer)(shape, dtype=dtype)
    return np.asarray(keras.ops.convert_to_numpy(values))


def to_deepmoe(
    model,
    gated_layers=None,
    widen=1,
    num_classes=None,
    embedding_dim=None,
    embedding_layers=None,
    embedding_filters=None,
    name=None,
):
    """Converts a Keras CNN, trained or not, into a DeepMoE network.

    The DeepMoE pieces are added around the model's own layers and
    weights:

    - a `ShallowEmbedding` reads the model's input and a
      `SparseGatingHeads` layer maps its latent mixture weights to one
      gate per input channel of every gated convolution;
    - each chosen `Conv2D` becomes a `GatedConv2D` with the same
      configuration and weights (by default the convolutions of
      `default_gated_layers`: those whose inputs another convolution
      produces for them alone, such as the inner convolutions of residual
      blocks, which DeepMoE's ResNets gate);
    - with `widen=k`, the gated channels are widened k times (the paper's
      "wide" DeepMoE): the producing convolution gets new filters (drawn
      from its kernel initializer), the channel-wise layers between get
      new channels (batch normalization with unit scale and statistics),
      and the gated convolution reads the new channels through zero
      kernel slices;
    - every other layer is copied with its weights, batch-normalization
      statistics included.

    At conversion every gate is exactly 1 (the heads' kernels are ones
    and the embedding's weights sum to 1), and new channels meet zero
    kernels, so the network computes the same function as the original:
    a trained model loses nothing. Training it with
    `keras_moe.training.DeepMoETrainer` (and the two-phase schedule of
    `train_two_phase`) then switches channels off per example, from where
    the dense model left off.

    The returned model has the original's inputs and outputs (logits, or
    probabilities for a model ending in a softmax: pass
    `from_logits=False` to the trainer then).

    Args:
        model: a functional or Sequential Keras CNN (channels-last), such
            as a `keras.applications` model or one of the user's own.
        gated_layers: optional list of names of `Conv2D` layers to gate;
            defaults to `default_gated_layers(model)`.
        widen: int >= 1, how many times to widen the gated channels.
        num_classes: optional int. When given, the embedding also returns
            class probabilities for the embedding loss `L_e` (the
            trainer's `mu`); without it, train with `mu=0`.
        embedding_dim: int, the size of the latent mixture weights `e`.
            Defaults to `num_classes`, or 64 without it.
        embedding_layers: int, the embedding's stride-2 convolutions.
            Defaults to 4 for inputs of at most 64x64, else 5.
        embedding_filters: int, the embedding's first width. Defaults to
            32 for inputs of at most 64x64, else 16.
        name: optional name of the new model.

    Returns:
        A functional `keras.Model` with new layers (sharing no variable
        with `model`).

    Example:

    ```python
    cnn = keras.Sequential([
        keras.Input((16, 16, 3)),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(4),
    ])
    moe = keras_moe.models.to_deepmoe(cnn, widen=2, num_classes=4)
    x = np.random.rand(2, 16, 16, 3).astype("float32")
    before = keras.ops.convert_to_numpy(cnn(x))
    after = keras.ops.convert_to_numpy(moe(x))
    bool(np.abs(before - after).max() < 1e-5)  # True
    [type(layer).__name__ for layer in moe.layers if "conv" in layer.name][:2]
    # ['Conv2D', 'GatedConv2D']
    moe.get_layer(index=4).kernel.shape[2]  # 16
    ```

    Reference:
        X. Wang et al., "Deep Mixture of Experts via Shallow Embedding",
        UAI 2019, section 3.3 (wide DeepMoE: section 4).
    """
    graph = _functional(model)
    widen = check_positive_int("widen", widen)
    if gated_layers is None:
        gated_layers = default_gated_layers(model)
    gated_layers = list(gated_layers)
    names = {layer.name: layer for layer in model.layers}
    chains = {}
    for layer_name in gated_layers:
        layer = names.get(layer_name)
        if layer is None or type(layer) is not keras.layers.Conv2D:
            raise ValueError(
                "`gated_layers` must name Conv2D layers of the model. "
                f"Received: {layer_name!r}"
                + ("" if layer is None else f" ({type(layer).__name__})")
            )
        found = _chain(graph, layer)
        if widen > 1 and found is None:
            raise ValueError(
                f"Layer {layer_name!r} has no convolution producing its "
                "inputs for it alone (through channel-wise layers), so its "
                "channels cannot be widened. Pass widen=1, or another "
                f"selection. Received: widen={widen}"
            )
        chains[layer_name] = found
    if not gated_layers:
        raise ValueError(
            f"Model {model.name!r} has no convolution to gate: "
            "`gated_layers` is empty."
        )
    input_shape = tuple(model.inputs[0].shape[1:])
    small = max(d or 0 for d in input_shape[:2]) <= 64
    if num_classes is not None:
        check_positive_int("num_classes", num_classes)
    embedding_dim = embedding_dim or num_classes or 64
    embedding_layers = embedding_layers or (4 if small else 5)
    embedding_filters = embedding_filters or (32 if small else 16)

    # Channel-wise layers and producers to widen, and the gated layers'
    # new input widths.
    widened = {}
    widths = []
    for layer_name in gated_layers:
        layer = names[layer_name]
        channels = int(tree.flatten(layer.input)[0].shape[-1])
        if widen > 1:
            producer, between = chains[layer_name]
            widened[producer.name] = channels
            for step in between:
                widened[step.name] = channels
        widths.append(channels * widen)

    # === Functional graph ===
    tensors, new_inputs = _new_inputs(model)
    used = {layer.name for layer in model.layers}
    embedding_name = _unique("embedding", used)
    heads_name = _unique("gating_heads", used)
    embedding = ShallowEmbedding(
        embedding_dim,
        num_layers=embedding_layers,
        filters=embedding_filters,
        num_classes=num_classes,
        name=embedding_name,
    )(new_inputs[0])
    if num_classes is not None:
        embedding = embedding[0]
    gates = SparseGatingHeads(
        widths, kernel_initializer="ones", name=heads_name
    )(embedding)
    gate_of = dict(zip(gated_layers, gates))
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        inputs = tree.map_structure(lambda t: tensors[id(t)], layer.input)
        grow = widened.get(layer.name)
        if layer.name in gate_of or (
            grow and isinstance(layer, keras.layers.Conv2D)
        ):
            config = layer.get_config()
            if grow:
                config["filters"] = grow * widen
            if layer.name in gate_of:
                new = GatedConv2D.from_config(config)
                output = new(inputs, gate_of[layer.name])
            else:
                new = type(layer).from_config(config)
                output = new(inputs)
            _copy_convolution(layer, new)
        elif grow:
            new = _clone(layer)
            output = new(inputs)
            _copy_channelwise(layer, new)
        else:
            new = _clone(layer)
            output = new(inputs)
            new.set_weights(layer.get_weights())
        for old, value in zip(tree.flatten(layer.output), tree.flatten(output)):
            tensors[id(old)] = value
    return _new_model(
        model, tensors, new_inputs, name or f"{model.name}_deepmoe"
    )


def _new_inputs(model):
    """New `keras.Input`s like the model's, and the map from the old ones."""
    tensors = {}
    new_inputs = []
    for tensor in model.inputs:
        new = keras.Input(
            tensor.shape[1:], dtype=tensor.dtype, name=tensor.name
        )
        tensors[id(tensor)] = new
        new_inputs.append(new)
    return tensors, new_inputs


def _new_model(model, tensors, new_inputs, name):
    """The rewritten graph as a model with the original's input and output
    structure."""
    outputs = tree.map_structure(
        lambda t: tensors[id(t)], _structure(model, "output")
    )
    inputs = tree.pack_sequence_as(_structure(model, "input"), new_inputs)
    return keras.Model(inputs, outputs, name=name)


def _structure(model, kind):
    """`model.input` / `model.output`; a Sequential model has lists only."""
    try:
        return getattr(model, kind)
    except AttributeError:
        flat = getattr(model, f"{kind}s")
        return flat[0] if len(flat) == 1 else flat


def _unique(name, used):
    candidate, i = name, 1
    while candidate in used:
        candidate, i = f"{name}_{i}", i + 1
    used.add(candidate)
    return candidate


def _numpy(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable))


def _copy_convolution(layer, new):
    """Copies a convolution's weights into a wider one: new input channels
    meet zero kernels (no effect at first), new filters are drawn from the
    layer's kernel initializer and have zero biases."""
    kernel = _numpy(layer.kernel)
    kh, kw, cin, cout = kernel.shape
    new_cin, new_cout = new.kernel.shape[2], new.kernel.shape[3]
    if new_cin > cin:
        zeros = np.zeros((kh, kw, new_cin - cin, cout), kernel.dtype)
        kernel = np.concatenate([kernel, zeros], axis=2)
    if new_cout > cout:
        fresh = _new_values(
            layer.kernel_initializer,
            (kh, kw, new_cin, new_cout - cout),
            kernel.dtype,
        )
        kernel = np.concatenate([kernel, fresh], axis=3)
    new.kernel.assign(kernel)
    if layer.use_bias:
        bias = _numpy(layer.bias)
        extra = np.zeros(new_cout - cout, bias.dtype)
        new.bias.assign(np.concatenate([bias, extra]))


def _copy_channelwise(layer, new):
    """Copies a channel-wise layer's weights into one with more channels:
    batch normalization gets unit scale and statistics for them, a
    depthwise convolution fresh kernels, PReLU the mean slope."""
    depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
    for old_var, new_var in zip(layer.weights, new.weights):
        value = _numpy(old_var)
        if tuple(value.shape) == tuple(new_var.shape):
            new_var.assign(value)
            continue
        axis = 2 if depthwise and value.ndim == 4 else -1
        shape = list(value.shape)
        shape[axis] = new_var.shape[axis] - value.shape[axis]
        name = old_var.path.split("/")[-1]
        if depthwise and name == "kernel":
            fill = _new_values(
                layer.depthwise_initializer, tuple(shape), value.dtype
            )
        elif name in ("gamma", "moving_variance"):
            fill = np.ones(shape, value.dtype)
        elif name == "alpha":
            fill = np.full(shape, float(value.mean()), value.dtype)
        else:  # bias, beta, moving_mean
            fill = np.zeros(shape, value.dtype)
        new_var.assign(np.concatenate([value, fill], axis=axis))


def _replaceable(layer):
    """Whether a layer is a Conv2D a pMoE layer can stand in for."""
    if type(layer) is not keras.layers.Conv2D:
        return False
    config = layer.get_config()
    return (
        tuple(config["strides"]) == (1, 1)
        and tuple(config["dilation_rate"]) == (1, 1)
        # A 1x1 convolution pads nothing: "valid" is "same".
        and (
            config["padding"] == "same"
            or tuple(config["kernel_size"]) == (1, 1)
        )
        and config.get("groups", 1) == 1
        and config["data_format"] == "channels_last"
    )


def default_pmoe_layer(model):
    """The convolution `to_pmoe` replaces by default.

    The last `Conv2D` of the model (in the order of `model.layers`) with
    strides 1, `"same"` padding (or a 1x1 kernel), no dilation or groups,
    channels-last data and a known height and width: the place of the
    pMoE layer in the paper's WRN-pMoE, after the last downsampling.

    Args:
        model: a functional or Sequential Keras model.

    Returns:
        The layer's name, or `None` when the model has no such layer.
    """
    for layer in reversed(model.layers):
        if _replaceable(layer):
            shape = tree.flatten(layer.input)[0].shape
            if shape[1] is not None and shape[2] is not None:
                return layer.name
    return None


def to_pmoe(
    model,
    layer=None,
    num_experts=4,
    patch_size=None,
    patches_per_expert=None,
    placement="halo",
    gating="softmax",
    name=None,
):
    """Replaces a convolution of a Keras CNN by a pMoE layer.

    The chosen `Conv2D` (with `F` filters) becomes a `PatchExpertChoiceMoE`
    of `num_experts` convolution experts with `F / num_experts` filters
    each, combined by concatenation, so that the layer keeps its output
    shape and, up to the routers' `patch_dim * num_experts` weights, its
    parameter count: WRN-pMoE's construction from WRN (pMoE section 5),
    applied to any CNN. Every other layer is copied with its weights
    (trained ones included, batch-norm statistics too), and expert `j` is
    initialised with the filters `j F / k` to `(j + 1) F / k - 1` of the
    convolution (and their biases), so that on the patches an expert
    selects it computes what those filters computed, times its gate. The
    convolution's activation, if any, follows the pMoE layer. Unlike
    `to_deepmoe`, the network's function changes at conversion: each
    expert sees only the `patches_per_expert` patches it selects, and the
    rest of its output is zero. Fine-tune the converted network.

    Args:
        model: a functional or built Sequential Keras model.
        layer: the name of the `Conv2D` to replace: strides 1, `"same"`
            padding (or a 1x1 kernel), channels-last. Defaults to
            `default_pmoe_layer(model)`, the last such convolution.
        num_experts: int, the number of experts `k`; must divide the
            convolution's filters. Defaults to 4.
        patch_size: int or tuple of 2 ints, the patch size; must divide the
            feature map. Defaults to a quarter of the map's height and
            width where they divide by 4 (16 patches), else 1.
        patches_per_expert: int, the patches `l` each expert selects.
            Defaults to `n / k` (rounded up): on average every patch is
            processed by one expert.
        placement: see `PatchExpertChoiceMoE`; defaults to `"halo"`, whose
            experts see the selected patches' neighbours as the replaced
            convolution did.
        gating: see `PatchExpertChoiceMoE`. Defaults to `"softmax"`.
        name: name of the new model; defaults to `"<model name>_pmoe"`.

    Returns:
        A new functional Keras model; `model` is left unchanged.

    Example:

    ```python
    cnn = keras.Sequential([
        keras.Input((16, 16, 3)),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])
    pmoe = keras_moe.models.to_pmoe(cnn, num_experts=4, patch_size=4)
    tuple(pmoe.output.shape)  # (None, 10)
    ```
    """
    from keras_moe.layers import PatchExpertChoiceMoE

    _functional(model, converted=PatchExpertChoiceMoE)
    if layer is None:
        layer = default_pmoe_layer(model)
        if layer is None:
            raise ValueError(
                f"Model {model.name!r} has no Conv2D with strides 1, 'same' "
                "padding and a known feature-map size to replace. Pass "
                "`layer`, the name of such a convolution."
            )
    names = {item.name: item for item in model.layers}
    target = names.get(layer)
    if target is None or not _replaceable(target):
        raise ValueError(
            "`layer` must name a Conv2D of the model with strides 1, 'same' "
            "padding, no dilation or groups and channels-last data. "
            f"Received: layer={layer!r}"
            + ("" if target is None else f" ({type(target).__name__})")
        )
    check_positive_int("num_experts", num_experts)
    filters = target.filters
    if filters % num_experts:
        raise ValueError(
            f"`num_experts` must divide the {filters} filters of layer "
            f"{layer!r}. Received: num_experts={num_experts}"
        )
    _, height, width, _ = tree.flatten(target.input)[0].shape
    if height is None or width is None:
        raise ValueError(
            f"Layer {layer!r} has an unknown feature-map size "
            f"({height}x{width}); build the model for a fixed input size."
        )
    if patch_size is None:
        patch_size = (
            (height // 4, width // 4)
            if height % 4 == 0 and width % 4 == 0
            else (1, 1)
        )
    moe_layer = PatchExpertChoiceMoE(
        num_experts=num_experts,
        patches_per_expert=patches_per_expert or 1,
        patch_size=patch_size,
        expert_filters=filters // num_experts,
        expert_kernel_size=target.kernel_size,
        expert_use_bias=target.use_bias,
        placement=placement,
        gating=gating,
        combine="concat",
        dtype=target.dtype_policy,
        name=target.name,
    )
    if patches_per_expert is None:
        patch_h, patch_w = moe_layer.patch_size
        if height % patch_h or width % patch_w:
            raise ValueError(
                f"`patch_size` must divide the {height}x{width} feature map "
                f"of layer {layer!r}. Received: patch_size={patch_size}"
            )
        patches = (height // patch_h) * (width // patch_w)
        moe_layer.patches_per_expert = -(-patches // num_experts)
    activation = keras.activations.serialize(target.activation)
    linear = target.activation is keras.activations.linear

    tensors, new_inputs = _new_inputs(model)
    for item in model.layers:
        if isinstance(item, keras.layers.InputLayer):
            continue
        inputs = tree.map_structure(lambda t: tensors[id(t)], item.input)
        if item is target:
            output = moe_layer(inputs)
            kernel, bias = _numpy(target.kernel), None
            if target.use_bias:
                bias = _numpy(target.bias)
            step = filters // num_experts
            for j, expert in enumerate(moe_layer.expert_layers):
                conv = _expert_convolution(expert)
                conv.kernel.assign(kernel[..., j * step : (j + 1) * step])
                if bias is not None:
                    conv.bias.assign(bias[j * step : (j + 1) * step])
            if not linear:
                output = keras.layers.Activation(
                    activation, name=f"{target.name}_activation"
                )(output)
        else:
            new = _clone(item)
            output = new(inputs)
            new.set_weights(item.get_weights())
        for old, value in zip(tree.flatten(item.output), tree.flatten(output)):
            tensors[id(old)] = value
    return _new_model(model, tensors, new_inputs, name or f"{model.name}_pmoe")


def _expert_convolution(expert):
    if isinstance(expert, keras.layers.Conv2D):
        return expert
    return [
        layer
        for layer in expert.layers
        if isinstance(layer, keras.layers.Conv2D)
    ][-1]
