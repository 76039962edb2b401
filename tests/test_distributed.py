"""One device or several: the same training, on every backend.

Each backend's own engine spreads the work: `keras.distribution` on jax
(4 simulated host devices), `tf.distribute.MirroredStrategy` on tensorflow
(2 logical CPU devices), DistributedDataParallel on torch (2 gloo
processes). The runs go through `examples/distributed_training.py` in a
subprocess, because the device count is fixed when the backend starts.

What "the same" means: under jax's distribution the program is one global
computation, so it equals one device on the global batch. MirroredStrategy
and DDP normalise each device's part of the batch on its own, so for a
network with batch normalization they equal one device that accumulates
the gradients of those parts (`--accumulate`); for a network without it
(the pMoE CNN) that is the same as one device on the global batch.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BACKEND = keras.backend.backend()
DEVICES = {"jax": 4, "tensorflow": 2, "torch": 2}[BACKEND]
# Logged per epoch; the DeepMoE terms and gate statistics when gated.
LOGS = (
    "loss",
    "accuracy",
    "base_loss",
    "gate_loss",
    "embedding_loss",
    "gate_density",
    "flops_ratio",
)

DRIVER = """
import json, sys
sys.path.insert(0, "examples")
import distributed_training as script

devices, runs = int(sys.argv[1]), json.loads(sys.argv[2])
script.configure_devices(
    script.parse_args(["--devices", str(devices), "--cpu"]),
    script.os.environ["KERAS_BACKEND"])
results = {name: script.main(argv, configure=False)
           for name, argv in runs.items()}
print("RESULTS " + json.dumps(results))
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(runs):
    """Runs the script once per entry of `runs`, in one subprocess."""
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(DEVICES), json.dumps(runs)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "KERAS_BACKEND": BACKEND},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULTS ")]
    return json.loads(line[-1][len("RESULTS ") :])


def assert_same_training(actual, expected, rtol=1e-3):
    logs = [k for k in LOGS if k in expected["history"]]
    assert set(logs) <= set(actual["history"])
    for key in logs:
        # A gate that rounding puts on the other side of zero changes the
        # density by 1 / (batch x gates), about 3e-4 here; an example at a
        # near tie between two classes changes the accuracy by 1 / 64.
        atol = {"gate_density": 2e-3, "flops_ratio": 2e-3, "accuracy": 0.04}
        atol = atol.get(key, 1e-5)
        np.testing.assert_allclose(
            actual["history"][key],
            expected["history"][key],
            rtol=rtol,
            atol=atol,
            err_msg=key,
        )
    np.testing.assert_allclose(
        actual["probe_logits"], expected["probe_logits"], rtol=1e-2, atol=1e-2
    )


def test_one_device_or_several_train_alike(tmp_path):
    models = ["deepmoe_resnet", "pmoe_cnn"]
    common = ["--epochs", "2", "--batch-size", "16", "--examples", "64"]
    # SGD: Adam divides by the root of tiny second moments, which turns
    # differences of rounding into visible ones within a few steps.
    common += ["--gates-off", "0.25", "--optimizer", "sgd"]
    several = ["--devices", str(DEVICES), "--cpu", "--port", str(free_port())]
    runs = {
        "one": ["--model", *models] + common,
        "several": ["--model", *models] + common + several,
    }
    if BACKEND == "jax":
        runs["model_parallel"] = (
            ["--model", "deepmoe_resnet"]
            + common
            + several
            + ["--model-parallel", "2"]
        )
    else:
        # The reference of batch normalization on each device's part.
        runs["accumulated"] = ["--model", "deepmoe_resnet", "--accumulate"]
        runs["accumulated"] += [str(DEVICES)] + common
    for name, argv in runs.items():
        argv += ["--output-dir", str(tmp_path / name)]
    results = run(runs)
    print(json.dumps(results))
    for name in runs:
        written = json.loads((tmp_path / name / "results.json").read_text())
        assert written["backend"] == BACKEND
    one, several = results["one"], results["several"]

    deepmoe = one["deepmoe_resnet"]["history"]
    # A quarter of the gates are off: the gate statistics compared are
    # not those of a dense network.
    assert max(deepmoe["gate_density"]) < 0.8
    assert max(deepmoe["flops_ratio"]) < 0.95
    assert deepmoe["loss"][-1] < deepmoe["loss"][0]
    assert several["deepmoe_resnet"]["devices"] == DEVICES
    if BACKEND == "jax":
        # One global program: the same as one device on the global batch.
        assert_same_training(several["deepmoe_resnet"], one["deepmoe_resnet"])
        parallel = results["model_parallel"]["deepmoe_resnet"]
        assert_same_training(parallel, one["deepmoe_resnet"])
        # The gated convolutions are split over the model axis; the data
        # parallel run replicates every kernel.
        shards = parallel["kernel_shardings"]
        assert shards["block1_conv2/kernel"] == 2
        assert shards["stem_conv/kernel"] == 1
        replicated = several["deepmoe_resnet"]["kernel_shardings"]
        assert set(replicated.values()) == {1}
    else:
        assert_same_training(
            several["deepmoe_resnet"],
            results["accumulated"]["deepmoe_resnet"],
        )
    # No batch normalization: the same as one device on the global batch.
    assert_same_training(several["pmoe_cnn"], one["pmoe_cnn"])
    pmoe = one["pmoe_cnn"]["history"]["loss"]
    assert pmoe[-1] < pmoe[0]


@pytest.mark.skipif(BACKEND != "torch", reason="torch only")
def test_torch_data_parallel_needs_a_process_group():
    from keras_moe.training import torch_data_parallel

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="process group"):
        torch_data_parallel(model)


def test_model_parallel_layout_map_shards_the_wide_convolutions():
    from keras_moe.training import model_parallel_layout_map
    from tests import model_zoo

    mesh = keras.distribution.DeviceMesh(
        (1, 2), ["batch", "model"], ["cpu:0", "cpu:1"]
    )
    network = model_zoo.deepmoe_resnet()
    layout_map = model_parallel_layout_map(network, mesh, min_channels=32)
    sharded = {
        w.path
        for w in network.weights
        if layout_map[w.path] is not None
        and layout_map[w.path].axes == (None, None, None, "model")
    }
    # The gated convolutions of 32 and 64 filters; not the 16-filter one,
    # nor any plain convolution.
    assert sharded == {"block2_conv2/kernel", "block3_conv2/kernel"}
    pmoe = model_zoo.pmoe_cnn()
    layout_map = model_parallel_layout_map(pmoe, mesh, min_channels=8)
    assert layout_map["pmoe/expert_3/kernel"].axes[-1] == "model"
    with pytest.raises(ValueError, match="model_axis='experts'"):
        model_parallel_layout_map(network, mesh, model_axis="experts")
    with pytest.raises(ValueError, match="min_channels=0"):
        model_parallel_layout_map(network, mesh, min_channels=0)
