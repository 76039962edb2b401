"""The DeepMoE objective inside `model.fit`, and the two-phase schedule."""

import numbers
import warnings

import keras
import numpy as np
from keras import ops

from keras_moe.analysis.callbacks import RoutingCollapseWarning
from keras_moe.analysis.flops import cost_terms
from keras_moe.layers import ShallowEmbedding
from keras_moe.layers import SparseGatingHeads
from keras_moe.layers import gate_l1
from keras_moe.layers._validation import check_choice
from keras_moe.layers._validation import check_non_negative_number
from keras_moe.layers._validation import check_positive_int
from keras_moe.layers._validation import check_positive_number
from keras_moe.layers.sparse_gating_heads import GATE_REDUCTIONS
from keras_moe.models import deepmoe_outputs
from keras_moe.training import _checkpoint


class _LastValue(keras.metrics.Metric):
    """A metric whose result is the value of the last batch."""

    def __init__(self, name, **kwargs):
        super().__init__(name=name, **kwargs)
        self.value = self.add_variable(
            shape=(), initializer="zeros", name="value"
        )

    def update_state(self, value):
        self.value.assign(ops.cast(value, self.dtype))

    def result(self):
        return ops.convert_to_tensor(self.value)


class _Untracked:
    """Holds an object out of Keras' attribute tracking."""

    def __init__(self, value):
        self.value = value


def _broadcast_weights(sample_weight, values):
    """`sample_weight` as float32 with `values`' rank (per example or per
    pixel), averaged over the extra axes when it has more."""
    weights = ops.cast(sample_weight, "float32")
    while len(weights.shape) > len(values.shape):
        weights = ops.mean(weights, axis=-1)
    while len(weights.shape) < len(values.shape):
        weights = ops.expand_dims(weights, -1)
    return ops.broadcast_to(weights, ops.shape(values))


def _weighted_mean(values, weights=None, valid=None):
    """Keras' "sum over batch size" reduction: the sum of the (weighted)
    values over their number (the number of valid ones with a mask)."""
    count = ops.cast(ops.size(values), "float32")
    if valid is not None:
        values = values * valid
        count = ops.maximum(ops.sum(valid), 1.0)
    if weights is not None:
        values = values * weights
    return ops.sum(values) / count


class _CollapseAlarm(keras.callbacks.Callback):
    """Warns as soon as a gated layer has every gate at zero in a batch."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.trainer._collapse_reported or not logs:
            return
        collapsed = logs.get("collapsed_layers")
        if collapsed is None:
            return
        collapsed = int(round(float(ops.convert_to_numpy(collapsed))))
        if collapsed > 0:
            self.trainer._collapse_reported = True
            warnings.warn(
                f"Gate collapse at epoch {self.epoch + 1}, step {batch + 1}: "
                f"{collapsed} of {self.trainer._num_gated} gated layers have "
                "every gate at zero for the whole batch, so the network now "
                "bypasses them (the signal goes through shortcuts only, or "
                "stops). lambda_gate="
                f"{self.trainer.lambda_gate:g} with gate_reduction="
                f"{self.trainer.gate_reduction!r} is too strong for this "
                "schedule: lower it. `keras_moe.analysis.gate_statistics` "
                "shows which layers collapsed.",
                RoutingCollapseWarning,
                stacklevel=2,
            )


def _replicas_in_sync():
    """Replicas whose gradients a `tf.distribute` strategy sums; else 1."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


