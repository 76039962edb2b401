"""What the DeepMoE example scripts share: arguments, training, reports.

The scripts next to this file import it as `_common`; it uses the public
`keras_moe` API only. It is not a script of its own.
"""

import argparse
import json
import os
import time

# The argument helpers import only the standard library, so that `--help`
# answers at once; `_imports` brings in Keras and keras_moe when a function
# needs them.
_IMPORTED = False


def _imports():
    """Imports Keras, NumPy and keras_moe as globals of this module, and
    defines the callbacks (which subclass a Keras class)."""
    global _IMPORTED, keras, np, analysis, data, GatedConv2D
    global CheckpointError, DeepMoETrainer, paper_schedule, train_two_phase
    global EpochTimer, BaselineRecord
    if _IMPORTED:
        return
    import keras
    import numpy as np

    from keras_moe import analysis
    from keras_moe import data
    from keras_moe.layers import GatedConv2D
    from keras_moe.training import CheckpointError
    from keras_moe.training import DeepMoETrainer
    from keras_moe.training import paper_schedule
    from keras_moe.training import train_two_phase

    EpochTimer, BaselineRecord = _callbacks(keras)
    _IMPORTED = True


def __getattr__(name):
    # `_common.EpochTimer` and friends, for callers outside this module.
    if name in _LAZY:
        _imports()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_LAZY = (
    "keras",
    "np",
    "analysis",
    "data",
    "GatedConv2D",
    "CheckpointError",
    "DeepMoETrainer",
    "paper_schedule",
    "train_two_phase",
    "EpochTimer",
    "BaselineRecord",
)


