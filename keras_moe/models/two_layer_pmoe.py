import keras

from keras_moe.layers import PatchExpertChoiceMoE
from keras_moe.models._builder import BuilderModel
from keras_moe.models._builder import check_model_kwargs


@keras.saving.register_keras_serializable(package="keras_moe")
class TwoLayerPMoE(BuilderModel):
    """The two-layer pMoE CNN of the pMoE theory (eq. 1).

    The input is cut into `n` non-overlapping patches `x^(j)` of
    `patch_size` (`d = patch_h * patch_w * channels` values each). Each of
    the `num_experts` (`k`) routers scores every patch, `<w_s, x^(j)>`, and
    sends its top `patches_per_expert` (`l`) patches `J_s(x)` to its expert,
    a layer of `neurons_per_expert` (`m / k`) ReLU neurons `w_{r,s}`
    applied to each patch on its own. The output is

    `f(x) = sum_s sum_r a_{r,s} / l * sum_{j in J_s(x)}
    ReLU(<w_{r,s}, x^(j)>) G_{j,s}(x)`

    with the gating values `G` of `gating`: `"hard"` (separate training,
    eq. 3), `"softmax"` (joint training, eq. 4) or `"softmax_all"`. The
    model is built from a `PatchExpertChoiceMoE` layer (`patch_size=1` on
    the patches laid out as channels), so the experts only run on the
    `k * l` selected patches.

    With `num_classes=2` the model returns one logit `f(x)` per sample:
    the paper's binary classifier, trained with the logistic loss
    `log(1 + exp(-y f(x)))` (eq. 2), which is
    `keras.losses.BinaryCrossentropy(from_logits=True)` on labels in
    {0, 1}. With `num_classes > 2` it returns `num_classes` logits
    `f_i(x)`, each with its own output weights (appendix M, eq. 23), for
    the softmax cross-entropy (eq. 24).

    As in the paper's analysis (section 3.2), the output weights `a_{r,s}`
    are drawn from `N(0, 1)` and kept fixed by default
    (`train_output_layer=False`).

    Args:
        num_experts: int, the number of experts `k`.
        neurons_per_expert: int, the hidden neurons of each expert
            (`m / k`).
        patches_per_expert: int, the patches `l` each expert receives.
        patch_size: int or tuple of 2 ints, the patch height and width; must
            divide the input's height and width.
        input_shape: tuple `(height, width, channels)`. Defaults to the
            paper's 4x4 grid of 28x28 digits, `(112, 112, 1)`.
        num_classes: int, 2 for one logit, more for one logit per class.
        gating: `"softmax"`, `"hard"` or `"softmax_all"`.
        train_output_layer: bool, whether the output weights `a` train.
        expert_initializer: initializer of the neurons `w_{r,s}` (eq. 8).
            Defaults to `RandomNormal(stddev=0.1)`.
        router_initializer: initializer of the routers `w_s` (eq. 7: small
            random values). Defaults to `RandomNormal(stddev=1e-4)`.
        output_initializer: initializer of the output weights `a`.
            Defaults to `RandomNormal(stddev=1.0)`.
        dtype: optional dtype policy of every layer.
        **kwargs: `keras.Model` keyword arguments such as `name`.

    Example:

    ```python
    model = keras_moe.models.TwoLayerPMoE(
        num_experts=2, neurons_per_expert=4, patches_per_expert=2,
        patch_size=8, input_shape=(32, 32, 1))
    tuple(model(np.zeros((3, 32, 32, 1), "float32")).shape)  # (3, 1)
    model.pmoe_layer.num_patches  # 16
    ```

    Reference:
        M. N. R. Chowdhury et al., "Patch-level Routing in Mixture-of-Experts
        is Provably Sample-efficient for Convolutional Neural Networks",
        ICML 2023, section 3, eq. 1-4 and 7-8; appendix M, eq. 23.
    """

    def __init__(
        self,
        num_experts,
        neurons_per_expert,
        patches_per_expert,
        patch_size,
        input_shape=(112, 112, 1),
        num_classes=2,
        gating="softmax",
        train_output_layer=False,
        expert_initializer=None,
        router_initializer=None,
        output_initializer=None,
        dtype=None,
        **kwargs,
    ):
        check_model_kwargs(type(self), kwargs)
        input_shape = tuple(input_shape)
        patch_size = _pair("patch_size", patch_size)
        grid = _grid(input_shape, patch_size)
        _check_int("num_classes", num_classes, minimum=2)
        _check_int("neurons_per_expert", neurons_per_expert)
        if expert_initializer is None:
            expert_initializer = {
                "class_name": "RandomNormal",
                "config": {"stddev": 0.1},
            }
        if router_initializer is None:
            router_initializer = {
                "class_name": "RandomNormal",
                "config": {"stddev": 1e-4},
            }
        if output_initializer is None:
            output_initializer = {
                "class_name": "RandomNormal",
                "config": {"stddev": 1.0},
            }

        # === Layers ===
        experts = [
            keras.layers.Conv2D(
                neurons_per_expert,
                1,
                activation="relu",
                use_bias=False,
                # A new initializer per expert: one instance would give
                # every expert the same starting weights.
                kernel_initializer=keras.initializers.get(
                    _copy(expert_initializer)
                ),
                dtype=dtype,
                name=f"expert_{s}",
            )
            for s in range(num_experts)
        ]
        pmoe_layer = PatchExpertChoiceMoE(
            num_experts=num_experts,
            patches_per_expert=patches_per_expert,
            patch_size=1,
            experts=experts,
            gating=gating,
            combine="concat",
            router_initializer=_copy(router_initializer),
            dtype=dtype,
            name="pmoe",
        )

        # === Functional Model ===
        images = keras.Input(input_shape, name="images")
        patches = _patches_as_channels(images, patch_size, grid, dtype)
        hidden = pmoe_layer(patches)
        logits = _readout(
            hidden,
            grid,
            patches_per_expert,
            num_classes,
            train_output_layer,
            output_initializer,
            dtype,
        )
        super().__init__(inputs=images, outputs=logits, dtype=dtype, **kwargs)

        # === Config ===
        self.pmoe_layer = pmoe_layer
        self.num_experts = num_experts
        self.neurons_per_expert = neurons_per_expert
        self.patches_per_expert = patches_per_expert
        self.patch_size = patch_size
        self.image_shape = input_shape
        self.num_classes = num_classes
        self.gating = gating
        self.train_output_layer = train_output_layer
        self.expert_initializer = expert_initializer
        self.router_initializer = router_initializer
        self.output_initializer = output_initializer

    def get_config(self):
        return {
            **super().get_config(),
            "num_experts": self.num_experts,
            "neurons_per_expert": self.neurons_per_expert,
            "patches_per_expert": self.patches_per_expert,
            "patch_size": self.patch_size,
            "input_shape": self.image_shape,
            "num_classes": self.num_classes,
            "gating": self.gating,
            "train_output_layer": self.train_output_layer,
            "expert_initializer": _serialize(self.expert_initializer),
            "router_initializer": _serialize(self.router_initializer),
            "output_initializer": _serialize(self.output_initializer),
        }


