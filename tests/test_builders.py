"""What every model builder shares: its dtype policy and `trainable` flag
survive `get_config` / `from_config` and `.keras` files."""

import keras
import pytest

from tests import model_zoo


def compute_dtypes(model):
    """The compute dtypes of the layers with weights."""
    return {layer.compute_dtype for layer in model.layers if layer.weights}


@pytest.mark.parametrize("builder", list(model_zoo.BUILDERS))
def test_dtype_policy_and_trainable_survive_config_and_saving(
    tmp_path, builder
):
    build, _ = model_zoo.BUILDERS[builder]
    # A policy object, not only its name.
    model = build(dtype=keras.DTypePolicy("mixed_bfloat16"), trainable=False)
    copies = {
        "model": model,
        "from_config": type(model).from_config(model.get_config()),
    }
    path = str(tmp_path / f"{builder}.keras")
    model.save(path)
    copies["loaded"] = keras.saving.load_model(path)
    for name, copy in copies.items():
        assert type(copy) is type(model), name
        assert not copy.trainable and not copy.trainable_weights, name
        assert copy.dtype_policy.name == "mixed_bfloat16", name
        assert compute_dtypes(copy) == {"bfloat16"}, name
        assert {w.dtype for w in copy.weights} == {"float32"}, name


def test_a_builder_reports_its_dtype_policy():
    model = model_zoo.deepmoe_resnet(dtype="mixed_float16")
    assert model.dtype_policy.name == "mixed_float16"
    assert model.compute_dtype == "float16"
    assert model.variable_dtype == "float32"
