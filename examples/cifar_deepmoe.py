"""Train a DeepMoE-ResNet on CIFAR with the paper's two-phase schedule.

    KERAS_BACKEND=jax python examples/cifar_deepmoe.py            # CIFAR-10
    KERAS_BACKEND=jax python examples/cifar_deepmoe.py --smoke    # seconds
    python examples/cifar_deepmoe.py --dataset digits             # offline
    python examples/cifar_deepmoe.py --data-dir path/to/cifar10-images

The model is a preset of `keras_moe.models.DeepMoEResNet` (wide or narrow
DeepMoE-ResNet-20/56/110, or the plain ResNet baseline). DeepMoE models are
trained with `keras_moe.training.train_two_phase` (joint training, then the
gating frozen and lambda = mu = 0), baselines with plain `fit` for the same
number of epochs and the same learning-rate schedule. Checkpoints go to the
output directory after every epoch; running the same command again resumes.

The final report gives the test accuracy, dense and effective FLOPs, gate
density per layer and time per epoch, and saves `results.json`,
`curves.png`, `gate_density.png` and `class_gates.png` (mean gate of the
last gated layer's channels for every class) in the output directory.
"""

import argparse
import json
import os
import time

import keras
import numpy as np

from keras_moe import analysis
from keras_moe import data
from keras_moe.models import DEEPMOE_RESNET_PRESETS
from keras_moe.models import DeepMoEResNet
from keras_moe.training import DeepMoETrainer
from keras_moe.training import paper_schedule
from keras_moe.training import train_two_phase


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cifar_presets = sorted(p for p in DEEPMOE_RESNET_PRESETS if "cifar" in p)
    parser.add_argument(
        "--model",
        default="wide_deepmoe_resnet56_cifar10",
        help=f"a preset: {', '.join(cifar_presets)}",
    )
    parser.add_argument(
        "--dataset",
        default="cifar10",
        choices=["cifar10", "cifar100", "image_folder", "digits"],
        help="digits: the small dataset that ships with scikit-learn, for "
        "machines without data or network",
    )
    parser.add_argument(
        "--data-dir",
        help="tensorflow-datasets directory, or an image folder with "
        "train/<class>/* and test/<class>/*",
    )
    parser.add_argument("--joint-epochs", type=int, default=270)
    parser.add_argument("--finetune-epochs", type=int, default=80)
    parser.add_argument("--lambda-gate", type=float, default=1e-3)
    parser.add_argument("--mu", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument(
        "--lr-boundaries",
        type=int,
        nargs="*",
        default=[150, 250],
        help="epochs at which the learning rate is divided by 10",
    )
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--max-train-examples", type=int)
    parser.add_argument("--max-test-examples", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="outputs/cifar_deepmoe")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny run on the digits dataset, in seconds",
    )
    return parser.parse_args(argv)


def load(args):
    kwargs = dict(
        batch_size=args.batch_size,
        max_train_examples=args.max_train_examples,
        max_test_examples=args.max_test_examples,
        seed=args.seed,
    )
    name = args.dataset
    if args.data_dir and name in ("cifar10", "cifar100"):
        loader = data.load_cifar10 if name == "cifar10" else data.load_cifar100
        return loader(args.data_dir, **kwargs)
    return data.load_dataset(name, data_dir=args.data_dir, **kwargs)


def build(args, info):
    config = dict(DEEPMOE_RESNET_PRESETS[args.model])
    config.update(num_classes=info.num_classes, input_shape=info.image_shape)
    if args.smoke:
        config.update(depth=8, embedding_layers=2, embedding_filters=8)
    return DeepMoEResNet(**config)


class EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self.start


def optimizer_fn(args):
    def make():
        optimizer = keras.optimizers.SGD(
            args.learning_rate,
            momentum=0.9,
            nesterov=True,
            weight_decay=args.weight_decay or None,
        )
        # Decay pulls the gating heads towards zero gates: leave sparsity
        # to the L1 term.
        optimizer.exclude_from_weight_decay(var_names=["gating_heads"])
        return optimizer

    return make


def train_deepmoe(network, train, test, args, schedule):
    trainer = DeepMoETrainer(network, lambda_gate=args.lambda_gate, mu=args.mu)
    history = train_two_phase(
        trainer,
        train,
        joint_epochs=args.joint_epochs,
        finetune_epochs=args.finetune_epochs,
        optimizer_fn=optimizer_fn(args),
        learning_rate=schedule,
        validation_data=test,
        checkpoint_dir=os.path.join(args.output_dir, "checkpoints"),
        callbacks=[EpochTimer()],
        verbose=2 if args.smoke else 1,
    )
    logs = trainer.evaluate(test, return_dict=True, verbose=0)
    return trainer, history, logs


