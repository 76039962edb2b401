"""Train DeepMoE-DRN-A-50 for semantic segmentation on Cityscapes.

    KERAS_BACKEND=jax python examples/cityscapes_deepmoe_drn.py \\
        --data-dir ~/tensorflow_datasets --manual-dir path/to/cityscapes-zips
    KERAS_BACKEND=jax python examples/cityscapes_deepmoe_drn.py --smoke

The model is a preset of `keras_moe.models.DeepMoEDRN`: wide
DeepMoE-DRN-A-50 (dilated ResNet-50 with gated bottlenecks, output stride
8) or the plain DRN-A-50 baseline. Cityscapes comes from
tensorflow-datasets (`cityscapes/semantic_segmentation`), which cannot
download it: put `leftImg8bit_trainvaltest.zip` and
`gtFine_trainvaltest.zip` in `--manual-dir` once, and tfds prepares them in
`--data-dir`. Labels are mapped to the 19 evaluation classes; every other
pixel has the ignore label 255 and counts neither in the loss nor in the
IoU.

As in DeepMoE section 5.4 (which follows the DRN training of Yu et al.),
the network trains on random `--crop-size` crops (832 x 832, with random
horizontal flips) of the `--image-size` frames with SGD, momentum 0.9 and
learning rate 5e-4 divided by 10 after 200 epochs; DeepMoE networks are
trained in two phases (joint, then the gating frozen and lambda = 0). The
test split (Cityscapes' validation images) is evaluated on whole frames,
with a copy of the network built for the frame size (the weights do not
depend on the input size).

The final report gives the mean IoU (`keras.metrics.MeanIoU` with
`ignore_class=255`) and the IoU of every class, dense and effective
multiply-adds per frame, gate density per layer and time per epoch, and saves
`results.json`, `curves.png` and `gate_density.png` in the output
directory. `--smoke` trains a tiny DRN on small synthetic images of
coloured rectangles, offline, in about half a minute.
"""

import argparse
import os
import warnings

import _common

# `keras_moe.data.CITYSCAPES_IGNORE_LABEL` and the names of
# `keras_moe.models.DEEPMOE_DRN_PRESETS`, here so that `--help` answers
# without importing Keras.
IGNORE = 255
PRESETS = ["drn_a50_cityscapes", "wide_deepmoe_drn_a50_cityscapes"]
CITYSCAPES_CLASSES = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
]


def _imports():
    """Keras, NumPy and keras_moe, imported once the arguments are parsed."""
    global keras, np, analysis, data, DEEPMOE_DRN_PRESETS, DeepMoEDRN
    global deepmoe_outputs
    import keras
    import numpy as np

    from keras_moe import analysis
    from keras_moe import data
    from keras_moe.models import DEEPMOE_DRN_PRESETS
    from keras_moe.models import DeepMoEDRN
    from keras_moe.models import deepmoe_outputs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default="wide_deepmoe_drn_a50_cityscapes",
        help=f"a preset: {', '.join(PRESETS)}",
    )
    parser.add_argument(
        "--variant",
        choices=["wide", "narrow"],
        help="override the preset's width (wide doubles the inner "
        "channels): drn_a50_cityscapes with wide is the paper's "
        "wide-DRN-A-50 baseline",
    )
    parser.add_argument(
        "--bottleneck",
        choices=["A", "B"],
        help="override the preset's gated bottleneck design",
    )
    parser.add_argument(
        "--dataset",
        default="cityscapes",
        choices=["cityscapes", "synthetic"],
        help="synthetic: small images of coloured rectangles, generated "
        "here, for machines without data",
    )
    parser.add_argument("--data-dir", help="tensorflow-datasets directory")
    parser.add_argument(
        "--manual-dir",
        help="folder with leftImg8bit_trainvaltest.zip and "
        "gtFine_trainvaltest.zip",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        default=[1024, 2048],
        metavar=("HEIGHT", "WIDTH"),
        help="frames are resized to this size (multiples of 8)",
    )
    parser.add_argument(
        "--crop-size",
        type=int,
        nargs=2,
        default=[832, 832],
        metavar=("HEIGHT", "WIDTH"),
        help="training crops (multiples of 8)",
    )
    _common.add_training_arguments(
        parser,
        joint_epochs=200,
        finetune_epochs=50,
        learning_rate=5e-4,
        lr_boundaries=[200],
        batch_size=8,
        mu=0.0,
        nesterov=False,
        output_dir="outputs/cityscapes_deepmoe_drn",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny DRN on small synthetic images, in about half a minute",
    )
    return parser.parse_args(argv)


