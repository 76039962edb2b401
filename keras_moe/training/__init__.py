"""Training: the DeepMoE objective and its two-phase schedule."""

from keras_moe.training.deepmoe import DeepMoETrainer
from keras_moe.training.deepmoe import paper_schedule
from keras_moe.training.deepmoe import train_two_phase

__all__ = ["DeepMoETrainer", "paper_schedule", "train_two_phase"]
