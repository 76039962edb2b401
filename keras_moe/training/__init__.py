"""Training: the DeepMoE objective and its two-phase schedule; pMoE routers."""

from keras_moe.training.deepmoe import DeepMoETrainer
from keras_moe.training.deepmoe import paper_schedule
from keras_moe.training.deepmoe import train_two_phase
from keras_moe.training.pmoe import RouterTrainer
from keras_moe.training.pmoe import train_routers

__all__ = [
    "DeepMoETrainer",
    "RouterTrainer",
    "paper_schedule",
    "train_routers",
    "train_two_phase",
]
