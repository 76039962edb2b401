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

    The authors' public code (nowazrabbani/pMoE_CNN) differs in two ways:
    it drops the last block's shortcut and puts batch normalization and
    ReLU inside each expert, after routing. Here the WRN block is kept
    intact and only its convolution is swapped, so that the two models
    differ in that one layer.

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
            constructor arguments for WRN-pMoE.
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
            if "expert_filters" not in pmoe_args and "experts" not in (
                pmoe_args
            ):
                pmoe_args["expert_filters"] = _default_expert_filters(
                    pmoe_args, widths[-1]
                )
            pmoe_args.setdefault("name", "pmoe")
            pmoe_args.setdefault("dtype", dtype)
            pmoe_layer = PatchExpertChoiceMoE(**pmoe_args)

        # === Functional Model ===
        images = keras.Input(input_shape, name="images")
        x = _conv(images, 16, 3, 1, dtype, "stem_conv")
        num_blocks = 3 * blocks_per_group
        index = 0
        for group, width in enumerate(widths):
            for block in range(blocks_per_group):
                index += 1
                strides = 2 if group > 0 and block == 0 else 1
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
        """Builds a named configuration of the paper.

        Args:
            preset: a name from `keras_moe.models.WRN_PRESETS`.
            **overrides: constructor arguments that replace the preset's.

        Returns:
            A `WideResNet`.
        """
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


_CELEBA_PMOE = dict(
    num_experts=8,
    patches_per_expert=2,
    patch_size=4,
    expert_filters=80,
    expert_kernel_size=3,
    gating="softmax",
    combine="concat",
)
_CIFAR10_PMOE = dict(
    num_experts=4,
    patches_per_expert=16,
    patch_size=1,
    expert_filters=160,
    expert_kernel_size=1,
    gating="softmax",
    combine="concat",
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
}
"""Named WRN and WRN-pMoE configurations of the pMoE paper (section 5.2
and appendix A): WRN-10-10 on CelebA 64x64 (binary "smiling"; pass
`num_classes=4` for the four-class task) and on CIFAR-10 32x32, each plain
and with the last convolution replaced by a `PatchExpertChoiceMoE`
(CelebA: 4x4 patches, 8 experts, 2 patches each, 3x3 experts with 80
filters; CIFAR-10: 1x1 patches, 4 experts, 16 patches each, 1x1 experts
with 160 filters; joint training with softmax gating)."""
