"""keras-moe: mixture-of-experts layers and models for Keras 3."""

from keras_moe import analysis
from keras_moe import data
from keras_moe import layers
from keras_moe import models
from keras_moe import training

__version__ = "0.1.0"

__all__ = ["analysis", "data", "layers", "models", "training", "__version__"]
