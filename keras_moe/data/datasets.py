"""Dataset loaders: tensorflow-datasets, image folders and offline digits.

Every loader returns `(train, test, info)`: two batched pipelines of
`(images, labels)` with float32 images, and a `DatasetInfo`. The pipelines
are `tf.data.Dataset`s when TensorFlow is installed; they feed `model.fit`
on every Keras backend. Without TensorFlow (a jax-only or torch-only
install), `"digits"` and `"image_folder"` (and CIFAR-10/100 stored as an
image folder) come as `ArrayBatches`, `keras.utils.PyDataset`s of NumPy
batches, with image files read by Pillow; the tensorflow-datasets names
need the `data` extra. `format="numpy"` asks for NumPy batches even when
TensorFlow is installed.
"""

import dataclasses
import os
import socket
import urllib.parse

import keras
import numpy as np

from keras_moe.data import augmentation as aug
from keras_moe.layers._validation import check_positive_int


class DatasetNotAvailableError(RuntimeError):
    """Raised when a dataset is neither on disk nor downloadable."""


@dataclasses.dataclass
class DatasetInfo:
    """What a loader returns besides the data.

    Attributes:
        name: the dataset's name.
        num_classes: number of classes (per pixel for segmentation).
        image_shape: `(height, width, channels)` of the images the model
            gets.
        class_names: list of class names, when known.
        num_train: number of training examples, when known.
        num_test: number of test examples, when known.
        task: `"classification"` or `"segmentation"`.
    """

    name: str
    num_classes: int
    image_shape: tuple
    class_names: list = None
    num_train: int = None
    num_test: int = None
    task: str = "classification"


# name: (tfds name, train split, test split, needs manual download).
_TFDS = {
    "cifar10": ("cifar10", "train", "test", False),
    "cifar100": ("cifar100", "train", "test", False),
    "celeba_smiling": ("celeb_a", "train", "test", False),
    "celeba_smiling_eyeglasses": ("celeb_a", "train", "test", False),
    "cityscapes": (
        "cityscapes/semantic_segmentation",
        "train",
        "validation",
        True,
    ),
    "imagenet": ("imagenet2012", "train", "validation", True),
}
DATASETS = tuple(_TFDS) + ("image_folder", "digits")
# The datasets that also load as NumPy batches, without TensorFlow.
_NUMPY_DATASETS = ("image_folder", "digits")
_FORMATS = ("tf", "numpy")

# Cityscapes label ids -> the 19 evaluation classes; everything else is 255.
_CITYSCAPES_TRAIN_IDS = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}
CITYSCAPES_IGNORE_LABEL = 255


