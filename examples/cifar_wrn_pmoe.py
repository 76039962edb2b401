"""Compare WRN and WRN-pMoE on CIFAR-10 over training-set sizes.

    KERAS_BACKEND=jax python examples/cifar_wrn_pmoe.py            # CIFAR-10
    python examples/cifar_wrn_pmoe.py --data-dir path/to/cifar10  # image folder
    KERAS_BACKEND=jax python examples/cifar_wrn_pmoe.py --smoke    # about 30 s

The pMoE paper's sample-complexity experiment (appendix A, figure 14):
WRN-10-10 against WRN-pMoE, the same network with its last convolution
replaced by a `PatchExpertChoiceMoE` (8x8x640 map cut into 64 patches of
1x1, 4 experts with 16 patches each, 1x1 experts with 160 filters, joint
training with softmax gating), both built by
`keras_moe.models.WideResNet`. Each model is trained from scratch on
class-balanced subsets of the training set (10,000 to 50,000 images by
default, the smaller sets nested in the larger), the test accuracy after
the last epoch is averaged over `--runs` independent runs. The defaults
follow the authors' protocol: SGD with learning rate 0.1 and no momentum,
batch 128, 50 epochs, images scaled to [0, 1], no augmentation (`--augment`
adds random crops and flips).

Data: CIFAR-10 through tensorflow-datasets (`--data-dir` is then its data
directory), or an image folder with `train/<class>/*` and `test/<class>/*`
given as `--data-dir`. `--smoke` trains a narrow network for three epochs
on 500 of the handwritten digits that ship with scikit-learn (16x16,
momentum and batch-norm momentum 0.9), offline, in about half a minute.

Networks: `--architecture paper` (default) builds the networks the paper's
text describes, the pre-activation WRN with only its last convolution
swapped (presets `wrn10_10_cifar10` and `wrn10_10_pmoe_cifar10`);
`--architecture authors` builds the networks of the authors' public code,
parameter for parameter (`authors_wrn10_10_cifar10` and
`authors_wrn10_10_pmoe_cifar10`: biases, a different last stage, batch
normalization and ReLU inside each expert after the gate, softmax over all
patches, routers initialised near uniform gates). `--widening-factor`
builds the same WRN-10-k at another width (the paper: 10; 4 trains several
times faster): the experts' filters, and the authors' last convolution,
follow it. `--placement halo` computes the authors' pMoE layer on the
selected patches only (equal outputs there in inference mode), instead of
on the whole masked map as their code does.

Writes to `--output-dir`, and lists at the end of the run:

- `results.json`: every run, the mean and standard deviation per
  training-set size, parameters and FLOPs of both models, routing
  statistics of the last WRN-pMoE;
- `accuracy.png`: test accuracy against the number of training samples;
- `selection_frequency.png`: how often each expert picks each patch
  position on the test set (with WRN-pMoE in `--models`);
- `patch_selection.png`: the patches the experts picked in one test image
  (with WRN-pMoE in `--models`);
- `runs/<model>_<size>_<run>.json`: each finished run (its settings and
  result), read back instead of trained again when the comparison is
  started again with the same options;
- `runs/wrn_pmoe_<size>_<run>.weights.h5`: the weights of each WRN-pMoE
  run, from which a resumed comparison draws its routing figures.
"""

import argparse
import json
import os
import time

import _common

MODELS = ("wrn", "wrn_pmoe")
ARCHITECTURES = ("paper", "authors")
LABELS = {"wrn": "WRN", "wrn_pmoe": "WRN-pMoE"}
STYLES = {"wrn": ("s", "-"), "wrn_pmoe": ("^", "--")}


def _imports():
    """Keras, NumPy and keras_moe, imported once the arguments are parsed
    (so that `--help` answers at once)."""
    global keras, np, analysis, data, WideResNet
    import keras
    import numpy as np

    from keras_moe import analysis
    from keras_moe import data
    from keras_moe.models import WideResNet


