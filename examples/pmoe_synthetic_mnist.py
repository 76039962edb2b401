"""pMoE's synthetic patch experiment (its figure 4) on MNIST digits.

Each sample is a 4x4 grid of MNIST digits (n = 16 patches of 28x28): a "1"
somewhere makes class 1, a "0" makes class 0, and the other 15 patches are
digits 2-9. Three models of about the same size learn it from N samples:

- separate-training pMoE: 2 experts of 20 ReLU neurons, l = 2 patches per
  expert, hard gates; the routers are first trained with eq. 6, then frozen;
- joint-training pMoE: 8 experts of 5 neurons, l = 6, softmax gates;
- the CNN of eq. 5 with 40 neurons, which sees all 16 patches.

All use SGD with learning rate 0.2, batches of 20 and fixed random output
weights, and train until zero training error (at most `--epochs`). The
script repeats this over several training-set sizes and seeds, and reports
the test accuracy (mean and standard deviation), the number of training
samples each model needs for 95% test accuracy, and how well the routers
send the discriminative digit to its expert (the paper's figures 8-9):

    KERAS_BACKEND=jax python examples/pmoe_synthetic_mnist.py \\
        --mnist-path path/to/mnist.npz

Without `--mnist-path` the script uses `keras.datasets.mnist` (the Keras
cache or a download). `--smoke` runs a tiny version on the 8x8 digits that
ship with scikit-learn, in about half a minute.
"""

import argparse
import json
import os
import time

import _common

MODELS = ("separate", "joint", "cnn")
LABELS = {
    "separate": "pMoE (separate training)",
    "joint": "pMoE (joint training)",
    "cnn": "CNN",
}


def _imports():
    """Keras, NumPy and keras_moe, imported once the arguments are parsed,
    and the callback (a Keras class)."""
    global keras, np, discriminative_routing, DatasetNotAvailableError
    global load_mnist, make_patch_digits, TwoLayerCNN, TwoLayerPMoE
    global train_routers, StopAtZeroTrainingError
    import keras
    import numpy as np

    from keras_moe.analysis import discriminative_routing
    from keras_moe.data import DatasetNotAvailableError
    from keras_moe.data import load_mnist
    from keras_moe.data import make_patch_digits
    from keras_moe.models import TwoLayerCNN
    from keras_moe.models import TwoLayerPMoE
    from keras_moe.training import train_routers

    class StopAtZeroTrainingError(keras.callbacks.Callback):
        """Stops once a whole epoch classified every training sample."""

        def on_epoch_end(self, epoch, logs=None):
            if logs and logs.get("accuracy", 0.0) >= 1.0:
                self.model.stop_training = True


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # A help text that states its default in words ends with
    # "%(default).0s", which prints nothing but keeps the formatter from
    # adding "(default: None)".
    parser.add_argument(
        "--mnist-path",
        help="path to a local mnist.npz (default: keras.datasets.mnist, "
        "from the Keras cache or the network)%(default).0s",
    )
    parser.add_argument(
        "--sample-sizes",
        default="100,200,300,500,700,1000,1500",
        help="comma-separated numbers of training samples",
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="runs (seeds) per sample size"
    )
    parser.add_argument(
        "--test-samples", type=int, default=1000, help="test samples"
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help="subset of " + str(MODELS)
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=150,
        help="most epochs; training stops at zero training error",
    )
    parser.add_argument(
        "--router-epochs",
        type=int,
        default=100,
        help="epochs of router training (eq. 6) for separate training",
    )
    parser.add_argument(
        "--router-fraction",
        type=float,
        default=1.0,
        help="fraction of the training samples the routers learn from",
    )
    parser.add_argument(
        "--learning-rate", type=float, default=0.2, help="SGD learning rate"
    )
    parser.add_argument("--batch-size", type=int, default=20, help="batch size")
    for model, experts, neurons, patches in (
        ("separate", 2, 20, 2),
        ("joint", 8, 5, 6),
    ):
        parser.add_argument(
            f"--{model}-experts",
            type=int,
            default=experts,
            help=f"experts of the {model}-training pMoE",
        )
        parser.add_argument(
            f"--{model}-neurons",
            type=int,
            default=neurons,
            help=f"ReLU neurons of each expert ({model} training)",
        )
        parser.add_argument(
            f"--{model}-patches",
            type=int,
            default=patches,
            help=f"patches l routed to each expert ({model} training)",
        )
    parser.add_argument(
        "--cnn-neurons",
        type=int,
        default=40,
        help="neurons of the CNN baseline",
    )
    parser.add_argument(
        "--target-accuracy",
        type=float,
        default=0.95,
        help="test accuracy at which the samples needed are reported",
    )
    parser.add_argument(
        "--output-dir",
        default="outputs/pmoe_synthetic_mnist",
        help="results.json and accuracy.png",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny run on scikit-learn digits"
    )
    args = parser.parse_args(argv)
    args.sample_sizes = [int(s) for s in args.sample_sizes.split(",")]
    args.models = [m.strip() for m in args.models.split(",")]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {MODELS}")
    if not 0 < args.router_fraction <= 1:
        parser.error("--router-fraction must be in (0, 1]")
    return args


