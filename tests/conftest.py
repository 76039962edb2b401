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

# End-to-end tests run whole example scripts or several processes, and take
# tens of seconds each. A run of the suite gives each of them to one backend,
# in turn in the order of collection, so that running the suite on jax,
# tensorflow and torch runs every one once; `--all-backends` runs them on
# every backend. Tests already limited to some backends keep their limits.
END_TO_END_MODULES = ("test_examples.py", "test_distributed.py")
BACKENDS = ("jax", "tensorflow", "torch")


def pytest_addoption(parser):
    parser.addoption(
        "--run-large",
        action="store_true",
        default=False,
        help="also run the tests marked `large`",
    )
    parser.addoption(
        "--all-backends",
        action="store_true",
        default=False,
        help="run every end-to-end test (example scripts, several "
        "processes) on this backend, not only those given to it",
    )


def pytest_collection_modifyitems(config, items):
    backend = os.environ["KERAS_BACKEND"]
    all_backends = config.getoption("--all-backends")
    skip_large = pytest.mark.skip(reason="large test: pass --run-large")
    shared = 0
    for item in items:
        if "large" in item.keywords and not config.getoption("--run-large"):
            item.add_marker(skip_large)
        module = os.path.basename(str(item.fspath))
        if (
            module in END_TO_END_MODULES
            and not all_backends
            and item.get_closest_marker("skipif") is None
        ):
            owner = BACKENDS[shared % len(BACKENDS)]
            shared += 1
            if owner != backend:
                item.add_marker(
                    pytest.mark.skip(
                        reason=f"end-to-end test run on {owner} "
                        "(pass --all-backends to run it here)"
                    )
                )


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend: {keras.backend.backend()}"


@pytest.fixture(autouse=True)
def _reset_keras_state():
    keras.config.set_dtype_policy("float32")
    keras.utils.clear_session()
    yield
    keras.config.set_dtype_policy("float32")
