import os
import time

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from keras_moe import data  # noqa: E402
from keras_moe.data import datasets  # noqa: E402


def make_image_folder(root, classes=("cat", "dog", "frog"), size=32):
    """Tiny image folder whose pixel value encodes the class index."""
    import keras

    for split, count in (("train", 4), ("test", 2)):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                image = np.full((size, size, 3), 40 * index + 10, "uint8")
                keras.utils.save_img(
                    str(folder / f"{i}.png"), image, scale=False
                )
    return root


def collect(dataset):
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in dataset])
    return np.concatenate(images), np.concatenate(labels)


def test_image_folder(tmp_path):
    root = make_image_folder(tmp_path)
    train, test, info = data.load_dataset(
        "image_folder",
        data_dir=str(root),
        batch_size=5,
        augment=False,
        normalize=False,
    )
    assert info.class_names == ["cat", "dog", "frog"]
    assert (info.num_classes, info.num_train, info.num_test) == (3, 12, 6)
    assert info.image_shape == (32, 32, 3)
    for split, count in ((train, 12), (test, 6)):
        images, labels = collect(split)
        assert images.shape == (count, 32, 32, 3)
        assert np.bincount(labels).tolist() == [count // 3] * 3
        # The pixel value says which class folder the image came from.
        np.testing.assert_allclose(
            images[:, 0, 0, 0], (40 * labels + 10) / 255.0, atol=1e-6
        )


def test_cifar_loader_reads_an_image_folder_with_cifar_statistics(tmp_path):
    root = make_image_folder(tmp_path)
    train, _, info = data.load_cifar10(str(root), batch_size=12, augment=False)
    images, labels = collect(train)
    mean = np.array(data.augmentation.CIFAR10_MEAN)
    std = np.array(data.augmentation.CIFAR10_STD)
    raw = (40 * labels + 10)[:, None] / 255.0
    np.testing.assert_allclose(
        images[:, 0, 0, :], (raw - mean) / std, atol=1e-4
    )


def test_subset_is_random_and_fixed_across_epochs(tmp_path):
    root = make_image_folder(tmp_path)
    train, _, info = data.load_dataset(
        "image_folder",
        data_dir=str(root),
        batch_size=4,
        max_train_examples=6,
        augment=False,
        normalize=False,
        seed=3,
    )
    assert info.num_train == 6
    first = np.sort(collect(train)[0][:, 0, 0, 0])
    second = np.sort(collect(train)[0][:, 0, 0, 0])
    np.testing.assert_array_equal(first, second)
    assert len(first) == 6
    # Not just the first class folder.
    assert len(np.unique(first)) > 1


def test_cifar_augmentation_crops_and_flips_each_image():
    rng = np.random.default_rng(0)
    images = rng.random((6, 32, 32, 3)).astype("float32")
    augment = data.cifar_augmentation(seed=1)
    dataset = tf.data.Dataset.from_tensor_slices(images).map(augment)
    out = np.stack([x.numpy() for x in dataset])
    assert out.shape == images.shape
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    offsets = set()
    for x, y in zip(padded, out):
        matches = [
            (i, j, flip)
            for i in range(9)
            for j in range(9)
            for flip in (False, True)
            if np.array_equal(
                (x[i : i + 32, j : j + 32, :])[:, :: -1 if flip else 1], y
            )
        ]
        assert matches, "output is not a crop (or flipped crop) of the input"
        offsets.add(matches[0])
    assert len(offsets) > 1


def test_digits_ship_offline():
    train, test, info = data.load_dataset("digits", batch_size=64, seed=0)
    assert info.image_shape == (32, 32, 3)
    assert (info.num_train, info.num_test) == (1438, 359)
    images, labels = collect(test)
    assert images.shape == (359, 32, 32, 3)
    assert set(np.unique(labels)) == set(range(10))
    x, y = next(iter(train))
    assert x.shape == (64, 32, 32, 3) and y.shape == (64,)


def test_missing_tfds_dataset_fails_fast_without_download(tmp_path):
    start = time.monotonic()
    with pytest.raises(data.DatasetNotAvailableError, match="data_dir"):
        data.load_dataset("cifar10", data_dir=str(tmp_path), download=False)
    assert time.monotonic() - start < 30


def test_missing_tfds_dataset_fails_fast_when_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "_reachable", lambda url, timeout=3: False)
    with pytest.raises(
        data.DatasetNotAvailableError, match="cannot be reached"
    ):
        data.load_dataset("cifar100", data_dir=str(tmp_path))


