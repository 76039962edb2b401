"""Tiny members of every model family, for tests that cover them all.

Each entry builds a small model under the current dtype policy and gives
an input batch for it. A new family is one more line in `FAMILIES`.
"""

import keras
import numpy as np

from keras_moe.layers import PatchExpertChoiceMoE
from keras_moe.models import DeepMoEDRN
from keras_moe.models import DeepMoEResNet
from keras_moe.models import DeepMoEVGG16
from keras_moe.models import TwoLayerCNN
from keras_moe.models import TwoLayerPMoE
from keras_moe.models import WideResNet


def deepmoe_resnet(**kwargs):
    return DeepMoEResNet(
        8,
        num_classes=4,
        input_shape=(16, 16, 3),
        variant="wide",
        embedding_layers=2,
        embedding_filters=4,
        **kwargs,
    )


def deepmoe_vgg16(**kwargs):
    return DeepMoEVGG16(
        num_classes=4, embedding_layers=2, embedding_filters=4, **kwargs
    )


def deepmoe_drn(**kwargs):
    return DeepMoEDRN(
        num_classes=3,
        input_shape=(32, 32, 3),
        variant="narrow",
        embedding_dim=8,
        embedding_layers=2,
        embedding_filters=4,
        **kwargs,
    )


def wide_resnet(**kwargs):
    return WideResNet(
        depth=10,
        widening_factor=1,
        num_classes=3,
        input_shape=(16, 16, 3),
        **kwargs,
    )


def wide_resnet_pmoe(**kwargs):
    """A WRN-10-1 whose last convolution is a pMoE layer."""
    return wide_resnet(
        pmoe=dict(num_experts=2, patches_per_expert=2, patch_size=2), **kwargs
    )


def two_layer_pmoe(**kwargs):
    return TwoLayerPMoE(
        num_experts=2,
        neurons_per_expert=3,
        patches_per_expert=2,
        patch_size=8,
        input_shape=(32, 32, 1),
        **kwargs,
    )


def two_layer_cnn(**kwargs):
    return TwoLayerCNN(4, 8, input_shape=(32, 32, 1), **kwargs)


def pmoe_cnn(return_routing=False):
    """A conv stem, a pMoE layer (top-2 of 16 patches per expert), a head.

    With `return_routing`, the model also returns the patches each expert
    selected, `(batch, num_experts, patches_per_expert)`.
    """
    images = keras.Input((16, 16, 3), name="images")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(images)
    x, routing = PatchExpertChoiceMoE(
        num_experts=4,
        patches_per_expert=2,
        patch_size=4,
        expert_filters=8,
        name="pmoe",
    )(x, return_routing=True)
    # Pooling to a 2x2 grid keeps where in the image the experts fired.
    x = keras.layers.AveragePooling2D(8)(x)
    x = keras.layers.Flatten()(x)
    logits = keras.layers.Dense(4, name="logits")(x)
    if return_routing:
        return keras.Model(images, {"logits": logits, **routing})
    return keras.Model(images, logits)


FAMILIES = {
    "deepmoe_resnet": (deepmoe_resnet, (16, 16, 3)),
    "deepmoe_vgg16": (deepmoe_vgg16, (32, 32, 3)),
    "deepmoe_drn": (deepmoe_drn, (32, 32, 3)),
    "pmoe_cnn": (pmoe_cnn, (16, 16, 3)),
}


# Every model builder, tiny, with the shape of its input images.
BUILDERS = {
    "deepmoe_resnet": (deepmoe_resnet, (16, 16, 3)),
    "deepmoe_vgg16": (deepmoe_vgg16, (32, 32, 3)),
    "deepmoe_drn": (deepmoe_drn, (32, 32, 3)),
    "wide_resnet": (wide_resnet, (16, 16, 3)),
    "wide_resnet_pmoe": (wide_resnet_pmoe, (16, 16, 3)),
    "two_layer_pmoe": (two_layer_pmoe, (32, 32, 1)),
    "two_layer_cnn": (two_layer_cnn, (32, 32, 1)),
}


def images(shape, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch,) + shape).astype("float32")


def quadrant_data(n=64, seed=0):
    """16x16 images; class c has a bright square in quadrant c."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 4).astype("int32")
    x = rng.normal(0.0, 0.3, size=(n, 16, 16, 3)).astype("float32")
    for i, c in enumerate(y):
        r, col = divmod(int(c), 2)
        x[i, 8 * r : 8 * r + 8, 8 * col : 8 * col + 8] += 1.5
    return x, y
