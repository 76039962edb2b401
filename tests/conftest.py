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

# Layer-level tests (the layers' equations, gradients, contracts) run on
# every backend. Tests of whole networks built from the layers (builders,
# export, training, conversion, data, docs) and end-to-end tests (example
# scripts, several processes) are shared out: a run of the suite gives each
# of them, and each parametrization, to one backend, in turn in the order
# of collection, so that running the suite on jax, tensorflow and torch
# runs every one once and every backend runs a share of each module (the
# package's few backend-specific branches are all reached by every share).
# `--all-backends` runs them all on this backend.
SHARED_MODULES = (
    "test_analysis_routing.py",
    "test_builders.py",
    "test_convert.py",
    "test_data.py",
    "test_distributed.py",
    "test_docs_site.py",
    "test_docstrings.py",
    "test_examples.py",
    "test_export.py",
    "test_models_resnet.py",
    "test_models_two_layer_pmoe.py",
    "test_models_vgg_drn.py",
    "test_models_wrn.py",
    "test_patch_digits.py",
    "test_readme.py",
    "test_training.py",
)
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
        help="run every network-level and end-to-end test on this backend, "
        "not only those given to it",
    )


def pytest_collection_modifyitems(config, items):
    backend = os.environ["KERAS_BACKEND"]
    all_backends = config.getoption("--all-backends")
    skip_large = pytest.mark.skip(reason="large test: pass --run-large")
    shared = 0
    kept, elsewhere = [], []
    for item in items:
        if "large" in item.keywords and not config.getoption("--run-large"):
            item.add_marker(skip_large)
        module = os.path.basename(str(item.fspath))
        if (
            module in SHARED_MODULES
            and not all_backends
            and item.get_closest_marker("skipif") is None
        ):
            owner = BACKENDS[shared % len(BACKENDS)]
            shared += 1
            if owner != backend:
                elsewhere.append(item)
                continue
        kept.append(item)
    if elsewhere:
        config.hook.pytest_deselected(items=elsewhere)
        items[:] = kept
    config._shared_elsewhere = len(elsewhere)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    count = getattr(config, "_shared_elsewhere", 0)
    if count:
        terminalreporter.write_line(
            f"{count} network-level and end-to-end tests were given to the "
            "other backends (deselected here; --all-backends runs them)"
        )


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend: {keras.backend.backend()}"


@pytest.fixture(autouse=True)
def _reset_keras_state():
    keras.config.set_dtype_policy("float32")
    keras.utils.clear_session()
    yield
    keras.config.set_dtype_policy("float32")