def test_unreachable_host_is_detected_quickly():
    start = time.monotonic()
    assert not datasets._reachable("https://unreachable.invalid/", 1.0)
    assert time.monotonic() - start < 10


def test_manual_dataset_asks_for_manual_dir(tmp_path):
    with pytest.raises(data.DatasetNotAvailableError, match="manual_dir"):
        data.load_dataset("imagenet", data_dir=str(tmp_path))


def test_missing_image_folder(tmp_path):
    with pytest.raises(data.DatasetNotAvailableError, match="train/<class>"):
        data.load_dataset("image_folder", data_dir=str(tmp_path))


def test_image_folder_skips_files_that_are_not_images(tmp_path):
    root = make_image_folder(tmp_path, classes=("cat", "dog"))
    # Sorted first in its folder, where the image size is read from.
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\x00\x01Bud1")
    (root / "test" / "dog" / "notes.txt").write_text("two dogs")
    train, test, info = data.load_dataset(
        "image_folder", data_dir=str(root), augment=False, normalize=False
    )
    assert (info.num_train, info.num_test) == (8, 4)
    assert info.image_shape == (32, 32, 3)
    assert collect(train)[0].shape == (8, 32, 32, 3)


def test_image_folder_with_an_empty_class_says_which(tmp_path):
    root = make_image_folder(tmp_path, classes=("cat", "dog"))
    for image in (root / "train" / "cat").iterdir():
        image.unlink()
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\x00")
    with pytest.raises(data.DatasetNotAvailableError, match="holds no images"):
        data.load_dataset("image_folder", data_dir=str(root))
    with pytest.raises(data.DatasetNotAvailableError, match="train.*cat"):
        data.load_dataset("image_folder", data_dir=str(root))


def test_image_folder_with_a_test_class_unknown_to_training(tmp_path):
    root = make_image_folder(tmp_path, classes=("cat",))
    (root / "test" / "dog").mkdir()
    (root / "test" / "cat").joinpath("0.png").rename(
        root / "test" / "dog" / "0.png"
    )
    with pytest.raises(
        data.DatasetNotAvailableError, match="only in test: \\['dog'\\]"
    ):
        data.load_dataset("image_folder", data_dir=str(root))


@pytest.mark.parametrize(
    "mean, std, match",
    [
        ([0.5] * 3, [0.2, float("nan"), 0.2], "std"),
        ([0.5] * 3, [0.2, 0.0, 0.2], "std"),
        ([0.5] * 3, [float("inf")] * 3, "std"),
        ([0.5, float("nan"), 0.5], [0.2] * 3, "mean"),
        ([0.5] * 2, [0.2] * 3, "mean"),
    ],
)
def test_normalization_rejects_invalid_statistics(mean, std, match):
    with pytest.raises(ValueError, match=match):
        data.normalization(mean, std)


@pytest.mark.parametrize(
    "name, num_classes, shape",
    [
        ("cifar10", 10, (32, 32, 3)),
        ("celeba_smiling_eyeglasses", 4, (64, 64, 3)),
    ],
)
def test_tfds_pipelines_on_mock_data(
    tmp_path, monkeypatch, name, num_classes, shape
):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(datasets, "_reachable", lambda url, timeout=3: True)
    with tfds.testing.mock_data(num_examples=4):
        train, test, info = data.load_dataset(
            name, data_dir=str(tmp_path), batch_size=2
        )
        x, y = next(iter(train))
    assert info.num_classes == num_classes
    assert info.image_shape == shape
    assert tuple(x.shape) == (2, *shape)
    assert set(np.unique(y.numpy())) <= set(range(num_classes))


