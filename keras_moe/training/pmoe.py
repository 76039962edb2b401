"""pMoE separate training: routers first (eq. 6), then the experts."""

import keras
import numpy as np
from keras import ops

from keras_moe.layers import PatchExpertChoiceMoE


def _find_pmoe_layer(model, layer):
    if isinstance(layer, PatchExpertChoiceMoE):
        return layer
    if isinstance(layer, str):
        return model.get_layer(layer)
    if layer is not None:
        raise ValueError(
            "`layer` must be a PatchExpertChoiceMoE, its name, or None. "
            f"Received: layer={layer!r}"
        )
    found = []
    pending = list(getattr(model, "layers", []))
    while pending:
        sub = pending.pop()
        if isinstance(sub, PatchExpertChoiceMoE):
            found.append(sub)
        else:
            pending.extend(getattr(sub, "layers", []))
    if len(found) != 1:
        raise ValueError(
            "The model must hold exactly one PatchExpertChoiceMoE layer, or "
            f"pass `layer`. Found {len(found)}."
        )
    return found[0]


@keras.saving.register_keras_serializable(package="keras_moe")
class RouterTrainer(keras.Model):
    """Trains the routers of a pMoE network with the objective of eq. 6.

    Separate training of pMoE learns the routers first, on their own, and
    then freezes them while the experts learn with hard gates. For two
    experts and labels `y_i` in {+1, -1}, the routers `w_1, w_2` minimise

    `-1/N_r * sum_i y_i <w_1 - w_2, sum_j x_i^(j)>`  (eq. 6),

    which turns `w_1` towards the patches of class +1 and `w_2` towards
    those of class -1. Here router `s` belongs to class `s`: with integer
    labels in {0, 1}, router 1 plays `w_1` (class 1 is `y = +1`). With more
    classes (appendix M.1, `num_experts == num_classes`, an even number),
    the classes are paired `(0, 1), (2, 3), ...` and each pair's routers
    are trained on that pair's samples by the same objective; the pairs
    share no weights, so they are trained together.

    The model maps inputs to the router scores `<w_s, sum_j x^(j)>`,
    `(batch, num_experts)`, computed through the network's own layers up to
    the pMoE layer, and its loss is eq. 6: `fit` and `evaluate` work as
    usual on integer labels. The loss is linear and unbounded below: its
    value says little, what counts is which patches each router ranks
    first (see `keras_moe.analysis.discriminative_routing`).

    Only the routing kernels should change: `train_routers` freezes every
    other weight of the network while it fits (or set the `trainable`
    flags yourself before `compile`).

    Args:
        network: a model holding one `PatchExpertChoiceMoE` layer.
        layer: optional, the `PatchExpertChoiceMoE` (or its name) whose
            routers to train, when the network holds several.
        **kwargs: `keras.Model` keyword arguments.

    Example:

    ```python
    network = keras_moe.models.TwoLayerPMoE(
        num_experts=2, neurons_per_expert=4, patches_per_expert=2,
        patch_size=8, input_shape=(32, 32, 1), gating="hard")
    trainer = keras_moe.training.RouterTrainer(network)
    trainer.compile(optimizer="sgd")
    x = np.random.rand(4, 32, 32, 1).astype("float32")
    tuple(trainer(x).shape)  # (4, 2)
    logs = trainer.evaluate(x, np.array([0, 1, 0, 1]), verbose=0,
                            return_dict=True)
    sorted(logs)  # ['loss']
    ```

    Reference:
        M. N. R. Chowdhury et al., "Patch-level Routing in Mixture-of-Experts
        is Provably Sample-efficient for Convolutional Neural Networks",
        ICML 2023, section 3.2, eq. 6; appendix M.1.
    """

    def __init__(self, network, layer=None, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.pmoe_layer = _find_pmoe_layer(network, layer)
        if self.pmoe_layer.num_experts % 2:
            raise ValueError(
                "Separate training pairs the routers (one per class), so "
                "the layer needs an even number of experts. Received: "
                f"num_experts={self.pmoe_layer.num_experts}"
            )
        inputs = network.inputs
        self.features = keras.Model(
            inputs[0] if len(inputs) == 1 else inputs, self.pmoe_layer.input
        )

    def call(self, inputs, training=None):
        # The layers before the routers are frozen: run them in inference
        # mode, so that batch normalization statistics stay as they are.
        features = self.features(inputs, training=False)
        routing_values = self.pmoe_layer.route(features)["routing_values"]
        return ops.sum(routing_values, axis=1)

    def _margins(self, y, scores):
        """Own router's score minus its partner's, per sample."""
        labels = ops.reshape(ops.cast(y, "int32"), (-1, 1))
        # The partner of class 2i is 2i + 1 and the other way round.
        partners = labels + 1 - 2 * (labels % 2)
        own = ops.take_along_axis(scores, labels, axis=1)
        other = ops.take_along_axis(scores, partners, axis=1)
        return ops.reshape(own - other, (-1,))

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        margins = self._margins(y, ops.cast(y_pred, "float32"))
        if sample_weight is None:
            return -ops.mean(margins)
        weights = ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
        return -ops.sum(margins * weights) / ops.maximum(ops.sum(weights), 1)

    def get_config(self):
        return {
            **super().get_config(),
            "network": keras.saving.serialize_keras_object(self.network),
            "layer": self.pmoe_layer.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["network"] = keras.saving.deserialize_keras_object(
            config["network"]
        )
        return cls(**config)


def train_routers(
    network,
    x,
    y=None,
    layer=None,
    epochs=100,
    batch_size=20,
    optimizer=None,
    freeze=True,
    **fit_kwargs,
):
    """Step 1 of separate training: learns the routers, then freezes them.

    Fits a `RouterTrainer` (eq. 6) on `(x, y)` with every weight of the
    network except the routing kernels frozen, then restores the other
    weights' `trainable` flags and, with `freeze=True`, leaves the routers
    frozen. Then compile the network (with a new optimizer) and `fit` it:
    the experts learn behind fixed routers. Use a network with
    `gating="hard"` (eq. 3) for the paper's separate training.

    Args:
        network: a model holding one `PatchExpertChoiceMoE` layer.
        x: inputs: an array, or a dataset of `(inputs, labels)`.
        y: integer labels in `[0, num_experts)` when `x` is an array.
        layer: optional, the `PatchExpertChoiceMoE` (or its name).
        epochs: int, epochs of router training (the paper: 100).
        batch_size: int, when `x` is an array (the paper: 20).
        optimizer: a Keras optimizer. Defaults to SGD with learning rate
            0.2, the paper's.
        freeze: bool, whether the routers stay frozen afterwards.
        **fit_kwargs: further `fit` arguments, such as `verbose`,
            `callbacks` or `validation_data`.

    Returns:
        The `History` of the router training.

    Example:

    ```python
    network = keras_moe.models.TwoLayerPMoE(
        num_experts=2, neurons_per_expert=4, patches_per_expert=2,
        patch_size=8, input_shape=(32, 32, 1), gating="hard")
    x = np.random.rand(8, 32, 32, 1).astype("float32")
    y = np.arange(8) % 2
    history = keras_moe.training.train_routers(network, x, y, epochs=2,
                                               verbose=0)
    network.pmoe_layer.router.trainable  # False
    network.compile(optimizer="sgd", loss="binary_crossentropy")
    ```

    Reference:
        M. N. R. Chowdhury et al., "Patch-level Routing in Mixture-of-Experts
        is Provably Sample-efficient for Convolutional Neural Networks",
        ICML 2023, section 3.2 (separate training) and appendix M.1.
    """
    trainer = RouterTrainer(network, layer=layer)
    pmoe_layer = trainer.pmoe_layer
    if y is not None:
        labels = np.asarray(keras.ops.convert_to_numpy(y)).reshape(-1)
        if labels.size and (
            labels.min() < 0 or labels.max() >= pmoe_layer.num_experts
        ):
            raise ValueError(
                "Router training needs one router per class: labels must "
                f"lie in [0, num_experts={pmoe_layer.num_experts}). "
                f"Received labels in [{labels.min()}, {labels.max()}]"
            )
    router = pmoe_layer.router
    others = [v for v in network.trainable_weights if v is not router]
    for variable in others:
        variable.trainable = False
    router.trainable = True
    try:
        trainer.compile(
            optimizer=optimizer
            if optimizer is not None
            else keras.optimizers.SGD(learning_rate=0.2)
        )
        if y is not None:
            fit_kwargs["batch_size"] = batch_size
        history = trainer.fit(x, y, epochs=epochs, **fit_kwargs)
    finally:
        for variable in others:
            variable.trainable = True
        router.trainable = not freeze
    return history