def load_dataset(
    name,
    data_dir=None,
    manual_dir=None,
    batch_size=128,
    image_size=None,
    augment=True,
    normalize=True,
    max_train_examples=None,
    max_test_examples=None,
    seed=None,
    download=True,
    format=None,
):
    """Loads a dataset as batched pipelines for training.

    Supported names: `"cifar10"`, `"cifar100"`, `"celeba_smiling"` (binary:
    smiling), `"celeba_smiling_eyeglasses"` (4 classes: smiling x
    eyeglasses), `"cityscapes"` (semantic segmentation, 19 classes, ignore
    label 255), `"imagenet"` through tensorflow-datasets; `"image_folder"`
    (`data_dir` holds `train/<class>/*` and `test/<class>/*` with the same
    class folders, each with at least one `.png`, `.jpg`, `.jpeg`, `.bmp`
    or `.gif` image; other files are skipped); and
    `"digits"`, the 1,797 8x8 handwritten digits that ship inside
    scikit-learn, resized to 32x32 RGB, for running examples on a machine
    without network or datasets.

    The pipelines are `tf.data.Dataset`s (`format="tf"`) or `ArrayBatches`,
    `keras.utils.PyDataset`s of NumPy batches that need no TensorFlow
    (`format="numpy"`). By default they are `tf.data` when TensorFlow is
    installed and NumPy batches otherwise. `"digits"` and `"image_folder"`
    load either way, with the same subsets, shuffling, augmentation and
    normalization; as NumPy batches, image files are read with Pillow and
    resized bilinearly as `keras.utils.image_dataset_from_directory` does
    (decoded images of at most 64x64 pixels are kept in memory, as the
    `tf.data` pipeline caches them). The tensorflow-datasets names load
    only as `tf.data`: without TensorFlow they raise a
    `DatasetNotAvailableError` naming the `data` extra.

    For the tensorflow-datasets names, `data_dir` is the tfds data
    directory. When the dataset is not prepared there and its source cannot
    be reached (or `download=False`), a `DatasetNotAvailableError` explaining
    how to provide the data is raised within seconds, instead of waiting for
    download retries. ImageNet and Cityscapes need their archives in
    `manual_dir` (see the tfds instructions).

    Training data is shuffled and, with `augment`, augmented (with Keras
    preprocessing layers in `tf.data`, in NumPy otherwise): for 32x32
    images the CIFAR augmentation (4-pixel zero padding, random crop and
    horizontal flip), for other classification images a random horizontal
    flip; segmentation data is not augmented.
    With `normalize`, images are standardized per channel with the
    dataset's statistics (CIFAR-10/100), ImageNet's statistics otherwise, or
    the `(mean, std)` pair given.

    Args:
        name: one of `keras_moe.data.DATASETS`.
        data_dir: tfds data directory, or the image folder.
        manual_dir: directory with manually downloaded archives (tfds).
        batch_size: int, the batch size.
        image_size: optional int or `(height, width)` to resize to.
        augment: bool, whether to augment the training split.
        normalize: bool, or a `(mean, std)` pair of per-channel statistics
            of images in [0, 1].
        max_train_examples: optional int, use only this many training
            examples.
        max_test_examples: optional int, use only this many test examples.
        seed: optional int, seed of the shuffling and augmentation.
        download: bool, whether tfds may download a missing dataset.
        format: `"tf"` for `tf.data` pipelines, `"numpy"` for
            `ArrayBatches` (`"digits"` and `"image_folder"` only), or `None`
            for `"tf"` when TensorFlow is installed and `"numpy"` otherwise.

    Returns:
        `(train, test, info)`.

    Example:

    ```python
    train, test, info = keras_moe.data.load_dataset("digits", batch_size=32)
    info.num_classes, info.image_shape  # (10, (32, 32, 3))
    ```
    """
    if name not in DATASETS:
        raise ValueError(
            f"Unknown dataset. Expected one of {list(DATASETS)}. "
            f"Received: name={name!r}"
        )
    check_positive_int("batch_size", batch_size)
    image_size = _size_pair(image_size)
    format = _data_format(name, format)
    if format == "numpy":
        # In memory or read from files: NumPy batches, no TensorFlow.
        if name == "digits":
            splits, info = _digits_without_tensorflow(image_size or (32, 32))
        else:
            splits, info = _image_folder_without_tensorflow(
                data_dir, image_size
            )
        return _numpy_batches(
            splits,
            info,
            batch_size,
            augment,
            normalize,
            max_train_examples,
            max_test_examples,
            seed,
        )
    _require_tensorflow(name)
    if name == "image_folder":
        train, test, info = _image_folder(data_dir, image_size)
    elif name == "digits":
        train, test, info = _digits(image_size or (32, 32))
    else:
        train, test, info = _from_tfds(
            name, data_dir, manual_dir, image_size, download
        )
    return _finish(
        train,
        test,
        info,
        batch_size,
        augment,
        normalize,
        max_train_examples,
        max_test_examples,
        seed,
    )


def load_cifar10(data_dir=None, **kwargs):
    """CIFAR-10 from tensorflow-datasets, or from an image folder.

    An image folder is standardized with CIFAR-10's statistics unless
    `normalize` says otherwise, and loads without TensorFlow too (see
    `load_dataset`).

    Args:
        data_dir: the tfds data directory; or a folder with
            `train/<class>/*` and `test/<class>/*` images, which is then
            read as an image folder.
        **kwargs: further arguments of `load_dataset`.

    Returns:
        `(train, test, info)`, see `load_dataset`.
    """
    if data_dir is not None and _is_image_folder(data_dir):
        kwargs.setdefault("normalize", (aug.CIFAR10_MEAN, aug.CIFAR10_STD))
        return load_dataset("image_folder", data_dir=data_dir, **kwargs)
    return load_dataset("cifar10", data_dir=data_dir, **kwargs)


