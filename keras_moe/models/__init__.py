"""Model builders and model-level utilities."""

from keras_moe.models.deepmoe_resnet import DEEPMOE_RESNET_PRESETS
from keras_moe.models.deepmoe_resnet import DeepMoEResNet
from keras_moe.models.sparse_inference import sparse_predict

__all__ = ["DEEPMOE_RESNET_PRESETS", "DeepMoEResNet", "sparse_predict"]
