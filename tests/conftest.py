"""Test configuration: picks the Keras backend before keras is imported.

Run the suite once per backend, for example
`KERAS_BACKEND=torch python -m pytest tests`; `scripts/run_tests.sh` runs all
three.
"""

import os
import tempfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if os.environ["KERAS_BACKEND"] == "jax":
    # The suite compiles hundreds of tiny XLA programs, once each: without
    # the expensive optimisation passes JAX compiles them about a third
    # faster (the programs compute the same up to floating-point rounding).
    os.environ.setdefault(
        "XLA_FLAGS",
        "--xla_backend_optimization_level=0"
        " --xla_llvm_disable_expensive_passes=true",
    )
    # Tests that build the same models compile the same programs: a
    # compilation cache for the session compiles each once.
    os.environ.setdefault(
        "JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jax-cache-")
    )
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

if os.environ["KERAS_BACKEND"] == "torch":
    # torch must be imported before tensorflow when both are installed.
    import torch  # noqa: F401

import keras  # noqa: E402
import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--run-large",
        action="store_true",
        default=False,
        help="also run the tests marked `large`",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-large"):
        return
    skip_large = pytest.mark.skip(reason="large test: pass --run-large")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip_large)


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend: {keras.backend.backend()}"


@pytest.fixture(autouse=True)
def _reset_keras_state():
    keras.config.set_dtype_policy("float32")
    keras.utils.clear_session()
    yield
    keras.config.set_dtype_policy("float32")
