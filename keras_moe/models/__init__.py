"""Model builders and model-level utilities."""

from keras_moe.models.convert import default_gated_layers
from keras_moe.models.convert import default_pmoe_layer
from keras_moe.models.convert import to_deepmoe
from keras_moe.models.convert import to_pmoe
from keras_moe.models.deepmoe_drn import DEEPMOE_DRN_PRESETS
from keras_moe.models.deepmoe_drn import DeepMoEDRN
from keras_moe.models.deepmoe_outputs import deepmoe_outputs
from keras_moe.models.deepmoe_resnet import DEEPMOE_RESNET_PRESETS
from keras_moe.models.deepmoe_resnet import DeepMoEResNet
from keras_moe.models.deepmoe_vgg import DEEPMOE_VGG_PRESETS
from keras_moe.models.deepmoe_vgg import WIDENING
from keras_moe.models.deepmoe_vgg import DeepMoEVGG16
from keras_moe.models.sparse import SparsePredictor
from keras_moe.models.sparse import prune_inactive_channels
from keras_moe.models.sparse import sparse_predict
from keras_moe.models.two_layer_pmoe import TwoLayerCNN
from keras_moe.models.two_layer_pmoe import TwoLayerPMoE
from keras_moe.models.wrn import WRN_PRESETS
from keras_moe.models.wrn import WideResNet

__all__ = [
    "DEEPMOE_DRN_PRESETS",
    "DEEPMOE_VGG_PRESETS",
    "DEEPMOE_RESNET_PRESETS",
    "DeepMoEDRN",
    "DeepMoEResNet",
    "DeepMoEVGG16",
    "deepmoe_outputs",
    "default_gated_layers",
    "to_deepmoe",
    "to_pmoe",
    "default_pmoe_layer",
    "WIDENING",
    "prune_inactive_channels",
    "sparse_predict",
    "SparsePredictor",
    "TwoLayerCNN",
    "TwoLayerPMoE",
    "WRN_PRESETS",
    "WideResNet",
]
