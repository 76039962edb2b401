"""Training: the DeepMoE objective and its two-phase schedule."""

from keras_moe.training.deepmoe import DeepMoETrainer
from keras_moe.training.deepmoe import paper_schedule
from keras_moe.training.deepmoe import train_two_phase
from keras_moe.training.distributed import model_parallel_layout_map
from keras_moe.training.distributed import torch_data_parallel

__all__ = [
    "DeepMoETrainer",
    "paper_schedule",
    "train_two_phase",
    "model_parallel_layout_map",
    "torch_data_parallel",
]