@keras.saving.register_keras_serializable(package="keras_moe")
class DeepMoETrainer(keras.Model):
    """Trains a DeepMoE network on `J = L_b + lambda L_g + mu L_e`.

    Wraps a DeepMoE network and applies the DeepMoE objective (eq. 7) in
    `compute_loss`, so that plain `fit` and `evaluate` train it on every
    backend. The network is any functional or Sequential model built from
    the layers of `keras_moe.layers`, a builder of `keras_moe.models`, or
    a CNN converted by `keras_moe.models.to_deepmoe`. What the objective
    needs is read from its graph (`keras_moe.models.deepmoe_outputs`):

    - the logits: the network's output, or its `"logits"` entry when it
      returns a dict;
    - the gates: the second input of every `GatedConv2D` (or a `"gates"`
      list among the outputs of a network without `GatedConv2D` layers);
    - the embedding's class probabilities, for `L_e`: the second output of
      its `ShallowEmbedding` built with `num_classes` (or an
      `"embedding_probs"` output). Without them, `mu` must be 0.

    A network without logits or gates raises a `ValueError` that says what
    it must provide. The terms:

    - `L_b`: cross entropy of the logits (per pixel for segmentation
      logits), with integer labels, weighted by `sample_weight` (and so
      by `class_weight`) as Keras' own losses are: the sum of the weighted
      losses over the number of examples (of valid pixels with
      `ignore_class`);
    - `L_g`: the gate L1 norm of eq. 8, averaged over the batch
      (`keras_moe.layers.gate_l1`). By default it is divided by the number
      of gates (`gate_reduction="mean"`), which puts it on the scale of the
      cross-entropy (about 1 for a dense network, whatever its size), as
      the paper's choice of `mu = 1` "to match the scale of the cross
      entropy loss" and its `lambda` range assume: the paper's values
      (0.001 to 8 on CIFAR) then range from nearly dense to strongly
      sparse. `gate_reduction="sum"` is eq. 8 as written: its value is
      the number of gated channels at initialization (2,016 for wide
      DeepMoE-ResNet-56), and the paper's `lambda` values switch every
      gate off within a few steps;
    - `L_e`: cross entropy of the embedding's class prediction, weighted
      per example like `L_b`.

    The logs show `loss` (J), `base_loss`, `gate_loss` (`L_g`, unweighted),
    `embedding_loss`, `gate_density` (fraction of non-zero gates),
    `flops_ratio` (effective over dense multiply-adds of the network under
    the batch's gates; a ratio, so the same in FLOPs) and
    `collapsed_layers` (gated layers whose gates are all zero for the
    whole of the last batch), next to the compiled metrics, which see the
    logits. The first time a layer collapses during `fit`, a
    `keras_moe.analysis.RoutingCollapseWarning` says so, with the epoch and
    step. `call` returns the dict of `deepmoe_outputs`; `predict` returns
    the logits.

    Changing `lambda_gate` or `mu` takes effect at the next `compile`.

    Args:
        network: the DeepMoE network.
        lambda_gate: float >= 0, the weight `lambda` of `L_g` (the paper
            uses 0.001 to 8 on CIFAR; larger values give sparser, cheaper
            networks). Defaults to 1.0.
        mu: float >= 0, the weight of `L_e` (the paper: 1 on CIFAR, 0 on
            ImageNet and for segmentation). Defaults to 1.0.
        gate_reduction: `"mean"` (default) or `"sum"`, how `L_g` reduces
            over the gates (see above).
        ignore_class: optional label left out of `L_b`, such as
            Cityscapes' 255 for segmentation.
        from_logits: bool, whether the network outputs logits (the
            default) or probabilities (a model ending in a softmax, such
            as a converted `keras.applications` model).
        **kwargs: `keras.Model` keyword arguments.

    Example:

    ```python
    network = keras_moe.models.DeepMoEResNet(20, num_classes=10)
    trainer = keras_moe.training.DeepMoETrainer(network, lambda_gate=0.01)
    trainer.compile(optimizer="sgd", metrics=["accuracy"])
    x = np.random.rand(8, 32, 32, 3).astype("float32")
    y = np.arange(8) % 10
    logs = trainer.evaluate(x, y, verbose=0, return_dict=True)
    sorted(k for k in logs if k.endswith("loss"))
    # ['base_loss', 'embedding_loss', 'gate_loss', 'loss']
    ```

    Reference:
        X. Wang et al., "Deep Mixture of Experts via Shallow Embedding",
        UAI 2019, eq. 7-8 and Procedure 1.
    """

    def __init__(
        self,
        network,
        lambda_gate=1.0,
        mu=1.0,
        gate_reduction="mean",
        ignore_class=None,
        from_logits=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # Raises the ValueError that says what a DeepMoE network needs.
        outputs = deepmoe_outputs(network)
        self.network = network
        # Not tracked: it shares every layer and weight with `network`,
        # which is what is saved.
        self._outputs = _Untracked(outputs)
        self.lambda_gate = check_non_negative_number("lambda_gate", lambda_gate)
        self.mu = check_non_negative_number("mu", mu)
        self.gate_reduction = check_choice(
            "gate_reduction", gate_reduction, GATE_REDUCTIONS
        )
        self.ignore_class = ignore_class
        if not isinstance(from_logits, bool):
            raise ValueError(
                "`from_logits` must be a bool. "
                f"Received: from_logits={from_logits!r}"
            )
        self.from_logits = from_logits
        self._has_embedding_probs = "embedding_probs" in outputs.output
        if self.mu > 0 and not self._has_embedding_probs:
            raise ValueError(
                f"`mu` > 0 weighs the embedding's cross entropy L_e, but "
                f"network {network.name!r} has no class probabilities: give "
                "its ShallowEmbedding `num_classes`, or pass mu=0. Received: "
                f"mu={mu!r}"
            )
        self.base_loss_tracker = keras.metrics.Mean(name="base_loss")
        self.gate_loss_tracker = keras.metrics.Mean(name="gate_loss")
        self.embedding_loss_tracker = keras.metrics.Mean(name="embedding_loss")
        self.gate_density_tracker = keras.metrics.Mean(name="gate_density")
        self.flops_ratio_tracker = keras.metrics.Mean(name="flops_ratio")
        self.collapsed_tracker = _LastValue(name="collapsed_layers")
        self._collapse_reported = False
        # `(lambda_gate, mu)` while phase 2 has them at zero.
        self._joint_weights = None
        self._dense_macs, self._cost_terms = cost_terms(network)
        self._num_gated = len(outputs.output["gates"])

    def call(self, inputs, training=None):
        return self._outputs.value(inputs, training=training)

    def _terms(self, y, y_pred, sample_weight=None):
        logits = ops.cast(y_pred["logits"], "float32")
        valid = None
        labels = y
        if self.ignore_class is not None:
            keep = ops.not_equal(y, self.ignore_class)
            valid = ops.cast(keep, "float32")
            labels = ops.where(keep, y, 0)
        per_item = keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=self.from_logits
        )
        weights = None
        if sample_weight is not None:
            weights = _broadcast_weights(sample_weight, per_item)
        base = _weighted_mean(per_item, weights, valid)
        gate = gate_l1(y_pred["gates"], self.gate_reduction)
        if self._has_embedding_probs:
            per_example = keras.losses.sparse_categorical_crossentropy(
                y, ops.cast(y_pred["embedding_probs"], "float32")
            )
            example_weights = None
            if sample_weight is not None:
                example_weights = _broadcast_weights(sample_weight, per_example)
            embedding = _weighted_mean(per_example, example_weights)
        else:
            embedding = ops.zeros(())
        return base, gate, embedding

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """`J = L_b + lambda L_g + mu L_e`, plus any added model losses.

        Under a `tf.distribute` strategy the value is divided by the number
        of replicas, as Keras does for its own losses: the strategy sums
        the replicas' gradients, so that the update is that of the mean
        over the global batch.
        """
        base, gate, embedding = self._terms(y, y_pred, sample_weight)
        total = base + self.lambda_gate * gate + self.mu * embedding
        for loss in self.losses:
            total = total + ops.cast(loss, "float32")
        return total / _replicas_in_sync()

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """Updates the loss terms, gate density, FLOPs ratio and metrics."""
        base, gate, embedding = self._terms(y, y_pred, sample_weight)
        self.base_loss_tracker.update_state(base)
        self.gate_loss_tracker.update_state(gate)
        self.embedding_loss_tracker.update_state(embedding)
        gates = y_pred["gates"]
        if gates:
            active = [
                ops.mean(ops.cast(ops.not_equal(g, 0), "float32"), axis=-1)
                for g in gates
            ]
            total = sum(int(g.shape[-1]) for g in gates)
            density = (
                sum(
                    ops.mean(a) * int(g.shape[-1])
                    for a, g in zip(active, gates)
                )
                / total
            )
            ratio = self._macs_ratio(gates)
            collapsed = sum(
                1.0 - ops.cast(ops.any(ops.not_equal(g, 0)), "float32")
                for g in gates
            )
        else:
            density = ratio = ops.ones(())
            collapsed = ops.zeros(())
        self.gate_density_tracker.update_state(density)
        self.flops_ratio_tracker.update_state(ratio)
        self.collapsed_tracker.update_state(collapsed)
        return super().compute_metrics(x, y, y_pred["logits"], sample_weight)

    def _macs_ratio(self, gates):
        """Effective over dense multiply-adds under the batch's gates:
        every thinned layer costs, per example, its dense multiply-adds
        times its active input and needed output fractions (per group)."""
        masks = [ops.cast(ops.not_equal(g, 0), "float32") for g in gates]

        def counts(indices, channels, groups):
            if indices is None:
                return channels / groups
            mask = masks[indices[0]]
            for index in indices[1:]:
                mask = ops.maximum(mask, masks[index])
            mask = ops.reshape(mask, (-1, groups, channels // groups))
            return ops.sum(mask, axis=-1)

        saved = 0.0
        for term in self._cost_terms:
            inputs = counts(
                None if term.input_gate is None else (term.input_gate,),
                term.in_channels,
                term.groups,
            )
            outputs = counts(term.output_gates, term.out_channels, term.groups)
            unit = term.dense_macs * term.groups
            unit /= term.in_channels * term.out_channels
            macs = ops.mean(ops.sum(inputs * outputs, axis=-1)) * unit
            saved = saved + (term.dense_macs - macs)
        return (self._dense_macs - saved) / self._dense_macs

    def fit(self, *args, callbacks=None, **kwargs):
        """`keras.Model.fit`, watching for gate collapse (see above)."""
        callbacks = list(callbacks or []) + [_CollapseAlarm(self)]
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def predict(self, x, **kwargs):
        """Runs the network; returns the logits only."""
        return super().predict(x, **kwargs)["logits"]

    def set_phase(self, phase):
        """Configures the trainer for phase 1 (joint) or 2 (fine-tune).

        Phase 2 sets `lambda_gate = mu = 0` and freezes the
        `ShallowEmbedding` and `SparseGatingHeads` layers (Procedure 1,
        line 10); phase 1 unfreezes them and gives back the `lambda_gate`
        and `mu` that phase 2 set to zero. Recompile with a new optimizer
        instance afterwards.

        Args:
            phase: 1 or 2.
        """
        if phase not in (1, 2):
            raise ValueError(f"`phase` must be 1 or 2. Received: {phase!r}")
        frozen = phase == 2
        for layer in self.network.layers:
            if isinstance(layer, (ShallowEmbedding, SparseGatingHeads)):
                layer.trainable = not frozen
        if frozen:
            if self._joint_weights is None:
                self._joint_weights = (self.lambda_gate, self.mu)
            self.lambda_gate = 0.0
            self.mu = 0.0
        elif self._joint_weights is not None:
            self.lambda_gate, self.mu = self._joint_weights
            self._joint_weights = None

    def get_config(self):
        return {
            **super().get_config(),
            "network": keras.saving.serialize_keras_object(self.network),
            "lambda_gate": self.lambda_gate,
            "mu": self.mu,
            "gate_reduction": self.gate_reduction,
            "ignore_class": self.ignore_class,
            "from_logits": self.from_logits,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["network"] = keras.saving.deserialize_keras_object(
            config["network"]
        )
        return cls(**config)


def paper_schedule(base_lr=0.1, boundaries=(150, 250), factor=0.1):
    """The paper's step learning rate, as a function of the epoch.

    Args:
        base_lr: finite float > 0, the initial learning rate.
        boundaries: epochs at which the rate is multiplied by `factor`
            (the paper's CIFAR schedule: 0.1, divided by 10 at epochs 150
            and 250 of 350).
        factor: finite float > 0, the multiplier at each boundary.

    Returns:
        A function `epoch -> learning rate`, for `train_two_phase` or
        `keras.callbacks.LearningRateScheduler`.
    """
    base_lr = check_positive_number("base_lr", base_lr)
    factor = check_positive_number("factor", factor)
    boundaries = tuple(boundaries)

    def schedule(epoch):
        return base_lr * factor ** sum(epoch >= b for b in boundaries)

    return schedule


class _EpochScheduler(keras.callbacks.Callback):
    """Sets the optimizer's learning rate from the global epoch."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def on_epoch_begin(self, epoch, logs=None):
        self.model.optimizer.learning_rate.assign(float(self.schedule(epoch)))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(
                ops.convert_to_numpy(self.model.optimizer.learning_rate)
            )


class _Checkpoint(keras.callbacks.Callback):
    """Writes a checkpoint of the trainer after every epoch."""

    def __init__(self, store, phase, manifest):
        super().__init__()
        self.store = store
        self.phase = phase
        self.manifest = manifest

    def on_epoch_end(self, epoch, logs=None):
        history = self.manifest["history"] + [
            {
                "phase": self.phase,
                "epoch": epoch + 1,
                **{k: float(v) for k, v in (logs or {}).items()},
            }
        ]
        self.manifest = {
            **self.manifest,
            "phase": self.phase,
            "epochs_done": epoch + 1,
            "history": history,
        }
        self.store.save(self.model, self.manifest)


def _check_epochs(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"`{name}` must be a non-negative integer. Received: "
            f"{name}={value!r}"
        )


def train_two_phase(
    trainer,
    train_data,
    joint_epochs,
    finetune_epochs,
    optimizer_fn=None,
    learning_rate=None,
    validation_data=None,
    metrics=("accuracy",),
    checkpoint_dir=None,
    config=None,
    batch_size=None,
    seed=None,
    callbacks=None,
    verbose="auto",
):
    """DeepMoE's two-phase training (Procedure 1) in one call.

    Phase 1 trains everything for `joint_epochs` epochs on the full
    objective. Phase 2 sets `lambda = mu = 0`, freezes the embedding network
    and the gating heads, and fine-tunes the base network for
    `finetune_epochs` epochs. The trainer is recompiled between the phases
    with a new optimizer from `optimizer_fn` (JAX needs a new optimizer
    when the trainable variables change, and TensorFlow would otherwise
    keep updating the frozen layers).

    The learning rate is set at the start of every epoch from
    `learning_rate(epoch)`, with the epoch counted across both phases, so
    the schedule runs on through phase 2 (the paper: `paper_schedule()`,
    0.1 divided by 10 at epochs 150 and 250, with 270 joint and 80
    fine-tuning epochs).

    Arrays (`train_data=(x, y)`) are shuffled at every epoch in an order
    drawn from `seed` and the epoch, so that two runs with the same seed
    see the same batches, resumed or not.

    With `checkpoint_dir`, a checkpoint is written after every epoch: the
    network's weights, the optimizer's variables (its slots such as
    momentum, its iteration count and learning rate), the states of the
    network's random generators, the phase, the epoch, the shuffling seed
    and the history. A call with the same directory resumes where the last
    run stopped, in the right phase, and says so (unless `verbose=0`); a
    run resumed with arrays ends with the weights of an uninterrupted run.
    A checkpoint is written as one unit: its files under new names first,
    then `progress.json`, which names them with their SHA-256 digests, in
    a single rename, so a run stopped at any point leaves the complete
    checkpoint of its last finished epoch. A checkpoint that is damaged,
    or was made by a run with another configuration (other epochs,
    `lambda_gate`, `mu`, `gate_reduction`, `ignore_class`, `from_logits`,
    batch size, `seed` or `config`), raises a `CheckpointError` before
    anything is trained.

    A `tf.data` pipeline or another iterable is used as given, and its
    order is its own: a `shuffle` or random augmentation starts again from
    its first epoch's draw in a new process, so a resumed run sees other
    batches than an uninterrupted one (as good a sample, not the same).
    For the same batches, pass arrays, or make the pipeline's randomness a
    function of the epoch (for example with `tf.random.stateless_*`
    operations seeded by a counter of the examples seen).

    Args:
        trainer: a `DeepMoETrainer`.
        train_data: training data: a `(x, y)` or `(x, y, sample_weight)`
            tuple of arrays, or a dataset for `fit`.
        joint_epochs: int, `n_0`.
        finetune_epochs: int, `n_1`.
        optimizer_fn: function returning a new optimizer; defaults to SGD
            with momentum 0.9 and Nesterov.
        learning_rate: optional function `epoch -> learning rate`.
        validation_data: optional validation data for `fit`.
        metrics: metrics compiled on the logits.
        checkpoint_dir: optional directory for resumable checkpoints.
        config: optional dict of JSON values that describes the run
            further (the model, the data, the schedule's parameters...):
            saved with the checkpoints, and a resumed run's must equal it.
        batch_size: int, the batch size for arrays (not for a dataset,
            which is batched already). Defaults to 32, as in `fit`.
        seed: optional int, the seed of the arrays' order. Defaults to a
            draw from NumPy's global generator (which
            `keras.utils.set_random_seed` sets), kept in the checkpoint.
        callbacks: optional extra callbacks for both phases.
        verbose: `fit` verbosity.

    Returns:
        A dict of lists: every logged value per epoch across both phases,
        plus `"phase"` and `"epoch"`.

    Raises:
        CheckpointError: when `checkpoint_dir` holds a checkpoint that is
            damaged or was made with another configuration.
    """
    _check_epochs("joint_epochs", joint_epochs)
    _check_epochs("finetune_epochs", finetune_epochs)
    if not isinstance(trainer, DeepMoETrainer):
        raise ValueError(
            f"`trainer` must be a DeepMoETrainer. Received: trainer={trainer!r}"
        )
    arrays = isinstance(train_data, tuple)
    if arrays and len(train_data) not in (2, 3):
        raise ValueError(
            "`train_data` must be a dataset, or a tuple `(x, y)` or "
            "`(x, y, sample_weight)` of arrays. Received a tuple of "
            f"{len(train_data)} items"
        )
    if batch_size is not None:
        if not arrays:
            raise ValueError(
                "`batch_size` is for arrays only: a dataset is batched "
                f"already. Received: batch_size={batch_size!r}"
            )
        check_positive_int("batch_size", batch_size)
    if seed is not None:
        if (
            isinstance(seed, bool)
            or not isinstance(seed, numbers.Integral)
            or seed < 0
        ):
            raise ValueError(
                "`seed` must be a non-negative integer. "
                f"Received: seed={seed!r}"
            )
        seed = int(seed)
    if config is not None:
        if not isinstance(config, dict):
            raise ValueError(
                f"`config` must be a dict. Received: config={config!r}"
            )
        config = _checkpoint.as_json(config, "config")
    optimizer_fn = optimizer_fn or (
        lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True)
    )
    # The weights of phase 1, also when a finished run left the trainer in
    # phase 2.
    weights = trainer._joint_weights or (trainer.lambda_gate, trainer.mu)
    total = joint_epochs + finetune_epochs
    run = {
        "joint_epochs": joint_epochs,
        "finetune_epochs": finetune_epochs,
        "lambda_gate": weights[0],
        "mu": weights[1],
        "gate_reduction": trainer.gate_reduction,
        "ignore_class": trainer.ignore_class,
        "from_logits": trainer.from_logits,
        "batch_size": (batch_size or 32) if arrays else None,
    }
    run = _checkpoint.as_json(run, "run")
    store = manifest = None
    if checkpoint_dir:
        store = _checkpoint.CheckpointDirectory(checkpoint_dir)
        manifest = store.read()
    if manifest is not None:
        store.check_configuration(manifest, run, config, seed)
        store.restore_network(manifest, trainer.network)
        seed = manifest["seed"]
        done, history = manifest["epochs_done"], list(manifest["history"])
    else:
        if seed is None:
            seed = int(np.random.randint(0, 2**31 - 1))
        done, history = 0, []
    talk = verbose not in (0, False)
    if manifest is not None and talk:
        if done >= total:
            print(
                f"Training already complete in {checkpoint_dir}: "
                f"{done} of {total} epochs done."
            )
        else:
            phase = 1 if done < joint_epochs else 2
            print(
                f"Resuming from {checkpoint_dir}: phase {phase}, epoch "
                f"{done + 1} of {total} ({done} done)."
            )
    order_callbacks = []
    if arrays:
        data = _checkpoint.ShuffledArrays(train_data, batch_size or 32, seed)
        fit_data = dict(x=data, shuffle=False)
        order_callbacks.append(_checkpoint.EpochOrder(data))
    else:
        # A dataset or generator orders its own batches: Keras ignores
        # `shuffle` there (and warns when it is left at True).
        fit_data = dict(x=train_data, shuffle=False)
    trained = False
    for phase, (start, stop) in (
        (1, (0, joint_epochs)),
        (2, (joint_epochs, total)),
    ):
        if done >= stop:
            continue
        trained = True
        trainer.set_phase(phase)
        trainer.compile(optimizer=optimizer_fn(), metrics=list(metrics))
        if manifest is not None and manifest["phase"] == phase and done > start:
            # Resumed within this phase: the phase's optimizer goes on.
            store.restore_optimizer(manifest, trainer)
        phase_callbacks = order_callbacks + list(callbacks or [])
        if learning_rate is not None:
            phase_callbacks.append(_EpochScheduler(learning_rate))
        if store is not None:
            phase_callbacks.append(
                _Checkpoint(
                    store,
                    phase,
                    {
                        "phase": phase,
                        "epochs_done": done,
                        "seed": seed,
                        "run": run,
                        "config": config,
                        "backend": keras.backend.backend(),
                        "history": history,
                    },
                )
            )
        result = trainer.fit(
            **fit_data,
            initial_epoch=max(done, start),
            epochs=stop,
            validation_data=validation_data,
            callbacks=phase_callbacks,
            verbose=verbose,
        )
        for i, epoch in enumerate(result.epoch):
            history.append(
                {
                    "phase": phase,
                    "epoch": epoch + 1,
                    **{k: float(v[i]) for k, v in result.history.items()},
                }
            )
        done = stop
    if not trained:
        # Everything was done already: leave the trainer as a finished run
        # does, ready to evaluate.
        trainer.set_phase(2 if finetune_epochs else 1)
        trainer.compile(optimizer=optimizer_fn(), metrics=list(metrics))
    keys = sorted({k for row in history for k in row})
    return {k: [row.get(k, np.nan) for row in history] for k in keys}
