"""Stacked mixtures of experts on MNIST against a dense network of equal size.

Two `MixtureOfExperts` layers, each with its own gating network, then a
softmax classifier (Eigen, Ranzato and Sutskever 2014). The script trains it
and a dense network with the same number of parameters, reports both test
accuracies and how the experts specialise (the mean gate of each expert for
each digit class), and saves a heat map of that specialisation.

    KERAS_BACKEND=jax python examples/mnist_stacked_moe.py \\
        --mnist-path path/to/mnist.npz

Without `--mnist-path` the script uses `keras.datasets.mnist`, which needs
the file in the Keras cache or a network connection. `--smoke` runs a tiny
configuration on the digits that ship with scikit-learn, in about half a
minute.
"""

import argparse
import json
import math
import os
import time

import _common


def _imports():
    """Keras, NumPy and keras_moe, imported once the arguments are parsed."""
    global keras, np, MixtureOfExperts
    import keras
    import numpy as np

    from keras_moe.layers import MixtureOfExperts


# A help text that states its default in words ends with "%(default).0s",
# which prints nothing but keeps ArgumentDefaultsHelpFormatter from adding
# "(default: None)".
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--mnist-path",
        help="path to a local mnist.npz (default: keras.datasets.mnist, "
        "from the Keras cache or the network)%(default).0s",
    )
    parser.add_argument(
        "--experts", type=int, default=4, help="experts in each MoE layer"
    )
    parser.add_argument(
        "--expert-units",
        type=int,
        default=128,
        help="output units of each expert",
    )
    parser.add_argument(
        "--gate-hidden-units",
        type=int,
        default=64,
        help="hidden units of each layer's gating network",
    )
    parser.add_argument(
        "--balancing",
        choices=["none", "pause", "loss"],
        default="pause",
        help="how the experts' load is balanced: pause (the paper's "
        "heuristic), an auxiliary loss, or none",
    )
    parser.add_argument(
        "--balance-steps",
        type=int,
        default=500,
        help="training batches during which the pause heuristic acts",
    )
    parser.add_argument(
        "--epochs", type=int, default=10, help="training epochs"
    )
    parser.add_argument(
        "--batch-size", type=int, default=128, help="batch size"
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=1e-3,
        help="Adam learning rate",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of weights and data order"
    )
    parser.add_argument(
        "--output-dir",
        default="outputs/mnist_stacked_moe",
        help="results.json and specialisation.png",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny run on scikit-learn digits"
    )
    return parser.parse_args(argv)


def load_data(args):
    """Flattened images in [0, 1] and integer labels."""
    if args.smoke:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.data / 16.0).astype("float32")
        y = digits.target.astype("int32")
        return (x[:1200], y[:1200]), (x[1200:], y[1200:])
    if args.mnist_path:
        with np.load(args.mnist_path) as data:
            train = data["x_train"], data["y_train"]
            test = data["x_test"], data["y_test"]
    else:
        try:
            train, test = keras.datasets.mnist.load_data()
        except Exception as error:
            raise SystemExit(
                "MNIST is not in the Keras cache and cannot be downloaded "
                f"({error}). Pass --mnist-path to a local mnist.npz, or "
                "--smoke for a tiny run on the digits that ship with "
                "scikit-learn, offline."
            )

    def prepare(split):
        x, y = split
        return (
            (x.reshape(len(x), -1) / 255.0).astype("float32"),
            y.astype("int32"),
        )

    return prepare(train), prepare(test)


def stacked_moe(features, num_classes, args):
    balancing = None if args.balancing == "none" else args.balancing
    inputs = keras.Input((features,))
    layers = [
        MixtureOfExperts(
            args.experts,
            expert_units=args.expert_units,
            gate_hidden_units=args.gate_hidden_units,
            balancing=balancing,
            balance_steps=args.balance_steps,
            name=f"moe_{i + 1}",
        )
        for i in range(2)
    ]
    z1, g1 = layers[0](inputs, return_gates=True)
    z2, g2 = layers[1](z1, return_gates=True)
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", name="classifier"
    )(z2)
    return keras.Model(inputs, outputs, name="stacked_moe"), keras.Model(
        inputs, [g1, g2], name="gates"
    )