def compile_quickly():
    """Makes XLA compile quickly, for `--smoke` runs.

    A smoke run trains a tiny network for a few dozen steps, and on the CPU
    most of its time goes to compiling (every new weight shape compiles the
    random initializer on jax). XLA's backend optimization level 0 compiles
    several times faster, and the tiny networks run about as fast. The flag
    is added to `XLA_FLAGS` (read by jax and by tensorflow's XLA) unless
    the environment sets an optimization level already; it must run before
    the backend is imported, and changes nothing on torch.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_backend_optimization_level=0".strip()
        )


# A help text that states its default in words ends with "%(default).0s",
# which prints nothing but keeps ArgumentDefaultsHelpFormatter from adding
# "(default: None)".
def add_training_arguments(
    parser,
    joint_epochs,
    finetune_epochs,
    learning_rate,
    lr_boundaries,
    batch_size,
    lambda_gate=1.0,
    mu=1.0,
    weight_decay=1e-4,
    nesterov=True,
    output_dir="outputs",
):
    """Adds the schedule, optimizer and run options every example has."""
    parser.add_argument(
        "--joint-epochs",
        type=int,
        default=joint_epochs,
        help="n0: joint training (baselines train joint + fine-tune epochs)",
    )
    parser.add_argument(
        "--finetune-epochs",
        type=int,
        default=finetune_epochs,
        help="n1: fine-tuning with the gating frozen and lambda = mu = 0",
    )
    parser.add_argument(
        "--lambda-gate",
        type=float,
        default=lambda_gate,
        help="lambda, the weight of the gate sparsity loss L_g (the paper: "
        "0.001 to 8 on CIFAR; larger is sparser and cheaper)",
    )
    parser.add_argument(
        "--gate-reduction",
        choices=["mean", "sum"],
        default="mean",
        help="L_g as the mean gate (on the cross-entropy's scale, where "
        "the paper's lambda values apply) or as eq. 8's sum",
    )
    parser.add_argument(
        "--mu",
        type=float,
        default=mu,
        help="mu, the weight of the embedding's cross-entropy L_e",
    )
    parser.add_argument(
        "--batch-size", type=int, default=batch_size, help="batch size"
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=learning_rate,
        help="SGD learning rate at the start",
    )
    parser.add_argument(
        "--lr-boundaries",
        type=int,
        nargs="*",
        default=list(lr_boundaries),
        help="epochs at which the learning rate is divided by 10",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=weight_decay,
        help="L2 weight decay of the optimizer",
    )
    parser.add_argument(
        "--nesterov",
        action=argparse.BooleanOptionalAction,
        default=nesterov,
        help="Nesterov momentum (0.9)",
    )
    parser.add_argument(
        "--max-train-examples",
        type=int,
        help="train on a class-balanced random subset of this size "
        "(default: all)%(default).0s",
    )
    parser.add_argument(
        "--max-test-examples",
        type=int,
        help="evaluate on this many test images (default: all)%(default).0s",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of weights and data order"
    )
    parser.add_argument(
        "--output-dir",
        default=output_dir,
        help="results, figures and checkpoints; a run resumes from here",
    )


def check_preset(name, presets, option="--model"):
    if name not in presets:
        raise SystemExit(
            f"Unknown {option} {name!r}. Choose one of {sorted(presets)}."
        )


OFFLINE_HINT = (
    "Without the data, --smoke (or --dataset digits, the small dataset "
    "that ships with scikit-learn) runs offline."
)


def load_or_exit(loader, *args, hint=OFFLINE_HINT, **kwargs):
    """Calls a `keras_moe.data` loader; a missing dataset ends the script
    with the loader's explanation, and `hint` (the offline way to run the
    script), instead of a traceback."""
    _imports()
    try:
        return loader(*args, **kwargs)
    except data.DatasetNotAvailableError as error:
        raise SystemExit(
            f"error: {error}\n{hint}" if hint else f"error: {error}"
        )


def per_example(dataset, transform, batch_size):
    """Maps `transform` over the examples of a batched `tf.data` dataset."""
    import tensorflow as tf

    batches = dataset.cardinality()
    dataset = dataset.unbatch().map(
        transform, num_parallel_calls=tf.data.AUTOTUNE
    )
    dataset = dataset.batch(batch_size)
    if batches >= 0:
        # Unbatching hides the size; state it so that `fit` knows its steps.
        dataset = dataset.apply(
            tf.data.experimental.assert_cardinality(batches)
        )
    return dataset.prefetch(tf.data.AUTOTUNE)


def _callbacks(keras):
    """The callback classes, defined once Keras is imported."""

    class EpochTimer(keras.callbacks.Callback):
        """Logs the wall time of every epoch as `epoch_seconds`."""

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                logs["epoch_seconds"] = time.perf_counter() - self.start

    class BaselineRecord(keras.callbacks.Callback):
        """The configuration and history of a baseline trained with
        `BackupAndRestore`, in `<backup>/run.json`, so that a resumed run is
        checked against the configuration that made the backup and reports
        every epoch."""

        def __init__(self, directory, config):
            super().__init__()
            self.directory = directory
            self.path = os.path.join(directory, "run.json")
            self.config = json.loads(json.dumps(config))
            self.history = []

        def resume(self, args, epochs):
            """Checks the backup against this run's configuration, says what
            it resumes, and keeps the history of the epochs it holds."""
            metadata = os.path.join(self.directory, "training_metadata.json")
            if not os.path.exists(self.path):
                if os.path.exists(metadata):
                    raise _cannot_resume(
                        args,
                        self.directory,
                        "its backup has no run.json to tell which "
                        "configuration made it",
                    )
                self._write()
                return
            try:
                with open(self.path) as f:
                    record = json.load(f)
                saved, history = record["config"], record["history"]
                done = 0
                if os.path.exists(metadata):
                    with open(metadata) as f:
                        done = int(json.load(f)["epoch"])
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise _cannot_resume(
                    args, self.directory, f"its backup is damaged ({error!r})"
                ) from None
            if saved != self.config:
                raise _cannot_resume(
                    args,
                    self.directory,
                    "it was made by a run with another configuration: "
                    + _differences(saved, self.config),
                )
            self.history = [row for row in history if row["epoch"] <= done]
            if done >= epochs:
                print(
                    f"Training already complete in {self.directory}: "
                    f"{done} of {epochs} epochs done."
                )
            elif done:
                print(
                    f"Resuming from {self.directory}: epoch {done + 1} of "
                    f"{epochs} ({done} done)."
                )

        def on_epoch_end(self, epoch, logs=None):
            row = {k: float(v) for k, v in (logs or {}).items()}
            self.history.append({**row, "epoch": epoch + 1})
            self._write()

        def _write(self):
            os.makedirs(self.directory, exist_ok=True)
            with open(self.path + ".tmp", "w") as f:
                json.dump({"config": self.config, "history": self.history}, f)
            os.replace(self.path + ".tmp", self.path)

    return EpochTimer, BaselineRecord


def optimizer_fn(args):
    """A function returning a new SGD optimizer with momentum 0.9."""
    _imports()

    def make():
        optimizer = keras.optimizers.SGD(
            args.learning_rate,
            momentum=0.9,
            nesterov=args.nesterov,
            weight_decay=args.weight_decay or None,
        )
        # Decay pulls the gating heads towards zero gates: leave sparsity
        # to the L1 term.
        optimizer.exclude_from_weight_decay(var_names=["gating_heads"])
        return optimizer

    return make


def run_config(args):
    """What a resumed run must share with the run that it resumes: every
    option but the folders, and the backend (the results are measurements
    of one backend)."""
    _imports()
    config = {
        k: v
        for k, v in sorted(vars(args).items())
        if k not in ("output_dir", "data_dir")
    }
    config["backend"] = keras.backend.backend()
    return config


def _cannot_resume(args, directory, reason):
    return SystemExit(
        f"error: cannot resume the run in --output-dir {args.output_dir}: "
        f"{reason}. Choose another --output-dir, or delete {directory} to "
        "start again."
    )


def _differences(saved, given):
    return "; ".join(
        f"{key} {saved.get(key)!r} (this run: {given.get(key)!r})"
        for key in sorted(set(saved) | set(given))
        if saved.get(key) != given.get(key)
    )


def train(
    network,
    train_data,
    validation_data,
    args,
    metrics,
    gated,
    loss=None,
    ignore_class=None,
):
    """Trains a DeepMoE network in two phases, or a baseline with `fit`.

    DeepMoE networks go through `train_two_phase` (checkpoints in
    `<output-dir>/checkpoints`); baselines train for `joint + fine-tune`
    epochs with the same learning-rate schedule and `BackupAndRestore` in
    `<output-dir>/backup`. A run resumes from what the output directory
    holds, and says so, only when it was made with the same options and
    backend (`run_config`); otherwise it ends with an error that names
    `--output-dir`.

    Returns:
        `(model, history)`: the compiled model to evaluate (the
        `DeepMoETrainer` or the network) and the per-epoch history.
    """
    _imports()
    schedule = paper_schedule(args.learning_rate, args.lr_boundaries)
    verbose = 2 if args.smoke else 1
    config = run_config(args)
    if gated:
        trainer = DeepMoETrainer(
            network,
            lambda_gate=args.lambda_gate,
            mu=args.mu,
            gate_reduction=args.gate_reduction,
            ignore_class=ignore_class,
        )
        try:
            history = train_two_phase(
                trainer,
                train_data,
                joint_epochs=args.joint_epochs,
                finetune_epochs=args.finetune_epochs,
                optimizer_fn=optimizer_fn(args),
                learning_rate=schedule,
                validation_data=validation_data,
                metrics=metrics,
                checkpoint_dir=os.path.join(args.output_dir, "checkpoints"),
                config=config,
                callbacks=[EpochTimer()],
                verbose=verbose,
            )
        except CheckpointError as error:
            raise _cannot_resume(args, error.directory, error.reason) from None
        return trainer, history
    network.compile(
        optimizer=optimizer_fn(args)(),
        loss=loss or keras.losses.SparseCategoricalCrossentropy(True),
        metrics=list(metrics),
    )
    epochs = args.joint_epochs + args.finetune_epochs
    backup = os.path.join(args.output_dir, "backup")
    record = BaselineRecord(backup, config)
    record.resume(args, epochs)
    # A finished run's `fit` restores the weights and trains no epoch.
    network.fit(
        train_data,
        # The pipeline shuffles; Keras ignores (and warns about) `shuffle`
        # for datasets.
        shuffle=False,
        epochs=epochs,
        validation_data=validation_data,
        callbacks=[
            keras.callbacks.LearningRateScheduler(schedule),
            # Kept when training ends, so that a finished run is reported
            # again rather than trained again.
            keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False),
            EpochTimer(),
            record,
        ],
        verbose=verbose,
    )
    rows = record.history
    keys = sorted({k for row in rows for k in row})
    history = {k: [row.get(k, np.nan) for row in rows] for k in keys}
    return network, history


def gate_report(
    network,
    gates,
    output_dir,
    labels=None,
    class_names=None,
    flops_network=None,
):
    """Multiply-adds under the measured gates, gate statistics, figures.

    Saves `gate_density.png`, and with labels `class_gates.png` (the mean
    gate of the last gated layer's channels for every class).

    Returns:
        `(flop_report, gate_statistics)`.
    """
    _imports()
    flops = analysis.flop_report(flops_network or network, gates=gates)
    stats = analysis.gate_statistics(
        gates,
        labels,
        [
            layer.name
            for layer in network.layers
            if isinstance(layer, GatedConv2D)
        ],
    )
    analysis.plot_gate_density(
        stats, os.path.join(output_dir, "gate_density.png")
    )
    if labels is not None:
        analysis.plot_class_gate_patterns(
            stats,
            layer=-1,
            path=os.path.join(output_dir, "class_gates.png"),
            class_names=class_names,
        )
    return flops, stats


def plot_curves(history, path, panels):
    """One panel per group of history keys, against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    # Markers show a run of one epoch; the styles tell apart curves that
    # lie on each other (gate density and the FLOPs ratio often do).
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")]
    panels = [p for p in panels if any(k in history for k in p)]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False
    )
    for ax, keys in zip(axes[0], panels):
        present = [key for key in keys if key in history]
        for key, (marker, line) in zip(present, styles * len(present)):
            ax.plot(
                history["epoch"],
                history[key],
                marker=marker,
                linestyle=line,
                markersize=5,
                markerfacecolor="none",
                label=key,
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        epochs = sorted(set(history["epoch"]))
        if len(epochs) == 1:
            # The locator falls back to fractions on a range of one epoch.
            ax.set_xticks(epochs)
            ax.set_xlim(epochs[0] - 0.5, epochs[0] + 0.5)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results(args, info, network, history, flops, stats, gated, **metrics):
    """The dict written to `results.json`."""
    _imports()
    seconds = [s for s in history.get("epoch_seconds", []) if s == s]
    return {
        "model": args.model,
        "dataset": info.name,
        "backend": keras.backend.backend(),
        "train_examples": info.num_train,
        "test_examples": info.num_test,
        "joint_epochs": args.joint_epochs,
        "finetune_epochs": args.finetune_epochs,
        "lambda_gate": args.lambda_gate if gated else None,
        "gate_reduction": args.gate_reduction if gated else None,
        "mu": args.mu if gated else None,
        **metrics,
        "dense_mmacs": flops.dense_macs / 1e6,
        "effective_mmacs": flops.effective_macs / 1e6,
        "flops_ratio": flops.ratio,
        "parameters": int(network.count_params()),
        "seconds_per_epoch": float(np.mean(seconds)) if seconds else None,
        "mean_gate": None
        if stats is None
        else float(
            np.sum(stats.mean_gate * stats.channels) / np.sum(stats.channels)
        ),
        # Layers whose gates are zero for every test example.
        "collapsed_layers": None
        if stats is None
        else int(np.sum(stats.collapsed_fraction == 1.0)),
        "gate_density": None
        if stats is None
        else {
            "overall": stats.overall_density,
            "per_layer": dict(
                zip(stats.layer_names, map(float, stats.density))
            ),
        },
        "history": history,
    }


def _millions(value):
    if value >= 1e9:
        return f"{value / 1e9:.2f} G"
    return f"{value / 1e6:.1f} M"


def report(results, stats, metric_lines, output_dir, figures):
    """Writes `results.json` and prints the final report."""
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print()
    for line in metric_lines:
        print(line)
    dense, effective = results["dense_mmacs"], results["effective_mmacs"]
    print(
        f"multiply-adds per image: dense {_millions(1e6 * dense)}, effective "
        f"{_millions(1e6 * effective)} ({results['flops_ratio']:.2f} of dense)"
    )
    if stats is not None:
        print(f"gate density {stats.overall_density:.3f}; per layer:")
        print(
            "  "
            + ", ".join(
                f"{n}: {d:.2f}"
                for n, d in zip(stats.layer_names, stats.density)
            )
        )
    if results["seconds_per_epoch"]:
        print(f"{results['seconds_per_epoch']:.1f} s per epoch")
    print(f"wrote {output_dir}/results.json, {', '.join(figures)}")
