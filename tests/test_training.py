import warnings

import keras
import numpy as np
import pytest

import keras_moe
from keras_moe.analysis import RoutingCollapseWarning
from keras_moe.models import DeepMoEResNet
from keras_moe.models import deepmoe_outputs
from keras_moe.training import DeepMoETrainer
from keras_moe.training import paper_schedule
from keras_moe.training import train_two_phase
from tests.testing import to_numpy


def tiny_network(seed=0):
    keras.utils.set_random_seed(seed)
    return DeepMoEResNet(
        8,
        num_classes=4,
        input_shape=(16, 16, 3),
        variant="narrow",
        embedding_layers=2,
        embedding_filters=4,
    )


def quadrant_data(n=64, seed=0):
    """Class c has a bright square in quadrant c: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    x = rng.normal(0.0, 0.3, size=(n, 16, 16, 3)).astype("float32")
    for i, c in enumerate(y):
        r, col = divmod(int(c), 2)
        x[i, 8 * r : 8 * r + 8, 8 * col : 8 * col + 8] += 1.5
    return x, y


def weights_of(network, names):
    return {
        w.path: to_numpy(w)
        for layer in network.layers
        if layer.name in names
        for w in layer.weights
    }


def test_loss_terms_and_logs():
    network = tiny_network()
    trainer = DeepMoETrainer(network, lambda_gate=0.01, mu=0.5)
    trainer.compile(optimizer="sgd", metrics=["accuracy"])
    x, y = quadrant_data(16)
    logs = trainer.evaluate(x, y, return_dict=True, verbose=0)
    out = to_numpy(deepmoe_outputs(network)(x))
    base = np.mean(
        to_numpy(
            keras.losses.sparse_categorical_crossentropy(
                y, out["logits"], from_logits=True
            )
        )
    )
    # L_g of eq. 8, divided by the number of gates (the default "mean").
    gate = sum(g.sum(-1).mean() for g in out["gates"])
    gate /= sum(g.shape[-1] for g in out["gates"])
    embedding = np.mean(-np.log(out["embedding_probs"][np.arange(16), y]))
    assert logs["base_loss"] == pytest.approx(base, rel=1e-4)
    assert logs["gate_loss"] == pytest.approx(gate, rel=1e-4)
    assert logs["embedding_loss"] == pytest.approx(embedding, rel=1e-3)
    assert logs["loss"] == pytest.approx(
        base + 0.01 * gate + 0.5 * embedding, rel=1e-4
    )
    assert logs["gate_density"] == 1.0 and logs["flops_ratio"] == 1.0
    assert logs["collapsed_layers"] == 0.0
    assert trainer.predict(x, verbose=0).shape == (16, 4)


def test_sum_reduction_is_equation_8():
    network = tiny_network()
    trainer = DeepMoETrainer(
        network, lambda_gate=0.01, mu=0.0, gate_reduction="sum"
    )
    trainer.compile(optimizer="sgd")
    x, y = quadrant_data(8)
    logs = trainer.evaluate(x, y, return_dict=True, verbose=0)
    gates = to_numpy(deepmoe_outputs(network)(x))["gates"]
    l1 = sum(np.abs(g).sum(-1).mean() for g in gates)
    assert logs["gate_loss"] == pytest.approx(l1, rel=1e-5)
    assert logs["loss"] == pytest.approx(
        logs["base_loss"] + 0.01 * l1, rel=1e-5
    )


def test_density_and_flops_ratio_follow_zero_gates():
    network = tiny_network()
    heads = network.get_layer("gating_heads")
    kernel = to_numpy(heads.heads[0].kernel)
    kernel[:, :8] = -1.0  # half of the first gated layer's gates are off
    heads.heads[0].kernel.assign(kernel)
    trainer = DeepMoETrainer(network)
    trainer.compile(optimizer="sgd")
    x, y = quadrant_data(8)
    logs = trainer.evaluate(x, y, return_dict=True, verbose=0)
    widths = [g.kernel.shape[2] for g in network.gated_layers]
    assert logs["gate_density"] == pytest.approx(
        (widths[0] / 2 + sum(widths[1:])) / sum(widths)
    )
    # By hand: the first block's gated conv (16 -> 16 channels, 3x3, on a
    # 16x16 map) reads half of its inputs, and the conv before it (through
    # batch norm and ReLU) computes only those half of its outputs.
    from keras_moe.analysis import flop_report

    assert network.gated_layers[0].name == "block1_conv2"
    saved = 2 * 0.5 * (16 * 16 * 9 * 16 * 16)
    dense = flop_report(network).dense_macs
    assert logs["flops_ratio"] == pytest.approx((dense - saved) / dense)


def test_chained_gates_thin_the_flops_ratio_per_example():
    from tests.test_flops import chain_model

    network = chain_model()
    heads = [
        layer
        for layer in network.layers
        if isinstance(layer, keras_moe.layers.SparseGatingHeads)
    ][0]
    # Gate A keeps everything; gate B keeps channel 1 for every example.
    heads.heads[0].kernel.assign(np.ones((4, 4), "float32"))
    kernel_b = -np.ones((4, 4), "float32")
    kernel_b[:, 1] = 1.0
    heads.heads[1].kernel.assign(kernel_b)
    trainer = DeepMoETrainer(network, mu=0.0)
    trainer.compile(optimizer="sgd")
    x = np.random.default_rng(0).random((4, 6, 6, 2)).astype("float32")
    y = np.zeros((4, 6, 6), "int32")
    logs = trainer.evaluate(x, y, return_dict=True, verbose=0)
    # By hand: conv 36*9*2*4 (all of its outputs feed A, whose gates are
    # on), A 36*9*4*4 computing 1 of its 4 outputs, B 36*4*3 on 1 of its
    # 4 inputs; the embedding and heads cost the same either way.
    from keras_moe.analysis import flop_report

    dense = flop_report(network).dense_macs
    saved = 0.75 * 36 * 9 * 4 * 4 + 0.75 * 36 * 4 * 3
    assert logs["flops_ratio"] == pytest.approx((dense - saved) / dense)


def fit_steps(gate_reduction, lambda_gate, steps):
    x, y = quadrant_data(16 * steps, seed=2)
    trainer = DeepMoETrainer(
        tiny_network(), lambda_gate=lambda_gate, gate_reduction=gate_reduction
    )
    trainer.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = trainer.fit(x, y, batch_size=16, epochs=1, verbose=0)
    collapse = [
        w for w in caught if issubclass(w.category, RoutingCollapseWarning)
    ]
    return history.history, collapse


def test_the_papers_largest_lambda_does_not_collapse_the_gates():
    # The paper's lambda range is [0.001, 8] with mu = 1 (section 5). With
    # L_g as the sum of eq. 8 (112 gates here, 2,016 in wide
    # DeepMoE-ResNet-56) lambda = 8 switches whole layers off within the
    # first steps of SGD 0.1; with the default normalisation it lowers
    # the gates gradually, leaving every layer alive after an epoch.
    history, collapse = fit_steps("mean", 8.0, 12)
    assert not collapse
    assert history["collapsed_layers"][-1] == 0.0
    assert history["gate_density"][-1] > 0.5
    history, collapse = fit_steps("sum", 8.0, 12)
    assert history["collapsed_layers"][-1] >= 1.0
    assert len(collapse) == 1
    message = str(collapse[0].message)
    assert "lambda_gate=8" in message and "epoch 1" in message


def test_two_phase_freezes_gating_and_continues_the_schedule():
    network = tiny_network()
    trainer = DeepMoETrainer(network, lambda_gate=0.01, mu=1.0)
    frozen_names = {"embedding", "gating_heads"}
    snapshots = {}

    class Snapshot(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            snapshots[epoch] = (
                weights_of(network, frozen_names),
                weights_of(network, {"block1_conv1"}),
            )

    history = train_two_phase(
        trainer,
        quadrant_data(32),
        joint_epochs=2,
        finetune_epochs=2,
        learning_rate=paper_schedule(0.1, boundaries=(1, 3)),
        callbacks=[Snapshot()],
        verbose=0,
    )
    assert history["phase"] == [1, 1, 2, 2]
    assert history["epoch"] == [1, 2, 3, 4]
    np.testing.assert_allclose(
        history["learning_rate"], [0.1, 0.01, 0.01, 0.001], rtol=1e-6
    )
    # Phase 2: J = L_b.
    np.testing.assert_allclose(
        history["loss"][2:], history["base_loss"][2:], rtol=1e-5
    )
    assert history["loss"][0] > history["base_loss"][0]
    for name, value in snapshots[1][0].items():
        np.testing.assert_array_equal(snapshots[3][0][name], value)
    assert any(
        not np.array_equal(snapshots[3][1][k], v)
        for k, v in snapshots[1][1].items()
    )
    # Phase 1 did train the gating.
    assert any(
        not np.array_equal(snapshots[0][0][k], v)
        for k, v in snapshots[1][0].items()
    )


class StopAt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt(f"stopped before epoch {epoch + 1}")


@pytest.mark.parametrize("stop_epoch", [1, 3])
def test_resume_after_interruption(tmp_path, stop_epoch):
    x, y = quadrant_data(32)
    kwargs = dict(
        joint_epochs=2,
        finetune_epochs=2,
        checkpoint_dir=str(tmp_path),
        verbose=0,
        learning_rate=paper_schedule(0.05, boundaries=(3,)),
    )
    trainer = DeepMoETrainer(tiny_network(), lambda_gate=0.01)
    with pytest.raises(KeyboardInterrupt):
        train_two_phase(
            trainer, (x, y), callbacks=[StopAt(stop_epoch)], **kwargs
        )
    saved = to_numpy([w for w in trainer.network.weights])
    # A new process: fresh objects, same checkpoint directory.
    resumed = DeepMoETrainer(tiny_network(seed=1), lambda_gate=0.01)
    starts = []

    class Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if not starts:
                starts.append(
                    (epoch, to_numpy([w for w in resumed.network.weights]))
                )

    history = train_two_phase(resumed, (x, y), callbacks=[Record()], **kwargs)
    assert history["epoch"] == [1, 2, 3, 4]
    assert history["phase"] == [1, 1, 2, 2]
    # It started at the first epoch not done, from the saved weights.
    assert starts[0][0] == stop_epoch
    for a, b in zip(starts[0][1], saved):
        np.testing.assert_array_equal(a, b)
    if stop_epoch == 3:
        heads = resumed.network.get_layer("gating_heads")
        assert not heads.trainable and resumed.lambda_gate == 0.0


def resumable_run(directory, callbacks=(), network_seed=0, verbose=0):
    """Two joint and two fine-tuning epochs of 4 batches, with momentum."""
    trainer = DeepMoETrainer(tiny_network(seed=network_seed), lambda_gate=0.01)
    history = train_two_phase(
        trainer,
        quadrant_data(128),
        joint_epochs=2,
        finetune_epochs=2,
        learning_rate=paper_schedule(0.05, boundaries=(3,)),
        checkpoint_dir=None if directory is None else str(directory),
        callbacks=list(callbacks),
        verbose=verbose,
    )
    return trainer, history


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    reference, expected = resumable_run(None)
    # Stopped in phase 1, then in phase 2, each time resumed by a fresh
    # process (new objects, other initial weights): the optimizer's
    # momentum and iteration count, the learning rate and the order of
    # the batches must go on as if nothing had happened.
    with pytest.raises(KeyboardInterrupt):
        resumable_run(tmp_path, [StopAt(1)])
    with pytest.raises(KeyboardInterrupt):
        resumable_run(tmp_path, [StopAt(3)], network_seed=1)
    resumed, history = resumable_run(tmp_path, network_seed=1)
    assert history["epoch"] == [1, 2, 3, 4]
    np.testing.assert_allclose(history["loss"], expected["loss"], rtol=1e-6)
    for a, b in zip(resumed.network.weights, reference.network.weights):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=a.path)


def test_a_checkpoint_is_written_as_one_unit(tmp_path, monkeypatch):
    import os

    reference, _ = resumable_run(None)
    saved = {}

    class Snapshot(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            saved[epoch + 1] = to_numpy(list(self.model.network.weights))

    # The process dies after epoch 2's weights are on disk and before its
    # progress is: the checkpoint must still be the whole of epoch 1.
    replace, progress_writes = os.replace, []

    def dying_replace(source, target):
        if os.path.basename(str(target)) == "progress.json":
            progress_writes.append(target)
            if len(progress_writes) == 2:
                raise KeyboardInterrupt("killed while saving epoch 2")
        replace(source, target)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        resumable_run(tmp_path, [Snapshot()])
    monkeypatch.setattr(os, "replace", replace)
    starts = []

    class Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if not starts:
                weights = to_numpy(list(self.model.network.weights))
                starts.append((epoch, weights))

    resumed, history = resumable_run(tmp_path, [Record()], network_seed=1)
    assert starts[0][0] == 1
    for a, b in zip(starts[0][1], saved[1]):
        np.testing.assert_array_equal(a, b)
    assert history["epoch"] == [1, 2, 3, 4]
    for a, b in zip(resumed.network.weights, reference.network.weights):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=a.path)


def short_run(directory, verbose=0, callbacks=(), **kwargs):
    """One joint and one fine-tuning step of 8 examples."""
    trainer = DeepMoETrainer(tiny_network(), lambda_gate=0.01)
    kwargs = {
        "joint_epochs": 1,
        "finetune_epochs": 1,
        "checkpoint_dir": str(directory),
        "verbose": verbose,
        **kwargs,
    }
    return train_two_phase(
        trainer, quadrant_data(8), callbacks=list(callbacks), **kwargs
    )


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A checkpoint of a run stopped after its first epoch."""
    directory = tmp_path_factory.mktemp("stopped")
    with pytest.raises(KeyboardInterrupt):
        short_run(directory, callbacks=[StopAt(1)], config={"data": "a"})
    return directory


