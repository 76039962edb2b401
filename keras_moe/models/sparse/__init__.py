"""Sparse inference and pruning of gated networks.

`ChannelAnalysis` (in `keras_moe.models._graph`) says which gates select
the channels of every layer; `plan` turns the gates of a pass into channel
indices and walks the graph computing only those (`thinned` holds the
layers that compute a subset of their channels); `predictor` runs the
walk eagerly or as cached, compiled pruned networks; `export` builds a
standalone smaller network without the channels a calibration set never
uses.
"""

from keras_moe.models.sparse.export import SelectChannels
from keras_moe.models.sparse.export import prune_inactive_channels
from keras_moe.models.sparse.predictor import STRATEGIES
from keras_moe.models.sparse.predictor import SparsePredictor
from keras_moe.models.sparse.predictor import group_examples
from keras_moe.models.sparse.predictor import sparse_predict

__all__ = [
    "STRATEGIES",
    "SelectChannels",
    "SparsePredictor",
    "group_examples",
    "prune_inactive_channels",
    "sparse_predict",
]
