import keras
from keras import ops

from keras_moe.layers._validation import check_choice
from keras_moe.layers._validation import check_non_negative_number
from keras_moe.layers._validation import check_number_above
from keras_moe.layers._validation import check_positive_int
from keras_moe.layers._validation import independent_initializer

BALANCING_MODES = (None, "pause", "loss")


@keras.saving.register_keras_serializable(package="keras_moe")
class MixtureOfExperts(keras.layers.Layer):
    """Dense mixture of experts with its own gating network (Eigen et al.).

    Every expert `f_i` sees the layer's input and a gating network computes
    mixture weights `g(x) = softmax(...)` over the `N` experts; the output is

    `z = sum_i g_i(x) f_i(x)`.

    Layers stack: the output `z_1` of one mixture feeds the next, and a final
    softmax layer classifies (`F(x) = softmax(f_3(z_2))`), each mixture
    having its own gating network. By default the experts are
    `Dense(expert_units, relu)` and the gating network is linear, a softmax
    over the experts of a linear map of the input (`gate_hidden_units=None`):
    `g(x) = softmax(W_g x)`. The gating network that the notes on Eigen et
    al. describe has a ReLU non-linearity, as the experts do:
    `gate_hidden_units` adds that ReLU hidden layer, `g(x) = softmax(W_g
    ReLU(V x))` (the MNIST example uses 64 units). Any Keras layer or small
    model can be given as expert instead of the default ones.

    Balancing the experts' use, as an option (`balancing`):

    - `"pause"`: the paper's heuristic. The layer keeps each expert's
      running total assignment `A_i` (the sum of `g_i` over the training
      examples seen). While `A_i > balance_threshold * mean(A)`, expert `i`
      is paused: its output is kept, but no gradient reaches it. The
      heuristic is meant for early training: it acts only during the first
      `balance_steps` training batches (all of training if `None`).
    - `"loss"`: a load-balancing auxiliary loss added with `add_loss`,
      `balance_loss_weight * CV(importance)^2`, where the importance of an
      expert is the sum of its gates over the batch and CV the coefficient
      of variation (Shazeer et al. 2017).

    Args:
        num_experts: int, the number of experts `N`.
        expert_units: int, the units of each default `Dense` ReLU expert.
            Give either this or `experts`.
        experts: optional list of `num_experts` Keras layers, each mapping
            the input to outputs of the same shape.
        gate_hidden_units: int or `None`, the units of the ReLU hidden layer
            `V` of the gating network, as in Eigen et al.; `None` for a
            linear gating network. Defaults to `None`.
        balancing: `None`, `"pause"` or `"loss"`.
        balance_threshold: finite float > 1, the factor over the mean
            assignment above which an expert is paused. Defaults to 2.
        balance_steps: optional int, the number of training batches during
            which the pause heuristic acts.
        balance_loss_weight: finite float >= 0, the weight of the balancing
            loss. Defaults to 0.01.
        expert_activation: activation of the default experts.
        kernel_initializer: initializer of the default experts' and the
            gating network's kernels.
        kernel_regularizer: optional regularizer of those kernels.
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: tensor of shape `(batch, features)` (or any rank the experts
            accept; the gates are computed from the flattened features).
        training: bool, whether the balancing heuristic updates and pauses.
        return_gates: bool, whether to also return the gates
            `(batch, num_experts)`.

    Input shape:
        `(batch, features)`.

    Output shape:
        `(batch, expert_units)` for the default experts; the experts'
        output shape otherwise. With `return_gates`, a tuple of that and
        `(batch, num_experts)`.

    Example:

    ```python
    x = np.random.rand(4, 20).astype("float32")
    moe = keras_moe.layers.MixtureOfExperts(num_experts=4, expert_units=8)
    tuple(moe(x).shape)  # (4, 8)
    z, gates = moe(x, return_gates=True)
    tuple(gates.shape)  # (4, 4)
    ```

    Reference:
        D. Eigen, M. Ranzato, I. Sutskever, "Learning Factored
        Representations in a Deep Mixture of Experts", ICLR workshop 2014
        (stacked mixtures and the assignment-balancing heuristic);
        N. Shazeer et al., "Outrageously Large Neural Networks", ICLR 2017
        (the importance loss).
    """

    def __init__(
        self,
        num_experts,
        expert_units=None,
        experts=None,
        gate_hidden_units=None,
        balancing=None,
        balance_threshold=2.0,
        balance_steps=None,
        balance_loss_weight=0.01,
        expert_activation="relu",
        kernel_initializer="glorot_uniform",
        kernel_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_experts = check_positive_int("num_experts", num_experts)
        if (expert_units is None) == (experts is None):
            raise ValueError(
                "Give exactly one of `expert_units` (default Dense experts) "
                "and `experts` (your own expert layers). Received: "
                f"expert_units={expert_units!r}, experts={experts!r}"
            )
        if expert_units is not None:
            check_positive_int("expert_units", expert_units)
        self.expert_units = expert_units
        if experts is not None:
            if (
                not isinstance(experts, (list, tuple))
                or len(experts) != num_experts
                or not all(isinstance(e, keras.layers.Layer) for e in experts)
            ):
                raise ValueError(
                    "`experts` must be a list of `num_experts` "
                    f"({num_experts}) Keras layers. Received: "
                    f"experts={experts!r}"
                )
            experts = list(experts)
        self.experts = experts
        if gate_hidden_units is not None:
            check_positive_int("gate_hidden_units", gate_hidden_units)
        self.gate_hidden_units = gate_hidden_units
        self.balancing = check_choice("balancing", balancing, BALANCING_MODES)
        # NaN would compare False against every total: no expert would
        # ever be paused.
        self.balance_threshold = check_number_above(
            "balance_threshold", balance_threshold, 1
        )
        if balance_steps is not None:
            check_positive_int("balance_steps", balance_steps)
        self.balance_steps = balance_steps
        self.balance_loss_weight = check_non_negative_number(
            "balance_loss_weight", balance_loss_weight
        )
        self.expert_activation = keras.activations.get(expert_activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)

    def build(self, inputs_shape):
        features = 1
        for dim in inputs_shape[1:]:
            if dim is None:
                raise ValueError(
                    "MixtureOfExperts needs known feature dimensions. "
                    f"Received: inputs_shape={tuple(inputs_shape)}"
                )
            features *= dim
        dense_kwargs = dict(
            kernel_regularizer=self.kernel_regularizer,
            dtype=self.dtype_policy,
        )

        def initializer(index):
            return independent_initializer(self.kernel_initializer, index)

        if self.experts is None:
            self.expert_layers = [
                keras.layers.Dense(
                    self.expert_units,
                    activation=self.expert_activation,
                    kernel_initializer=initializer(i),
                    name=f"expert_{i}",
                    **dense_kwargs,
                )
                for i in range(self.num_experts)
            ]
        else:
            self.expert_layers = self.experts
        output_shapes = set()
        for expert in self.expert_layers:
            if not expert.built:
                expert.build(inputs_shape)
            output_shapes.add(
                tuple(expert.compute_output_shape(inputs_shape))[1:]
            )
        if len(output_shapes) != 1:
            raise ValueError(
                "All experts must give outputs of the same shape. "
                f"Received: {sorted(output_shapes)}"
            )
        self.expert_output_shape = output_shapes.pop()
        self.gate_hidden = None
        gate_inputs = features
        if self.gate_hidden_units is not None:
            self.gate_hidden = keras.layers.Dense(
                self.gate_hidden_units,
                activation="relu",
                kernel_initializer=initializer(self.num_experts),
                name="gate_hidden",
                **dense_kwargs,
            )
            self.gate_hidden.build((None, features))
            gate_inputs = self.gate_hidden_units
        self.gate_logits = keras.layers.Dense(
            self.num_experts,
            kernel_initializer=initializer(self.num_experts + 1),
            name="gate_logits",
            **dense_kwargs,
        )
        self.gate_logits.build((None, gate_inputs))
        self.assignment_totals = self.add_weight(
            name="assignment_totals",
            shape=(self.num_experts,),
            initializer="zeros",
            trainable=False,
            dtype="float32",
        )
        self.balance_step = self.add_weight(
            name="balance_step",
            shape=(),
            initializer="zeros",
            trainable=False,
            dtype="float32",
        )

    def gates(self, inputs):
        """The mixture weights `g(x)`, `(batch, num_experts)`, in float32."""
        x = ops.reshape(inputs, (ops.shape(inputs)[0], -1))
        if self.gate_hidden is not None:
            x = self.gate_hidden(x)
        logits = self.gate_logits(x)
        return ops.softmax(ops.cast(logits, "float32"), axis=-1)

    def paused_experts(self):
        """Boolean `(num_experts,)`: which experts the heuristic pauses."""
        totals = self.assignment_totals
        over = totals > self.balance_threshold * ops.mean(totals)
        if self.balance_steps is not None:
            over = ops.logical_and(over, self.balance_step < self.balance_steps)
        return over

    def call(self, inputs, training=None, return_gates=False):
        gates = self.gates(inputs)
        outputs = [
            ops.cast(expert(inputs), self.compute_dtype)
            for expert in self.expert_layers
        ]
        if self.balancing == "pause" and training:
            paused = self.paused_experts()
            outputs = [
                ops.where(paused[i], ops.stop_gradient(out), out)
                for i, out in enumerate(outputs)
            ]
            self.assignment_totals.assign(
                self.assignment_totals + ops.sum(gates, axis=0)
            )
            self.balance_step.assign(self.balance_step + 1.0)
        if self.balancing == "loss" and training:
            importance = ops.sum(gates, axis=0)
            mean = ops.mean(importance)
            cv_squared = ops.var(importance) / (ops.square(mean) + 1e-10)
            self.add_loss(self.balance_loss_weight * cv_squared)
        stacked = ops.stack(outputs, axis=1)
        weights = ops.reshape(
            ops.cast(gates, self.compute_dtype),
            (-1, self.num_experts) + (1,) * len(self.expert_output_shape),
        )
        mixture = ops.sum(stacked * weights, axis=1)
        if return_gates:
            return mixture, gates
        return mixture

    def compute_output_spec(self, inputs, training=None, return_gates=False):
        if not self.built:
            self.build(inputs.shape)
        batch = inputs.shape[0]
        mixture = keras.KerasTensor(
            (batch, *self.expert_output_shape), self.compute_dtype
        )
        if return_gates:
            return mixture, keras.KerasTensor(
                (batch, self.num_experts), "float32"
            )
        return mixture

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "expert_units": self.expert_units,
                "experts": None
                if self.experts is None
                else [
                    keras.saving.serialize_keras_object(e) for e in self.experts
                ],
                "gate_hidden_units": self.gate_hidden_units,
                "balancing": self.balancing,
                "balance_threshold": self.balance_threshold,
                "balance_steps": self.balance_steps,
                "balance_loss_weight": self.balance_loss_weight,
                "expert_activation": keras.activations.serialize(
                    self.expert_activation
                ),
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "kernel_regularizer": keras.regularizers.serialize(
                    self.kernel_regularizer
                ),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("experts") is not None:
            config["experts"] = [
                keras.saving.deserialize_keras_object(e)
                for e in config["experts"]
            ]
        return cls(**config)
