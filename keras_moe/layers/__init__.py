"""Mixture-of-experts layers for convolutional networks."""

from keras_moe.layers.gated_conv2d import GatedConv2D
from keras_moe.layers.mixture_of_experts import MixtureOfExperts
from keras_moe.layers.patch_expert_choice_moe import PatchExpertChoiceMoE
from keras_moe.layers.shallow_embedding import ShallowEmbedding
from keras_moe.layers.sparse_gating_heads import SparseGatingHeads
from keras_moe.layers.sparse_gating_heads import gate_l1

__all__ = [
    "GatedConv2D",
    "MixtureOfExperts",
    "PatchExpertChoiceMoE",
    "ShallowEmbedding",
    "SparseGatingHeads",
    "gate_l1",
]