def load_digits(args):
    """`((train_images, train_labels), (test_images, test_labels))`."""
    if args.smoke:
        from sklearn.datasets import load_digits as sklearn_digits

        digits = sklearn_digits()
        images = (digits.images / 16.0).astype("float32")
        half = len(images) // 2
        return (images[:half], digits.target[:half]), (
            images[half:],
            digits.target[half:],
        )
    try:
        return load_mnist(args.mnist_path)
    except DatasetNotAvailableError as error:
        raise SystemExit(
            f"{error}\nWithout the data, --smoke runs a tiny version on the "
            "digits that ship with scikit-learn, offline."
        )


def build(name, args, input_shape, patch_size):
    common = dict(patch_size=patch_size, input_shape=input_shape)
    if name == "separate":
        return TwoLayerPMoE(
            args.separate_experts,
            args.separate_neurons,
            args.separate_patches,
            gating="hard",
            **common,
        )
    if name == "joint":
        # Smaller initial neurons for joint training, as in the authors'
        # code; the other two models keep the default N(0, 0.1^2).
        return TwoLayerPMoE(
            args.joint_experts,
            args.joint_neurons,
            args.joint_patches,
            gating="softmax",
            expert_initializer=keras.initializers.RandomNormal(stddev=0.01),
            **common,
        )
    return TwoLayerCNN(args.cnn_neurons, **common)


def routing_values(model, x):
    layer = model.pmoe_layer
    features = keras.Model(model.input, layer.input)
    values = []
    for start in range(0, len(x), 500):
        batch = features(x[start : start + 500])
        values.append(
            keras.ops.convert_to_numpy(layer.route(batch)["routing_values"])
        )
    return np.concatenate(values)


def run_one(name, args, train, test, patch_size, seed):
    """Trains one model; returns its test accuracy and routing results."""
    x, y, _ = train
    x_test, y_test, positions = test
    keras.utils.set_random_seed(seed)
    model = build(name, args, x.shape[1:], patch_size)
    start = time.perf_counter()
    result = {}
    if name == "separate":
        routers = max(2, int(round(args.router_fraction * len(x))))
        train_routers(
            model,
            x[:routers],
            y[:routers],
            epochs=args.router_epochs,
            batch_size=args.batch_size,
            optimizer=keras.optimizers.SGD(args.learning_rate),
            verbose=0,
        )
    model.compile(
        optimizer=keras.optimizers.SGD(args.learning_rate),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")],
    )
    history = model.fit(
        x,
        y,
        batch_size=args.batch_size,
        epochs=args.epochs,
        callbacks=[StopAtZeroTrainingError()],
        verbose=0,
    )
    result["seconds"] = time.perf_counter() - start
    result["epochs"] = len(history.history["loss"])
    result["train_accuracy"] = float(history.history["accuracy"][-1])
    result["test_accuracy"] = float(
        model.evaluate(x_test, y_test, batch_size=500, verbose=0)[1]
    )
    if name != "cnn":
        values = routing_values(model, x_test)
        if name == "separate":
            # Figure 8: router c, trained for class c, ranks that class's
            # digit among its top patches.
            result["routing"] = {
                f"top_{top}": discriminative_routing(
                    values,
                    y_test,
                    positions,
                    top=top,
                    expert_for_class=[0, 1],
                )["rate"]
                for top in range(1, min(8, values.shape[1]) + 1)
            }
        else:
            # Figure 9: some expert gives the digit its largest gate.
            routed = discriminative_routing(values, y_test, positions, top=1)
            result["routing"] = {
                "top_1_per_class": routed["per_class"],
                "experts": routed["experts"],
            }
    return result


def samples_for(sizes, accuracies, target):
    """The first training-set size whose mean accuracy reaches `target`,
    interpolated linearly between the measured sizes; None if never."""
    previous = None
    for size, accuracy in zip(sizes, accuracies):
        if accuracy >= target:
            if previous is None:
                return float(size)
            (size0, accuracy0) = previous
            fraction = (target - accuracy0) / (accuracy - accuracy0)
            return float(size0 + fraction * (size - size0))
        previous = (size, accuracy)
    return None


