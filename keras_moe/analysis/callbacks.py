"""A Keras callback that watches routing during training."""

import warnings

import keras
import numpy as np

from keras_moe.analysis import routing


class RoutingCollapseWarning(UserWarning):
    """Warned when gates or experts collapse during training."""


def _find_layers(model, class_name):
    """Layers of a class in a model and its nested functional models."""
    found = []
    for layer in getattr(model, "layers", []):
        if type(layer).__name__ == class_name:
            found.append(layer)
        elif hasattr(layer, "layers"):
            found.extend(_find_layers(layer, class_name))
    return found


class RoutingMonitor(keras.callbacks.Callback):
    """Logs routing statistics during `fit` and warns when routing collapses.

    At the end of every `every_n_epochs`-th epoch the callback runs the model
    on `data` (a fixed, small held-out set) and adds scalars to the epoch's
    logs, so they appear in the progress bar, in `History` and in
    `keras.callbacks.TensorBoard` (place the monitor before TensorBoard in
    the callback list):

    - DeepMoE gates (of the `GatedConv2D` layers of the model, or of the
      network of a `DeepMoETrainer`; or given by `gate_fn`):
      `routing/gate_density` and, per gated layer,
      `routing/gate_density/<layer>` and `routing/dead_channels/<layer>`.
    - `MixtureOfExperts` layers: `routing/<layer>/expert_<i>_load`, each
      expert's mean gate.
    - `PatchExpertChoiceMoE` layers: `routing/<layer>/coverage`,
      `.../mean_overlap` and `.../min_position_entropy`.

    It warns (`RoutingCollapseWarning`) on:

    - gate collapse: a gated layer whose gates are all zero for more than
      `collapse_threshold` of the inputs, which cuts the signal there;
    - expert collapse: a `MixtureOfExperts` expert whose mean gate is below
      `expert_collapse_threshold / num_experts` (chosen for almost
      nothing);
    - redundant patch experts: two experts of a `PatchExpertChoiceMoE` whose
      selected patches overlap by more than `overlap_threshold` (expert
      choice gives every expert the same load, so this is how its routing
      collapses).

    Args:
        data: inputs, an `(x, y)` tuple of arrays or a dataset of batches;
            keep it small (a few hundred examples).
        gate_fn: optional function from a batch of inputs to the list of
            gate tensors, for gates that are not inputs of `GatedConv2D`
            layers.
        every_n_epochs: int, how often to compute the statistics.
        collapse_threshold: float in (0, 1].
        expert_collapse_threshold: float in (0, 1].
        overlap_threshold: float in (0, 1].
        batch_size: batch size used for arrays.
        raise_on_collapse: bool; if `True`, stop training (by setting
            `model.stop_training`) after warning.

    Example:

    ```python
    monitor = keras_moe.analysis.RoutingMonitor(np.zeros((8, 4)))
    monitor.every_n_epochs  # 1
    ```
    """

    def __init__(
        self,
        data,
        gate_fn=None,
        every_n_epochs=1,
        collapse_threshold=0.5,
        expert_collapse_threshold=0.1,
        overlap_threshold=0.95,
        batch_size=128,
        raise_on_collapse=False,
    ):
        super().__init__()
        if not isinstance(every_n_epochs, int) or every_n_epochs <= 0:
            raise ValueError(
                "`every_n_epochs` must be a positive integer. "
                f"Received: every_n_epochs={every_n_epochs!r}"
            )
        for name, value in (
            ("collapse_threshold", collapse_threshold),
            ("expert_collapse_threshold", expert_collapse_threshold),
            ("overlap_threshold", overlap_threshold),
        ):
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(
                    f"`{name}` must be in (0, 1]. Received: {name}={value!r}"
                )
        self.data = data
        self.gate_fn = gate_fn
        self.every_n_epochs = every_n_epochs
        self.collapse_threshold = collapse_threshold
        self.expert_collapse_threshold = expert_collapse_threshold
        self.overlap_threshold = overlap_threshold
        self.batch_size = batch_size
        self.raise_on_collapse = raise_on_collapse
        self.history = []

    def _warn(self, message):
        warnings.warn(message, RoutingCollapseWarning, stacklevel=2)
        if self.raise_on_collapse:
            self.model.stop_training = True

    def compute(self):
        """Computes the statistics now; returns `(scalars, problems)`."""
        scalars, problems = {}, []
        scalars.update(self._gate_scalars(problems))
        for layer in _find_layers(self.model, "MixtureOfExperts"):
            scalars.update(self._mixture_scalars(layer, problems))
        for layer in _find_layers(self.model, "PatchExpertChoiceMoE"):
            scalars.update(self._patch_scalars(layer, problems))
        return scalars, problems

    def _gate_scalars(self, problems):
        gate_fn = self.gate_fn
        if gate_fn is None:
            try:
                gate_fn = routing.gate_function(self.model)
            except ValueError:
                return {}  # no DeepMoE gates in this model
        gates, _ = routing.collect_gates(
            self.model,
            self.data,
            gate_fn=gate_fn,
            batch_size=self.batch_size,
        )
        stats = routing.gate_statistics(gates)
        for name, fraction in zip(stats.layer_names, stats.collapsed_fraction):
            if fraction > self.collapse_threshold:
                problems.append(
                    f"Gate collapse: every gate of gated {name} is zero for "
                    f"{fraction:.0%} of the monitored inputs, so that layer "
                    "passes no signal for them. Lower the sparsity weight "
                    "lambda or the learning rate."
                )
        return {f"routing/{k}": v for k, v in stats.as_scalars().items()}

    def _mixture_scalars(self, layer, problems):
        features = keras.Model(self.model.input, layer.input)
        gates = []
        for x, _ in routing._batches(self.data, self.batch_size):
            inputs = features(x, training=False)
            gates.append(keras.ops.convert_to_numpy(layer.gates(inputs)))
        load = routing.expert_load(np.concatenate(gates))
        floor = self.expert_collapse_threshold / layer.num_experts
        for i, share in enumerate(load["mean_gate"]):
            if share < floor:
                problems.append(
                    f"Expert collapse: expert {i} of {layer.name} has a "
                    f"mean gate of {share:.3f} (uniform would be "
                    f"{1 / layer.num_experts:.3f}); it is chosen for almost "
                    "nothing. Consider balancing='pause' or 'loss'."
                )
        return {
            f"routing/{layer.name}/expert_{i}_load": float(v)
            for i, v in enumerate(load["mean_gate"])
        }

    def _patch_scalars(self, layer, problems):
        decision, _ = routing.collect_routing(
            self.model, layer, self.data, batch_size=self.batch_size
        )
        stats = routing.patch_routing_statistics(
            decision["indices"], decision["gates"], layer.grid_shape
        )
        k = layer.num_experts
        for i in range(k):
            for j in range(i + 1, k):
                if stats.overlap[i, j] > self.overlap_threshold:
                    problems.append(
                        f"Redundant experts: experts {i} and {j} of "
                        f"{layer.name} select the same patches "
                        f"({stats.overlap[i, j]:.0%} overlap)."
                    )
        return stats.as_scalars(prefix=f"routing/{layer.name}")

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        scalars, problems = self.compute()
        self.history.append({"epoch": epoch, **scalars})
        if logs is not None:
            logs.update(scalars)
        for problem in problems:
            self._warn(f"Epoch {epoch + 1}: {problem}")