def copy_of(directory, tmp_path):
    import shutil

    return shutil.copytree(directory, tmp_path / "checkpoint")


def damage_weights(directory, how):
    import json

    with open(directory / "progress.json") as f:
        name = json.load(f)["weights"]
    path = directory / name
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "corrupt":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()


def without_key(directory, key):
    import json

    with open(directory / "progress.json") as f:
        manifest = json.load(f)
    del manifest[key]
    (directory / "progress.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: (d / "progress.json").write_text(""), "cannot be read"),
        (
            lambda d: (d / "progress.json").write_bytes(
                (d / "progress.json").read_bytes()[:40]
            ),
            "cannot be read",
        ),
        (lambda d: without_key(d, "epochs_done"), "no 'epochs_done' entry"),
        (lambda d: damage_weights(d, "truncate"), "truncated or damaged"),
        (lambda d: damage_weights(d, "corrupt"), "truncated or damaged"),
        (lambda d: damage_weights(d, "delete"), "is missing"),
    ],
    ids=[
        "empty_progress",
        "truncated_progress",
        "missing_key",
        "truncated_weights",
        "corrupted_weights",
        "missing_weights",
    ],
)
def test_a_damaged_checkpoint_raises_one_clear_error(
    tmp_path, stopped_run, damage, match
):
    from keras_moe.training import CheckpointError

    directory = copy_of(stopped_run, tmp_path)
    damage(directory)
    with pytest.raises(CheckpointError, match=match) as error:
        short_run(directory, config={"data": "a"})
    assert error.value.directory == str(directory)
    assert "Delete this directory to start again" in str(error.value)
    assert isinstance(error.value, ValueError)