def train_baseline(network, train, test, args, schedule):
    network.compile(
        optimizer=optimizer_fn(args)(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    epochs = args.joint_epochs + args.finetune_epochs
    result = network.fit(
        train,
        epochs=epochs,
        validation_data=test,
        callbacks=[
            keras.callbacks.LearningRateScheduler(schedule),
            keras.callbacks.BackupAndRestore(
                os.path.join(args.output_dir, "backup")
            ),
            EpochTimer(),
        ],
        verbose=2 if args.smoke else 1,
    )
    history = {k: list(map(float, v)) for k, v in result.history.items()}
    history["epoch"] = [e + 1 for e in result.epoch]
    logs = network.evaluate(test, return_dict=True, verbose=0)
    return network, history, logs


def plot_curves(history, path, gated):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("accuracy", "val_accuracy"), ("loss", "val_loss")]
    if gated:
        panels.append(("gate_density", "flops_ratio"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5))
    for ax, keys in zip(axes, panels):
        for key in keys:
            if key in history:
                ax.plot(history["epoch"], history[key], label=key)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.model not in DEEPMOE_RESNET_PRESETS:
        raise SystemExit(
            f"Unknown --model {args.model!r}. Choose one of "
            f"{sorted(DEEPMOE_RESNET_PRESETS)}."
        )
    if args.smoke:
        args.dataset, args.batch_size = "digits", 32
        args.joint_epochs, args.finetune_epochs = 1, 1
        args.max_train_examples = args.max_train_examples or 256
        args.max_test_examples = args.max_test_examples or 128
        args.lr_boundaries = [1]
    keras.utils.set_random_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    try:
        train, test, info = load(args)
    except data.DatasetNotAvailableError as error:
        raise SystemExit(f"error: {error}")
    network = build(args, info)
    schedule = paper_schedule(args.learning_rate, args.lr_boundaries)
    gated = DEEPMOE_RESNET_PRESETS[args.model].get("gated", True)
    print(
        f"{args.model} on {info.name} ({info.num_train} training, "
        f"{info.num_test} test images), backend {keras.backend.backend()}"
    )
    if gated:
        model, history, logs = train_deepmoe(
            network, train, test, args, schedule
        )
        gates, labels = analysis.collect_gates(network, test)
        flops = analysis.flop_report(network, gates=gates)
        stats = analysis.gate_statistics(
            gates, labels, [layer.name for layer in network.gated_layers]
        )
        analysis.plot_gate_density(
            stats, os.path.join(args.output_dir, "gate_density.png")
        )
        analysis.plot_class_gate_patterns(
            stats,
            layer=-1,
            path=os.path.join(args.output_dir, "class_gates.png"),
            class_names=info.class_names,
        )
    else:
        model, history, logs = train_baseline(
            network, train, test, args, schedule
        )
        flops = analysis.flop_report(network)
        stats = None
    plot_curves(history, os.path.join(args.output_dir, "curves.png"), gated)
    seconds = [s for s in history.get("epoch_seconds", []) if s == s]
    results = {
        "model": args.model,
        "dataset": info.name,
        "backend": keras.backend.backend(),
        "train_examples": info.num_train,
        "test_examples": info.num_test,
        "joint_epochs": args.joint_epochs,
        "finetune_epochs": args.finetune_epochs,
        "lambda_gate": args.lambda_gate if gated else None,
        "mu": args.mu if gated else None,
        "test_accuracy": float(logs["accuracy"]),
        "dense_mflops": flops.dense / 1e6,
        "effective_mflops": flops.effective / 1e6,
        "flops_ratio": flops.ratio,
        "parameters": int(network.count_params()),
        "seconds_per_epoch": float(np.mean(seconds)) if seconds else None,
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
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n{args.model}: test accuracy {results['test_accuracy']:.4f}")
    print(
        f"FLOPs per image: dense {results['dense_mflops']:.1f} M, "
        f"effective {results['effective_mflops']:.1f} M "
        f"({results['flops_ratio']:.2f} of dense)"
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
    print(f"wrote {args.output_dir}/results.json, curves.png")
    return results


if __name__ == "__main__":
    main()
