import keras

from keras_moe.layers import GatedConv2D
from keras_moe.layers import ShallowEmbedding
from keras_moe.layers import SparseGatingHeads
from keras_moe.models._builder import BATCH_NORM_EPSILON
from keras_moe.models._builder import BATCH_NORM_MOMENTUM
from keras_moe.models._builder import BuilderModel
from keras_moe.models._builder import batch_norm
from keras_moe.models._builder import check_batch_norm
from keras_moe.models._builder import check_model_kwargs
from keras_moe.models.deepmoe_resnet import build_preset

VGG16_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
# Widths of the 13 convolutions under each widening strategy: DeepMoE
# appendix A.2, table 6.
WIDENING = {
    None: VGG16_WIDTHS,
    "W1-High": VGG16_WIDTHS[:10] + (1536,) + VGG16_WIDTHS[11:],
    "W1-Mid": VGG16_WIDTHS[:4] + (2990,) + VGG16_WIDTHS[5:],
    "W4-Low": (512, 512, 615, 615) + VGG16_WIDTHS[4:],
    "W13-All": (128, 128, 256, 256, 405, 405, 405) + (615,) * 6,
}
POOL_AFTER = (1, 3, 6, 9, 12)


@keras.saving.register_keras_serializable(package="keras_moe")
class DeepMoEVGG16(BuilderModel):
    """DeepMoE-VGG16 with batch normalization, a gate after every conv.

    The 13 3x3 convolutions of VGG16 (each followed by batch normalization
    and ReLU, with max pooling after convolutions 2, 4, 7, 10 and 13) for
    CIFAR-size inputs, then global average pooling and a linear classifier.
    A gate follows every convolution (DeepMoE section 5: "a gating header
    after each convolutional layer"), 13 gates in all: the gate after
    convolution `i` selects its output channels, so it gates the inputs of
    what reads them. Convolutions 2-13 are `GatedConv2D` layers gated on the
    previous convolution's channels, and the classifier is a 1x1
    `GatedConv2D` on the pooled `(1, 1, C)` map (a linear layer whose
    inputs are gated) that reads the 13th gate. A zero gate therefore
    removes an output channel of every convolution, and `flop_report`
    counts each convolution at its active inputs times its active outputs.

    `widening` chooses the channel counts of the paper's table 6
    (`"W1-High"`: convolution 11 widened to 1536; `"W1-Mid"`: convolution
    5 to 2990; `"W4-Low"`: convolutions 1-4 to 512, 512, 615, 615;
    `"W13-All"`: every convolution, see `WIDENING`). `None` is the standard
    VGG16, the "narrow" DeepMoE of the paper's CIFAR-100 experiments. With
    `gated=False` the same code builds the plain network (the classifier
    is then an ordinary 1x1 convolution).

    As `DeepMoEResNet`, the model returns the logits, gated or plain;
    `keras_moe.models.deepmoe_outputs(model)` also returns the gates and
    the embedding's class probabilities.

    Args:
        num_classes: int, the number of classes.
        input_shape: tuple, the image shape (at least 32x32).
        widening: `None` or a key of `WIDENING`.
        gated: bool, whether to build the DeepMoE network.
        embedding_dim: int, defaults to `num_classes`.
        embedding_layers: int, the embedding's stride-2 convolutions.
        embedding_filters: int, the embedding's first width.
        batch_norm_momentum: float, the momentum of every batch
            normalization. Defaults to 0.9 (PyTorch's 0.1).
        batch_norm_epsilon: float. Defaults to 1e-5.
        dtype: optional dtype policy.
        **kwargs: `keras.Model` keyword arguments: `name`, `trainable`.

    Example:

    ```python
    model = keras_moe.models.DeepMoEVGG16(num_classes=100)
    len(model.gated_layers)  # 13
    [c.filters for c in model.gated_layers][:3]  # [64, 128, 128]
    ```

    Reference:
        X. Wang et al., "Deep Mixture of Experts via Shallow Embedding",
        UAI 2019, section 5.3 and appendix A.2 (table 6); K. Simonyan and
        A. Zisserman, "Very Deep Convolutional Networks for Large-Scale
        Image Recognition", ICLR 2015.
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
        batch_norm_momentum=BATCH_NORM_MOMENTUM,
        batch_norm_epsilon=BATCH_NORM_EPSILON,
        dtype=None,
        **kwargs,
    ):
        check_model_kwargs(type(self), kwargs)
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
        bn = check_batch_norm(batch_norm_momentum, batch_norm_epsilon)
        widths = WIDENING[widening]
        embedding_dim = embedding_dim or num_classes

        # === Layers ===
        images = keras.Input(input_shape, name="images")
        gates = [None] * len(widths)
        if gated:
            embedding, _ = ShallowEmbedding(
                embedding_dim,
                num_layers=embedding_layers,
                filters=embedding_filters,
                num_classes=num_classes,
                batch_norm_momentum=bn[0],
                batch_norm_epsilon=bn[1],
                dtype=dtype,
                name="embedding",
            )(images)
            gates = SparseGatingHeads(
                list(widths), dtype=dtype, name="gating_heads"
            )(embedding)

        # === Functional Model ===
        x = images
        # The layer after convolution i reads its outputs through gate i.
        for i, width in enumerate(widths):
            x = _conv(
                x, width, 3, gates[i - 1] if i else None, dtype, f"conv{i + 1}"
            )
            x = batch_norm(dtype, *bn, name=f"bn{i + 1}")(x)
            x = keras.layers.ReLU(dtype=dtype, name=f"relu{i + 1}")(x)
            if i in POOL_AFTER:
                x = keras.layers.MaxPooling2D(
                    2, dtype=dtype, name=f"pool{POOL_AFTER.index(i) + 1}"
                )(x)
        x = keras.layers.GlobalAveragePooling2D(
            keepdims=True, dtype=dtype, name="gap"
        )(x)
        x = _conv(x, num_classes, 1, gates[-1], dtype, "classifier", True)
        logits = keras.layers.Flatten(dtype=dtype, name="logits")(x)
        super().__init__(inputs=images, outputs=logits, dtype=dtype, **kwargs)

        # === Config ===
        self.num_classes = num_classes
        self.image_shape = input_shape
        self.widening = widening
        self.gated = gated
        self.embedding_dim = embedding_dim
        self.embedding_layers = embedding_layers
        self.embedding_filters = embedding_filters
        self.batch_norm_momentum, self.batch_norm_epsilon = bn

    @property
    def gated_layers(self):
        """The `GatedConv2D` layers (convolutions 2 to 13, the classifier),
        in the order of `model.layers`."""
        return [
            layer for layer in self.layers if isinstance(layer, GatedConv2D)
        ]

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "input_shape": self.image_shape,
            "widening": self.widening,
            "gated": self.gated,
            "embedding_dim": self.embedding_dim,
            "embedding_layers": self.embedding_layers,
            "embedding_filters": self.embedding_filters,
            "batch_norm_momentum": self.batch_norm_momentum,
            "batch_norm_epsilon": self.batch_norm_epsilon,
        }

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


def _conv(x, filters, kernel_size, gates, dtype, name, classifier=False):
    kwargs = dict(
        padding="same",
        # The classifier is a linear layer: a bias and Keras' Dense init.
        use_bias=classifier,
        kernel_initializer="glorot_uniform" if classifier else "he_normal",
        dtype=dtype,
        name=name,
    )
    if gates is None:
        return keras.layers.Conv2D(filters, kernel_size, **kwargs)(x)
    return GatedConv2D(filters, kernel_size, **kwargs)(x, gates)
