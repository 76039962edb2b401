"""Standard augmentation and normalization for `tf.data` pipelines."""

import math
import numbers

import keras

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def cifar_augmentation(image_size=32, padding=4, seed=None):
    """The CIFAR augmentation of the ResNet and DeepMoE papers.

    Zero-pads each side of an image by `padding` pixels, takes a random
    `image_size` crop and flips horizontally with probability 1/2. The crop
    and flip are Keras preprocessing layers (`RandomCrop`, `RandomFlip`),
    which run inside `tf.data` whatever the Keras backend, so the dataset
    feeds JAX, TensorFlow and PyTorch models alike.

    The returned function works on one image `(height, width, channels)` at
    a time: map it before batching, so that every image gets its own crop
    (`RandomCrop` draws one offset per call).

    Args:
        image_size: int, the side of the square output crop.
        padding: int, the zero padding added to each side before cropping.
        seed: optional int, seed of the random crop and flip.

    Returns:
        A function mapping a float image tensor to an augmented one.

    Example:

    ```python
    import tensorflow as tf
    augment = keras_moe.data.cifar_augmentation(seed=0)
    images = tf.data.Dataset.from_tensor_slices(
        np.random.rand(4, 32, 32, 3).astype("float32"))
    batch = next(iter(images.map(augment).batch(4)))
    tuple(batch.shape)  # (4, 32, 32, 3)
    ```
    """
    import tensorflow as tf

    crop_and_flip = keras.layers.Pipeline(
        [
            keras.layers.RandomCrop(image_size, image_size, seed=seed),
            keras.layers.RandomFlip("horizontal", seed=seed),
        ]
    )
    paddings = [[padding, padding], [padding, padding], [0, 0]]

    def augment(image):
        padded = tf.pad(image, paddings)[None]
        return crop_and_flip(padded, training=True)[0]

    return augment


def normalization(mean, std):
    """Per-channel normalization `(x - mean) / std` of images in [0, 1].

    A `keras.layers.Normalization`, usable in `tf.data` pipelines and in
    models on any backend.

    Args:
        mean: sequence of finite per-channel means.
        std: sequence of finite per-channel standard deviations, > 0.

    Returns:
        A `keras.layers.Normalization` layer with those statistics.
    """
    mean, std = list(mean), list(std)
    if len(mean) != len(std) or not all(
        isinstance(m, numbers.Real) and math.isfinite(m) for m in mean
    ):
        raise ValueError(
            "`mean` must be finite numbers, one per channel of `std`. "
            f"Received: mean={mean!r}, std={std!r}"
        )
    if not all(
        isinstance(s, numbers.Real) and math.isfinite(s) and s > 0 for s in std
    ):
        raise ValueError(
            f"`std` must be finite numbers > 0. Received: std={std!r}"
        )
    layer = keras.layers.Normalization(
        mean=mean, variance=[float(s) ** 2 for s in std]
    )
    layer.build((None, None, None, len(mean)))
    return layer
