import copy

import keras

from keras_moe.layers import PatchExpertChoiceMoE
from keras_moe.models._builder import BATCH_NORM_EPSILON
from keras_moe.models._builder import BATCH_NORM_MOMENTUM
from keras_moe.models._builder import BuilderModel
from keras_moe.models._builder import batch_norm
from keras_moe.models._builder import check_batch_norm
from keras_moe.models._builder import check_model_kwargs
from keras_moe.models.deepmoe_resnet import build_preset


@keras.saving.register_keras_serializable(package="keras_moe")
class WideResNet(BuilderModel):
    """Wide residual network (WRN), and WRN-pMoE with a patch-level MoE.

    The pre-activation WRN-`depth`-`widening_factor` of Zagoruyko and
    Komodakis: a 3x3 convolution with 16 filters, three groups of
    `(depth - 4) // 6` residual blocks with `16 * k`, `32 * k` and `64 * k`
    channels (`k = widening_factor`; strides 1, 2 and 2), then batch
    normalization, ReLU, global average pooling and a linear classifier
    returning logits. Each block computes

    `BN -> ReLU -> conv3x3(stride) -> BN -> ReLU -> [dropout] -> conv3x3`

    and adds a shortcut: the block's input, or, where the shape changes, a
    1x1 convolution (with the block's stride) of the pre-activated input.
    Convolutions have no bias and He-normal kernels.

    WRN-pMoE (pMoE section 5.2 and figure 18): with `pmoe` given, the last
    3x3 convolution of the network (the second convolution of the last
    block) is replaced by a `keras_moe.layers.PatchExpertChoiceMoE` built
    from the `pmoe` dict of constructor arguments. Everything else is the
    same network: the block's pre-activation, its shortcut and the addition
    stay in place, so `model.pmoe_layer` sees the pre-activated
    `(H / 4, W / 4, 64 * k)` feature map and its output is added to the
    shortcut. Its output channels must therefore equal the block width
    `64 * k`; when `pmoe` gives neither `expert_filters` nor `experts`,
    `expert_filters` is set to `64 * k / num_experts` (`"concat"`) or
    `64 * k` (`"sum"`).

    `architecture="authors"` builds the network of the authors' public
    code (nowazrabbani/pMoE_CNN) instead, parameter for parameter. Its
    convolutions have biases and Glorot-uniform kernels (Keras' defaults);
    the first block of every group has a 1x1 convolution shortcut (with
    the group's stride) of the block's input as it comes, before batch
    normalization. In WRN-pMoE the third group is replaced by batch
    normalization, ReLU and a 3x3 convolution with `64 * k` filters and
    stride 2, followed by the `PatchExpertChoiceMoE` and then the final
    batch normalization: no shortcut and no addition around the MoE, and
    any number of output channels. There, `pmoe` arguments left out take
    the authors' values: `placement="masked"` (each expert runs on the
    input map times its gate map), `expert_use_pre_activation=True` (batch
    normalization and ReLU in each expert, after the gate),
    `gating="softmax_all"`, routers drawn from a normal distribution with
    standard deviation 1e-4 (each gate starts near `1 / n`), and experts
    with biases and Glorot-uniform kernels. `placement="halo"` computes
    the same on the selected patches at a fraction of the cost (see
    `PatchExpertChoiceMoE`). The authors ran WRN-10 only; at greater
    depths the third group is replaced all the same, as their code does.
    Their classifier ends in a softmax (CelebA's binary task: a single
    logit); here it returns logits, for a loss with `from_logits=True`.

    Parameters of the swapped layer, in the paper's two configurations
    (`k = 10`): the replaced convolution has 3 * 3 * 640 * 640 = 3,686,400
    weights. At CelebA 64x64 (16x16x640 map, 4x4 patches, n = 16, 8 experts
    with 2 patches each, 3x3 experts with 80 filters) the pMoE layer has
    8 * (3 * 3 * 640 * 80 + 80) = 3,687,040 expert parameters and
    4 * 4 * 640 * 8 = 81,920 router weights: 3,768,960 in all. At CIFAR-10
    32x32 (8x8x640 map, 1x1 patches, n = 64, 4 experts with 16 patches each,
    1x1 experts with 160 filters) it has 4 * (640 * 160 + 160) = 410,240
    expert parameters and 640 * 4 = 2,560 router weights: 412,800 in all,
    about a ninth of the convolution it replaces.

    Args:
        depth: int, the number of layers, `6 * n + 4` (10, 16, 22, 28, 40).
        widening_factor: int, the widening factor `k`.
        num_classes: int, the number of classes.
        input_shape: tuple, the image shape `(height, width, channels)`.
        pmoe: `None` for the plain WRN, or a dict of `PatchExpertChoiceMoE`
            constructor arguments for WRN-pMoE. Without `expert_filters`
            or `experts`, `expert_filters` follows the width (`64 * k /
            num_experts`, or `64 * k` with `combine="sum"`). The experts'
            batch normalization takes the network's momentum and epsilon
            unless `pmoe` sets them.
        architecture: `"paper"` (the pre-activation WRN with only its last
            convolution swapped) or `"authors"` (the network of the
            authors' public code), see above.
        dropout_rate: float in `[0, 1)`, dropout between the two
            convolutions of every block (0 for none).
        batch_norm_momentum: float, the momentum of every batch
            normalization. Defaults to 0.9 (PyTorch's 0.1).
        batch_norm_epsilon: float. Defaults to 1e-5.
        dtype: optional dtype policy of every layer.
        **kwargs: `keras.Model` keyword arguments: `name`, `trainable`.

    Example:

    ```python
    model = keras_moe.models.WideResNet(
        depth=10, widening_factor=1, num_classes=2,
        input_shape=(16, 16, 3),
        pmoe=dict(num_experts=4, patches_per_expert=2, patch_size=2,
                  expert_filters=16))
    tuple(model(np.zeros((2, 16, 16, 3), "float32")).shape)  # (2, 2)
    model.pmoe_layer.output_channels  # 64
    ```

    Reference:
        M. N. R. Chowdhury et al., "Patch-level Routing in Mixture-of-Experts
        is Provably Sample-efficient for Convolutional Neural Networks",
        ICML 2023, section 5.2, appendix A and L (figures 17 and 18);
        S. Zagoruyko and N. Komodakis, "Wide Residual Networks", BMVC 2016.
    """

    def __init__(
        self,
        depth=10,
        widening_factor=10,
        num_classes=10,
        input_shape=(32, 32, 3),
        pmoe=None,
        architecture="paper",
        dropout_rate=0.0,
        batch_norm_momentum=BATCH_NORM_MOMENTUM,
        batch_norm_epsilon=BATCH_NORM_EPSILON,
        dtype=None,
        **kwargs,
    ):
        check_model_kwargs(type(self), kwargs)
        bn = check_batch_norm(batch_norm_momentum, batch_norm_epsilon)
        input_shape = tuple(input_shape)
        _validate(depth, widening_factor, num_classes, input_shape)
        if pmoe is not None and not isinstance(pmoe, dict):
            raise ValueError(
                "`pmoe` must be None or a dict of PatchExpertChoiceMoE "
                f"constructor arguments. Received: pmoe={pmoe!r}"
            )
        if architecture not in ARCHITECTURES:
            raise ValueError(
                f"`architecture` must be one of {list(ARCHITECTURES)}. "
                f"Received: architecture={architecture!r}"
            )
        authors = architecture == "authors"
        if (
            isinstance(dropout_rate, bool)
            or not isinstance(dropout_rate, (int, float))
            or not 0 <= dropout_rate < 1
        ):
            raise ValueError(
                "`dropout_rate` must be a float in [0, 1). "
                f"Received: dropout_rate={dropout_rate!r}"
            )
        blocks_per_group = (depth - 4) // 6
        widths = [16 * widening_factor, 32 * widening_factor]
        widths.append(64 * widening_factor)

        # === Layers ===
        pmoe_layer = None
        if pmoe is not None:
            pmoe_args = dict(pmoe)
            if authors:
                pmoe_args = {**copy.deepcopy(_AUTHORS_PMOE), **pmoe_args}
            if "expert_filters" not in pmoe_args and "experts" not in (
                pmoe_args
            ):
                pmoe_args["expert_filters"] = _default_expert_filters(
                    pmoe_args, widths[-1]
                )
            pmoe_args.setdefault("expert_batch_norm_momentum", bn[0])
            pmoe_args.setdefault("expert_batch_norm_epsilon", bn[1])
            pmoe_args.setdefault("name", "pmoe")
            pmoe_args.setdefault("dtype", dtype)
            pmoe_layer = PatchExpertChoiceMoE(**pmoe_args)
        conv = _authors_conv if authors else _conv

        # === Functional Model ===
        images = keras.Input(input_shape, name="images")
        x = conv(images, 16, 3, 1, dtype, "stem_conv")
        num_blocks = 3 * blocks_per_group
        index = 0
        for group, width in enumerate(widths):
            if authors and pmoe_layer is not None and group == 2:
                # The authors' WRN-pMoE: BN -> ReLU -> conv(stride 2) in
                # place of the third group, then the MoE.
                x = _bn_relu(x, dtype, bn, f"block{index + 1}_1")
                x = conv(x, width, 3, 2, dtype, f"block{index + 1}_conv1")
                pmoe_layer.build(x.shape)
                x = pmoe_layer(x)
                break
            for block in range(blocks_per_group):
                index += 1
                strides = 2 if group > 0 and block == 0 else 1
                if authors:
                    x = _authors_block(
                        x,
                        width,
                        strides,
                        block == 0,
                        dropout_rate,
                        dtype,
                        bn,
                        f"block{index}",
                    )
                    continue
                x = _block(
                    x,
                    width,
                    strides,
                    dropout_rate,
                    dtype,
                    bn,
                    f"block{index}",
                    pmoe_layer if index == num_blocks else None,
                    pmoe,
                )
        x = _bn_relu(x, dtype, bn, "final")
        x = keras.layers.GlobalAveragePooling2D(dtype=dtype, name="pool")(x)
        logits = keras.layers.Dense(num_classes, dtype=dtype, name="logits")(x)
        super().__init__(inputs=images, outputs=logits, dtype=dtype, **kwargs)

        # === Config ===
        self.depth = depth
        self.widening_factor = widening_factor
        self.num_classes = num_classes
        self.image_shape = input_shape
        self.pmoe = None if pmoe is None else dict(pmoe)
        self.architecture = architecture
        self.dropout_rate = dropout_rate
        self.batch_norm_momentum, self.batch_norm_epsilon = bn

    @property
    def pmoe_layer(self):
        """The `PatchExpertChoiceMoE` of WRN-pMoE, `None` for the plain
        WRN."""
        for layer in self.layers:
            if isinstance(layer, PatchExpertChoiceMoE):
                return layer
        return None

    def get_config(self):
        pmoe = self.pmoe
        if pmoe is not None and pmoe.get("experts") is not None:
            pmoe = dict(pmoe)
            pmoe["experts"] = [
                keras.saving.serialize_keras_object(expert)
                for expert in pmoe["experts"]
            ]
        return {
            **super().get_config(),
            "depth": self.depth,
            "widening_factor": self.widening_factor,
            "num_classes": self.num_classes,
            "input_shape": self.image_shape,
            "pmoe": pmoe,
            "architecture": self.architecture,
            "dropout_rate": self.dropout_rate,
            "batch_norm_momentum": self.batch_norm_momentum,
            "batch_norm_epsilon": self.batch_norm_epsilon,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        pmoe = config.get("pmoe")
        if pmoe is not None and pmoe.get("experts") is not None:
            config["pmoe"] = dict(pmoe)
            config["pmoe"]["experts"] = [
                keras.saving.deserialize_keras_object(expert)
                for expert in pmoe["experts"]
            ]
        return cls(**config)

    @classmethod
    def from_preset(cls, preset, **overrides):
        """Builds a named configuration of the paper or the authors' code.

        Overrides compose with the preset: values derived from a width
        (the experts' filters, the authors' last convolution) follow an
        overridden `widening_factor`, and a `pmoe` dict updates the
        preset's pMoE arguments instead of replacing them (`pmoe=None`
        builds the plain network).

        Args:
            preset: a name from `keras_moe.models.WRN_PRESETS`.
            **overrides: constructor arguments that replace the preset's.

        Returns:
            A `WideResNet`.

        Example:

        ```python
        model = keras_moe.models.WideResNet.from_preset(
            "wrn10_10_pmoe_cifar10", widening_factor=1,
            pmoe=dict(gating="hard"))
        model.pmoe_layer.expert_filters  # 16
        model.pmoe_layer.gating  # 'hard'
        ```
        """
        pmoe = overrides.get("pmoe")
        preset_pmoe = WRN_PRESETS.get(preset, {}).get("pmoe")
        if isinstance(pmoe, dict) and preset_pmoe is not None:
            overrides = {**overrides, "pmoe": {**preset_pmoe, **pmoe}}
        return build_preset(cls, WRN_PRESETS, preset, overrides)


def _conv(x, filters, kernel_size, strides, dtype, name):
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        dtype=dtype,
        name=name,
    )(x)