def dense_width(features, num_classes, target_params):
    """Hidden width of a 2-hidden-layer MLP with `target_params` weights."""
    # features*w + w + w*w + w + w*num_classes + num_classes = target
    b = features + num_classes + 2
    c = num_classes - target_params
    return max(1, round((-b + math.sqrt(b * b - 4 * c)) / 2))


def dense_network(features, num_classes, width):
    inputs = keras.Input((features,))
    x = keras.layers.Dense(width, activation="relu")(inputs)
    x = keras.layers.Dense(width, activation="relu")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="dense")


def train(model, train_data, test_data, args):
    model.compile(
        keras.optimizers.Adam(args.learning_rate),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(
        *train_data,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_split=0.1,
        verbose=1 if not args.smoke else 0,
    )
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(*test_data, verbose=0)
    return float(accuracy), seconds


def specialisation(gate_model, x, y, num_classes):
    """Mean gate of each expert for each class, per mixture layer."""
    gates = gate_model.predict(x, batch_size=512, verbose=0)
    tables = []
    for layer_gates in gates:
        table = np.stack(
            [layer_gates[y == c].mean(axis=0) for c in range(num_classes)]
        )
        tables.append(table)
    return tables


def plot_specialisation(tables, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(4 * len(tables), 4))
    for i, (ax, table) in enumerate(zip(np.atleast_1d(axes), tables)):
        image = ax.imshow(table, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_title(f"mixture layer {i + 1}")
        ax.set_xlabel("expert")
        ax.set_ylabel("digit class")
        ax.set_xticks(range(table.shape[1]))
        ax.set_yticks(range(table.shape[0]))
        fig.colorbar(image, ax=ax, label="mean gate")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        _common.compile_quickly()
    _imports()
    if args.smoke:
        args.epochs, args.expert_units, args.gate_hidden_units = 10, 16, 8
        args.balance_steps = 10
    keras.utils.set_random_seed(args.seed)
    train_data, test_data = load_data(args)
    # Made once the data is there: a run without data leaves no folder.
    os.makedirs(args.output_dir, exist_ok=True)
    features = train_data[0].shape[1]
    num_classes = int(train_data[1].max()) + 1

    moe, gate_model = stacked_moe(features, num_classes, args)
    width = dense_width(features, num_classes, moe.count_params())
    dense = dense_network(features, num_classes, width)

    results = {
        "backend": keras.backend.backend(),
        "epochs": args.epochs,
        "train_examples": len(train_data[0]),
        "test_examples": len(test_data[0]),
    }
    for name, model in (("stacked_moe", moe), ("dense", dense)):
        accuracy, seconds = train(model, train_data, test_data, args)
        results[name] = {
            "test_accuracy": accuracy,
            "parameters": int(model.count_params()),
            "train_seconds": round(seconds, 1),
        }
    tables = specialisation(gate_model, *test_data, num_classes)
    results["specialisation"] = {
        f"layer_{i + 1}": {
            f"expert_{e}": {
                "top_classes": [int(c) for c in np.argsort(-t[:, e])[:3]],
                "mean_gate_by_class": [round(float(v), 3) for v in t[:, e]],
            }
            for e in range(t.shape[1])
        }
        for i, t in enumerate(tables)
    }
    plot_specialisation(
        tables, os.path.join(args.output_dir, "specialisation.png")
    )
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)

    print(f"\nbackend {results['backend']}, {args.epochs} epochs")
    print("| model | parameters | test accuracy | train time (s) |")
    print("| --- | --- | --- | --- |")
    for name in ("stacked_moe", "dense"):
        r = results[name]
        print(
            f"| {name} | {r['parameters']:,} | {r['test_accuracy']:.4f} | "
            f"{r['train_seconds']} |"
        )
    print("\nThe classes each expert weighs most (test set):")
    for layer, experts in results["specialisation"].items():
        for expert, stats in experts.items():
            print(f"  {layer} {expert}: classes {stats['top_classes']}")
    print(f"\nwrote {args.output_dir}/results.json and specialisation.png")
    return results


if __name__ == "__main__":
    main()