def add_arguments(parser, train_sizes, test_size, output_dir):
    """The arguments shared with `celeba_wrn_pmoe.py`."""
    parser.add_argument(
        "--train-sizes",
        type=int,
        nargs="+",
        default=train_sizes,
        help="numbers of training images (class-balanced)",
    )
    parser.add_argument(
        "--test-size",
        type=int,
        default=test_size,
        help="number of test images (class-balanced)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=5,
        help="independent runs per model and training-set size",
    )
    parser.add_argument(
        "--epochs", type=int, default=50, help="training epochs of each run"
    )
    parser.add_argument(
        "--batch-size", type=int, default=128, help="batch size"
    )
    parser.add_argument(
        "--learning-rate", type=float, default=0.1, help="SGD learning rate"
    )
    parser.add_argument(
        "--momentum", type=float, default=0.0, help="SGD momentum"
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="weight decay of the optimizer (0: none)",
    )
    parser.add_argument(
        "--architecture",
        default="paper",
        choices=ARCHITECTURES,
        help="paper: the WRN of the paper's text, only its last convolution "
        "replaced by the pMoE layer; authors: the networks of the authors' "
        "public code, parameter for parameter (no shortcut around the MoE, "
        "BN -> ReLU -> conv experts behind the gate, softmax_all gating)",
    )
    parser.add_argument(
        "--depth", type=int, default=10, help="depth of the WRN-depth-k"
    )
    parser.add_argument(
        "--widening-factor",
        type=int,
        default=10,
        help="k of WRN-depth-k: 10 is the paper's network; a smaller one "
        "(e.g. 4) is the same network at a reduced width, the experts' "
        "filters following it",
    )
    parser.add_argument(
        "--dropout-rate",
        type=float,
        default=0.0,
        help="dropout rate inside the residual blocks",
    )
    parser.add_argument(
        "--batch-norm-momentum",
        type=float,
        default=None,
        help="momentum of every batch normalization (Keras convention); "
        "default: the preset's, 0.9 for paper, Keras' 0.99 for authors, "
        "whose moving statistics need thousands of steps to settle"
        "%(default).0s",
    )
    parser.add_argument(
        "--gating",
        default=None,
        choices=["softmax", "hard", "softmax_all"],
        help="gating of the pMoE layer (softmax is joint training); "
        "(default: the preset's, softmax for paper, softmax_all for "
        "authors)%(default).0s",
    )
    parser.add_argument(
        "--patches-per-expert",
        type=int,
        default=None,
        help="patches l each expert selects (default: the preset's; the "
        "authors used 2 in their CIFAR-10-with-ImageNet-noise "
        "experiment)%(default).0s",
    )
    parser.add_argument(
        "--placement",
        default=None,
        choices=["patch", "masked", "halo"],
        help="where the pMoE experts run: patch (each selected patch "
        "alone, eq. 1), masked (the whole masked map, the authors' code), "
        "halo (as masked, on the selected patches and their halo only); "
        "(default: patch for paper, masked for authors)%(default).0s",
    )
    parser.add_argument(
        "--augment",
        action="store_true",
        help="random crops (32x32 images) and horizontal flips",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        choices=MODELS,
        help="the models to train",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the subsets; run r on n images uses seed + 1000 r + n",
    )
    parser.add_argument(
        "--output-dir",
        default=output_dir,
        help="results, figures and the finished runs (runs/); a "
        "comparison started again reads its finished runs back",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny offline run, in about half a minute",
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data-dir",
        help="tensorflow-datasets directory, or an image folder with "
        "train/<class>/* and test/<class>/*",
    )
    add_arguments(
        parser,
        train_sizes=[10000, 20000, 30000, 40000, 50000],
        test_size=10000,
        output_dir="outputs/cifar_wrn_pmoe",
    )
    return parser.parse_args(argv)


def smoke_settings(args):
    """Settings of `--smoke`: a narrow network trained for a few epochs on
    small subsets, with momentum and batch-norm momentum 0.9 so that a few
    dozen steps learn (and the moving statistics follow them)."""
    args.train_sizes = [500]
    args.test_size = 200
    args.runs, args.epochs, args.batch_size = 1, 3, 32
    args.widening_factor = 1
    args.momentum = 0.9
    args.batch_norm_momentum = 0.9