def test_celeba_four_way_labels():
    transform, _ = datasets._tfds_transform(
        "celeba_smiling_eyeglasses", None, (8, 8)
    )
    labels = []
    for smiling in (False, True):
        for glasses in (False, True):
            features = {
                "image": tf.zeros((16, 16, 3), "uint8"),
                "attributes": {"Smiling": smiling, "Eyeglasses": glasses},
            }
            labels.append(int(transform(features)[1]))
    assert labels == [0, 1, 2, 3]


def test_cityscapes_labels_map_to_train_ids():
    transform, info = datasets._tfds_transform("cityscapes", None, (2, 4))
    label_ids = np.array([[7, 8, 26, 33], [0, 6, 34, 255]], "uint8")
    features = {
        "image_left": tf.zeros((2, 4, 3), "uint8"),
        "segmentation_label": tf.constant(label_ids[..., None]),
    }
    image, labels = transform(features)
    assert info.task == "segmentation" and info.num_classes == 19
    assert tuple(image.shape) == (2, 4, 3)
    np.testing.assert_array_equal(
        labels.numpy(), [[0, 1, 13, 18], [255, 255, 255, 255]]
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="mnist3d"), "name='mnist3d'"),
        (dict(name="digits", batch_size=0), "batch_size=0"),
        (dict(name="digits", image_size=(32,)), "image_size"),
        (dict(name="digits", max_train_examples=-5), "-5"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load_dataset(**kwargs)


def run_without_tensorflow(code):
    """Runs `code` in a Python where TensorFlow cannot be imported, as in a
    jax-only or torch-only install; returns its standard output."""
    import subprocess
    import sys

    backend = "torch" if os.environ.get("KERAS_BACKEND") == "torch" else "jax"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nsys.modules['tensorflow'] = None\n" + code,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "KERAS_BACKEND": backend},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_digits_train_without_tensorflow():
    out = run_without_tensorflow(
        """
import keras, numpy as np
from keras_moe import data
train, test, info = data.load_dataset(
    "digits", batch_size=32, augment=True, max_train_examples=200,
    max_test_examples=100, seed=3)
x, y = train[0]
assert x.shape == (32, 32, 32, 3) and x.dtype == np.float32, x.shape
assert y.shape == (32,) and set(np.unique(y)) <= set(range(10))
assert (info.num_train, info.num_test) == (200, 100) and len(train) == 7
# Standardized with the statistics of load_dataset's default.
t = np.concatenate([b[0] for b in test])
assert t.shape == (100, 32, 32, 3) and abs(t.mean()) < 3
first = train[0][1].copy()
train.on_epoch_end()
assert not np.array_equal(first, train[0][1])  # a new order each epoch
model = keras.Sequential([
    keras.Input((32, 32, 3)), keras.layers.Conv2D(8, 3, strides=2),
    keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)])
model.compile("adam", keras.losses.SparseCategoricalCrossentropy(True),
              metrics=["accuracy"])
model.fit(train, epochs=1, verbose=0)
print("ACCURACY", model.evaluate(test, verbose=0, return_dict=True)["accuracy"])
print("TENSORFLOW", sys.modules.get("tensorflow"))
try:
    data.load_dataset("image_folder", data_dir=".")
except data.DatasetNotAvailableError as error:
    print("ERROR", error)
"""
    )
    assert "ACCURACY" in out and "TENSORFLOW None" in out
    assert "keras-moe[data]" in out and "'image_folder'" in out


def test_array_batches_reject_bad_input():
    images = np.zeros((4, 8, 8, 3), "float32")
    with pytest.raises(ValueError, match="batch_size=0"):
        data.ArrayBatches(images, np.arange(4), batch_size=0)
    with pytest.raises(ValueError, match="4 images and 3 labels"):
        data.ArrayBatches(images, np.arange(3), batch_size=2)
    with pytest.raises(IndexError):
        data.ArrayBatches(images, np.arange(4), batch_size=2)[2]