def _authors_conv(x, filters, kernel_size, strides, dtype, name):
    """A convolution of the authors' code: Keras' defaults, bias and
    Glorot-uniform kernel."""
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        dtype=dtype,
        name=name,
    )(x)


def _bn_relu(x, dtype, bn, name):
    x = batch_norm(dtype, *bn, name=f"{name}_bn")(x)
    return keras.layers.ReLU(dtype=dtype, name=f"{name}_relu")(x)


def _block(x, width, strides, dropout_rate, dtype, bn, name, pmoe_layer, pmoe):
    """A pre-activation basic block; `pmoe_layer` replaces its second
    convolution when given."""
    activated = _bn_relu(x, dtype, bn, f"{name}_1")
    if strides == 1 and x.shape[-1] == width:
        shortcut = x
    else:
        shortcut = _conv(activated, width, 1, strides, dtype, f"{name}_proj")
    y = _conv(activated, width, 3, strides, dtype, f"{name}_conv1")
    y = _bn_relu(y, dtype, bn, f"{name}_2")
    if dropout_rate:
        y = keras.layers.Dropout(
            dropout_rate, dtype=dtype, name=f"{name}_dropout"
        )(y)
    if pmoe_layer is None:
        y = _conv(y, width, 3, 1, dtype, f"{name}_conv2")
    else:
        pmoe_layer.build(y.shape)
        if pmoe_layer.output_channels != width:
            raise ValueError(
                "The pMoE layer replaces a convolution with "
                f"{width} output channels (64 * widening_factor), so its "
                f"output must have {width} channels; it gives "
                f"{pmoe_layer.output_channels} (num_experts * expert_filters "
                f"with combine='concat', expert_filters with 'sum'). "
                f"Received: pmoe={pmoe!r}"
            )
        y = pmoe_layer(y)
    return keras.layers.Add(dtype=dtype, name=f"{name}_add")([shortcut, y])


