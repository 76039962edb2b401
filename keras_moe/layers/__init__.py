"""Mixture-of-experts layers for convolutional networks."""

from keras_moe.layers.gated_conv2d import GatedConv2D
from keras_moe.layers.patch_expert_choice_moe import PatchExpertChoiceMoE
from keras_moe.layers.shallow_embedding import ShallowEmbedding
from keras_moe.layers.sparse_gating_heads import SparseGatingHeads
from keras_moe.layers.sparse_gating_heads import gate_l1

__all__ = [
    "GatedConv2D",
    "PatchExpertChoiceMoE",
    "ShallowEmbedding",
    "SparseGatingHeads",
    "gate_l1",
]
