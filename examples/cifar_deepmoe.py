"""Train a DeepMoE-ResNet on CIFAR with the paper's two-phase schedule.

    KERAS_BACKEND=jax python examples/cifar_deepmoe.py            # CIFAR-10
    KERAS_BACKEND=jax python examples/cifar_deepmoe.py --smoke    # about 30 s
    python examples/cifar_deepmoe.py --dataset digits             # offline
    python examples/cifar_deepmoe.py --data-dir path/to/cifar10-images

The model is a preset of `keras_moe.models.DeepMoEResNet` (wide or narrow
DeepMoE-ResNet-20/56/110, or the plain ResNet baseline). DeepMoE models are
trained with `keras_moe.training.train_two_phase` (joint training, then the
gating frozen and lambda = mu = 0), baselines with plain `fit` for the same
number of epochs and the same learning-rate schedule. Checkpoints go to the
output directory after every epoch; running the same command again resumes.

The final report gives the test accuracy, dense and effective
multiply-adds, gate density per layer and time per epoch, and saves
`results.json`,
`curves.png`, `gate_density.png` and `class_gates.png` (mean gate of the
last gated layer's channels for every class) in the output directory.
"""

import argparse
import os

import _common

# The CIFAR presets of `keras_moe.models.DEEPMOE_RESNET_PRESETS`, named here
# so that `--help` answers without importing Keras.
CIFAR_PRESETS = tuple(
    f"{kind}{depth}_{dataset}"
    for kind in ("narrow_deepmoe_resnet", "resnet", "wide_deepmoe_resnet")
    for depth in (20, 56, 110)
    for dataset in ("cifar10", "cifar100")
)


def _imports():
    """Keras and keras_moe, imported once the arguments are parsed."""
    global keras, analysis, data, DEEPMOE_RESNET_PRESETS
    global DeepMoEResNet, to_deepmoe
    import keras

    from keras_moe import analysis
    from keras_moe import data
    from keras_moe.models import DEEPMOE_RESNET_PRESETS
    from keras_moe.models import DeepMoEResNet
    from keras_moe.models import to_deepmoe


# A help text that states its default in words ends with "%(default).0s",
# which prints nothing but keeps ArgumentDefaultsHelpFormatter from adding
# "(default: None)".
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default="wide_deepmoe_resnet56_cifar10",
        help=f"a preset: {', '.join(sorted(CIFAR_PRESETS))}",
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
    _common.add_training_arguments(
        parser,
        joint_epochs=270,
        finetune_epochs=80,
        learning_rate=0.1,
        lr_boundaries=[150, 250],
        batch_size=128,
        output_dir="outputs/cifar_deepmoe",
    )
    parser.add_argument(
        "--depth",
        type=int,
        help="override the preset's depth (6n + 2), e.g. 8 for a smaller "
        "plain ResNet baseline",
    )
    parser.add_argument(
        "--from-model",
        metavar="PATH",
        help="start from this trained dense network (a .keras file, e.g. "
        "the model.keras of a baseline run), converted to DeepMoE with "
        "keras_moe.models.to_deepmoe, instead of building --model "
        "(default: off)%(default).0s",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a depth-8 network on 512 digits (16x16), 3 + 1 epochs, offline",
    )
    return parser.parse_args(argv)


def load(args):
    kwargs = dict(
        batch_size=args.batch_size,
        max_train_examples=args.max_train_examples,
        max_test_examples=args.max_test_examples,
        seed=args.seed,
    )
    if args.smoke:
        kwargs["image_size"] = 16  # the 8x8 digits at twice their size
    name = args.dataset
    if name == "digits":
        # NumPy batches: the offline run imports no TensorFlow.
        kwargs["format"] = "numpy"
    if args.data_dir and name in ("cifar10", "cifar100"):
        loader = data.load_cifar10 if name == "cifar10" else data.load_cifar100
        return _common.load_or_exit(loader, args.data_dir, **kwargs)
    return _common.load_or_exit(
        data.load_dataset, name, data_dir=args.data_dir, **kwargs
    )