def test_a_run_with_another_configuration_is_not_resumed(tmp_path, stopped_run):
    from keras_moe.training import CheckpointError

    directory = copy_of(stopped_run, tmp_path)
    with pytest.raises(CheckpointError, match="data 'a' \\(this run: 'b'\\)"):
        short_run(directory, config={"data": "b"})
    with pytest.raises(CheckpointError, match="batch_size 32 \\(this run: 4"):
        short_run(directory, config={"data": "a"}, batch_size=4)
    with pytest.raises(CheckpointError, match="joint_epochs 1 \\(this run"):
        short_run(directory, config={"data": "a"}, joint_epochs=2)


def test_resuming_and_a_finished_run_say_so(tmp_path, stopped_run, capsys):
    directory = copy_of(stopped_run, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        short_run(
            directory, verbose=1, callbacks=[StopAt(1)], config={"data": "a"}
        )
    out = capsys.readouterr().out
    assert f"Resuming from {directory}: phase 2, epoch 2 of 2" in out
    history = short_run(directory, config={"data": "a"})
    assert history["phase"] == [1, 2]
    again = short_run(directory, verbose=1, config={"data": "a"})
    assert again == history
    out = capsys.readouterr().out
    assert f"Training already complete in {directory}: 2 of 2" in out


def test_sparsity_term_lowers_gate_density_and_keeps_accuracy():
    x, y = quadrant_data(128, seed=1)
    results = {}
    for lambda_gate in (0.0, 2.0):
        trainer = DeepMoETrainer(tiny_network(), lambda_gate=lambda_gate)
        trainer.compile(
            optimizer=keras.optimizers.Adam(0.02), metrics=["accuracy"]
        )
        trainer.fit(x, y, epochs=6, batch_size=16, verbose=0)
        results[lambda_gate] = trainer.evaluate(
            x, y, return_dict=True, verbose=0
        )
    # What this protects: the L1 term switches gates off, and so saves
    # compute. Without it nothing drives a gate to zero (the heads start
    # near 1); with it, at least a tenth of the gates (and of the gated
    # multiply-adds) must go in 48 steps, or the term does not act.
    assert results[2.0]["gate_density"] < results[0.0]["gate_density"] - 0.1
    assert results[2.0]["flops_ratio"] < results[0.0]["flops_ratio"] - 0.1
    # Fine-tuning with the gating frozen (phase 2) must keep the density
    # exactly and bring the sparse network back to solving the task,
    # which four bright quadrants make easy (chance is 0.25; a dense
    # network reaches 1.0): at most 15% errors on the training images.
    trainer.set_phase(2)
    trainer.compile(optimizer=keras.optimizers.Adam(0.01), metrics=["accuracy"])
    trainer.fit(x, y, epochs=6, batch_size=16, verbose=0)
    tuned = trainer.evaluate(x, y, return_dict=True, verbose=0)
    assert tuned["accuracy"] >= 0.85
    np.testing.assert_allclose(
        tuned["gate_density"], results[2.0]["gate_density"], atol=1e-6
    )


def test_saving_the_trainer(tmp_path):
    trainer = DeepMoETrainer(tiny_network(), lambda_gate=0.02, mu=0.3)
    x, _ = quadrant_data(4)
    trainer(x)
    path = str(tmp_path / "trainer.keras")
    trainer.save(path)
    loaded = keras.saving.load_model(path)
    assert (loaded.lambda_gate, loaded.mu) == (0.02, 0.3)
    np.testing.assert_allclose(
        to_numpy(loaded(x)["logits"]),
        to_numpy(trainer(x)["logits"]),
        atol=1e-5,
    )
    assert loaded.gate_reduction == "mean"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lambda_gate=-1.0), "lambda_gate=-1.0"),
        (dict(lambda_gate=float("nan")), "lambda_gate=nan"),
        (dict(lambda_gate=float("inf")), "lambda_gate=inf"),
        (dict(mu="x"), "mu"),
        (dict(gate_reduction="l2"), "gate_reduction='l2'"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeepMoETrainer(tiny_network(), **kwargs)


def test_invalid_schedule_arguments():
    trainer = DeepMoETrainer(tiny_network())
    with pytest.raises(ValueError, match="joint_epochs=-1"):
        train_two_phase(trainer, quadrant_data(4), -1, 1)
    with pytest.raises(ValueError, match="base_lr=nan"):
        paper_schedule(float("nan"))
    with pytest.raises(ValueError, match="factor=inf"):
        paper_schedule(0.1, factor=float("inf"))


MIRRORED_SCRIPT = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
from keras_moe.training import DeepMoETrainer
from tests.test_training import quadrant_data, tiny_network

def train(strategy, batch_size, accumulation):
    with strategy.scope():
        trainer = DeepMoETrainer(tiny_network(), lambda_gate=0.01)
        trainer.compile(optimizer=keras.optimizers.SGD(
            0.1, gradient_accumulation_steps=accumulation))
    x, y = quadrant_data(32)
    history = trainer.fit(x, y, batch_size=batch_size, epochs=2,
                          shuffle=False, verbose=0).history
    kernel = trainer.network.get_layer("logits").kernel.numpy()
    return history["loss"], float(np.abs(kernel).sum())

mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
# Each replica normalises its own half of the batch: one device with the
# gradients of the two halves accumulated computes the same update.
one = train(tf.distribute.get_strategy(), 8, 2)
two = train(mirrored, 16, None)
print(json.dumps({"one": one, "two": two}))
"""


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.distribute only"
)
def test_mirrored_strategy_averages_the_replicas_gradients():
    import json
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        env={**os.environ, "KERAS_BACKEND": "tensorflow"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # Summed, unscaled replica gradients would double the update and the
    # logged loss.
    np.testing.assert_allclose(out["two"][0], out["one"][0], rtol=1e-4)
    assert out["two"][1] == pytest.approx(out["one"][1], rel=1e-4)


def test_sample_weight_weighs_the_base_and_embedding_losses():
    network = tiny_network()
    trainer = DeepMoETrainer(network, lambda_gate=0.0, mu=1.0)
    trainer.compile(optimizer="sgd")
    x, y = quadrant_data(8)
    weights = np.array([1, 0, 1, 0, 2, 0, 1, 0], "float32")
    logs = trainer.evaluate(
        x, y, sample_weight=weights, batch_size=8, return_dict=True, verbose=0
    )
    out = to_numpy(deepmoe_outputs(network)(x))
    logits = out["logits"] - out["logits"].max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    base = -log_probs[np.arange(8), y]
    embedding = -np.log(out["embedding_probs"][np.arange(8), y])
    # Keras' reduction: the weighted sum over the number of examples.
    assert logs["base_loss"] == pytest.approx(np.sum(weights * base) / 8, 1e-4)
    assert logs["embedding_loss"] == pytest.approx(
        np.sum(weights * embedding) / 8, 1e-4
    )
    unweighted = trainer.evaluate(x, y, return_dict=True, verbose=0)
    assert unweighted["base_loss"] == pytest.approx(np.mean(base), 1e-4)
    # class_weight goes through the same path during fit.
    history = trainer.fit(
        x, y, class_weight={0: 1.0, 1: 0.0, 2: 0.0, 3: 0.0}, verbose=0
    ).history
    assert np.isfinite(history["loss"][0])


def test_a_network_without_gates_is_refused_at_construction():
    plain = DeepMoEResNet(
        8, num_classes=4, input_shape=(16, 16, 3), gated=False
    )
    with pytest.raises(ValueError, match="no gates"):
        DeepMoETrainer(plain)


def test_mu_needs_class_probabilities():
    from tests.test_flops import chain_model

    with pytest.raises(ValueError, match="mu=1.0"):
        DeepMoETrainer(chain_model(), mu=1.0)


def test_functional_model_from_the_layers_trains():
    # A functional DeepMoE network returning only its logits: the trainer
    # finds the gates and the embedding's class probabilities in the graph.
    from keras_moe.layers import GatedConv2D
    from keras_moe.layers import ShallowEmbedding
    from keras_moe.layers import SparseGatingHeads

    inputs = keras.Input((16, 16, 3))
    e, _ = ShallowEmbedding(4, num_layers=2, filters=4, num_classes=4)(inputs)
    g1, g2 = SparseGatingHeads([8, 8])(e)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = GatedConv2D(8, 3, padding="same", activation="relu")(x, g1)
    x = GatedConv2D(8, 3, padding="same", activation="relu")(x, g2)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4)(x))
    trainer = DeepMoETrainer(model, lambda_gate=1.0)
    trainer.compile(optimizer="adam", metrics=["accuracy"])
    x, y = quadrant_data(32)
    history = trainer.fit(x, y, epochs=2, batch_size=16, verbose=0).history
    assert history["gate_loss"][0] > 0 and history["embedding_loss"][0] > 0
    assert history["loss"][-1] < history["loss"][0]