def load_cifar100(data_dir=None, **kwargs):
    """CIFAR-100 (fine labels) from tensorflow-datasets or an image folder.

    An image folder is standardized with CIFAR-100's statistics unless
    `normalize` says otherwise, and loads without TensorFlow too (see
    `load_dataset`).

    Args:
        data_dir: the tfds data directory or an image folder.
        **kwargs: further arguments of `load_dataset`.

    Returns:
        `(train, test, info)`, see `load_dataset`.
    """
    if data_dir is not None and _is_image_folder(data_dir):
        kwargs.setdefault("normalize", (aug.CIFAR100_MEAN, aug.CIFAR100_STD))
        return load_dataset("image_folder", data_dir=data_dir, **kwargs)
    return load_dataset("cifar100", data_dir=data_dir, **kwargs)


def _has_tensorflow():
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def _require_tensorflow(name):
    """The pipelines are `tf.data`: TensorFlow must be importable, whatever
    the Keras backend."""
    try:
        import tensorflow  # noqa: F401
    except ImportError as error:
        offline = (
            'or pass `format="numpy"` for NumPy batches, which need none'
            if name in _NUMPY_DATASETS
            else 'or load "digits" or "image_folder", which need none, or '
            "pass NumPy arrays to `fit`"
        )
        raise DatasetNotAvailableError(
            f"Loading {name!r} as `tf.data` pipelines, which feed "
            "`model.fit` on every Keras backend, needs TensorFlow: install "
            'the `data` extra (`pip install "keras-moe[data]"`, or `pip '
            f'install ".[jax,data]"` in a clone), {offline}.'
        ) from error


def _data_format(name, format):
    """The pipeline format of `name`: `format`, or what is installed."""
    if format not in (None,) + _FORMATS:
        raise ValueError(
            f"`format` must be one of {list(_FORMATS)} or None. "
            f"Received: format={format!r}"
        )
    if name not in _NUMPY_DATASETS:
        if format == "numpy":
            raise ValueError(
                f"{name!r} comes from tensorflow-datasets as `tf.data` "
                'pipelines; `format="numpy"` is for '
                f"{' and '.join(map(repr, _NUMPY_DATASETS))}. "
                f"Received: format={format!r}"
            )
        return "tf"
    if format is None:
        return "tf" if _has_tensorflow() else "numpy"
    return format


def _size_pair(image_size):
    if image_size is None:
        return None
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or any(not isinstance(s, int) or s <= 0 for s in image_size)
    ):
        raise ValueError(
            "`image_size` must be a positive int or a (height, width) pair. "
            f"Received: image_size={image_size!r}"
        )
    return tuple(image_size)


def _is_image_folder(path):
    return os.path.isdir(os.path.join(path, "train")) and os.path.isdir(
        os.path.join(path, "test")
    )


# The files `keras.utils.image_dataset_from_directory` reads; anything else
# in a class folder (`.DS_Store`, `Thumbs.db`, notes) is skipped.
_IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")


def _class_folders(split_dir):
    """The class folders of a split, as Keras lists them (hidden skipped)."""
    return sorted(
        d
        for d in os.listdir(split_dir)
        if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith(".")
    )


def _image_files(folder):
    """The image files under a class folder, sorted, as Keras finds them."""
    found = []
    for root, _, files in sorted(os.walk(folder)):
        found += [
            os.path.join(root, f)
            for f in sorted(files)
            if f.lower().endswith(_IMAGE_EXTENSIONS)
        ]
    return found


