import keras
from keras import ops

from keras_moe.layers._validation import check_rank


@keras.saving.register_keras_serializable(package="keras_moe")
class GatedConv2D(keras.layers.Conv2D):
    """2D convolution whose input channels are gated mixture-of-experts.

    DeepMoE treats every input channel of a convolution as an expert. With
    per-example gates `g` of shape `(batch, in_channels)`, the layer computes

    `z = sum_i g_i * (K_i * x_i)`

    where `K_i * x_i` is the convolution of input channel `i` with its slice
    of the kernel (DeepMoE eq. 3-5). This is the same as scaling the input
    channels by their gates before an ordinary convolution, which is how it
    is computed. A gate of exactly zero removes its channel entirely: the
    channel contributes nothing to the output, and no gradient reaches the
    kernel slice of that channel through this example.

    The constructor takes the arguments of `keras.layers.Conv2D`; the only
    difference is the call signature, which takes the gates as a second
    input.

    Args:
        filters: int, the number of output channels (`C^out`).
        kernel_size: int or tuple of 2 ints, the size of the convolution
            window (`k`).
        strides: int or tuple of 2 ints, the strides of the convolution.
        padding: `"valid"` or `"same"` (case-insensitive).
        data_format: `"channels_last"` or `"channels_first"`. Defaults to
            `keras.config.image_data_format()`. (On TensorFlow, CPU
            convolutions take `"channels_last"` only, unless compiled with
            XLA, as for `keras.layers.Conv2D`.)
        dilation_rate: int or tuple of 2 ints, the dilation rate.
        groups: int, the number of groups the input channels are split into.
        activation: activation applied to the gated sum `z`.
        use_bias: bool, whether to add a bias to the output.
        kernel_initializer: initializer of the kernel `K`.
        bias_initializer: initializer of the bias.
        kernel_regularizer: optional regularizer of the kernel.
        bias_regularizer: optional regularizer of the bias.
        activity_regularizer: optional regularizer of the output.
        kernel_constraint: optional constraint of the kernel.
        bias_constraint: optional constraint of the bias.
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: 4D tensor, the feature map `x`.
        gates: 2D tensor of shape `(batch, in_channels)`, the gate values `g`
            of this layer, for example one output of `SparseGatingHeads`.

    Input shape:
        `inputs`: `(batch, height, width, in_channels)` with
        `"channels_last"`, `(batch, in_channels, height, width)` with
        `"channels_first"`. `gates`: `(batch, in_channels)`.

    Output shape:
        The output shape of `keras.layers.Conv2D` with the same arguments.

    Example:

    ```python
    x = np.random.rand(2, 8, 8, 4).astype("float32")
    gates = np.array([[1.0, 0.0, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0]])
    layer = keras_moe.layers.GatedConv2D(6, 3, padding="same")
    tuple(layer(x, gates).shape)  # (2, 8, 8, 6)
    ```

    Reference:
        X. Wang et al., "Deep Mixture of Experts via Shallow Embedding",
        UAI 2019, section 3.2, eq. 3-5.
    """

    def build(self, inputs_shape, gates_shape):
        check_rank(self, "inputs", inputs_shape, 4)
        in_channels = inputs_shape[self._channel_axis()]
        if in_channels is None:
            raise ValueError(
                f"{self.__class__.__name__} needs a known number of input "
                f"channels. Received: inputs_shape={tuple(inputs_shape)}"
            )
        self._check_gates(inputs_shape, gates_shape)
        super().build(inputs_shape)

    def _channel_axis(self):
        return -1 if self.data_format == "channels_last" else 1

    def _check_gates(self, inputs_shape, gates_shape):
        """The gates' shape must be `(batch, in_channels)`: checked when the
        layer is built and at every call, on the static shapes (a batch
        size unknown when tracing is not compared)."""
        check_rank(self, "gates", gates_shape, 2)
        in_channels = inputs_shape[self._channel_axis()]
        batch, gates_batch = inputs_shape[0], gates_shape[0]
        if (gates_shape[-1] is not None and gates_shape[-1] != in_channels) or (
            batch is not None
            and gates_batch is not None
            and batch != gates_batch
        ):
            raise ValueError(
                "`gates` must have one value per input channel and one row "
                f"per example, i.e. shape ({batch}, {in_channels}). "
                f"Received: gates_shape={tuple(gates_shape)} for "
                f"inputs_shape={tuple(inputs_shape)}"
            )

    def call(self, inputs, gates):
        self._check_gates(tuple(inputs.shape), tuple(gates.shape))
        gates = ops.cast(gates, self.compute_dtype)
        if self.data_format == "channels_last":
            gates = gates[:, None, None, :]
        else:
            gates = gates[:, :, None, None]
        return super().call(ops.multiply(inputs, gates))

    def compute_output_shape(self, inputs_shape, gates_shape=None):
        if gates_shape is not None and self.built:
            self._check_gates(tuple(inputs_shape), tuple(gates_shape))
        return super().compute_output_shape(inputs_shape)
