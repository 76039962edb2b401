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

CIFAR_DEPTHS = (20, 32, 44, 56, 110)
IMAGENET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}
VARIANTS = ("wide", "narrow")
BOTTLENECKS = ("A", "B")


@keras.saving.register_keras_serializable(package="keras_moe")
class DeepMoEResNet(BuilderModel):
    """DeepMoE-ResNet: a ResNet whose residual blocks are gated (DeepMoE).

    CIFAR ResNets of depth `6n + 2` (three stages of `n` basic blocks with
    16, 32 and 64 channels, a 3x3 stem) and ImageNet ResNet-18/34 (basic
    blocks) and ResNet-50 (bottleneck blocks) with a 7x7 stride-2 stem and
    max pooling. Downsampling shortcuts are 1x1 convolutions with batch
    normalization (option B of He et al.), other shortcuts are identities.

    Gating (DeepMoE figure 2): inside every block, a convolution is a
    `GatedConv2D` gated on the channels the previous convolution of the
    block produced, with gates from a `ShallowEmbedding` and one
    `SparseGatingHeads` head per gated convolution:

    - basic block: `conv3x3(inner) -> BN -> ReLU -> gated conv3x3(width)`;
      one gate over the `inner` channels.
    - bottleneck A: `conv1x1(inner) -> gated conv3x3(inner) -> gated
      conv1x1(4 * width)`; two gates, both inner convolutions widened in
      `"wide"`.
    - bottleneck B (less memory): `conv1x1(width) -> conv3x3(inner) ->
      gated conv1x1(4 * width)`; one gate, only the 3x3 widened.

    `variant="wide"` doubles the gated (inner) channels, so that with about
    half of them switched off the network costs what the baseline costs;
    `"narrow"` keeps the baseline widths. With `gated=False` the same code
    builds the plain network (same widths, ordinary convolutions, no
    embedding): `variant="narrow", gated=False` is the standard ResNet.

    Gated or plain, the model returns the logits `(batch, num_classes)`,
    so it predicts, evaluates and exports like any Keras classifier.
    `keras_moe.training.DeepMoETrainer` trains it on the DeepMoE
    objective, and `keras_moe.models.deepmoe_outputs(model)` gives a model
    that also returns the gates (one `(batch, C_l)` tensor per
    `GatedConv2D`, in the order of `model.gated_layers`) and the
    embedding's class probabilities.

    Args:
        depth: int. CIFAR: 20, 32, 44, 56, 110 or any `6n + 2`. ImageNet:
            18, 34 or 50.
        num_classes: int, the number of classes.
        input_shape: tuple, the image shape. Inputs of at most 64x64 get the
            CIFAR design, larger ones the ImageNet design.
        variant: `"wide"` or `"narrow"`.
        gated: bool, whether to build the DeepMoE network or the plain one.
        bottleneck: `"A"` or `"B"`, the gated bottleneck of ResNet-50.
        embedding_dim: int, the size of the embedding `e`. Defaults to
            `num_classes` for CIFAR-size inputs, so that `e` itself is the
            embedding's class prediction (the paper's `L_e` with `mu = 1`),
            and to 64 for ImageNet-size inputs, where the paper sets
            `mu = 0` and 1,000 latent weights would make the gating heads
            as costly as a residual stage.
        embedding_layers: int, the embedding's stride-2 convolutions.
            Defaults to 4 for CIFAR-size inputs and 5 for ImageNet-size.
        embedding_filters: int, the width of the embedding's first
            convolution (doubled at each following one). Defaults to 32
            for CIFAR-size inputs and 16 for ImageNet-size inputs, which
            keeps the embedding and gating heads near the paper's "roughly
            2%" of the base network's multiply-adds (see the presets
            page).
        batch_norm_momentum: float, the momentum of every batch
            normalization (of the embedding too). Defaults to 0.9, the
            papers' PyTorch networks' (0.1 in PyTorch's convention).
        batch_norm_epsilon: float. Defaults to 1e-5, as in PyTorch.
        dtype: optional dtype policy of every layer.
        **kwargs: `keras.Model` keyword arguments: `name`, `trainable`.

    Example:

    ```python
    model = keras_moe.models.DeepMoEResNet(20, num_classes=10)
    logits = model(np.zeros((2, 32, 32, 3), "float32"))
    tuple(logits.shape)  # (2, 10)
    len(model.gated_layers)  # 9
    ```

    Reference:
        X. Wang et al., "Deep Mixture of Experts via Shallow Embedding",
        UAI 2019, section 3.3, figure 2 and section 5; K. He et al., "Deep
        Residual Learning for Image Recognition", CVPR 2016.
    """

    def __init__(
        self,
        depth=56,
        num_classes=10,
        input_shape=(32, 32, 3),
        variant="wide",
        gated=True,
        bottleneck="A",
        embedding_dim=None,
        embedding_layers=None,
        embedding_filters=None,
        batch_norm_momentum=BATCH_NORM_MOMENTUM,
        batch_norm_epsilon=BATCH_NORM_EPSILON,
        dtype=None,
        **kwargs,
    ):
        check_model_kwargs(type(self), kwargs)
        input_shape = tuple(input_shape)
        _validate(depth, num_classes, input_shape, variant, bottleneck)
        batch_norm_momentum, batch_norm_epsilon = check_batch_norm(
            batch_norm_momentum, batch_norm_epsilon
        )
        cifar = max(input_shape[:2]) <= 64
        if embedding_dim is None:
            embedding_dim = num_classes if cifar else 64
        if embedding_layers is None:
            embedding_layers = 4 if cifar else 5
        if embedding_filters is None:
            embedding_filters = 32 if cifar else 16

        # === Layers ===
        # The blocks' widths and strides; the gates' widths follow from
        # them, so the gating heads can be built before the base network.
        if cifar:
            blocks_per_stage = (depth - 2) // 6
            stages = [
                (16, blocks_per_stage),
                (32, blocks_per_stage),
                (64, blocks_per_stage),
            ]
            kind = "basic"
        else:
            stages = list(zip((64, 128, 256, 512), IMAGENET_BLOCKS[depth]))
            kind = "basic" if depth < 50 else "bottleneck_" + bottleneck
        factor = 2 if variant == "wide" else 1
        plan = []
        for stage, (width, blocks) in enumerate(stages):
            for block in range(blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                plan.append((width, strides))
        gate_widths = []
        for width, _ in plan:
            if kind == "basic":
                gate_widths.append(width * factor)
            elif kind == "bottleneck_A":
                gate_widths += [width * factor, width * factor]
            else:
                gate_widths.append(width * factor)

        # === Functional Model ===
        images = keras.Input(input_shape, name="images")
        gates = iter([])
        if gated:
            embedding, _ = ShallowEmbedding(
                embedding_dim,
                num_layers=embedding_layers,
                filters=embedding_filters,
                num_classes=num_classes,
                batch_norm_momentum=batch_norm_momentum,
                batch_norm_epsilon=batch_norm_epsilon,
                dtype=dtype,
                name="embedding",
            )(images)
            gate_list = SparseGatingHeads(
                gate_widths, dtype=dtype, name="gating_heads"
            )(embedding)
            gates = iter(gate_list)

        builder = _Builder(
            gated, dtype, batch_norm_momentum, batch_norm_epsilon
        )
        if cifar:
            x = builder.conv(images, 16, 3, name="stem_conv")
            x = builder.bn_relu(x, "stem")
        else:
            x = builder.conv(images, 64, 7, strides=2, name="stem_conv")
            x = builder.bn_relu(x, "stem")
            x = keras.layers.MaxPooling2D(
                3, strides=2, padding="same", dtype=dtype, name="stem_pool"
            )(x)
        for i, (width, strides) in enumerate(plan):
            name = f"block{i + 1}"
            if kind == "basic":
                x = builder.basic(
                    x, width, width * factor, strides, gates, name
                )
            else:
                x = builder.bottleneck(
                    x,
                    width,
                    width * factor,
                    strides,
                    gates,
                    name,
                    gate_both=kind == "bottleneck_A",
                )
        x = keras.layers.GlobalAveragePooling2D(dtype=dtype, name="pool")(x)
        logits = keras.layers.Dense(num_classes, dtype=dtype, name="logits")(x)
        super().__init__(inputs=images, outputs=logits, dtype=dtype, **kwargs)

        # === Config ===
        self.depth = depth
        self.num_classes = num_classes
        self.image_shape = input_shape
        self.variant = variant
        self.gated = gated
        self.bottleneck = bottleneck
        self.embedding_dim = embedding_dim
        self.embedding_layers = embedding_layers
        self.embedding_filters = embedding_filters
        self.batch_norm_momentum = batch_norm_momentum
        self.batch_norm_epsilon = batch_norm_epsilon

    @property
    def gated_layers(self):
        """The `GatedConv2D` layers, in the order of `model.layers` (and of
        the gates of `keras_moe.models.deepmoe_outputs`)."""
        return [
            layer for layer in self.layers if isinstance(layer, GatedConv2D)
        ]

    def get_config(self):
        return {
            **super().get_config(),
            "depth": self.depth,
            "num_classes": self.num_classes,
            "input_shape": self.image_shape,
            "variant": self.variant,
            "gated": self.gated,
            "bottleneck": self.bottleneck,
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
            preset: a name from `keras_moe.models.DEEPMOE_RESNET_PRESETS`.
            **overrides: constructor arguments that replace the preset's.

        Returns:
            A `DeepMoEResNet`.
        """
        return build_preset(cls, DEEPMOE_RESNET_PRESETS, preset, overrides)


class _Builder:
    """Adds the layers of the blocks, gated or plain."""

    def __init__(self, gated, dtype, bn_momentum, bn_epsilon):
        self.gated = gated
        self.dtype = dtype
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon

    def conv(
        self,
        x,
        filters,
        kernel_size,
        strides=1,
        gates=None,
        name=None,
        dilation_rate=1,
    ):
        kwargs = dict(
            strides=strides,
            dilation_rate=dilation_rate,
            padding="same",
            use_bias=False,
            kernel_initializer="he_normal",
            dtype=self.dtype,
            name=name,
        )
        if gates is not None:
            return GatedConv2D(filters, kernel_size, **kwargs)(x, gates)
        return keras.layers.Conv2D(filters, kernel_size, **kwargs)(x)

    def bn_relu(self, x, name, relu=True):
        x = batch_norm(
            self.dtype, self.bn_momentum, self.bn_epsilon, f"{name}_bn"
        )(x)
        if relu:
            x = keras.layers.ReLU(dtype=self.dtype, name=f"{name}_relu")(x)
        return x

    def shortcut(self, x, filters, strides, name):
        if strides == 1 and x.shape[-1] == filters:
            return x
        x = self.conv(x, filters, 1, strides=strides, name=f"{name}_proj")
        return self.bn_relu(x, f"{name}_proj", relu=False)

    def basic(self, x, width, inner, strides, gates, name):
        shortcut = self.shortcut(x, width, strides, name)
        y = self.conv(x, inner, 3, strides=strides, name=f"{name}_conv1")
        y = self.bn_relu(y, f"{name}_1")
        y = self.conv(
            y, width, 3, gates=self.next_gate(gates), name=f"{name}_conv2"
        )
        y = self.bn_relu(y, f"{name}_2", relu=False)
        return self.add_relu(shortcut, y, name)

    def bottleneck(
        self, x, width, inner, strides, gates, name, gate_both, dilation=1
    ):
        shortcut = self.shortcut(x, 4 * width, strides, name)
        first = inner if gate_both else width
        y = self.conv(x, first, 1, name=f"{name}_conv1")
        y = self.bn_relu(y, f"{name}_1")
        y = self.conv(
            y,
            inner,
            3,
            strides=strides,
            gates=self.next_gate(gates) if gate_both else None,
            name=f"{name}_conv2",
            dilation_rate=dilation,
        )
        y = self.bn_relu(y, f"{name}_2")
        y = self.conv(
            y, 4 * width, 1, gates=self.next_gate(gates), name=f"{name}_conv3"
        )
        y = self.bn_relu(y, f"{name}_3", relu=False)
        return self.add_relu(shortcut, y, name)

    def next_gate(self, gates):
        return next(gates) if self.gated else None

    def add_relu(self, shortcut, y, name):
        x = keras.layers.Add(dtype=self.dtype, name=f"{name}_add")(
            [shortcut, y]
        )
        return keras.layers.ReLU(dtype=self.dtype, name=f"{name}_out")(x)


def build_preset(cls, presets, preset, overrides):
    """Builds `cls` from the configuration `presets[preset]`."""
    if preset not in presets:
        raise ValueError(
            f"Unknown preset. Expected one of {sorted(presets)}. "
            f"Received: preset={preset!r}"
        )
    return cls(**{**presets[preset], **overrides})


def _validate(depth, num_classes, input_shape, variant, bottleneck):
    if len(input_shape) != 3 or any(
        not isinstance(d, int) or d <= 0 for d in input_shape
    ):
        raise ValueError(
            "`input_shape` must be (height, width, channels) of positive "
            f"ints. Received: input_shape={input_shape!r}"
        )
    cifar = max(input_shape[:2]) <= 64
    if cifar and (not isinstance(depth, int) or depth < 8 or (depth - 2) % 6):
        raise ValueError(
            "CIFAR-size inputs need a depth of 6n + 2 (20, 32, 44, 56, 110, "
            f"...). Received: depth={depth!r}"
        )
    if not cifar and depth not in IMAGENET_BLOCKS:
        raise ValueError(
            "ImageNet-size inputs need depth 18, 34 or 50. "
            f"Received: depth={depth!r}"
        )
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, int)
        or (num_classes <= 0)
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


def _presets():
    presets = {}
    for depth in (20, 56, 110):
        for classes in (10, 100):
            for variant in VARIANTS:
                presets[f"{variant}_deepmoe_resnet{depth}_cifar{classes}"] = (
                    dict(depth=depth, num_classes=classes, variant=variant)
                )
            presets[f"resnet{depth}_cifar{classes}"] = dict(
                depth=depth,
                num_classes=classes,
                variant="narrow",
                gated=False,
            )
    imagenet = dict(num_classes=1000, input_shape=(224, 224, 3))
    for depth in (18, 34):
        presets[f"wide_deepmoe_resnet{depth}_imagenet"] = dict(
            depth=depth, variant="wide", **imagenet
        )
        if depth == 18:
            # The smallest base: a narrower embedding keeps it near 2%.
            presets["wide_deepmoe_resnet18_imagenet"]["embedding_filters"] = 12
        presets[f"resnet{depth}_imagenet"] = dict(
            depth=depth, variant="narrow", gated=False, **imagenet
        )
    for b in BOTTLENECKS:
        presets[f"wide_deepmoe_resnet50{b.lower()}_imagenet"] = dict(
            depth=50, variant="wide", bottleneck=b, **imagenet
        )
    presets["resnet50_imagenet"] = dict(
        depth=50, variant="narrow", gated=False, **imagenet
    )
    return presets


DEEPMOE_RESNET_PRESETS = _presets()