def _image_folder_files(data_dir):
    """The class names of an image folder, and the image files of each
    class in its `train` and `test` splits."""
    if data_dir is None or not _is_image_folder(data_dir):
        raise DatasetNotAvailableError(
            "An image folder needs `data_dir` with `train/<class>/*` and "
            "`test/<class>/*` images (for example CIFAR-10 extracted from "
            f"an image-folder archive). Received: data_dir={data_dir!r}"
        )
    train_dir = os.path.join(data_dir, "train")
    test_dir = os.path.join(data_dir, "test")
    class_names = _class_folders(train_dir)
    if not class_names:
        raise DatasetNotAvailableError(f"No class folders in {train_dir!r}.")
    test_names = _class_folders(test_dir)
    if test_names != class_names:
        # Labels are the classes' indices in one list shared by the two
        # splits: a test class unknown to training would be dropped.
        raise DatasetNotAvailableError(
            f"The class folders of {test_dir!r} and {train_dir!r} differ: "
            f"only in test: {sorted(set(test_names) - set(class_names))}, "
            f"only in train: {sorted(set(class_names) - set(test_names))}. "
            "Both splits need a folder for every class."
        )
    files = []
    for split_dir in (train_dir, test_dir):
        split_files = []
        for name in class_names:
            images = _image_files(os.path.join(split_dir, name))
            if not images:
                raise DatasetNotAvailableError(
                    f"The class folder {os.path.join(split_dir, name)!r} "
                    f"holds no images (files ending in "
                    f"{', '.join(_IMAGE_EXTENSIONS)}). Add its images, or "
                    "remove the class from both splits."
                )
            split_files.append(images)
        files.append(split_files)
    return class_names, files


def _image_folder(data_dir, image_size):
    class_names, files = _image_folder_files(data_dir)
    if image_size is None:
        # The size of the first training image, so images keep their size.
        image_size = _read_image(files[0][0][0]).shape[:2]
    splits = []
    for split in ("train", "test"):
        ds = keras.utils.image_dataset_from_directory(
            os.path.join(data_dir, split),
            labels="inferred",
            label_mode="int",
            class_names=class_names,
            image_size=image_size,
            batch_size=None,
            shuffle=False,
            verbose=False,
        )
        splits.append(ds.map(lambda x, y: (x / 255.0, y)))
    shape = tuple(splits[0].element_spec[0].shape)
    info = DatasetInfo(
        name="image_folder",
        num_classes=len(class_names),
        image_shape=shape,
        class_names=class_names,
        num_train=int(splits[0].cardinality()),
        num_test=int(splits[1].cardinality()),
    )
    return splits[0], splits[1], info


def _image_folder_without_tensorflow(data_dir, image_size):
    """The image folder's splits as `(images, labels)`, images read from
    their files when indexed, with Pillow; and its `DatasetInfo`."""
    class_names, files = _image_folder_files(data_dir)
    if image_size is None:
        image_size = _read_image(files[0][0][0]).shape[:2]
    splits = []
    for split_files in files:
        # `image_dataset_from_directory`'s order and labels: the files of
        # each class in turn, labelled with the index of their class.
        paths = [path for paths in split_files for path in paths]
        labels = np.repeat(
            np.arange(len(class_names), dtype="int32"),
            [len(paths) for paths in split_files],
        )
        splits.append((_ImageFiles(paths, image_size), labels))
    info = DatasetInfo(
        name="image_folder",
        num_classes=len(class_names),
        image_shape=(*image_size, 3),
        class_names=class_names,
        num_train=len(splits[0][1]),
        num_test=len(splits[1][1]),
    )
    return splits, info


