"""Training under mixed precision: finite, decreasing losses."""

import keras
import numpy as np
import pytest

from keras_moe.training import DeepMoETrainer
from tests import model_zoo


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("family", ["deepmoe_resnet", "pmoe_cnn"])
def test_mixed_precision_training(policy, family):
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(0)
    network = model_zoo.FAMILIES[family][0]()
    if family == "pmoe_cnn":
        model = network
        model.compile(
            optimizer=keras.optimizers.Adam(0.02),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    else:
        model = DeepMoETrainer(network, lambda_gate=0.01)
        model.compile(optimizer=keras.optimizers.Adam(0.02))
    if policy == "mixed_float16":
        # Keras scales float16 losses so small gradients do not underflow.
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = model_zoo.quadrant_data(64)
    history = model.fit(x, y, batch_size=16, epochs=4, verbose=0).history
    losses = np.array(history["loss"])
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < 0.9 * losses[0], losses
    for key in ("base_loss", "gate_loss", "embedding_loss"):
        if key in history:
            assert np.all(np.isfinite(history[key])), (key, history[key])
    # Computation in half precision, weights in float32.
    assert (
        keras.backend.standardize_dtype(network.compute_dtype)
        == (policy.split("_")[1])
    )
    assert {w.dtype for w in network.weights} == {"float32"}