def check_args(args, num_classes):
    if args.patches_per_expert is not None and args.patches_per_expert <= 0:
        raise SystemExit("--patches-per-expert must be positive.")
    for name in ("runs", "epochs", "batch_size", "widening_factor"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive.")
    if min(args.train_sizes) < num_classes or args.test_size < num_classes:
        raise SystemExit(
            f"--train-sizes and --test-size need at least one image per "
            f"class ({num_classes} classes)."
        )


def class_balanced(dataset, per_class, num_classes, split):
    """The first `per_class` examples of every class of a batched dataset.

    Reads `(images, labels)` batches until every class has `per_class`
    examples (or the data ends) and returns a list of arrays, one per
    class, in the order the dataset gave them, stored as 8-bit images.
    Loaders shuffle their training split, so these are random examples,
    and a smaller training-set size takes a prefix of every class: the
    training sets are nested.
    """
    found = [[] for _ in range(num_classes)]
    counts = np.zeros(num_classes, dtype=int)
    for images, labels in dataset:
        images = np.asarray(images)
        labels = np.asarray(labels).reshape(-1)
        for c in range(num_classes):
            need = per_class - counts[c]
            if need <= 0:
                continue
            chosen = images[labels == c][:need]
            if len(chosen):
                found[c].append(
                    np.round(np.clip(chosen, 0, 1) * 255).astype("uint8")
                )
                counts[c] += len(chosen)
        if np.all(counts >= per_class):
            break
    if np.any(counts == 0):
        missing = [int(c) for c in np.flatnonzero(counts == 0)]
        raise SystemExit(
            f"error: the {split} split has no images of classes {missing}."
        )
    if np.any(counts < per_class):
        short = {
            int(c): int(counts[c]) for c in np.flatnonzero(counts < per_class)
        }
        print(
            f"note: the {split} split has fewer than {per_class} images of "
            f"some classes ({short}); using what there is."
        )
    return [np.concatenate(f) for f in found]


def take(by_class, size, seed):
    """`size // num_classes` images of every class, shuffled, as float32."""
    per_class = size // len(by_class)
    x = np.concatenate([images[:per_class] for images in by_class])
    y = np.concatenate(
        [
            np.full(min(per_class, len(images)), c)
            for c, images in enumerate(by_class)
        ]
    ).astype("int32")
    order = np.random.default_rng(seed).permutation(len(y))
    return x[order].astype("float32") / 255.0, y[order]


def build(kind, presets, args, num_classes, input_shape):
    """WRN or WRN-pMoE at the chosen width, from the presets of the chosen
    architecture."""
    plain_preset, pmoe_preset = presets[args.architecture]
    overrides = dict(
        depth=args.depth,
        widening_factor=args.widening_factor,
        num_classes=num_classes,
        input_shape=input_shape,
        dropout_rate=args.dropout_rate,
    )
    if args.batch_norm_momentum is not None:
        overrides["batch_norm_momentum"] = args.batch_norm_momentum
    if kind == "wrn":
        return WideResNet.from_preset(plain_preset, **overrides)
    # Updates the preset's pMoE arguments; the experts' filters follow the
    # width (80 or 160 at width 10).
    pmoe = {
        name: getattr(args, name)
        for name in ("gating", "patches_per_expert", "placement")
        if getattr(args, name) is not None
    }
    return WideResNet.from_preset(pmoe_preset, pmoe=pmoe, **overrides)


def augmented(x, y, args):
    """A shuffled, augmented `tf.data` pipeline (it feeds every backend)."""
    import tensorflow as tf

    size = x.shape[1]
    if size == 32:
        augment = data.cifar_augmentation(32, 4, seed=args.seed)
    else:
        flip = keras.layers.RandomFlip("horizontal", seed=args.seed)

        def augment(image):
            return flip(image, training=True)

    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    dataset = dataset.shuffle(len(y), seed=args.seed)
    dataset = dataset.map(
        lambda image, label: (augment(image), label),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return dataset.batch(args.batch_size).prefetch(tf.data.AUTOTUNE)


def train_and_test(model, x, y, x_test, y_test, args):
    model.compile(
        optimizer=keras.optimizers.SGD(
            args.learning_rate,
            momentum=args.momentum,
            weight_decay=args.weight_decay or None,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    if args.augment:
        history = model.fit(
            augmented(x, y, args), epochs=args.epochs, verbose=2
        )
    else:
        history = model.fit(
            x, y, batch_size=args.batch_size, epochs=args.epochs, verbose=2
        )
    seconds = time.perf_counter() - start
    logs = model.evaluate(
        x_test, y_test, batch_size=256, return_dict=True, verbose=0
    )
    return {
        "test_accuracy": float(logs["accuracy"]),
        "test_loss": float(logs["loss"]),
        "train_accuracy": float(history.history["accuracy"][-1]),
        "train_loss": float(history.history["loss"][-1]),
        "seconds": seconds,
    }


def routing_figures(model, x_test, y_test, output_dir):
    """Routing statistics of the pMoE layer on the test set, and figures."""
    layer = model.pmoe_layer
    routing, labels = analysis.collect_routing(
        model, layer, (x_test, y_test), batch_size=256
    )
    stats = analysis.patch_routing_statistics(
        routing["indices"], routing["gates"], layer.grid_shape, labels
    )
    analysis.plot_selection_frequency(
        stats, os.path.join(output_dir, "selection_frequency.png")
    )
    analysis.plot_patch_selection(
        x_test[0],
        routing["indices"][0],
        layer.grid_shape,
        path=os.path.join(output_dir, "patch_selection.png"),
        title=f"patches picked by each expert (label {int(labels[0])})",
    )
    return {
        "coverage": stats.coverage,
        "position_entropy": [float(e) for e in stats.position_entropy],
        "grid_shape": list(layer.grid_shape),
    }


def plot_accuracy(summary, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for kind, by_size in summary.items():
        sizes = sorted(int(s) for s in by_size)
        means = [by_size[str(s)]["mean"] for s in sizes]
        stds = [by_size[str(s)]["std"] for s in sizes]
        # Distinct markers and lines: the two curves can lie on each other.
        marker, line = STYLES[kind]
        ax.errorbar(
            sizes,
            means,
            stds,
            marker=marker,
            linestyle=line,
            capsize=3,
            label=LABELS[kind],
        )
    ax.set_xlabel("number of training samples")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def describe(model, kind, args):
    """Parameters, FLOPs and the pMoE configuration of a model."""
    layer = model.pmoe_layer
    described = {
        "parameters": int(model.count_params()),
        "mmacs_per_image": analysis.flop_report(model).dense_macs / 1e6,
        "architecture": model.architecture,
        "pmoe": None
        if layer is None
        else {
            "placement": layer.placement,
            "num_patches": layer.num_patches,
            "num_experts": layer.num_experts,
            "patches_per_expert": layer.patches_per_expert,
            "expert_filters": layer.expert_filters,
            "expert_kernel_size": list(layer.expert_kernel_size),
            "gating": layer.gating,
            "parameters": int(layer.count_params()),
        },
    }
    print(
        f"{LABELS[kind]}-{args.depth}-{args.widening_factor}: "
        f"{described['parameters']:,} parameters, "
        f"{described['mmacs_per_image']:.1f} M multiply-adds per image"
    )
    return described


def finished_run(path, settings):
    """The result saved at `path` by a run with the same settings, if any."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    if saved.get("settings") != settings:
        raise SystemExit(
            f"error: {path} holds a run made with other options or on "
            "another backend; use another --output-dir"
        )
    return saved["result"]


def save_run(path, result, settings):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"settings": settings, "result": result}, f, indent=2)
    os.replace(path + ".tmp", path)


def compare(args, train_by_class, x_test, y_test, info, presets, title):
    """Trains every model on every training-set size and reports.

    Args:
        args: the parsed arguments.
        train_by_class: list of uint8 image arrays, one per class.
        x_test, y_test: the test set, float32 images in [0, 1].
        info: a `keras_moe.data.DatasetInfo`.
        presets: dict from architecture (`"paper"`, `"authors"`) to the
            `(plain preset, pMoE preset)` names of `WRN_PRESETS`.
        title: the figure title.

    Returns:
        The results dict written to `results.json`.
    """
    num_classes = info.num_classes
    input_shape = tuple(x_test.shape[1:])
    print(
        f"{info.name}: {num_classes} classes, images {input_shape}, "
        f"{len(y_test)} test images, backend {keras.backend.backend()}"
    )
    models = {}
    runs, last_pmoe = [], None
    # A finished run is kept under runs/ and read back when the same
    # command (or one with more sizes, models or runs) is started again.
    run_settings = {
        key: value
        for key, value in vars(args).items()
        if key not in ("output_dir", "train_sizes", "models", "runs")
    }
    run_settings["backend"] = keras.backend.backend()
    for size in sorted(args.train_sizes):
        x, y = take(train_by_class, size, args.seed)
        for kind in args.models:
            for run in range(args.runs):
                keras.utils.set_random_seed(args.seed + 1000 * run + size)
                model = build(kind, presets, args, num_classes, input_shape)
                if kind not in models:
                    models[kind] = describe(model, kind, args)
                print(
                    f"\n{LABELS[kind]}, {len(y)} training images, run {run + 1}"
                )
                path = os.path.join(
                    args.output_dir, "runs", f"{kind}_{len(y)}_{run}.json"
                )
                result = finished_run(path, run_settings)
                if result is not None:
                    print(f"already done, reading {path}")
                else:
                    result = train_and_test(model, x, y, x_test, y_test, args)
                    result.update(model=kind, train_size=len(y), run=run)
                    if kind == "wrn_pmoe":
                        # For the routing figures of a resumed comparison.
                        result["weights"] = path[: -len(".json")] + (
                            ".weights.h5"
                        )
                        model.save_weights(result["weights"])
                    save_run(path, result, run_settings)
                runs.append(result)
                print(
                    f"test accuracy {result['test_accuracy']:.4f} "
                    f"({result['seconds']:.0f} s)"
                )
                if kind == "wrn_pmoe":
                    last_pmoe = model
                    if "weights" in result:
                        model.load_weights(result["weights"])
    summary = {}
    for kind in args.models:
        summary[kind] = {}
        for size in sorted({r["train_size"] for r in runs}):
            accuracies = [
                r["test_accuracy"]
                for r in runs
                if r["model"] == kind and r["train_size"] == size
            ]
            summary[kind][str(size)] = {
                "mean": float(np.mean(accuracies)),
                "std": float(np.std(accuracies)),
                "runs": len(accuracies),
            }
    os.makedirs(args.output_dir, exist_ok=True)
    routing = None
    if last_pmoe is not None:
        routing = routing_figures(last_pmoe, x_test, y_test, args.output_dir)
    plot_accuracy(summary, os.path.join(args.output_dir, "accuracy.png"), title)
    settings = {k: v for k, v in vars(args).items() if k not in ("output_dir",)}
    results = {
        "dataset": info.name,
        "backend": keras.backend.backend(),
        "num_classes": num_classes,
        "class_names": info.class_names,
        "test_size": int(len(y_test)),
        "settings": settings,
        "models": models,
        "summary": summary,
        "runs": runs,
        "routing": routing,
    }
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(
        "\n| training images | "
        + " | ".join(LABELS[k] for k in args.models)
        + " |"
    )
    print("| --- |" + " --- |" * len(args.models))
    for size in sorted(summary[args.models[0]], key=int):
        cells = [
            f"{summary[k][size]['mean']:.4f} +- {summary[k][size]['std']:.4f}"
            for k in args.models
        ]
        print(f"| {size} | " + " | ".join(cells) + " |")
    written = ["results.json", "accuracy.png"]
    if routing is not None:
        written += ["selection_frequency.png", "patch_selection.png"]
    written.append("runs/<model>_<size>_<run>.json (every finished run)")
    if "wrn_pmoe" in args.models:
        written.append(
            "runs/wrn_pmoe_<size>_<run>.weights.h5 (the WRN-pMoE weights, "
            "for the routing figures of a resumed comparison)"
        )
    print(f"wrote in {args.output_dir}:")
    for name in written:
        print(f"  {name}")
    return results


def load(args):
    """CIFAR-10 (tfds or image folder), or the offline digits for
    `--smoke`."""
    kwargs = dict(
        batch_size=512, augment=False, normalize=False, seed=args.seed
    )
    if args.smoke:
        # The 8x8 digits at twice their size.
        return data.load_dataset("digits", image_size=16, **kwargs)
    return data.load_cifar10(args.data_dir, **kwargs)


def run_comparison(args, load, presets, title):
    """Loads the data with `load(args)`, takes class-balanced subsets and
    runs `compare` on the two `presets`; `title(info)` names the table."""
    _imports()
    keras.utils.set_random_seed(args.seed)
    try:
        train, test, info = load(args)
    except data.DatasetNotAvailableError as error:
        raise SystemExit(
            f"error: {error}\nWithout the data, --smoke runs a tiny "
            "comparison offline."
        )
    check_args(args, info.num_classes)
    num_classes = info.num_classes
    per_class = max(args.train_sizes) // num_classes
    train_by_class = class_balanced(train, per_class, num_classes, "training")
    test_by_class = class_balanced(
        test, args.test_size // num_classes, num_classes, "test"
    )
    x_test, y_test = take(test_by_class, args.test_size, args.seed)
    return compare(
        args, train_by_class, x_test, y_test, info, presets, title(info)
    )


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        _common.compile_quickly()
    if args.smoke:
        smoke_settings(args)
    return run_comparison(
        args,
        load,
        {
            "paper": ("wrn10_10_cifar10", "wrn10_10_pmoe_cifar10"),
            "authors": (
                "authors_wrn10_10_cifar10",
                "authors_wrn10_10_pmoe_cifar10",
            ),
        },
        lambda info: f"{info.name}: WRN vs WRN-pMoE",
    )


if __name__ == "__main__":
    main()
