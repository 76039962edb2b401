"""Digit data for the pMoE experiments: MNIST and grids of digit patches."""

import os

import numpy as np

from keras_moe.data.datasets import DatasetNotAvailableError
from keras_moe.data.datasets import _reachable

_MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"


def load_mnist(path=None):
    """Loads MNIST from a local `mnist.npz` or through `keras.datasets`.

    Args:
        path: optional path to an `mnist.npz` in the `keras.datasets.mnist`
            layout (`x_train`, `y_train`, `x_test`, `y_test`), read with
            NumPy alone (no TensorFlow needed). Without it,
            `keras.datasets.mnist.load_data()` is used: the Keras cache
            (`~/.keras/datasets/mnist.npz`), or a download.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: uint8 images
        `(num, 28, 28)` and integer labels.

    Raises:
        DatasetNotAvailableError: when `path` does not exist, or MNIST is
            neither cached nor downloadable (checked within seconds, with no
            network, instead of waiting for the download to time out).
    """
    if path is not None:
        if not os.path.isfile(path):
            raise DatasetNotAvailableError(
                f"No MNIST file at {path!r}. Give the path of an mnist.npz "
                "with x_train, y_train, x_test and y_test arrays."
            )
        with np.load(path) as data:
            return (data["x_train"], data["y_train"]), (
                data["x_test"],
                data["y_test"],
            )
    import keras

    cache = os.path.join(
        os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")),
        "datasets",
        "mnist.npz",
    )
    if not os.path.isfile(cache) and not _reachable(_MNIST_URL):
        raise DatasetNotAvailableError(
            "MNIST is not in the Keras cache and cannot be downloaded (no "
            "network). Pass the path of a local mnist.npz, or copy it to "
            f"{cache}."
        )
    return keras.datasets.mnist.load_data()


def make_patch_digits(
    images,
    labels,
    num_samples,
    class_digits=(0, 1),
    noise_digits=None,
    grid_size=4,
    seed=None,
):
    """Builds the synthetic patch data of pMoE section 5.1.

    Each sample is a `grid_size x grid_size` grid of digit images (`n`
    patches). Exactly one patch, at a uniformly random position, holds a
    class-discriminative digit: the class of the sample is the index of
    that digit in `class_digits`. Every other patch holds a digit drawn
    from `noise_digits`, the class-irrelevant patterns. With the defaults
    and MNIST, a "0" somewhere makes class 0 and a "1" makes class 1, the
    other 15 patches are digits 2-9: the paper's data (`n = 16` patches of
    `d = 28 x 28`). More `class_digits` give the multi-class data of
    appendix M.

    The classes are balanced (they differ by at most one sample), and each
    patch is a random image of its digit drawn from `images`, so build the
    training samples from training images and the test samples from test
    images.

    Args:
        images: `(num, height, width)` or `(num, height, width, channels)`
            digit images; uint8 images are scaled to [0, 1].
        labels: `(num,)` integer digit labels of `images`.
        num_samples: int, the number of samples to build.
        class_digits: sequence of the discriminative digits, one per class.
        noise_digits: sequence of the class-irrelevant digits. Defaults to
            every digit in `labels` that is not in `class_digits`.
        grid_size: int or tuple of 2 ints, the patch grid.
        seed: optional int, for reproducible samples.

    Returns:
        `(x, y, positions)`: float32 samples `(num_samples, grid_h * height,
        grid_w * width, channels)`, int32 class labels `(num_samples,)`,
        and int32 `(num_samples,)` positions of the discriminative patch,
        numbered row-major over the grid (the patch numbering of
        `PatchExpertChoiceMoE`).

    Example:

    ```python
    digits = np.repeat(np.arange(10), 3)
    images = np.random.default_rng(0).random((30, 8, 8))
    x, y, positions = keras_moe.data.make_patch_digits(
        images, digits, num_samples=6, seed=0)
    x.shape  # (6, 32, 32, 1)
    sorted(y.tolist())  # [0, 0, 0, 1, 1, 1]
    ```

    Reference:
        M. N. R. Chowdhury et al., "Patch-level Routing in Mixture-of-Experts
        is Provably Sample-efficient for Convolutional Neural Networks",
        ICML 2023, section 5.1 and appendix M.
    """
    images = np.asarray(images)
    labels = np.asarray(labels).reshape(-1)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(
            "`images` must be (num, height, width[, channels]) with one "
            f"label each. Received: images of shape {images.shape} and "
            f"{len(labels)} labels"
        )
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, (int, np.integer))
        or num_samples <= 0
    ):
        raise ValueError(
            "`num_samples` must be a positive integer. "
            f"Received: num_samples={num_samples!r}"
        )
    class_digits = list(class_digits)
    if len(class_digits) < 2 or len(set(class_digits)) != len(class_digits):
        raise ValueError(
            "`class_digits` must hold at least two different digits. "
            f"Received: class_digits={class_digits!r}"
        )
    if noise_digits is None:
        noise_digits = sorted(set(labels.tolist()) - set(class_digits))
    noise_digits = list(noise_digits)
    if not noise_digits or set(noise_digits) & set(class_digits):
        raise ValueError(
            "`noise_digits` must be non-empty and share no digit with "
            f"`class_digits`. Received: noise_digits={noise_digits!r}, "
            f"class_digits={class_digits!r}"
        )
    pools = {}
    for digit in class_digits + noise_digits:
        pools[digit] = np.flatnonzero(labels == digit)
        if not len(pools[digit]):
            raise ValueError(
                f"No image of digit {digit!r} in `images` (labels hold "
                f"{sorted(set(labels.tolist()))})."
            )
    if isinstance(grid_size, (int, np.integer)):
        grid_size = (int(grid_size), int(grid_size))
    grid_h, grid_w = grid_size
    if grid_h <= 0 or grid_w <= 0 or grid_h * grid_w < 2:
        raise ValueError(
            "`grid_size` must give at least 2 patches. "
            f"Received: grid_size={grid_size!r}"
        )
    num_patches = grid_h * grid_w

    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(num_samples) % len(class_digits))
    positions = rng.integers(0, num_patches, num_samples)
    # Draw a noise digit first, then an image of it, so that every noise
    # digit is equally likely whatever its number of images.
    noise_choice = rng.integers(
        0, len(noise_digits), (num_samples, num_patches)
    )
    patch_index = np.empty((num_samples, num_patches), dtype="int64")
    for i, digit in enumerate(noise_digits):
        where = noise_choice == i
        patch_index[where] = rng.choice(pools[digit], where.sum())
    for c, digit in enumerate(class_digits):
        rows = np.flatnonzero(y == c)
        patch_index[rows, positions[rows]] = rng.choice(pools[digit], len(rows))

    patches = images[patch_index]
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    _, height, width, channels = images.shape
    x = patches.reshape(num_samples, grid_h, grid_w, height, width, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(
        num_samples, grid_h * height, grid_w * width, channels
    )
    x = (x / scale).astype("float32")
    return x, y.astype("int32"), positions.astype("int32")
