import os
import time

import numpy as np
import pytest

from keras_moe import data
from keras_moe.data import datasets


@pytest.fixture
def tf():
    """TensorFlow, for the tests of the `tf.data` pipelines; the others run
    without it too (the NumPy batches are then the default)."""
    return pytest.importorskip("tensorflow")


# The pipelines: `tf.data` (needs TensorFlow) and NumPy batches.
FORMATS = ("tf", "numpy")


def require(format):
    if format == "tf":
        pytest.importorskip("tensorflow")


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
    images, labels = zip(*[(np.asarray(x), np.asarray(y)) for x, y in dataset])
    return np.concatenate(images), np.concatenate(labels)


@pytest.mark.parametrize("format", FORMATS)
def test_image_folder(tmp_path, format):
    require(format)
    root = make_image_folder(tmp_path)
    train, test, info = data.load_dataset(
        "image_folder",
        data_dir=str(root),
        batch_size=5,
        augment=False,
        normalize=False,
        format=format,
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


@pytest.mark.parametrize("format", FORMATS)
def test_cifar_loader_reads_an_image_folder_with_cifar_statistics(
    tmp_path, format
):
    require(format)
    root = make_image_folder(tmp_path)
    train, _, info = data.load_cifar10(
        str(root), batch_size=12, augment=False, format=format
    )
    images, labels = collect(train)
    mean = np.array(data.augmentation.CIFAR10_MEAN)
    std = np.array(data.augmentation.CIFAR10_STD)
    raw = (40 * labels + 10)[:, None] / 255.0
    np.testing.assert_allclose(
        images[:, 0, 0, :], (raw - mean) / std, atol=1e-4
    )


@pytest.mark.parametrize("format", FORMATS)
def test_subset_is_random_and_fixed_across_epochs(tmp_path, format):
    require(format)
    root = make_image_folder(tmp_path)
    train, _, info = data.load_dataset(
        "image_folder",
        data_dir=str(root),
        batch_size=4,
        max_train_examples=6,
        augment=False,
        normalize=False,
        seed=3,
        format=format,
    )
    assert info.num_train == 6
    first = np.sort(collect(train)[0][:, 0, 0, 0])
    if format == "numpy":
        train.on_epoch_end()  # what `fit` calls between epochs
    second = np.sort(collect(train)[0][:, 0, 0, 0])
    np.testing.assert_array_equal(first, second)
    assert len(first) == 6
    # Not just the first class folder.
    assert len(np.unique(first)) > 1


def test_cifar_augmentation_crops_and_flips_each_image(tf):
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


def test_missing_tfds_dataset_fails_fast_without_download(tmp_path, tf):
    start = time.monotonic()
    with pytest.raises(data.DatasetNotAvailableError, match="data_dir"):
        data.load_dataset("cifar10", data_dir=str(tmp_path), download=False)
    assert time.monotonic() - start < 30


def test_missing_tfds_dataset_fails_fast_when_offline(
    tmp_path, tf, monkeypatch
):
    monkeypatch.setattr(datasets, "_reachable", lambda url, timeout=3: False)
    with pytest.raises(
        data.DatasetNotAvailableError, match="cannot be reached"
    ):
        data.load_dataset("cifar100", data_dir=str(tmp_path))


def test_unreachable_host_is_detected_quickly():
    start = time.monotonic()
    assert not datasets._reachable("https://unreachable.invalid/", 1.0)
    assert time.monotonic() - start < 10


def test_manual_dataset_asks_for_manual_dir(tmp_path, tf):
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


def test_celeba_four_way_labels(tf):
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


def test_cityscapes_labels_map_to_train_ids(tf):
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
        (dict(name="digits", format="jax"), "format='jax'"),
        (dict(name="cifar10", format="numpy"), "format='numpy'"),
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
    data.load_dataset("cifar10")
except data.DatasetNotAvailableError as error:
    print("ERROR", error)
"""
    )
    assert "ACCURACY" in out and "TENSORFLOW None" in out
    # The tensorflow-datasets names say what to install, and what loads
    # without it.
    assert "keras-moe[data]" in out and '"image_folder"' in out


def test_array_batches_reject_bad_input():
    images = np.zeros((4, 8, 8, 3), "float32")
    with pytest.raises(ValueError, match="batch_size=0"):
        data.ArrayBatches(images, np.arange(4), batch_size=0)
    with pytest.raises(ValueError, match="4 images and 3 labels"):
        data.ArrayBatches(images, np.arange(3), batch_size=2)
    with pytest.raises(IndexError):
        data.ArrayBatches(images, np.arange(4), batch_size=2)[2]


def write_image_folder(root, rng, classes=("zebra", "ant", "moth"), size=8):
    """An image folder of random PNGs written with Pillow, its classes
    created out of order; returns `{(split, class, index): pixels}`, uint8
    RGB. The last test image of each class is stored as grayscale."""
    from PIL import Image

    pixels = {}
    for split, count in (("train", 3), ("test", 2)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 256, (size, size, 3), dtype="uint8")
                if split == "test" and i == count - 1:
                    image = np.repeat(image[..., :1], 3, axis=-1)
                    Image.fromarray(image[..., 0], "L").save(
                        root / split / name / f"{i}.png"
                    )
                else:
                    Image.fromarray(image).save(
                        root / split / name / f"{i}.png"
                    )
                pixels[(split, name, i)] = image
    return pixels


def test_image_folder_loads_without_tensorflow(tmp_path):
    pixels = write_image_folder(tmp_path / "images", np.random.default_rng(0))
    out = tmp_path / "out.npz"
    printed = run_without_tensorflow(
        f"""
import numpy as np
from keras_moe import data
root, out = {str(tmp_path / "images")!r}, {str(out)!r}
def collect(split):
    x, y = zip(*(split[i] for i in range(len(split))))
    return np.concatenate(x), np.concatenate(y)
kwargs = dict(data_dir=root, batch_size=4, augment=False, normalize=False)
train, test, info = data.load_dataset("image_folder", **kwargs)
print(type(train).__name__, type(test).__name__)
print(info.class_names, info.num_train, info.num_test, info.image_shape)
x, y = collect(test)
_, small, _ = data.load_dataset("image_folder", image_size=4, **kwargs)
small_x, _ = collect(small)
sub, _, sub_info = data.load_dataset(
    "image_folder", max_train_examples=4, seed=1, **kwargs)
sub_y = np.sort(collect(sub)[1])
_, cifar, _ = data.load_cifar10(root, batch_size=4, augment=False)
cifar_x, _ = collect(cifar)
aug, _, _ = data.load_dataset(
    "image_folder", data_dir=root, batch_size=9, seed=0, normalize=False)
aug_x, aug_y = aug[0]
print(sub_info.num_train, len(sub_y), aug_x.shape, aug_x.dtype, aug_y.dtype)
np.savez(out, x=x, y=y, small_x=small_x, cifar_x=cifar_x, aug_x=aug_x)
print("TENSORFLOW", sys.modules.get("tensorflow"))
"""
    )
    lines = printed.splitlines()
    assert lines[0] == "ArrayBatches ArrayBatches"
    # Labels index the sorted class folders.
    assert lines[1] == "['ant', 'moth', 'zebra'] 9 6 (8, 8, 3)"
    assert lines[2] == "4 4 (9, 8, 8, 3) float32 int32"
    assert lines[3] == "TENSORFLOW None"
    got = np.load(out)
    order = [(n, i) for n in ("ant", "moth", "zebra") for i in range(2)]
    expected = np.stack([pixels[("test", n, i)] for n, i in order]) / 255.0
    np.testing.assert_array_equal(got["y"], [0, 0, 1, 1, 2, 2])
    assert got["x"].dtype == np.float32
    assert got["x"].min() >= 0 and got["x"].max() <= 1
    np.testing.assert_allclose(got["x"], expected, atol=1e-6)
    # Bilinear with pixel centres at half-integers, as `tf.image.resize`:
    # halving the size averages 2x2 blocks (Pillow's antialiased bilinear
    # would weigh 4x4 pixels).
    blocks = expected.reshape(6, 4, 2, 4, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(got["small_x"], blocks, atol=1e-6)
    # `load_cifar10` standardizes an image folder with CIFAR-10's statistics.
    mean = np.array(data.augmentation.CIFAR10_MEAN)
    std = np.array(data.augmentation.CIFAR10_STD)
    np.testing.assert_allclose(
        got["cifar_x"], (expected - mean) / std, atol=1e-5
    )
    # Augmented (8x8 images: flipped or not), the training images stay
    # training images.
    train_images = [v / 255.0 for k, v in pixels.items() if k[0] == "train"]
    for image in got["aug_x"]:
        assert any(
            np.allclose(image, t, atol=1e-6)
            or np.allclose(image, t[:, ::-1], atol=1e-6)
            for t in train_images
        )


def test_image_folder_pipelines_agree(tmp_path, tf):
    from PIL import Image

    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for name in ("b", "a"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i, size in enumerate(((13, 7), (5, 9))):
                pixels = rng.integers(0, 256, (*size, 3), dtype="uint8")
                Image.fromarray(pixels).save(folder / f"{i}.png")
    for image_size in ((6, 10), (20, 11), (13, 7)):
        batches = {}
        for format in FORMATS:
            _, test, info = data.load_dataset(
                "image_folder",
                data_dir=str(tmp_path),
                image_size=image_size,
                batch_size=3,
                augment=False,
                format=format,
            )
            batches[format] = collect(test)
            assert info.image_shape == (*image_size, 3)
        np.testing.assert_array_equal(batches["tf"][1], batches["numpy"][1])
        np.testing.assert_allclose(
            batches["tf"][0], batches["numpy"][0], atol=1e-5
        )


def test_digits_pipelines_agree(tf):
    kwargs = dict(batch_size=100, seed=1, max_test_examples=200)
    _, tf_test, tf_info = data.load_dataset("digits", format="tf", **kwargs)
    _, np_test, np_info = data.load_dataset("digits", format="numpy", **kwargs)
    assert tf_info == np_info
    for tf_part, np_part in zip(collect(tf_test), collect(np_test)):
        np.testing.assert_allclose(tf_part, np_part, atol=1e-5)


def test_mnist_npz_loads_without_tensorflow(tmp_path):
    path = tmp_path / "mnist.npz"
    rng = np.random.default_rng(2)
    arrays = {
        "x_train": rng.integers(0, 256, (6, 28, 28), dtype="uint8"),
        "y_train": rng.integers(0, 10, 6).astype("uint8"),
        "x_test": rng.integers(0, 256, (4, 28, 28), dtype="uint8"),
        "y_test": rng.integers(0, 10, 4).astype("uint8"),
    }
    np.savez(path, **arrays)
    out = run_without_tensorflow(
        f"""
import numpy as np
from keras_moe.data import load_mnist
(x, y), (xt, yt) = load_mnist({str(path)!r})
np.savez({str(tmp_path / "out.npz")!r}, x_train=x, y_train=y, x_test=xt,
         y_test=yt)
print("TENSORFLOW", sys.modules.get("tensorflow"))
"""
    )
    assert "TENSORFLOW None" in out
    with np.load(tmp_path / "out.npz") as got:
        for key, value in arrays.items():
            assert got[key].dtype == value.dtype
            np.testing.assert_array_equal(got[key], value)
