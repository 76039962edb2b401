"""Compare WRN and WRN-pMoE on CelebA over training-set sizes.

    KERAS_BACKEND=jax python examples/celeba_wrn_pmoe.py          # smiling
    python examples/celeba_wrn_pmoe.py --task smiling_eyeglasses  # 4 classes
    python examples/celeba_wrn_pmoe.py --smoke                    # about 30 s

The pMoE paper's CelebA experiment (section 5.2, figures 10 and 12):
WRN-10-10 against WRN-pMoE, the same network with its last convolution
replaced by a `PatchExpertChoiceMoE` (16x16x640 map cut into 16 patches of
4x4, 8 experts with 2 patches each, 3x3 experts with 80 filters, joint
training with softmax gating), on 64x64 CelebA images. Tasks: `smiling`
(binary) and `smiling_eyeglasses` (four classes: smiling x eyeglasses).
Each model is trained from scratch on class-balanced subsets of the
training split (4,000 to 16,000 images by default, nested) and tested on a
class-balanced set of 2,000 test images; the test accuracy after the last
epoch is averaged over `--runs` runs. Defaults follow the authors'
protocol: SGD with learning rate 0.1 and no momentum, batch 128, 50 epochs,
no augmentation.

Data: CelebA through tensorflow-datasets (`--data-dir` is its data
directory), or an image folder with `train/<class>/*` and
`test/<class>/*` given as `--data-dir`; images are resized to 64x64.
Without the prepared dataset and without network the script stops within
seconds and says how to provide it. The loader keeps decoded images in
memory: reading enough images of the rare "smiling, eyeglasses" class for
the four-class task takes several GB of RAM. `--smoke` trains a narrow
network for four epochs on 400 synthetic images (no faces, made at 64x64
and halved to 32x32) whose classes are small local marks (a "smile" bar
in the lower half, dark "eyeglasses" in the upper half), offline, in about
half a minute.

`--architecture authors` trains the networks of the authors' public code
instead (presets `authors_wrn10_10_celeba` and
`authors_wrn10_10_pmoe_celeba`, with the task's number of classes), and
`--widening-factor` a narrower WRN-10-k; see `cifar_wrn_pmoe.py --help`.

Writes to `--output-dir`, as `cifar_wrn_pmoe.py` does, and lists at the
end of the run: `results.json` (every run, means and standard deviations,
parameters, FLOPs and routing statistics), `accuracy.png`,
`selection_frequency.png` and `patch_selection.png` (the last two with
WRN-pMoE in `--models`), `runs/<model>_<size>_<run>.json` (each finished
run, read back when the comparison is started again) and
`runs/wrn_pmoe_<size>_<run>.weights.h5` (each WRN-pMoE run's weights, for
the routing figures of a resumed comparison).
"""

import argparse
import os

import _common
from cifar_wrn_pmoe import add_arguments
from cifar_wrn_pmoe import run_comparison

TASKS = ("smiling", "smiling_eyeglasses")
CLASS_NAMES = {
    "smiling": ["not smiling", "smiling"],
    "smiling_eyeglasses": [
        "no smile, no eyeglasses",
        "no smile, eyeglasses",
        "smile, no eyeglasses",
        "smile, eyeglasses",
    ],
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--task",
        default="smiling",
        choices=TASKS,
        help="smiling: 2 classes; smiling_eyeglasses: 4 classes",
    )
    parser.add_argument(
        "--data-dir",
        help="tensorflow-datasets directory holding celeb_a, or an image "
        "folder with train/<class>/* and test/<class>/* (classes in the "
        "sorted order of their folder names)",
    )
    parser.add_argument(
        "--no-download",
        action="store_true",
        help="stop instead of downloading CelebA when it is not prepared",
    )
    add_arguments(
        parser,
        train_sizes=[4000, 8000, 12000, 16000],
        test_size=2000,
        output_dir="outputs/celeba_wrn_pmoe",
    )
    return parser.parse_args(argv)


def synthetic(num_examples, task, seed):
    """64x64 images whose classes are local marks, with the loader's
    labels.

    A smooth random background; "smiling" adds a bright bar at a random
    place in the lower half, "eyeglasses" two dark squares at a random
    height in the upper half. Labels: `smiling`, or `2 * smiling +
    eyeglasses` for the four-class task, as `keras_moe.data` gives them.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0.3, 0.7, size=(num_examples, 8, 8, 3))
    images = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
    images += rng.normal(0, 0.05, size=images.shape)
    smiling = rng.integers(0, 2, num_examples)
    glasses = rng.integers(0, 2, num_examples)
    for i in range(num_examples):
        if smiling[i]:
            row, col = rng.integers(36, 56), rng.integers(8, 40)
            images[i, row : row + 4, col : col + 16] = 1.0
        if glasses[i]:
            row = rng.integers(8, 24)
            images[i, row : row + 6, 14:24] = 0.0
            images[i, row : row + 6, 40:50] = 0.0
    labels = smiling if task == "smiling" else 2 * smiling + glasses
    return np.clip(images, 0, 1).astype("float32"), labels.astype("int64")


def load(args):
    """CelebA from tensorflow-datasets, or synthetic data for `--smoke`."""
    from keras_moe import data

    if args.smoke:
        # The synthetic images at half size (2x2 means): four times less
        # work per step, so that the smoke run's few dozen steps are quick.
        num_classes = 2 if args.task == "smiling" else 4
        splits = []
        for size in (400, 200):
            x, y = synthetic(size, args.task, args.seed + len(splits))
            x = x.reshape(size, 32, 2, 32, 2, 3).mean(axis=(2, 4))
            splits.append(data.ArrayBatches(x, y.astype("int32"), 64))
        info = data.DatasetInfo(
            name=f"synthetic_{args.task}",
            num_classes=num_classes,
            class_names=CLASS_NAMES[args.task],
            image_shape=(32, 32, 3),
            num_train=400,
            num_test=200,
        )
        return splits[0], splits[1], info
    folder = args.data_dir and os.path.isdir(
        os.path.join(args.data_dir, "train")
    )
    return data.load_dataset(
        "image_folder" if folder else f"celeba_{args.task}",
        data_dir=args.data_dir,
        batch_size=512,
        image_size=64,
        augment=False,
        normalize=False,
        seed=args.seed,
        download=not args.no_download,
    )


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        _common.compile_quickly()
    if args.smoke:
        # As cifar_wrn_pmoe.py's smoke run: a few dozen steps that learn.
        args.train_sizes = [400]
        args.test_size = 200
        args.runs, args.epochs, args.batch_size = 1, 4, 32
        args.widening_factor = 1
        args.momentum = args.batch_norm_momentum = 0.9
    return run_comparison(
        args,
        load,
        {
            "paper": ("wrn10_10_celeba", "wrn10_10_pmoe_celeba"),
            "authors": (
                "authors_wrn10_10_celeba",
                "authors_wrn10_10_pmoe_celeba",
            ),
        },
        lambda info: f"CelebA {args.task}: WRN vs WRN-pMoE",
    )


if __name__ == "__main__":
    main()
