import keras
from keras import ops

from keras_moe.layers._validation import check_choice
from keras_moe.layers._validation import check_non_negative_number
from keras_moe.layers._validation import check_positive_int
from keras_moe.layers._validation import check_rank
from keras_moe.layers._validation import independent_initializer

GATE_REDUCTIONS = ("mean", "sum")


def gate_l1(gates, reduction="sum"):
    """The DeepMoE sparsity loss `L_g`, batch-averaged.

    With `reduction="sum"`, `L_g = sum_l ||G^l||_1`: the L1 norms of every
    layer's gates, summed over the layers (DeepMoE eq. 8 as written). With
    `reduction="mean"`, the same sum divided by the total number of gates
    `sum_l C_l`: the mean gate magnitude, about 1 for a network that starts
    dense whatever its size. Both are averaged over the batch, and give the
    same gradient direction; they differ by the constant `sum_l C_l`.

    Args:
        gates: a gate tensor of shape `(batch, channels)` or a list of them,
            one per gated layer (the output of `SparseGatingHeads`).
        reduction: `"sum"` (eq. 8) or `"mean"`. Defaults to `"sum"`.

    Returns:
        A float32 scalar.

    Example:

    ```python
    gates = [np.ones((2, 4), "float32"), np.zeros((2, 12), "float32")]
    float(keras_moe.layers.gate_l1(gates))  # 4.0
    float(keras_moe.layers.gate_l1(gates, reduction="mean"))  # 0.25
    ```
    """
    check_choice("reduction", reduction, GATE_REDUCTIONS)
    if not isinstance(gates, (list, tuple)):
        gates = [gates]
    total = 0.0
    for gate in gates:
        gate = ops.cast(gate, "float32")
        total = total + ops.mean(ops.sum(ops.abs(gate), axis=-1))
    if reduction == "mean":
        total = total / float(sum(int(gate.shape[-1]) for gate in gates))
    return total


@keras.saving.register_keras_serializable(package="keras_moe")
class SparseGatingHeads(keras.layers.Layer):
    """Multi-headed sparse gating network of DeepMoE.

    One head per gated layer maps the latent mixture weights `e` to that
    layer's gates: `G^l(e) = ReLU(W_g^l e)` (DeepMoE eq. 6). The ReLU makes
    the gates sparse, and the number of active experts (channels) of each
    layer is decided by the data, not by a fixed top-k.

    The default kernel initializer has mean 1, so with a softmax embedding
    (whose entries sum to 1) every gate starts close to 1: the network starts
    dense and the sparsity loss, not the initialization, decides which
    channels get switched off.

    With `lambda_gate > 0` the layer adds `lambda_gate * L_g` to the model's
    losses (`layer.losses`), where `L_g` is the gate L1 norm of DeepMoE
    eq. 8, averaged over the batch. By default (`gate_reduction="mean"`)
    `L_g` is divided by the number of gates, so that it is about 1 for a
    dense network of any size, on the scale of the cross-entropy: the
    paper's `lambda` values (0.001 to 8 on CIFAR, section 5) then behave
    as in the paper, from nearly dense to strongly sparse.
    `gate_reduction="sum"` is eq. 8 literally, whose scale grows with the
    number of gated channels (2,016 for wide DeepMoE-ResNet-56), so that
    a `lambda` of the paper's range switches every gate off within a few
    steps. `keras_moe.layers.gate_l1` computes `L_g` for training code
    that weighs it itself.

    Args:
        channels: list of ints `[C_1, ..., C_L]`, the number of gates (input
            channels of the gated convolution) of each head.
        lambda_gate: float >= 0, the weight `lambda` of the sparsity loss
            added through `add_loss`. Defaults to 0 (no loss added).
        gate_reduction: `"mean"` or `"sum"`, how `L_g` reduces over the
            gates (see above and `gate_l1`). Defaults to `"mean"`.
        use_bias: bool, whether the heads have a bias. The paper's heads have
            none. Defaults to `False`.
        kernel_initializer: initializer of the head kernels `W_g^l`.
            Defaults to a normal distribution with mean 1 and standard
            deviation 0.1.
        bias_initializer: initializer of the biases, if any.
        kernel_regularizer: optional regularizer of the head kernels.
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: 2D tensor `e` of shape `(batch, embedding_dim)`, for example
            the output of `ShallowEmbedding`.

    Input shape:
        `(batch, embedding_dim)`.

    Output shape:
        A list of `L` tensors of shapes `(batch, C_l)`.

    Example:

    ```python
    e = np.full((2, 8), 1.0 / 8, dtype="float32")
    heads = keras_moe.layers.SparseGatingHeads([16, 32])
    gates = heads(e)
    [tuple(g.shape) for g in gates]  # [(2, 16), (2, 32)]
    ```

    Reference:
        X. Wang et al., "Deep Mixture of Experts via Shallow Embedding",
        UAI 2019, section 3.3, eq. 6 and 8.
    """

    def __init__(
        self,
        channels,
        lambda_gate=0.0,
        gate_reduction="mean",
        use_bias=False,
        kernel_initializer=None,
        bias_initializer="zeros",
        kernel_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(channels, (list, tuple)) or not channels:
            raise ValueError(
                "`channels` must be a non-empty list of positive integers, "
                f"one per gated layer. Received: channels={channels!r}"
            )
        for value in channels:
            check_positive_int("channels", value)
        self.channels = list(channels)
        self.lambda_gate = check_non_negative_number("lambda_gate", lambda_gate)
        self.gate_reduction = check_choice(
            "gate_reduction", gate_reduction, GATE_REDUCTIONS
        )
        self.use_bias = use_bias
        if kernel_initializer is None:
            kernel_initializer = keras.initializers.RandomNormal(
                mean=1.0, stddev=0.1
            )
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)

    def build(self, inputs_shape):
        check_rank(self, "inputs", inputs_shape, 2)
        embedding_dim = inputs_shape[-1]
        if embedding_dim is None:
            raise ValueError(
                "SparseGatingHeads needs a known embedding size. "
                f"Received: inputs_shape={tuple(inputs_shape)}"
            )
        self.heads = []
        for i, width in enumerate(self.channels):
            head = keras.layers.Dense(
                width,
                activation="relu",
                use_bias=self.use_bias,
                kernel_initializer=independent_initializer(
                    self.kernel_initializer, i
                ),
                bias_initializer=self.bias_initializer,
                kernel_regularizer=self.kernel_regularizer,
                dtype=self.dtype_policy,
                name=f"head_{i}",
            )
            head.build((None, embedding_dim))
            self.heads.append(head)

    def call(self, inputs):
        gates = [head(inputs) for head in self.heads]
        if self.lambda_gate > 0:
            self.add_loss(
                self.lambda_gate * gate_l1(gates, self.gate_reduction)
            )
        return gates

    def compute_output_shape(self, inputs_shape):
        return [(inputs_shape[0], width) for width in self.channels]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "channels": self.channels,
                "lambda_gate": self.lambda_gate,
                "gate_reduction": self.gate_reduction,
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer
                ),
                "kernel_regularizer": keras.regularizers.serialize(
                    self.kernel_regularizer
                ),
            }
        )
        return config
