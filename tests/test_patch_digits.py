import numpy as np
import pytest

from keras_moe.analysis import discriminative_routing
from keras_moe.data import DatasetNotAvailableError
from keras_moe.data import load_mnist
from keras_moe.data import make_patch_digits


def labelled_images(per_digit=5, size=4):
    """Images whose every pixel holds `100 * digit + copy`, so a patch
    tells which image it came from."""
    labels = np.repeat(np.arange(10), per_digit)
    ids = 100 * labels + np.tile(np.arange(per_digit), 10)
    images = np.broadcast_to(ids[:, None, None], (len(ids), size, size))
    return images.astype("float32"), labels


def grid_ids(x, size=4):
    """The id of the image in each patch: `(num, n)`."""
    num, height, width, _ = x.shape
    cells = x[:, ::size, ::size, 0]
    return cells.reshape(num, -1)


def test_layout_labels_and_positions():
    images, labels = labelled_images()
    x, y, positions = make_patch_digits(images, labels, 40, seed=0)
    assert x.shape == (40, 16, 16, 1) and x.dtype == np.float32
    assert y.dtype == np.int32 and positions.dtype == np.int32
    assert np.bincount(y).tolist() == [20, 20]  # balanced classes
    ids = grid_ids(x)
    digits = ids // 100
    rows = np.arange(40)
    # The class is decided by the digit at the discriminative position:
    # 0 for class 0, 1 for class 1; every other patch is a digit 2-9.
    np.testing.assert_array_equal(digits[rows, positions], y)
    others = np.ones_like(digits, bool)
    others[rows, positions] = False
    assert digits[others].min() >= 2 and digits[others].max() <= 9
    # Patches are whole images, and positions and noise digits vary.
    assert len(np.unique(positions)) > 8
    assert set(np.unique(digits[others])) == set(range(2, 10))
    cells = x[..., 0].reshape(40, 4, 4, 4, 4).transpose(0, 1, 3, 2, 4)
    cells = cells.reshape(40, 16, 16)
    np.testing.assert_array_equal(cells.min(-1), cells.max(-1))


def test_uint8_images_are_scaled_and_seed_reproduces():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 4, 4), dtype=np.uint8)
    labels = np.arange(30) % 10
    a = make_patch_digits(images, labels, 6, grid_size=(2, 3), seed=1)
    b = make_patch_digits(images, labels, 6, grid_size=(2, 3), seed=1)
    for left, right in zip(a, b):
        np.testing.assert_array_equal(left, right)
    x = a[0]
    assert x.shape == (6, 8, 12, 1)
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
    c = make_patch_digits(images, labels, 6, grid_size=(2, 3), seed=2)
    assert not np.array_equal(a[0], c[0])


def test_multiclass_data():
    images, labels = labelled_images()
    x, y, positions = make_patch_digits(
        images, labels, 60, class_digits=(3, 5, 7), noise_digits=(0, 1), seed=0
    )
    digits = grid_ids(x) // 100
    assert np.bincount(y).tolist() == [20, 20, 20]
    np.testing.assert_array_equal(
        digits[np.arange(60), positions], np.array([3, 5, 7])[y]
    )
    others = np.ones_like(digits, bool)
    others[np.arange(60), positions] = False
    assert set(np.unique(digits[others])) == {0, 1}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_samples=0), "num_samples"),
        (dict(class_digits=(1,)), "class_digits"),
        (dict(class_digits=(1, 1)), "class_digits"),
        (dict(noise_digits=(1, 2)), "noise_digits"),
        (dict(noise_digits=()), "noise_digits"),
        (dict(class_digits=(0, 11)), "digit 11"),
        (dict(grid_size=1), "grid_size"),
    ],
)
def test_invalid_arguments(kwargs, match):
    images, labels = labelled_images()
    kwargs = {"num_samples": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_patch_digits(images, labels, **kwargs)
    with pytest.raises(ValueError, match="images"):
        make_patch_digits(images[:3], labels, 4)


def test_load_mnist_from_a_file(tmp_path):
    path = tmp_path / "mnist.npz"
    arrays = {
        "x_train": np.zeros((3, 28, 28), np.uint8),
        "y_train": np.arange(3),
        "x_test": np.ones((2, 28, 28), np.uint8),
        "y_test": np.arange(2),
    }
    np.savez(path, **arrays)
    (x_train, y_train), (x_test, y_test) = load_mnist(str(path))
    np.testing.assert_array_equal(x_test, arrays["x_test"])
    np.testing.assert_array_equal(y_train, arrays["y_train"])
    with pytest.raises(DatasetNotAvailableError, match="No MNIST file"):
        load_mnist(str(tmp_path / "missing.npz"))


def test_discriminative_routing_by_hand():
    # 4 examples, 3 patches, 2 experts.
    values = np.zeros((4, 3, 2))
    values[0, :, 0] = [0.1, 0.2, 0.9]  # class 0, patch 2: expert 0 top-1
    values[1, :, 0] = [0.5, 0.2, 0.3]  # class 0, patch 2: expert 0 top-2
    values[2, :, 1] = [0.9, 0.0, 0.1]  # class 1, patch 0: expert 1 top-1
    values[3, :, 1] = [0.0, 0.2, 0.1]  # class 1, patch 0: expert 1 top-3
    values[2:, :, 0] = [0.0, 0.5, 0.4]  # expert 0 never ranks patch 0 high
    labels, positions = [0, 0, 1, 1], [2, 2, 0, 0]
    top1 = discriminative_routing(values, labels, positions, top=1)
    assert top1["experts"] == {0: 0, 1: 1}
    assert top1["per_class"] == {0: 0.5, 1: 0.5}
    assert top1["rate"] == 0.5
    top2 = discriminative_routing(values, labels, positions, top=2)
    assert top2["per_class"] == {0: 1.0, 1: 0.5}
    assert top2["rate"] == 0.75
    # A fixed mapping is used as given, even when it is the wrong one.
    swapped = discriminative_routing(
        values, labels, positions, top=1, expert_for_class=[1, 0]
    )
    assert swapped["experts"] == {0: 1, 1: 0}
    assert swapped["rate"] < top1["rate"]


def test_discriminative_routing_validates():
    values = np.zeros((2, 3, 2))
    with pytest.raises(ValueError, match="top"):
        discriminative_routing(values, [0, 1], [0, 1], top=4)
    with pytest.raises(ValueError, match="routing_values"):
        discriminative_routing(values, [0], [0, 1])
    with pytest.raises(ValueError, match="expert_for_class"):
        discriminative_routing(values, [0, 1], [0, 1], expert_for_class=[0, 5])
