"""Training: the DeepMoE objective and its two-phase schedule, pMoE router
training, and helpers for several devices."""

from keras_moe.training._checkpoint import CheckpointError
from keras_moe.training.deepmoe import DeepMoETrainer
from keras_moe.training.deepmoe import paper_schedule
from keras_moe.training.deepmoe import train_two_phase
from keras_moe.training.distributed import model_parallel_layout_map
from keras_moe.training.distributed import torch_data_parallel
from keras_moe.training.pmoe import RouterTrainer
from keras_moe.training.pmoe import train_routers

__all__ = [
    "CheckpointError",
    "DeepMoETrainer",
    "RouterTrainer",
    "model_parallel_layout_map",
    "paper_schedule",
    "torch_data_parallel",
    "train_routers",
    "train_two_phase",
]