def summarise(results, args):
    summary = {}
    for name in args.models:
        runs = results[name]
        means = [
            float(np.mean([r["test_accuracy"] for r in runs[str(n)]]))
            for n in args.sample_sizes
        ]
        stds = [
            float(np.std([r["test_accuracy"] for r in runs[str(n)]]))
            for n in args.sample_sizes
        ]
        summary[name] = {
            "mean_accuracy": means,
            "std_accuracy": stds,
            "samples_for_target": samples_for(
                args.sample_sizes, means, args.target_accuracy
            ),
        }
    if "cnn" in summary and summary["cnn"]["samples_for_target"]:
        cnn = summary["cnn"]["samples_for_target"]
        for name in args.models:
            needed = summary[name]["samples_for_target"]
            summary[name]["fraction_of_cnn"] = needed / cnn if needed else None
    return summary


def plot(summary, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    # Distinct markers and lines: the curves can lie on each other.
    styles = {"separate": ("o", "-"), "joint": ("s", "--"), "cnn": ("^", ":")}
    for name in args.models:
        ax.errorbar(
            args.sample_sizes,
            summary[name]["mean_accuracy"],
            yerr=summary[name]["std_accuracy"],
            marker=styles[name][0],
            linestyle=styles[name][1],
            capsize=3,
            label=LABELS[name],
        )
    ax.axhline(args.target_accuracy, color="grey", linestyle=":")
    ax.set_xlabel("number of training samples (N)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Synthetic patch data from MNIST (pMoE figure 4)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_report(summary, results, args):
    print(f"\nbackend {keras.backend.backend()}, {args.seeds} seeds")
    header = " | ".join(str(n) for n in args.sample_sizes)
    print(f"| model | {header} | N for {args.target_accuracy:.0%} |")
    print("| --- " * (len(args.sample_sizes) + 2) + "|")
    for name in args.models:
        s = summary[name]
        cells = " | ".join(
            f"{m:.3f} ± {d:.3f}"
            for m, d in zip(s["mean_accuracy"], s["std_accuracy"])
        )
        needed = s["samples_for_target"]
        needed = f"{needed:.0f}" if needed else f"> {args.sample_sizes[-1]}"
        print(f"| {LABELS[name]} | {cells} | {needed} |")
    for name in args.models:
        ratio = summary[name].get("fraction_of_cnn")
        if ratio and name != "cnn":
            print(f"{LABELS[name]} needs {ratio:.0%} of the CNN's samples")
    if "separate" in args.models:
        print("\nseparate-training routers: class digit in the top-l patches")
        print("(fraction of test samples, mean over seeds; pMoE figure 8)")
        for n in args.sample_sizes:
            runs = results["separate"][str(n)]
            tops = sorted(runs[0]["routing"], key=lambda k: int(k[4:]))
            rates = "  ".join(
                f"l={t[4:]}: {np.mean([r['routing'][t] for r in runs]):.3f}"
                for t in tops
            )
            print(f"  N={n}: {rates}")
    if "joint" in args.models:
        print("\njoint-training routers: class digit gets an expert's largest")
        print("gate (fraction of test samples per class, mean over seeds;")
        print("pMoE figure 9)")
        for n in args.sample_sizes:
            runs = results["joint"][str(n)]
            per_class = [r["routing"]["top_1_per_class"] for r in runs]
            rates = "  ".join(
                f"class {c}: {np.mean([p[c] for p in per_class]):.3f}"
                for c in sorted(per_class[0])
            )
            print(f"  N={n}: {rates}")


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        _common.compile_quickly()
    _imports()
    if args.smoke:
        args.sample_sizes, args.seeds, args.test_samples = [200], 1, 200
        args.epochs, args.router_epochs = 10, 5
        args.joint_experts, args.joint_patches = 4, 2
    (train_images, train_labels), (test_images, test_labels) = load_digits(args)
    patch_size = train_images.shape[1:3]
    test = make_patch_digits(
        test_images, test_labels, args.test_samples, seed=12345
    )
    results = {name: {} for name in args.models}
    start = time.perf_counter()
    for size in args.sample_sizes:
        for seed in range(args.seeds):
            train = make_patch_digits(
                train_images, train_labels, size, seed=1000 * seed + size
            )
            for name in args.models:
                run = run_one(name, args, train, test, patch_size, seed)
                results[name].setdefault(str(size), []).append(run)
                print(
                    f"N={size} seed={seed} {name}: test accuracy "
                    f"{run['test_accuracy']:.3f} after {run['epochs']} "
                    f"epochs ({run['seconds']:.1f} s)",
                    flush=True,
                )
    summary = summarise(results, args)
    report = {
        "backend": keras.backend.backend(),
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("mnist_path",)
        },
        "total_seconds": round(time.perf_counter() - start, 1),
        "summary": summary,
        "runs": results,
    }
    # Made once the data is there: a run without data leaves no folder.
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot(summary, args, os.path.join(args.output_dir, "accuracy.png"))
    print_report(summary, results, args)
    print(
        f"\n{report['total_seconds']:.0f} s in all; wrote "
        f"{args.output_dir}/results.json and accuracy.png"
    )
    return report


if __name__ == "__main__":
    main()