def synthetic_segmentation(args, num_classes=3, image_size=(32, 48)):
    """Images of coloured rectangles on a background, labelled per pixel.

    Each class has its own colour; the top two rows are labelled `IGNORE`,
    like the unlabelled pixels of Cityscapes.
    """
    import tensorflow as tf

    rng = np.random.default_rng(args.seed)
    colours = rng.uniform(0.0, 1.0, size=(num_classes, 3))
    height, width = image_size

    def make(count):
        labels = np.zeros((count, height, width), "int32")
        for label in labels:
            for _ in range(3):
                top = rng.integers(0, height - 4)
                left = rng.integers(0, width - 4)
                bottom = top + rng.integers(4, height // 2)
                right = left + rng.integers(4, width // 2)
                label[top:bottom, left:right] = rng.integers(1, num_classes)
        images = colours[labels] + rng.normal(0, 0.1, labels.shape + (3,))
        labels[:, :2] = IGNORE
        dataset = tf.data.Dataset.from_tensor_slices(
            (images.astype("float32"), labels)
        )
        return dataset.batch(args.batch_size)

    num_train = args.max_train_examples or 64
    num_test = args.max_test_examples or 32
    info = data.DatasetInfo(
        name="synthetic",
        num_classes=num_classes,
        image_shape=(height, width, 3),
        class_names=["background"]
        + [f"rectangle {c}" for c in range(1, num_classes)],
        num_train=num_train,
        num_test=num_test,
        task="segmentation",
    )
    return make(num_train), make(num_test), info


def random_crop_flip(dataset, crop_size, batch_size, seed):
    """Random crops of images and labels together, and horizontal flips."""
    import tensorflow as tf

    height, width = crop_size

    def transform(image, label):
        both = tf.concat([image, tf.cast(label, image.dtype)[..., None]], -1)
        both = tf.image.random_crop(both, (height, width, 4), seed=seed)
        both = tf.image.random_flip_left_right(both, seed=seed)
        return both[..., :3], tf.cast(both[..., 3], label.dtype)

    return _common.per_example(dataset, transform, batch_size)


def load(args):
    if args.dataset == "synthetic":
        return synthetic_segmentation(args)
    train, test, info = _common.load_or_exit(
        data.load_dataset,
        "cityscapes",
        data_dir=args.data_dir,
        manual_dir=args.manual_dir,
        batch_size=args.batch_size,
        image_size=tuple(args.image_size),
        max_train_examples=args.max_train_examples,
        max_test_examples=args.max_test_examples,
        seed=args.seed,
        hint="Without the data, --smoke (or --dataset synthetic, images "
        "generated here) runs offline.",
    )
    info.class_names = CITYSCAPES_CLASSES
    return train, test, info


def build(args, num_classes, input_shape):
    config = dict(DEEPMOE_DRN_PRESETS[args.model])
    config.update(num_classes=num_classes, input_shape=input_shape)
    for option in ("variant", "bottleneck"):
        if getattr(args, option):
            config[option] = getattr(args, option)
    if args.smoke:
        config.update(
            embedding_layers=2,
            embedding_filters=4,
            stage_blocks=(1, 1, 1, 1),
            stage_widths=(8, 8, 16, 16),
        )
    return DeepMoEDRN(**config)


def mean_iou_metric(num_classes):
    class MeanIoU(keras.metrics.MeanIoU):
        """`keras.metrics.MeanIoU`, without jax's int64 warning.

        Keras casts the indices of its confusion matrix to int64
        (`keras.src.metrics.metrics_utils.confusion_matrix`); jax, which
        computes in int32 unless `jax_enable_x64` is set, warns at every
        update that it truncates them. Class indices fit in int32.
        """

        def update_state(self, *args, **kwargs):
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore",
                    message="Explicitly requested dtype int64",
                    category=UserWarning,
                )
                return super().update_state(*args, **kwargs)

    return MeanIoU(
        num_classes, sparse_y_pred=False, ignore_class=IGNORE, name="mean_iou"
    )


def evaluate(network, dataset, num_classes, gated):
    """Mean and per-class IoU, pixel accuracy and the gates on `dataset`."""
    metric = mean_iou_metric(num_classes)
    correct = labelled = 0
    gates = []
    if gated:
        network = deepmoe_outputs(network)
    for x, y in dataset.as_numpy_iterator():
        outputs = network.predict_on_batch(x)
        logits = outputs["logits"] if gated else outputs
        metric.update_state(y, logits)
        valid = y != IGNORE
        predicted = np.argmax(logits, axis=-1)
        correct += int(np.sum((predicted == y) & valid))
        labelled += int(np.sum(valid))
        if gated:
            gates.append(outputs["gates"])
    confusion = keras.ops.convert_to_numpy(metric.total_cm)
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    per_class = np.where(union > 0, intersection / np.maximum(union, 1), np.nan)
    gates = [np.concatenate(layer) for layer in zip(*gates)] if gated else None
    return {
        "mean_iou": float(keras.ops.convert_to_numpy(metric.result())),
        "per_class_iou": per_class,
        "pixel_accuracy": correct / max(labelled, 1),
        "gates": gates,
    }


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        _common.compile_quickly()
    _imports()
    _common.check_preset(args.model, DEEPMOE_DRN_PRESETS)
    if args.smoke:
        args.dataset, args.batch_size = "synthetic", 8
        args.image_size, args.crop_size = [32, 48], [32, 32]
        args.joint_epochs, args.finetune_epochs = 3, 1
        args.learning_rate, args.lr_boundaries = 0.05, [3]
    for option in ("image_size", "crop_size"):
        size = getattr(args, option)
        if any(side <= 0 or side % 8 for side in size):
            raise SystemExit(
                f"--{option.replace('_', '-')} must be positive multiples "
                f"of 8. Received: {size}"
            )
    keras.utils.set_random_seed(args.seed)
    train, test, info = load(args)
    # Made once the data is there: a run without data leaves no folder.
    os.makedirs(args.output_dir, exist_ok=True)
    frame = tuple(info.image_shape[:2])
    crop = tuple(min(c, f) for c, f in zip(args.crop_size, frame))
    network = build(args, info.num_classes, (*crop, 3))
    gated = DEEPMOE_DRN_PRESETS[args.model].get("gated", True)
    print(
        f"{args.model} on {info.name} ({info.num_train} training, "
        f"{info.num_test} test images of {frame[0]}x{frame[1]}, training "
        f"crops {crop[0]}x{crop[1]}), backend {keras.backend.backend()}"
    )
    if crop != frame:
        train = random_crop_flip(train, crop, args.batch_size, args.seed)
    _, history = _common.train(
        network,
        train,
        # Validation during training needs frames of the crop size.
        test if crop == frame else None,
        args,
        metrics=[mean_iou_metric(info.num_classes)],
        gated=gated,
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=IGNORE
        ),
        ignore_class=IGNORE,
    )
    evaluation_network = network
    if crop != frame:
        evaluation_network = build(args, info.num_classes, (*frame, 3))
        evaluation_network.set_weights(network.get_weights())
    scores = evaluate(evaluation_network, test, info.num_classes, gated)
    figures = ["curves.png"]
    if gated:
        flops, stats = _common.gate_report(
            evaluation_network, scores["gates"], args.output_dir
        )
        figures.append("gate_density.png")
    else:
        flops, stats = analysis.flop_report(evaluation_network), None
    _common.plot_curves(
        history,
        os.path.join(args.output_dir, "curves.png"),
        [
            ("mean_iou", "val_mean_iou"),
            ("loss", "val_loss"),
            ("gate_density", "flops_ratio"),
        ],
    )
    names = info.class_names or [str(c) for c in range(info.num_classes)]
    # Classes absent from the test pixels and never predicted have no IoU.
    per_class = {
        name: None if np.isnan(iou) else float(iou)
        for name, iou in zip(names, scores["per_class_iou"])
    }
    results = _common.results(
        args,
        info,
        network,
        history,
        flops,
        stats,
        gated,
        variant=network.variant,
        bottleneck=network.bottleneck,
        image_size=list(frame),
        crop_size=list(crop),
        mean_iou=scores["mean_iou"],
        per_class_iou=per_class,
        pixel_accuracy=scores["pixel_accuracy"],
    )
    _common.report(
        results,
        stats,
        [
            f"{args.model}: mean IoU {results['mean_iou']:.4f}, pixel "
            f"accuracy {results['pixel_accuracy']:.4f}",
            "IoU per class: "
            + ", ".join(
                f"{n}: {'-' if v is None else f'{v:.2f}'}"
                for n, v in per_class.items()
            ),
        ],
        args.output_dir,
        figures,
    )
    return results


if __name__ == "__main__":
    main()
