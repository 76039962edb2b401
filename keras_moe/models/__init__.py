"""Model builders and model-level utilities."""

from keras_moe.models.sparse_inference import sparse_predict

__all__ = ["sparse_predict"]