def _authors_block(x, width, strides, first, dropout_rate, dtype, bn, name):
    """A block of the authors' code: the first of its group has a 1x1
    convolution shortcut of the block's input, not pre-activated."""
    y = _bn_relu(x, dtype, bn, f"{name}_1")
    y = _authors_conv(y, width, 3, strides, dtype, f"{name}_conv1")
    y = _bn_relu(y, dtype, bn, f"{name}_2")
    if dropout_rate:
        y = keras.layers.Dropout(
            dropout_rate, dtype=dtype, name=f"{name}_dropout"
        )(y)
    y = _authors_conv(y, width, 3, 1, dtype, f"{name}_conv2")
    shortcut = x
    if first:
        shortcut = _authors_conv(x, width, 1, strides, dtype, f"{name}_proj")
    return keras.layers.Add(dtype=dtype, name=f"{name}_add")([shortcut, y])


def _default_expert_filters(pmoe, width):
    num_experts = pmoe.get("num_experts")
    if pmoe.get("combine", "concat") == "sum":
        return width
    if (
        isinstance(num_experts, bool)
        or not isinstance(num_experts, int)
        or num_experts <= 0
        or width % num_experts
    ):
        raise ValueError(
            "Without `expert_filters`, `num_experts` must divide the width "
            f"of the replaced convolution ({width}). Received: pmoe={pmoe!r}"
        )
    return width // num_experts


