import keras
from keras import ops

from keras_moe.layers._validation import check_momentum
from keras_moe.layers._validation import check_positive_int
from keras_moe.layers._validation import check_positive_number
from keras_moe.layers._validation import check_rank
from keras_moe.layers._validation import independent_initializer
from keras_moe.layers._validation import standardize_data_format


@keras.saving.register_keras_serializable(package="keras_moe")
class ShallowEmbedding(keras.layers.Layer):
    """The cheap embedding network `M` that drives DeepMoE's gates.

    `num_layers` 3x3 convolutions with stride 2 (each followed by batch
    normalization and ReLU), then global average pooling and a softmax layer
    that gives the latent mixture weights `e = M(x)` of size `embedding_dim`.
    The paper uses 4 layers for CIFAR-size inputs and 5 for ImageNet-size
    inputs, which keeps the embedding at roughly 2% of the base network's
    computation.

    When `num_classes` is given, the layer also returns the class
    probabilities used by the auxiliary embedding loss `L_e` (DeepMoE eq. 7,
    Procedure 1 line 7): `e` itself when `embedding_dim == num_classes`,
    otherwise the softmax of a linear head applied to `e`.

    The softmax is computed in float32, also under mixed precision.

    Args:
        embedding_dim: int, the size of the latent mixture weights `e`.
        num_layers: int, the number of stride-2 convolutions. Defaults to 4.
        filters: int or sequence of `num_layers` ints. An int is the width of
            the first convolution, doubled at every following one; a
            sequence gives each convolution's width. Defaults to 32.
        num_classes: optional int. When set, the call also returns class
            probabilities for the auxiliary loss.
        use_batch_norm: bool, whether each convolution is followed by batch
            normalization. Defaults to `True`.
        batch_norm_momentum: float in `[0, 1)`, the momentum of the moving
            statistics. Defaults to 0.9, the papers' PyTorch networks'
            (PyTorch's 0.1 in its own convention), so that inference-mode
            statistics follow the data after a few dozen steps.
        batch_norm_epsilon: float > 0. Defaults to 1e-5, as in PyTorch.
        kernel_initializer: initializer of the convolution and dense kernels.
        kernel_regularizer: optional regularizer of those kernels.
        data_format: `"channels_last"` or `"channels_first"`. Defaults to
            `keras.config.image_data_format()`.
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: 4D tensor, the input images `x`.
        training: bool, whether batch normalization runs in training mode.

    Input shape:
        `(batch, height, width, channels)` with `"channels_last"`.

    Output shape:
        `(batch, embedding_dim)`; with `num_classes`, a tuple of that and
        `(batch, num_classes)`.

    Example:

    ```python
    images = np.random.rand(2, 32, 32, 3).astype("float32")
    embed = keras_moe.layers.ShallowEmbedding(16, num_classes=10)
    e, class_probs = embed(images)
    tuple(e.shape), tuple(class_probs.shape)  # ((2, 16), (2, 10))
    ```

    Reference:
        X. Wang et al., "Deep Mixture of Experts via Shallow Embedding",
        UAI 2019, section 3.3 and Procedure 1.
    """

    def __init__(
        self,
        embedding_dim,
        num_layers=4,
        filters=32,
        num_classes=None,
        use_batch_norm=True,
        batch_norm_momentum=0.9,
        batch_norm_epsilon=1e-5,
        kernel_initializer="he_normal",
        kernel_regularizer=None,
        data_format=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.embedding_dim = check_positive_int("embedding_dim", embedding_dim)
        self.num_layers = check_positive_int("num_layers", num_layers)
        if isinstance(filters, (list, tuple)):
            if len(filters) != num_layers:
                raise ValueError(
                    "`filters` must be an int or a sequence of `num_layers` "
                    f"({num_layers}) ints. Received: filters={filters!r}"
                )
            for width in filters:
                check_positive_int("filters", width)
            filters = list(filters)
        else:
            check_positive_int("filters", filters)
        self.filters = filters
        if num_classes is not None:
            check_positive_int("num_classes", num_classes)
        self.num_classes = num_classes
        self.use_batch_norm = use_batch_norm
        self.batch_norm_momentum = check_momentum(
            "batch_norm_momentum", batch_norm_momentum
        )
        self.batch_norm_epsilon = check_positive_number(
            "batch_norm_epsilon", batch_norm_epsilon
        )
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.data_format = standardize_data_format(data_format)

    @property
    def layer_widths(self):
        """The number of filters of each stride-2 convolution."""
        if isinstance(self.filters, list):
            return list(self.filters)
        return [self.filters * 2**i for i in range(self.num_layers)]

    def build(self, inputs_shape):
        check_rank(self, "inputs", inputs_shape, 4)
        self.convs = []
        self.norms = []
        channel_axis = -1 if self.data_format == "channels_last" else 1
        shape = tuple(inputs_shape)
        for i, width in enumerate(self.layer_widths):
            conv = keras.layers.Conv2D(
                width,
                3,
                strides=2,
                padding="same",
                use_bias=not self.use_batch_norm,
                kernel_initializer=independent_initializer(
                    self.kernel_initializer, i
                ),
                kernel_regularizer=self.kernel_regularizer,
                data_format=self.data_format,
                dtype=self.dtype_policy,
                name=f"conv_{i}",
            )
            conv.build(shape)
            shape = conv.compute_output_shape(shape)
            self.convs.append(conv)
            if self.use_batch_norm:
                norm = keras.layers.BatchNormalization(
                    axis=channel_axis,
                    momentum=self.batch_norm_momentum,
                    epsilon=self.batch_norm_epsilon,
                    dtype=self.dtype_policy,
                    name=f"bn_{i}",
                )
                norm.build(shape)
                self.norms.append(norm)
        self.projection = keras.layers.Dense(
            self.embedding_dim,
            kernel_initializer=independent_initializer(
                self.kernel_initializer, self.num_layers
            ),
            kernel_regularizer=self.kernel_regularizer,
            dtype=self.dtype_policy,
            name="projection",
        )
        self.projection.build((None, self.layer_widths[-1]))
        self.class_head = None
        if self.num_classes is not None and (
            self.num_classes != self.embedding_dim
        ):
            self.class_head = keras.layers.Dense(
                self.num_classes,
                kernel_initializer=independent_initializer(
                    self.kernel_initializer, self.num_layers + 1
                ),
                kernel_regularizer=self.kernel_regularizer,
                dtype=self.dtype_policy,
                name="class_head",
            )
            self.class_head.build((None, self.embedding_dim))

    def call(self, inputs, training=None):
        x = inputs
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.use_batch_norm:
                x = self.norms[i](x, training=training)
            x = ops.relu(x)
        spatial_axes = [1, 2] if self.data_format == "channels_last" else [2, 3]
        x = ops.mean(x, axis=spatial_axes)
        logits = self.projection(x)
        embedding = ops.softmax(ops.cast(logits, "float32"), axis=-1)
        if self.num_classes is None:
            return embedding
        if self.class_head is None:
            return embedding, embedding
        class_logits = self.class_head(embedding)
        class_probs = ops.softmax(ops.cast(class_logits, "float32"), axis=-1)
        return embedding, class_probs

    def compute_output_spec(self, inputs, training=None):
        batch = inputs.shape[0]
        embedding = keras.KerasTensor((batch, self.embedding_dim), "float32")
        if self.num_classes is None:
            return embedding
        class_probs = keras.KerasTensor((batch, self.num_classes), "float32")
        return embedding, class_probs

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "embedding_dim": self.embedding_dim,
                "num_layers": self.num_layers,
                "filters": self.filters,
                "num_classes": self.num_classes,
                "use_batch_norm": self.use_batch_norm,
                "batch_norm_momentum": self.batch_norm_momentum,
                "batch_norm_epsilon": self.batch_norm_epsilon,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "kernel_regularizer": keras.regularizers.serialize(
                    self.kernel_regularizer
                ),
                "data_format": self.data_format,
            }
        )
        return config