def _read_image(path):
    """The image file at `path` as a uint8 RGB array `(height, width, 3)`,
    as `image_dataset_from_directory` decodes it (grayscale repeated, alpha
    dropped, the first frame of an animation)."""
    try:
        from PIL import Image
    except ImportError as error:
        raise DatasetNotAvailableError(
            "Reading an image folder needs Pillow: `pip install pillow` "
            "(the `data` extra installs it)."
        ) from error
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _resize_bilinear(images, size):
    """Bilinear resizing of float `(num, height, width, channels)` images,
    as `tf.image.resize` does without antialiasing (pixel centres at
    half-integers, edge pixels repeated)."""

    def taps(in_size, out_size):
        position = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
        position = np.clip(position, 0, in_size - 1)
        low = np.floor(position).astype(int)
        high = np.minimum(low + 1, in_size - 1)
        return low, high, (position - low).astype(images.dtype)

    top, bottom, dy = taps(images.shape[1], size[0])
    left, right, dx = taps(images.shape[2], size[1])
    dy, dx = dy[None, :, None, None], dx[None, None, :, None]
    rows = images[:, top] * (1 - dy) + images[:, bottom] * dy
    return rows[:, :, left] * (1 - dx) + rows[:, :, right] * dx


def _rows(images, idx):
    """The images at `idx`, of an array or of `_ImageFiles`."""
    if isinstance(images, _ImageFiles):
        return _ImageFiles([images.paths[i] for i in idx], images.image_size)
    return images[idx]


class _ImageFiles:
    """Image files as an array of float32 RGB images in [0, 1] that reads
    the files it is indexed with (by an integer array), resized to
    `image_size`. Images of at most 64x64 pixels are read once and kept."""

    def __init__(self, paths, image_size):
        self.paths = list(paths)
        self.image_size = tuple(image_size)
        height, width = self.image_size
        self._cache = {} if height * width <= 64 * 64 else None

    def __len__(self):
        return len(self.paths)

    def _image(self, index):
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        image = _read_image(self.paths[index]).astype("float32")
        if image.shape[:2] != self.image_size:
            image = _resize_bilinear(image[None], self.image_size)[0]
        image = image / np.float32(255.0)
        if self._cache is not None:
            self._cache[index] = image
        return image

    def __getitem__(self, rows):
        rows = np.asarray(rows)
        if rows.ndim != 1:
            raise IndexError(
                "Image files are indexed with a 1D array of integers. "
                f"Received: {rows!r}"
            )
        height, width = self.image_size
        if not len(rows):
            return np.zeros((0, height, width, 3), "float32")
        return np.stack([self._image(int(i)) for i in rows])


def _digits_arrays():
    """The digits in [0, 1], `(1797, 8, 8, 1)`, their labels, and the
    indices of the training and test splits (a fixed fifth for test)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise DatasetNotAvailableError(
            'The "digits" dataset ships with scikit-learn: '
            "`pip install scikit-learn` (or the `data` extra)."
        ) from error
    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[..., None]
    labels = digits.target.astype("int64")
    order = np.random.default_rng(0).permutation(len(labels))
    num_test = len(labels) // 5
    return images, labels, order[num_test:], order[:num_test]


def _digits(image_size):
    import tensorflow as tf

    images, labels, train_idx, test_idx = _digits_arrays()
    num_test = len(test_idx)

    def split(idx):
        x = tf.image.resize(images[idx], image_size)
        x = tf.image.grayscale_to_rgb(x)
        return tf.data.Dataset.from_tensor_slices((x, labels[idx]))

    info = DatasetInfo(
        name="digits",
        num_classes=10,
        image_shape=(*image_size, 3),
        class_names=[str(i) for i in range(10)],
        num_train=len(train_idx),
        num_test=num_test,
    )
    return split(train_idx), split(test_idx), info


def _digits_without_tensorflow(image_size):
    """The digits' splits as `(images, labels)` arrays, and their info."""
    images, labels, train_idx, test_idx = _digits_arrays()
    resized = keras.ops.image.resize(images, image_size)
    resized = np.asarray(keras.ops.convert_to_numpy(resized), "float32")
    rgb = np.repeat(resized, 3, axis=-1)
    info = DatasetInfo(
        name="digits",
        num_classes=10,
        image_shape=(*image_size, 3),
        class_names=[str(i) for i in range(10)],
        num_train=len(train_idx),
        num_test=len(test_idx),
    )
    splits = [(rgb[idx], labels[idx]) for idx in (train_idx, test_idx)]
    return splits, info