def _validate(depth, widening_factor, num_classes, input_shape):
    if (
        isinstance(depth, bool)
        or not isinstance(depth, int)
        or depth < 10
        or (depth - 4) % 6
    ):
        raise ValueError(
            "`depth` must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...). "
            f"Received: depth={depth!r}"
        )
    for name, value in (
        ("widening_factor", widening_factor),
        ("num_classes", num_classes),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(
                f"`{name}` must be a positive integer. "
                f"Received: {name}={value!r}"
            )
    if len(input_shape) != 3 or any(
        isinstance(d, bool) or not isinstance(d, int) or d <= 0
        for d in input_shape
    ):
        raise ValueError(
            "`input_shape` must be (height, width, channels) of positive "
            f"ints. Received: input_shape={input_shape!r}"
        )


ARCHITECTURES = ("paper", "authors")

# The pMoE layer of the authors' code (gater_2.py, wideresnet_moe.py).
_AUTHORS_PMOE = dict(
    placement="masked",
    expert_use_pre_activation=True,
    gating="softmax_all",
    router_initializer={
        "class_name": "RandomNormal",
        "config": {"mean": 0.0, "stddev": 1e-4},
    },
    expert_kernel_initializer="glorot_uniform",
    expert_use_bias=True,
)
# Keras' batch normalization defaults, which the authors' code keeps.
_AUTHORS_BATCH_NORM = dict(batch_norm_momentum=0.99, batch_norm_epsilon=1e-3)

_CELEBA_PMOE = dict(
    num_experts=8,
    patches_per_expert=2,
    patch_size=4,
    expert_kernel_size=3,
    gating="softmax",
    combine="concat",
)
_CIFAR10_PMOE = dict(
    num_experts=4,
    patches_per_expert=16,
    patch_size=1,
    expert_kernel_size=1,
    gating="softmax",
    combine="concat",
)
_AUTHORS_CELEBA = dict(
    depth=10,
    widening_factor=10,
    num_classes=4,
    input_shape=(64, 64, 3),
    architecture="authors",
    **_AUTHORS_BATCH_NORM,
)
_AUTHORS_CIFAR10 = dict(
    _AUTHORS_CELEBA, num_classes=10, input_shape=(32, 32, 3)
)

WRN_PRESETS = {
    "wrn10_10_celeba": dict(
        depth=10, widening_factor=10, num_classes=2, input_shape=(64, 64, 3)
    ),
    "wrn10_10_pmoe_celeba": dict(
        depth=10,
        widening_factor=10,
        num_classes=2,
        input_shape=(64, 64, 3),
        pmoe=_CELEBA_PMOE,
    ),
    "wrn10_10_cifar10": dict(
        depth=10, widening_factor=10, num_classes=10, input_shape=(32, 32, 3)
    ),
    "wrn10_10_pmoe_cifar10": dict(
        depth=10,
        widening_factor=10,
        num_classes=10,
        input_shape=(32, 32, 3),
        pmoe=_CIFAR10_PMOE,
    ),
    "authors_wrn10_10_celeba": _AUTHORS_CELEBA,
    "authors_wrn10_10_pmoe_celeba": dict(
        _AUTHORS_CELEBA,
        pmoe=dict(
            num_experts=8,
            patches_per_expert=2,
            patch_size=4,
            expert_kernel_size=3,
        ),
    ),
    "authors_wrn10_10_cifar10": _AUTHORS_CIFAR10,
    "authors_wrn10_10_pmoe_cifar10": dict(
        _AUTHORS_CIFAR10,
        pmoe=dict(
            num_experts=4,
            patches_per_expert=16,
            patch_size=1,
            expert_kernel_size=1,
        ),
    ),
    "authors_wrn10_10_pmoe_cifar10_imagenet_noise": dict(
        _AUTHORS_CIFAR10,
        pmoe=dict(
            num_experts=4,
            patches_per_expert=2,
            patch_size=1,
            expert_kernel_size=1,
        ),
    ),
}
"""Named WRN and WRN-pMoE configurations of the pMoE paper (section 5.2
and appendix A).

The paper-text variants, `wrn10_10_*`: WRN-10-10 on CelebA 64x64 (binary
"smiling"; pass `num_classes=4` for the four-class task) and on CIFAR-10
32x32, each plain and with the last convolution replaced by a
`PatchExpertChoiceMoE` (CelebA: 4x4 patches, 8 experts, 2 patches each, 3x3
experts; CIFAR-10: 1x1 patches, 4 experts, 16 patches each, 1x1 experts;
the experts' filters share the width, 80 and 160 at `widening_factor=10`;
joint training with softmax gating).

The authors' networks, `authors_wrn10_10_*`: the networks of the authors'
public code (`architecture="authors"`), parameter for parameter, with
their batch normalization (Keras' defaults, momentum 0.99 and epsilon
1e-3), gating (`"softmax_all"`), router initialisation (normal, standard
deviation 1e-4) and biases: CelebA's four-class task (7,439,396 and
7,333,796 parameters) and CIFAR-10 (7,443,242 and 3,971,242), with
16 patches per expert as in their original-CIFAR-10 experiment, or 2 in
their CIFAR-10-with-ImageNet-noise one."""
