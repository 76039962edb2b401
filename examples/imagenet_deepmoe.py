"""Train a wide DeepMoE-ResNet or its ResNet baseline on ImageNet.

    KERAS_BACKEND=jax python examples/imagenet_deepmoe.py \\
        --data-dir ~/tensorflow_datasets --manual-dir path/to/imagenet-tars
    KERAS_BACKEND=jax python examples/imagenet_deepmoe.py --smoke  # about 30 s
    python examples/imagenet_deepmoe.py --dataset image_folder \\
        --data-dir path/to/imagenet-images   # train/<class>/*, test/<class>/*

The model is a preset of `keras_moe.models.DeepMoEResNet`: wide
DeepMoE-ResNet-18, -34, or -50 with bottleneck A or B, or the plain
ResNet-18/34/50 baseline. ImageNet comes from tensorflow-datasets
(`imagenet2012`), which cannot download it: put `ILSVRC2012_img_train.tar`
and `ILSVRC2012_img_val.tar` in `--manual-dir` once, and tfds prepares them
in `--data-dir`. Images are resized to `--resize` pixels and cropped to
`--image-size`: a random crop and horizontal flip for training, the centre
crop for testing.

The paper's ImageNet schedule is the default: 100 epochs, learning rate 0.1
divided by 10 every 30 epochs, mu = 0 and no fine-tuning phase (DeepMoE
section 5). Checkpoints go to the output directory after every epoch;
running the same command again resumes.

The final report gives top-1 and top-5 accuracy, dense and effective
multiply-adds, gate density per layer and time per epoch, and saves
`results.json`,
`curves.png`, `gate_density.png` and `class_gates.png` in the output
directory.
"""

import argparse
import os

import _common

# The ImageNet presets of `keras_moe.models.DEEPMOE_RESNET_PRESETS`, named
# here so that `--help` answers without importing Keras.
PRESETS = [
    "resnet18_imagenet",
    "resnet34_imagenet",
    "resnet50_imagenet",
    "wide_deepmoe_resnet18_imagenet",
    "wide_deepmoe_resnet34_imagenet",
    "wide_deepmoe_resnet50a_imagenet",
    "wide_deepmoe_resnet50b_imagenet",
]


def _imports():
    """Keras and keras_moe, imported once the arguments are parsed."""
    global keras, analysis, data, DEEPMOE_RESNET_PRESETS, DeepMoEResNet
    import keras

    from keras_moe import analysis
    from keras_moe import data
    from keras_moe.models import DEEPMOE_RESNET_PRESETS
    from keras_moe.models import DeepMoEResNet


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default="wide_deepmoe_resnet18_imagenet",
        help=f"a preset: {', '.join(PRESETS)}",
    )
    parser.add_argument(
        "--dataset",
        default="imagenet",
        choices=["imagenet", "image_folder", "digits"],
        help="imagenet: tfds imagenet2012; image_folder: --data-dir with "
        "train/<class>/* and test/<class>/*; digits: the small dataset "
        "that ships with scikit-learn, for machines without data",
    )
    parser.add_argument(
        "--data-dir",
        help="tensorflow-datasets directory, or the image folder",
    )
    parser.add_argument(
        "--manual-dir",
        help="folder with ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar",
    )
    parser.add_argument(
        "--resize", type=int, default=256, help="side images are resized to"
    )
    parser.add_argument(
        "--image-size", type=int, default=224, help="side of the crops"
    )
    _common.add_training_arguments(
        parser,
        joint_epochs=100,
        finetune_epochs=0,
        learning_rate=0.1,
        lr_boundaries=[30, 60, 90],
        batch_size=256,
        mu=0.0,
        output_dir="outputs/imagenet_deepmoe",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny model on the digits dataset, in about half a minute",
    )
    return parser.parse_args(argv)


def crop(dataset, size, batch_size, seed, random):
    """Crops batched `(images, labels)` to `size` x `size` pixels."""
    if random:
        flip = keras.layers.RandomFlip("horizontal", seed=seed)
        crop_layer = keras.layers.RandomCrop(size, size, seed=seed)

        def transform(x, y):
            return flip(crop_layer(x, training=True), training=True), y

    else:
        crop_layer = keras.layers.CenterCrop(size, size)

        def transform(x, y):
            return crop_layer(x), y

    return _common.per_example(dataset, transform, batch_size)


def load(args):
    train, test, info = _common.load_or_exit(
        data.load_dataset,
        args.dataset,
        data_dir=args.data_dir,
        manual_dir=args.manual_dir,
        batch_size=args.batch_size,
        image_size=args.resize,
        # The random crop below comes with its own flip.
        augment=False,
        max_train_examples=args.max_train_examples,
        max_test_examples=args.max_test_examples,
        seed=args.seed,
    )
    size = min(args.image_size, info.image_shape[0])
    if size < info.image_shape[0]:
        train = crop(train, size, args.batch_size, args.seed, random=True)
        test = crop(test, size, args.batch_size, args.seed, random=False)
        info.image_shape = (size, size, info.image_shape[2])
    return train, test, info


def build(args, info):
    config = dict(DEEPMOE_RESNET_PRESETS[args.model])
    config.update(num_classes=info.num_classes, input_shape=info.image_shape)
    if args.smoke:
        # Inputs of 64 pixels or less get the small-image design.
        config.update(depth=8, embedding_layers=2, embedding_filters=8)
    return DeepMoEResNet(**config)


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        _common.compile_quickly()
    _imports()
    _common.check_preset(args.model, DEEPMOE_RESNET_PRESETS)
    if args.smoke:
        # Digits resized to 20 pixels and cropped to 16, four joint epochs
        # and no fine-tuning, as in the paper's ImageNet schedule.
        args.dataset, args.batch_size = "digits", 32
        args.resize, args.image_size = 20, 16
        args.joint_epochs, args.finetune_epochs = 4, 0
        args.max_train_examples = args.max_train_examples or 512
        args.max_test_examples = args.max_test_examples or 256
        args.lr_boundaries = [3]
    keras.utils.set_random_seed(args.seed)
    train, test, info = load(args)
    # Made once the data is there: a run without data leaves no folder.
    os.makedirs(args.output_dir, exist_ok=True)
    network = build(args, info)
    gated = DEEPMOE_RESNET_PRESETS[args.model].get("gated", True)
    print(
        f"{args.model} on {info.name} ({info.num_train} training, "
        f"{info.num_test} test images of {info.image_shape}), backend "
        f"{keras.backend.backend()}"
    )
    top5 = keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5_accuracy")
    model, history = _common.train(
        network, train, test, args, metrics=["accuracy", top5], gated=gated
    )
    logs = model.evaluate(test, return_dict=True, verbose=0)
    figures = ["curves.png"]
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
            ("accuracy", "val_accuracy", "top5_accuracy", "val_top5_accuracy"),
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
        top1_accuracy=float(logs["accuracy"]),
        top5_accuracy=float(logs["top5_accuracy"]),
    )
    _common.report(
        results,
        stats,
        [
            f"{args.model}: top-1 accuracy {results['top1_accuracy']:.4f}, "
            f"top-5 accuracy {results['top5_accuracy']:.4f}"
        ],
        args.output_dir,
        figures,
    )
    return results


if __name__ == "__main__":
    main()