def _numpy_batches(
    splits, info, batch_size, augment, normalize, max_train, max_test, seed
):
    """`_finish` for NumPy: `(images, labels)` splits as `ArrayBatches`,
    with the subsets, shuffling, augmentation and normalization of the
    `tf.data` pipelines."""
    subsets = []
    for (images, labels), limit in zip(splits, (max_train, max_test)):
        if limit is not None:
            _check_limit(limit)
        if limit is not None and limit < len(labels):
            # The examples `_subset` keeps, in their order.
            rng = np.random.default_rng(seed)
            idx = np.sort(rng.choice(len(labels), limit, replace=False))
            images, labels = _rows(images, idx), labels[idx]
        subsets.append((images, labels))
    info.num_train, info.num_test = (len(labels) for _, labels in subsets)
    mean = std = None
    if normalize:
        mean, std = (
            _STATISTICS.get(info.name, (aug.IMAGENET_MEAN, aug.IMAGENET_STD))
            if normalize is True
            else normalize
        )
        aug.normalization(mean, std)  # checks the statistics
    train = ArrayBatches(
        *subsets[0],
        batch_size,
        shuffle=True,
        augment=augment and info.task == "classification",
        mean=mean,
        std=std,
        seed=seed,
    )
    test = ArrayBatches(*subsets[1], batch_size, mean=mean, std=std)
    return train, test, info


class ArrayBatches(keras.utils.PyDataset):
    """Batches of images and labels as NumPy arrays, without TensorFlow.

    What `load_dataset` returns for `"digits"` and `"image_folder"` when
    TensorFlow is not installed (or with `format="numpy"`): a
    `keras.utils.PyDataset` that `fit`,
    `evaluate` and `predict` take on every backend. With `shuffle` the
    order changes at every epoch (`on_epoch_end`, which `fit` calls), as
    a function of `seed` and the epoch; with `augment`, 32x32 images get
    the CIFAR augmentation (4-pixel zero padding, a random crop, a
    horizontal flip) and other images a random horizontal flip; with
    `mean` and `std`, images are standardized per channel.

    Args:
        images: float array `(num, height, width, channels)`, or an object
            with `len` that gives such an array when indexed by an integer
            array (as the image folders' files are read batch by batch).
        labels: integer array `(num,)`.
        batch_size: int, examples per batch (the last may be smaller).
        shuffle: bool, whether to shuffle at every epoch.
        augment: bool, whether to augment.
        mean: optional per-channel means to subtract.
        std: optional per-channel standard deviations to divide by.
        seed: optional int, seed of the order and the augmentation.

    Example:

    ```python
    images = np.random.rand(10, 8, 8, 3).astype("float32")
    labels = np.arange(10) % 2
    batches = keras_moe.data.ArrayBatches(images, labels, batch_size=4)
    len(batches)  # 3
    batches[2][0].shape  # (2, 8, 8, 3)
    ```
    """

    def __init__(
        self,
        images,
        labels,
        batch_size,
        shuffle=False,
        augment=False,
        mean=None,
        std=None,
        seed=None,
    ):
        super().__init__()
        check_positive_int("batch_size", batch_size)
        if len(images) != len(labels):
            raise ValueError(
                "`images` and `labels` must hold as many examples. Received "
                f"{len(images)} images and {len(labels)} labels."
            )
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.shuffle, self.augment = shuffle, augment
        self.mean = None if mean is None else np.asarray(mean, "float32")
        self.std = None if std is None else np.asarray(std, "float32")
        self.seed = 0 if seed is None else seed
        self.epoch = 0
        self._order()

    def _order(self):
        num = len(self.labels)
        self.order = (
            np.random.default_rng((self.seed, self.epoch)).permutation(num)
            if self.shuffle
            else np.arange(num)
        )

    def __len__(self):
        return -(-len(self.labels) // self.batch_size)

    @property
    def num_batches(self):
        return len(self)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        rows = self.order[
            index * self.batch_size : (index + 1) * self.batch_size
        ]
        x = self.images[rows]
        if self.augment:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            x = _augment(x, rng)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        # int32 labels: JAX computes in 32-bit integers.
        return x.astype("float32"), self.labels[rows].astype("int32")

    def on_epoch_end(self):
        self.epoch += 1
        self._order()


def _augment(x, rng):
    """The CIFAR crop and flip for 32x32 images, a flip for others."""
    num, height, width, _ = x.shape
    flip = rng.random(num) < 0.5
    x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
    if height == width == 32:
        padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
        dy, dx = rng.integers(0, 9, size=(2, num))
        x = np.stack(
            [
                p[i : i + height, j : j + width]
                for p, i, j in zip(padded, dy, dx)
            ]
        )
    return x


def _reachable(url, timeout=3.0):
    """Whether a TCP connection to the host of `url` opens quickly."""
    parsed = urllib.parse.urlparse(url)
    if not parsed.hostname:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout):
            return True
    except OSError:
        return False


