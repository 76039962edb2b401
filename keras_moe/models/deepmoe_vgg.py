import keras

from keras_moe.layers import GatedConv2D
from keras_moe.layers import ShallowEmbedding
from keras_moe.layers import SparseGatingHeads
from keras_moe.models.deepmoe_resnet import build_preset

VGG16_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
# Widths of the 13 convolutions under each widening strategy (DeepMoE
# supplementary A.2, table 1). W13-All and W1-Mid are read from the table;
# both have about 24.2 M convolution parameters. The text extraction of the
# table lost the widened values of W1-High (the top layer) and of layers 3-4
# of W4-Low: they are set here so that each strategy has the same parameter
# count as the other two.
WIDENING = {
    None: VGG16_WIDTHS,
    "W1-High": VGG16_WIDTHS[:12] + (2565,),
    "W1-Mid": VGG16_WIDTHS[:4] + (2990,) + VGG16_WIDTHS[5:],
    "W4-Low": (512, 512, 614, 614) + VGG16_WIDTHS[4:],
    "W13-All": (128, 128, 256, 256, 405, 405, 405) + (615,) * 6,
}
POOL_AFTER = (1, 3, 6, 9, 12)


@keras.saving.register_keras_serializable(package="keras_moe")
class DeepMoEVGG16(keras.Model):
    """DeepMoE-VGG16 with batch normalization, a gate after every conv.

    The 13 3x3 convolutions of VGG16 (each followed by batch normalization
    and ReLU, with max pooling after convolutions 2, 4, 7, 10 and 13) for
    CIFAR-size inputs, and a linear classifier. A gate follows every
    convolution (DeepMoE section 5: "a gating header after each
    convolutional layer"): convolutions 2-13 are `GatedConv2D` gated on the
    channels of the previous convolution, 12 gates in all; the last
    convolution's outputs feed the classifier ungated.

    `widening` chooses the channel counts of the supplementary table
    (`"W1-High"`, `"W1-Mid"`, `"W4-Low"`, `"W13-All"`, see `WIDENING`;
    `None` is the standard VGG16, the "narrow" DeepMoE of the paper's
    CIFAR-100 experiments). With `gated=False` the same code builds the
    plain network.

    The output contract is that of `DeepMoEResNet`: a dict with
    `"logits"`, `"embedding_probs"` and `"gates"` when gated, the logits
    otherwise.

    Args:
        num_classes: int, the number of classes.
        input_shape: tuple, the image shape (at least 32x32).
        widening: `None` or a key of `WIDENING`.
        gated: bool, whether to build the DeepMoE network.
        embedding_dim: int, defaults to `num_classes`.
        embedding_layers: int, the embedding's stride-2 convolutions.
        embedding_filters: int, the embedding's first width.
        dtype: optional dtype policy.
        **kwargs: `keras.Model` keyword arguments.

    Example:

    ```python
    model = keras_moe.models.DeepMoEVGG16(num_classes=100)
    len(model.gated_layers)  # 12
    [c.filters for c in model.gated_layers][:3]  # [64, 128, 128]
    ```

    Reference:
        X. Wang et al., "Deep Mixture of Experts via Shallow Embedding",
        UAI 2019, section 5.3 and supplementary A.2; K. Simonyan and A.
        Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
        Recognition", ICLR 2015.
    """

    def __init__(
        self,
        num_classes=100,
        input_shape=(32, 32, 3),
        widening=None,
        gated=True,
        embedding_dim=None,
        embedding_layers=4,
        embedding_filters=32,
        dtype=None,
        **kwargs,
    ):
        input_shape = tuple(input_shape)
        if widening not in WIDENING:
            raise ValueError(
                f"`widening` must be one of {list(WIDENING)}. Received: "
                f"widening={widening!r}"
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
        if len(input_shape) != 3 or min(input_shape[:2]) < 32:
            raise ValueError(
                "`input_shape` must be (height, width, channels) with sides "
                f"of at least 32. Received: input_shape={input_shape!r}"
            )
        widths = WIDENING[widening]
        embedding_dim = embedding_dim or num_classes

        # === Layers ===
        images = keras.Input(input_shape, name="images")
        gates = [None] * (len(widths) - 1)
        outputs = {}
        if gated:
            embedding, class_probs = ShallowEmbedding(
                embedding_dim,
                num_layers=embedding_layers,
                filters=embedding_filters,
                num_classes=num_classes,
                dtype=dtype,
                name="embedding",
            )(images)
            gates = SparseGatingHeads(
                list(widths[:-1]), dtype=dtype, name="gating_heads"
            )(embedding)
            outputs = {"embedding_probs": class_probs, "gates": list(gates)}

        # === Functional Model ===
        x = images
        for i, width in enumerate(widths):
            conv_kwargs = dict(
                padding="same",
                use_bias=False,
                kernel_initializer="he_normal",
                dtype=dtype,
                name=f"conv{i + 1}",
            )
            # Convolution i + 1 reads the gated outputs of convolution i.
            if gated and i > 0:
                x = GatedConv2D(width, 3, **conv_kwargs)(x, gates[i - 1])
            else:
                x = keras.layers.Conv2D(width, 3, **conv_kwargs)(x)
            x = keras.layers.BatchNormalization(dtype=dtype, name=f"bn{i + 1}")(
                x
            )
            x = keras.layers.ReLU(dtype=dtype, name=f"relu{i + 1}")(x)
            if i in POOL_AFTER:
                x = keras.layers.MaxPooling2D(
                    2, dtype=dtype, name=f"pool{POOL_AFTER.index(i) + 1}"
                )(x)
        x = keras.layers.GlobalAveragePooling2D(dtype=dtype, name="gap")(x)
        logits = keras.layers.Dense(num_classes, dtype=dtype, name="logits")(x)
        if gated:
            super().__init__(
                inputs=images, outputs={"logits": logits, **outputs}, **kwargs
            )
        else:
            super().__init__(inputs=images, outputs=logits, **kwargs)

        # === Config ===
        self.num_classes = num_classes
        self.image_shape = input_shape
        self.widening = widening
        self.gated = gated
        self.embedding_dim = embedding_dim
        self.embedding_layers = embedding_layers
        self.embedding_filters = embedding_filters
        self.dtype_name = dtype

    @property
    def gated_layers(self):
        """The `GatedConv2D` layers (convolutions 2 to 13)."""
        return [
            layer for layer in self.layers if isinstance(layer, GatedConv2D)
        ]

    def get_config(self):
        return {
            "num_classes": self.num_classes,
            "input_shape": self.image_shape,
            "widening": self.widening,
            "gated": self.gated,
            "embedding_dim": self.embedding_dim,
            "embedding_layers": self.embedding_layers,
            "embedding_filters": self.embedding_filters,
            "dtype": self.dtype_name,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    @classmethod
    def from_preset(cls, preset, **overrides):
        """Builds a named configuration of the paper.

        Args:
            preset: a name from `keras_moe.models.DEEPMOE_VGG_PRESETS`.
            **overrides: constructor arguments that replace the preset's.

        Returns:
            A `DeepMoEVGG16`.
        """
        return build_preset(cls, DEEPMOE_VGG_PRESETS, preset, overrides)


DEEPMOE_VGG_PRESETS = {
    "narrow_deepmoe_vgg16_cifar100": dict(num_classes=100),
    "vgg16_cifar100": dict(num_classes=100, gated=False),
    **{
        f"deepmoe_vgg16_{w.lower().replace('-', '_')}_cifar100": dict(
            num_classes=100, widening=w
        )
        for w in ("W1-High", "W1-Mid", "W4-Low", "W13-All")
    },
}