@keras.saving.register_keras_serializable(package="keras_moe")
class TwoLayerCNN(BuilderModel):
    """The single-expert CNN counterpart of the two-layer pMoE (eq. 5).

    Every one of the `num_neurons` (`m`) ReLU neurons `w_r` sees every one
    of the `n` patches:

    `f(x) = sum_r a_r / n * sum_j ReLU(<w_r, x^(j)>)`,

    which is `TwoLayerPMoE` with one expert that receives all patches with
    gating values 1. Output and training as in `TwoLayerPMoE`.

    Args:
        num_neurons: int, the hidden neurons `m`.
        patch_size: int or tuple of 2 ints, the patch height and width.
        input_shape: tuple `(height, width, channels)`.
        num_classes: int, 2 for one logit, more for one logit per class.
        train_output_layer: bool, whether the output weights `a` train.
        expert_initializer: initializer of the neurons `w_r`. Defaults to
            `RandomNormal(stddev=0.1)`.
        output_initializer: initializer of the output weights `a`.
            Defaults to `RandomNormal(stddev=1.0)`.
        dtype: optional dtype policy of every layer.
        **kwargs: `keras.Model` keyword arguments such as `name`.

    Example:

    ```python
    model = keras_moe.models.TwoLayerCNN(
        num_neurons=8, patch_size=8, input_shape=(32, 32, 1))
    tuple(model(np.zeros((3, 32, 32, 1), "float32")).shape)  # (3, 1)
    ```

    Reference:
        M. N. R. Chowdhury et al., "Patch-level Routing in Mixture-of-Experts
        is Provably Sample-efficient for Convolutional Neural Networks",
        ICML 2023, section 3.1, eq. 5.
    """

    def __init__(
        self,
        num_neurons,
        patch_size,
        input_shape=(112, 112, 1),
        num_classes=2,
        train_output_layer=False,
        expert_initializer=None,
        output_initializer=None,
        dtype=None,
        **kwargs,
    ):
        check_model_kwargs(type(self), kwargs)
        input_shape = tuple(input_shape)
        patch_size = _pair("patch_size", patch_size)
        grid = _grid(input_shape, patch_size)
        _check_int("num_neurons", num_neurons)
        _check_int("num_classes", num_classes, minimum=2)
        if expert_initializer is None:
            expert_initializer = {
                "class_name": "RandomNormal",
                "config": {"stddev": 0.1},
            }
        if output_initializer is None:
            output_initializer = {
                "class_name": "RandomNormal",
                "config": {"stddev": 1.0},
            }

        # === Functional Model ===
        images = keras.Input(input_shape, name="images")
        patches = _patches_as_channels(images, patch_size, grid, dtype)
        hidden = keras.layers.Conv2D(
            num_neurons,
            1,
            activation="relu",
            use_bias=False,
            kernel_initializer=keras.initializers.get(
                _copy(expert_initializer)
            ),
            dtype=dtype,
            name="neurons",
        )(patches)
        num_patches = grid[0] * grid[1]
        logits = _readout(
            hidden,
            grid,
            num_patches,
            num_classes,
            train_output_layer,
            output_initializer,
            dtype,
        )
        super().__init__(inputs=images, outputs=logits, dtype=dtype, **kwargs)

        # === Config ===
        self.num_neurons = num_neurons
        self.patch_size = patch_size
        self.image_shape = input_shape
        self.num_classes = num_classes
        self.train_output_layer = train_output_layer
        self.expert_initializer = expert_initializer
        self.output_initializer = output_initializer

    def get_config(self):
        return {
            **super().get_config(),
            "num_neurons": self.num_neurons,
            "patch_size": self.patch_size,
            "input_shape": self.image_shape,
            "num_classes": self.num_classes,
            "train_output_layer": self.train_output_layer,
            "expert_initializer": _serialize(self.expert_initializer),
            "output_initializer": _serialize(self.output_initializer),
        }