def _from_tfds(name, data_dir, manual_dir, image_size, download):
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise DatasetNotAvailableError(
            f"Loading {name!r} needs tensorflow-datasets: "
            "`pip install tensorflow-datasets`. Without it, use "
            '`load_dataset("image_folder", data_dir=...)`.'
        ) from error
    tfds_name, train_split, test_split, manual = _TFDS[name]
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    if not builder.is_prepared():
        where = builder.data_dir
        help_text = (
            f"The dataset {tfds_name!r} is not prepared in {where!r}. "
            "Point `data_dir` (`--data-dir`) at a tensorflow-datasets "
            "directory that holds it, or at an image folder with "
            "`train/<class>/*` and `test/<class>/*` images"
        )
        if manual:
            if manual_dir is None or not os.path.isdir(manual_dir):
                raise DatasetNotAvailableError(
                    f"{help_text}. {tfds_name!r} cannot be downloaded "
                    "automatically: put its archives in a folder and pass "
                    f"it as `manual_dir` (received: {manual_dir!r}). "
                    "tensorflow-datasets says:\n"
                    f"{getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', '')}"
                )
        elif not download:
            raise DatasetNotAvailableError(f"{help_text}; download=False.")
        elif not _reachable(builder.info.homepage or ""):
            raise DatasetNotAvailableError(
                f"{help_text}. Its source ({builder.info.homepage}) cannot "
                "be reached from this machine, so it cannot be downloaded."
            )
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
        )
    train = builder.as_dataset(split=train_split)
    test = builder.as_dataset(split=test_split)
    transform, info = _tfds_transform(name, builder, image_size)
    splits = builder.info.splits
    if splits:
        info.num_train = splits[train_split].num_examples
        info.num_test = splits[test_split].num_examples
    return train.map(transform), test.map(transform), info


def _tfds_transform(name, builder, image_size):
    """Maps a tfds feature dict to `(image in [0, 1], label)`."""
    import tensorflow as tf

    def image_of(features, key="image"):
        image = tf.cast(features[key], "float32") / 255.0
        if image_size is not None:
            image = tf.image.resize(image, image_size)
        return image

    if name in ("cifar10", "cifar100", "imagenet"):
        label_feature = builder.info.features["label"]
        size = image_size or {"imagenet": (224, 224)}.get(name, (32, 32))

        def transform(features):
            image = tf.cast(features["image"], "float32") / 255.0
            return tf.image.resize(image, size), features["label"]

        return transform, DatasetInfo(
            name=name,
            num_classes=label_feature.num_classes,
            image_shape=(*size, 3),
            class_names=list(label_feature.names),
        )
    if name.startswith("celeba"):
        size = image_size or (64, 64)
        four_way = name == "celeba_smiling_eyeglasses"

        def transform(features):
            image = tf.image.resize(
                tf.cast(features["image"], "float32") / 255.0, size
            )
            smiling = tf.cast(features["attributes"]["Smiling"], "int64")
            if not four_way:
                return image, smiling
            glasses = tf.cast(features["attributes"]["Eyeglasses"], "int64")
            return image, 2 * smiling + glasses

        names = (
            [
                "no smile, no eyeglasses",
                "no smile, eyeglasses",
                "smile, no eyeglasses",
                "smile, eyeglasses",
            ]
            if four_way
            else ["not smiling", "smiling"]
        )
        return transform, DatasetInfo(
            name=name,
            num_classes=len(names),
            image_shape=(*size, 3),
            class_names=names,
        )
    # Cityscapes semantic segmentation.
    lookup = np.full(256, CITYSCAPES_IGNORE_LABEL, dtype="int64")
    for label_id, train_id in _CITYSCAPES_TRAIN_IDS.items():
        lookup[label_id] = train_id
    size = image_size or (512, 1024)

    def transform(features):
        image = tf.image.resize(
            tf.cast(features["image_left"], "float32") / 255.0, size
        )
        label = tf.image.resize(
            features["segmentation_label"], size, method="nearest"
        )
        label = tf.gather(lookup, tf.cast(label[..., 0], "int64"))
        return image, label

    return transform, DatasetInfo(
        name=name,
        num_classes=len(_CITYSCAPES_TRAIN_IDS),
        image_shape=(*size, 3),
        task="segmentation",
    )