def build(args, info):
    if args.from_model:
        dense = keras.saving.load_model(args.from_model)
        return to_deepmoe(dense, num_classes=info.num_classes), dense
    config = dict(DEEPMOE_RESNET_PRESETS[args.model])
    config.update(num_classes=info.num_classes, input_shape=info.image_shape)
    if args.depth:
        config["depth"] = args.depth
    if args.smoke:
        config.update(depth=8)
        if config.get("gated", True):
            config.update(embedding_layers=2, embedding_filters=8)
    return DeepMoEResNet(**config), None


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        _common.compile_quickly()
    _imports()
    _common.check_preset(args.model, DEEPMOE_RESNET_PRESETS)
    if args.smoke:
        args.dataset, args.batch_size = "digits", 32
        args.joint_epochs, args.finetune_epochs = 3, 1
        args.max_train_examples = args.max_train_examples or 512
        args.max_test_examples = args.max_test_examples or 256
        args.lr_boundaries = [3]
    keras.utils.set_random_seed(args.seed)
    train, test, info = load(args)
    # Made once the data is there: a run without data leaves no folder.
    os.makedirs(args.output_dir, exist_ok=True)
    network, dense = build(args, info)
    gated = bool(args.from_model) or DEEPMOE_RESNET_PRESETS[args.model].get(
        "gated", True
    )
    if dense is not None:
        described = f"{args.from_model} converted to DeepMoE"
    else:
        described = args.model + (
            f" at depth {network.depth}" if args.smoke or args.depth else ""
        )
    print(
        f"{described} on {info.name} ({info.num_train} training, "
        f"{info.num_test} test images), backend {keras.backend.backend()}"
    )
    before = {}
    if dense is not None:
        dense.compile(
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        logs = dense.evaluate(test, return_dict=True, verbose=0)
        # The converted network, before training: every gate is 1, so it
        # computes the dense network's function.
        network.compile(
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        converted = network.evaluate(test, return_dict=True, verbose=0)
        before = dict(
            converted_from=args.from_model,
            accuracy_before_conversion=float(logs["accuracy"]),
            accuracy_at_conversion=float(converted["accuracy"]),
            mmacs_before_conversion=analysis.flop_report(dense).dense_macs
            / 1e6,
        )
        print(
            f"before conversion: test accuracy "
            f"{before['accuracy_before_conversion']:.4f}, "
            f"{before['mmacs_before_conversion']:.1f} M multiply-adds; "
            f"converted, before training: "
            f"{before['accuracy_at_conversion']:.4f}"
        )
    model, history = _common.train(
        network, train, test, args, metrics=["accuracy"], gated=gated
    )
    logs = model.evaluate(test, return_dict=True, verbose=0)
    # The trained network, for `keras.saving.load_model`.
    network.save(os.path.join(args.output_dir, "model.keras"))
    figures = ["model.keras", "curves.png"]
    if gated:
        gates, labels = analysis.collect_gates(network, test)
        flops, stats = _common.gate_report(
            network,
            gates,
            args.output_dir,
            labels=labels,
            class_names=info.class_names,
        )
        figures += ["gate_density.png", "class_gates.png"]
    else:
        flops, stats = analysis.flop_report(network), None
    _common.plot_curves(
        history,
        os.path.join(args.output_dir, "curves.png"),
        [
            ("accuracy", "val_accuracy"),
            ("loss", "val_loss"),
            ("gate_density", "flops_ratio"),
        ],
    )
    results = _common.results(
        args,
        info,
        network,
        history,
        flops,
        stats,
        gated,
        test_accuracy=float(logs["accuracy"]),
        **before,
    )
    _common.report(
        results,
        stats,
        [f"{described}: test accuracy {results['test_accuracy']:.4f}"],
        args.output_dir,
        figures,
    )
    return results


if __name__ == "__main__":
    main()