def _patches_as_channels(images, patch_size, grid, dtype):
    """`(b, H, W, C)` -> `(b, grid_h, grid_w, patch_h * patch_w * C)`."""
    (patch_h, patch_w), (grid_h, grid_w) = patch_size, grid
    channels = images.shape[-1]
    x = keras.layers.Reshape(
        (grid_h, patch_h, grid_w, patch_w, channels), dtype=dtype
    )(images)
    x = keras.layers.Permute((1, 3, 2, 4, 5), dtype=dtype)(x)
    return keras.layers.Reshape(
        (grid_h, grid_w, patch_h * patch_w * channels),
        dtype=dtype,
        name="patches",
    )(x)


def _readout(hidden, grid, divisor, num_classes, trainable, init, dtype):
    """`sum_r a_r / divisor * sum_j hidden_{j, r}`: the output layer."""
    num_patches = grid[0] * grid[1]
    x = keras.layers.GlobalAveragePooling2D(dtype=dtype, name="pool")(hidden)
    # The pooling averages over all n patches; the model sums over them and
    # divides by `divisor` (l for pMoE, n for the CNN).
    x = keras.layers.Rescaling(num_patches / divisor, dtype=dtype)(x)
    return keras.layers.Dense(
        1 if num_classes == 2 else num_classes,
        use_bias=False,
        kernel_initializer=keras.initializers.get(_copy(init)),
        trainable=trainable,
        dtype=dtype,
        name="output",
    )(x)


def _copy(initializer):
    """A fresh initializer object from a config, name or instance."""
    if isinstance(initializer, keras.initializers.Initializer):
        return initializer.__class__.from_config(initializer.get_config())
    if isinstance(initializer, dict):
        return {
            **initializer,
            "config": dict(initializer.get("config", {})),
        }
    return initializer


def _serialize(initializer):
    if isinstance(initializer, keras.initializers.Initializer):
        return keras.initializers.serialize(initializer)
    return initializer


def _pair(name, value):
    pair = (value, value) if isinstance(value, int) else value
    if (
        not isinstance(pair, (list, tuple))
        or len(pair) != 2
        or any(
            isinstance(v, bool) or not isinstance(v, int) or v <= 0
            for v in pair
        )
    ):
        raise ValueError(
            f"`{name}` must be a positive int or a tuple of 2 positive ints. "
            f"Received: {name}={value!r}"
        )
    return tuple(pair)


def _grid(input_shape, patch_size):
    if len(input_shape) != 3 or any(
        isinstance(d, bool) or not isinstance(d, int) or d <= 0
        for d in input_shape
    ):
        raise ValueError(
            "`input_shape` must be (height, width, channels) of positive "
            f"ints. Received: input_shape={input_shape!r}"
        )
    (height, width), (patch_h, patch_w) = input_shape[:2], patch_size
    if height % patch_h or width % patch_w:
        raise ValueError(
            f"`patch_size` must divide the input's height and width. "
            f"Received: patch_size={patch_size} for "
            f"input_shape={input_shape}"
        )
    return height // patch_h, width // patch_w


def _check_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"`{name}` must be an integer >= {minimum}. "
            f"Received: {name}={value!r}"
        )