_STATISTICS = {
    "cifar10": (aug.CIFAR10_MEAN, aug.CIFAR10_STD),
    "cifar100": (aug.CIFAR100_MEAN, aug.CIFAR100_STD),
}


def _finish(
    train,
    test,
    info,
    batch_size,
    augment,
    normalize,
    max_train,
    max_test,
    seed,
):
    import tensorflow as tf

    train, info.num_train = _subset(train, info.num_train, max_train, seed)
    test, info.num_test = _subset(test, info.num_test, max_test, seed)
    # Decoding is the slow part for small images: keep decoded images.
    small = info.image_shape[0] * info.image_shape[1] <= 64 * 64
    if small:
        train, test = train.cache(), test.cache()
    train = train.shuffle(
        min(info.num_train or 10_000, 50_000),
        seed=seed,
        reshuffle_each_iteration=True,
    )
    if augment:
        height, width = info.image_shape[:2]
        if info.task == "classification" and height == width == 32:
            crop_flip = aug.cifar_augmentation(32, 4, seed=seed)
            train = train.map(
                lambda x, y: (crop_flip(x), y),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        elif info.task == "classification":
            flip = keras.layers.RandomFlip("horizontal", seed=seed)
            train = train.map(
                lambda x, y: (flip(x, training=True), y),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
    train, test = train.batch(batch_size), test.batch(batch_size)
    if normalize:
        if normalize is True:
            mean, std = _STATISTICS.get(
                info.name, (aug.IMAGENET_MEAN, aug.IMAGENET_STD)
            )
        else:
            mean, std = normalize
        norm = aug.normalization(mean, std)
        train = train.map(lambda x, y: (norm(x), y))
        test = test.map(lambda x, y: (norm(x), y))
    autotune = tf.data.AUTOTUNE
    return train.prefetch(autotune), test.prefetch(autotune), info


def _check_limit(limit):
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ValueError(
            "`max_train_examples` and `max_test_examples` must be positive "
            f"integers. Received: {limit!r}"
        )


def _subset(dataset, size, limit, seed):
    """A random subset of `limit` examples, the same at every epoch.

    Loaders list examples in a fixed order (often sorted by class), so the
    first examples are not a fair sample.
    """
    import tensorflow as tf

    if limit is None or (size is not None and limit >= size):
        return dataset, size
    _check_limit(limit)
    if size is None:
        return dataset.take(limit), limit
    keep = np.zeros(size, dtype=bool)
    chosen = np.random.default_rng(seed).choice(size, limit, replace=False)
    keep[chosen] = True
    keep = tf.constant(keep)
    dataset = dataset.enumerate().filter(lambda i, example: keep[i])
    dataset = dataset.map(lambda i, example: example)
    # Filtering hides the size; state it so that `fit` knows its steps.
    return dataset.apply(tf.data.experimental.assert_cardinality(limit)), limit
