"""What every model builder shares: the functional-subclass plumbing."""

import keras

from keras_moe.layers._validation import check_momentum
from keras_moe.layers._validation import check_positive_number

# Batch normalization of the papers' PyTorch networks (momentum 0.1 in
# PyTorch's convention is 0.9 in Keras'), as in KerasHub's ResNets. Keras'
# default momentum of 0.99 leaves the moving statistics near their start
# for hundreds of steps, so inference-mode outputs stay near chance after
# a short run.
BATCH_NORM_MOMENTUM = 0.9
BATCH_NORM_EPSILON = 1e-5

_MODEL_KWARGS = ("name", "trainable")


def check_model_kwargs(cls, kwargs):
    """Raises a `TypeError` for keyword arguments `keras.Model` does not
    take, as Keras layers do (a misspelt argument must not be ignored)."""
    unknown = sorted(set(kwargs) - set(_MODEL_KWARGS))
    if unknown:
        raise TypeError(
            f"{cls.__name__}() got unexpected keyword argument(s) {unknown}. "
            f"Besides its own arguments it takes {list(_MODEL_KWARGS)}."
        )


def check_batch_norm(momentum, epsilon):
    return (
        check_momentum("batch_norm_momentum", momentum),
        check_positive_number("batch_norm_epsilon", epsilon),
    )


class BuilderModel(keras.Model):
    """Base of the model builders (KerasHub's functional subclass).

    A subclass builds its graph from `keras.Input` in `__init__`, calls
    `check_model_kwargs` first, then `super().__init__(inputs=...,
    outputs=..., dtype=dtype, **kwargs)`, and sets one attribute per
    constructor argument. `get_config` here returns `name`, `trainable`
    and the serialized dtype policy; subclasses add their arguments.
    """

    def __init__(self, *, inputs, outputs, dtype=None, **kwargs):
        check_model_kwargs(type(self), kwargs)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        if dtype is not None:
            self.dtype_policy = keras.dtype_policies.get(dtype)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def batch_norm(dtype, momentum, epsilon, name):
    return keras.layers.BatchNormalization(
        momentum=momentum, epsilon=epsilon, dtype=dtype, name=name
    )
