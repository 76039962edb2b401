"""Argument checks shared by the layers (private)."""

import math
import numbers

import keras


def check_positive_int(name, value):
    """Raises a `ValueError` unless `value` is an int greater than zero."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value!r}"
        )
    return value


def check_non_negative_number(name, value):
    """Raises a `ValueError` unless `value` is a finite number >= 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(
            f"`{name}` must be a finite, non-negative number. "
            f"Received: {name}={value!r}"
        )
    return float(value)


def check_positive_number(name, value):
    """Raises a `ValueError` unless `value` is a finite number > 0."""
    value = check_non_negative_number(name, value)
    if value == 0:
        raise ValueError(
            f"`{name}` must be a positive number. Received: {name}={value!r}"
        )
    return value


def check_number_above(name, value, bound):
    """Raises a `ValueError` unless `value` is a finite number > `bound`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= bound
    ):
        raise ValueError(
            f"`{name}` must be a finite number greater than {bound}. "
            f"Received: {name}={value!r}"
        )
    return float(value)


def check_momentum(name, value):
    """Raises a `ValueError` unless `value` is a number in `[0, 1)`."""
    value = check_non_negative_number(name, value)
    if value >= 1:
        raise ValueError(
            f"`{name}` must be in [0, 1). Received: {name}={value!r}"
        )
    return value


def check_choice(name, value, choices):
    """Raises a `ValueError` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {list(choices)}. "
            f"Received: {name}={value!r}"
        )
    return value


def check_rank(layer, name, shape, rank):
    """Raises a `ValueError` unless `shape` has exactly `rank` dimensions."""
    if shape is None or len(shape) != rank:
        raise ValueError(
            f"{layer.__class__.__name__} expects `{name}` of rank {rank}. "
            f"Received: {name}_shape={None if shape is None else tuple(shape)}"
        )


def standardize_data_format(data_format):
    """Resolves `None` to the global image data format and checks it."""
    if data_format is None:
        data_format = keras.config.image_data_format()
    if isinstance(data_format, str):
        data_format = data_format.lower()
    return check_choice(
        "data_format", data_format, ("channels_first", "channels_last")
    )


def independent_initializer(initializer, index):
    """A copy of `initializer` whose values are independent of other copies.

    A Keras initializer instance draws the same values at every call (an
    unseeded one fixes its seed when it is created), so sub-layers that share
    one instance start identical: experts would be copies of each other.
    Each sub-layer gets its own copy instead; a seeded initializer's seed is
    offset by `index`, so seeded layers stay reproducible.
    """
    config = initializer.get_config()
    if isinstance(config.get("seed"), int):
        config = {**config, "seed": config["seed"] + index}
    return initializer.__class__.from_config(config)
