"""Sub-layers built from one initializer must not start identical."""

import keras
import numpy as np

from keras_moe.layers import MixtureOfExperts
from keras_moe.layers import PatchExpertChoiceMoE
from keras_moe.layers import ShallowEmbedding
from keras_moe.layers import SparseGatingHeads
from tests.testing import to_numpy


def kernels(layers):
    return [to_numpy(layer.kernel) for layer in layers]


def all_different(arrays):
    return all(
        not np.allclose(a, b)
        for i, a in enumerate(arrays)
        for b in arrays[i + 1 :]
    )


def build_all(initializer):
    moe = MixtureOfExperts(3, expert_units=4, kernel_initializer=initializer)
    moe(np.zeros((2, 5), "float32"))
    pmoe = PatchExpertChoiceMoE(
        3, 1, 2, expert_filters=3, expert_kernel_initializer=initializer
    )
    pmoe(np.zeros((1, 4, 4, 2), "float32"))
    heads = SparseGatingHeads([4, 4, 4], kernel_initializer=initializer)
    heads(np.zeros((1, 3), "float32"))
    embedding = ShallowEmbedding(
        4, num_layers=3, filters=[4, 4, 4], kernel_initializer=initializer
    )
    embedding(np.zeros((1, 16, 16, 4), "float32"))
    return [
        kernels(moe.expert_layers),
        kernels(pmoe.expert_layers),
        kernels(heads.heads),
        kernels(embedding.convs[1:]),
    ]


def test_experts_heads_and_convolutions_start_different():
    for group in build_all("glorot_uniform"):
        assert all_different(group)


def test_seeded_initializers_stay_reproducible():
    first = build_all(keras.initializers.GlorotUniform(seed=7))
    second = build_all(keras.initializers.GlorotUniform(seed=7))
    for a_group, b_group in zip(first, second):
        assert all_different(a_group)
        for a, b in zip(a_group, b_group):
            np.testing.assert_array_equal(a, b)
