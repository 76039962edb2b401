import keras

from keras_moe.layers import GatedConv2D
from keras_moe.layers import ShallowEmbedding
from keras_moe.layers import SparseGatingHeads
from keras_moe.models._builder import BATCH_NORM_EPSILON
from keras_moe.models._builder import BATCH_NORM_MOMENTUM
from keras_moe.models._builder import BuilderModel
from keras_moe.models._builder import check_batch_norm
from keras_moe.models._builder import check_model_kwargs
from keras_moe.models.deepmoe_resnet import BOTTLENECKS
from keras_moe.models.deepmoe_resnet import VARIANTS
from keras_moe.models.deepmoe_resnet import _Builder
from keras_moe.models.deepmoe_resnet import build_preset


@keras.saving.register_keras_serializable(package="keras_moe")
class DeepMoEDRN(BuilderModel):
    """DeepMoE-DRN-A-50 for semantic segmentation (DeepMoE section 5.4).

    DRN-A-50 is ResNet-50 whose last two stages keep their resolution: the
    stride 2 of stages 4 and 5 is replaced by dilation 2 and 4 in their 3x3
    convolutions, so the output stride is 8. A 1x1 convolution gives class
    scores per position, bilinearly upsampled to the input size. The
    bottlenecks are gated as in `DeepMoEResNet` (bottleneck A or B, wide or
    narrow); the embedding has no class head (segmentation has no image
    label). The model returns the logits `(batch, height, width,
    num_classes)`, gated or plain; `keras_moe.models.deepmoe_outputs`
    gives a model that also returns the gates.

    Train it with `keras_moe.training.DeepMoETrainer(network, mu=0,
    ignore_class=255)` for Cityscapes' ignore label, and report
    `keras.metrics.MeanIoU(num_classes, sparse_y_pred=False,
    ignore_class=255)`, which takes the arg-max of the logits.

    Args:
        num_classes: int, classes per pixel (19 for Cityscapes).
        input_shape: tuple, `(height, width, 3)`, sides multiples of 8.
        variant: `"wide"` or `"narrow"`.
        gated: bool.
        bottleneck: `"A"` or `"B"`.
        embedding_dim: int, the size of `e` (defaults to 64).
        embedding_layers: int, defaults to 5.
        embedding_filters: int, defaults to 32.
        stage_blocks: four ints, the bottleneck blocks of each stage.
            Defaults to `(3, 4, 6, 3)`, ResNet-50's; fewer blocks give a
            smaller network of the same design (for quick experiments).
        stage_widths: four ints, the bottleneck width of each stage (the
            blocks output four times as many channels; the stem has the
            first width). Defaults to `(64, 128, 256, 512)`.
        batch_norm_momentum: float, the momentum of every batch
            normalization. Defaults to 0.9 (PyTorch's 0.1).
        batch_norm_epsilon: float. Defaults to 1e-5.
        dtype: optional dtype policy.
        **kwargs: `keras.Model` keyword arguments: `name`, `trainable`.

    Example:

    ```python
    model = keras_moe.models.DeepMoEDRN(
        num_classes=19, input_shape=(64, 64, 3))
    out = model(np.zeros((1, 64, 64, 3), "float32"))
    tuple(out.shape)  # (1, 64, 64, 19)
    ```

    Reference:
        X. Wang et al., "Deep Mixture of Experts via Shallow Embedding",
        UAI 2019, section 5.4; F. Yu, V. Koltun, T. Funkhouser, "Dilated
        Residual Networks", CVPR 2017.
    """

    def __init__(
        self,
        num_classes=19,
        input_shape=(512, 1024, 3),
        variant="wide",
        gated=True,
        bottleneck="A",
        embedding_dim=64,
        embedding_layers=5,
        embedding_filters=32,
        stage_blocks=(3, 4, 6, 3),
        stage_widths=(64, 128, 256, 512),
        batch_norm_momentum=BATCH_NORM_MOMENTUM,
        batch_norm_epsilon=BATCH_NORM_EPSILON,
        dtype=None,
        **kwargs,
    ):
        check_model_kwargs(type(self), kwargs)
        batch_norm_momentum, batch_norm_epsilon = check_batch_norm(
            batch_norm_momentum, batch_norm_epsilon
        )
        input_shape = tuple(input_shape)
        stage_blocks = _four_positive_ints("stage_blocks", stage_blocks)
        stage_widths = _four_positive_ints("stage_widths", stage_widths)
        if (
            len(input_shape) != 3
            or any(not isinstance(d, int) or d <= 0 for d in input_shape)
            or input_shape[0] % 8
            or input_shape[1] % 8
        ):
            raise ValueError(
                "`input_shape` must be (height, width, channels) with height "
                f"and width multiples of 8. Received: input_shape="
                f"{input_shape!r}"
            )
        if (
            isinstance(num_classes, bool)
            or not isinstance(num_classes, int)
            or num_classes <= 0
        ):
            raise ValueError(
                "`num_classes` must be a positive integer. "
                f"Received: num_classes={num_classes!r}"
            )
        if variant not in VARIANTS:
            raise ValueError(
                f"`variant` must be one of {list(VARIANTS)}. "
                f"Received: variant={variant!r}"
            )
        if bottleneck not in BOTTLENECKS:
            raise ValueError(
                f"`bottleneck` must be one of {list(BOTTLENECKS)}. "
                f"Received: bottleneck={bottleneck!r}"
            )
        factor = 2 if variant == "wide" else 1
        gate_both = bottleneck == "A"
        # (width, strides, dilation) of every block: stages 4 and 5 dilate.
        plan = []
        for stage, (width, blocks) in enumerate(
            zip(stage_widths, stage_blocks)
        ):
            dilation = {2: 2, 3: 4}.get(stage, 1)
            for block in range(blocks):
                strides = 2 if stage == 1 and block == 0 else 1
                plan.append((width, strides, dilation))
        gate_widths = []
        for width, _, _ in plan:
            gate_widths += [width * factor] * (2 if gate_both else 1)

        # === Layers ===
        images = keras.Input(input_shape, name="images")
        gates = iter([])
        if gated:
            embedding = ShallowEmbedding(
                embedding_dim,
                num_layers=embedding_layers,
                filters=embedding_filters,
                batch_norm_momentum=batch_norm_momentum,
                batch_norm_epsilon=batch_norm_epsilon,
                dtype=dtype,
                name="embedding",
            )(images)
            gate_list = SparseGatingHeads(
                gate_widths, dtype=dtype, name="gating_heads"
            )(embedding)
            gates = iter(gate_list)

        # === Functional Model ===
        builder = _Builder(
            gated, dtype, batch_norm_momentum, batch_norm_epsilon
        )
        x = builder.conv(
            images, stage_widths[0], 7, strides=2, name="stem_conv"
        )
        x = builder.bn_relu(x, "stem")
        x = keras.layers.MaxPooling2D(
            3, strides=2, padding="same", dtype=dtype, name="stem_pool"
        )(x)
        for i, (width, strides, dilation) in enumerate(plan):
            x = builder.bottleneck(
                x,
                width,
                width * factor,
                strides,
                gates,
                f"block{i + 1}",
                gate_both=gate_both,
                dilation=dilation,
            )
        x = keras.layers.Conv2D(num_classes, 1, dtype=dtype, name="classifier")(
            x
        )
        logits = keras.layers.Resizing(
            input_shape[0],
            input_shape[1],
            interpolation="bilinear",
            dtype=dtype,
            name="upsample",
        )(x)
        super().__init__(inputs=images, outputs=logits, dtype=dtype, **kwargs)

        # === Config ===
        self.num_classes = num_classes
        self.image_shape = input_shape
        self.variant = variant
        self.gated = gated
        self.bottleneck = bottleneck
        self.embedding_dim = embedding_dim
        self.embedding_layers = embedding_layers
        self.embedding_filters = embedding_filters
        self.stage_blocks = stage_blocks
        self.stage_widths = stage_widths
        self.batch_norm_momentum = batch_norm_momentum
        self.batch_norm_epsilon = batch_norm_epsilon

    @property
    def gated_layers(self):
        """The `GatedConv2D` layers, in the order of `model.layers`."""
        return [
            layer for layer in self.layers if isinstance(layer, GatedConv2D)
        ]

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "input_shape": self.image_shape,
            "variant": self.variant,
            "gated": self.gated,
            "bottleneck": self.bottleneck,
            "embedding_dim": self.embedding_dim,
            "embedding_layers": self.embedding_layers,
            "embedding_filters": self.embedding_filters,
            "stage_blocks": self.stage_blocks,
            "stage_widths": self.stage_widths,
            "batch_norm_momentum": self.batch_norm_momentum,
            "batch_norm_epsilon": self.batch_norm_epsilon,
        }

    @classmethod
    def from_preset(cls, preset, **overrides):
        """Builds a named configuration of the paper.

        Args:
            preset: a name from `keras_moe.models.DEEPMOE_DRN_PRESETS`.
            **overrides: constructor arguments that replace the preset's.

        Returns:
            A `DeepMoEDRN`.
        """
        return build_preset(cls, DEEPMOE_DRN_PRESETS, preset, overrides)


def _four_positive_ints(name, value):
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 4
        or any(
            isinstance(v, bool) or not isinstance(v, int) or v <= 0
            for v in value
        )
    ):
        raise ValueError(
            f"`{name}` must be four positive integers, one per stage. "
            f"Received: {name}={value!r}"
        )
    return tuple(value)


DEEPMOE_DRN_PRESETS = {
    "wide_deepmoe_drn_a50_cityscapes": dict(
        num_classes=19, input_shape=(832, 832, 3), variant="wide"
    ),
    "drn_a50_cityscapes": dict(
        num_classes=19,
        input_shape=(832, 832, 3),
        variant="narrow",
        gated=False,
    ),
}
