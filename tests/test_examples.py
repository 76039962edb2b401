"""Every example's smoke mode runs end to end on the current backend."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_example(script, *args, timeout=300):
    env = {**os.environ, "KERAS_BACKEND": keras.backend.backend()}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_mnist_stacked_moe_smoke(tmp_path):
    out = run_example(
        "mnist_stacked_moe.py", "--smoke", "--output-dir", str(tmp_path)
    )
    assert "| stacked_moe |" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["backend"] == keras.backend.backend()
    moe, dense = results["stacked_moe"], results["dense"]
    # Same size within 1%.
    assert (
        abs(moe["parameters"] - dense["parameters"])
        < 0.01 * dense["parameters"]
    )
    assert 0.0 <= moe["test_accuracy"] <= 1.0
    assert set(results["specialisation"]) == {"layer_1", "layer_2"}
    assert (tmp_path / "specialisation.png").stat().st_size > 1000


@pytest.mark.parametrize("flag", ["--help"])
def test_examples_have_a_cli(flag):
    for script in sorted((ROOT / "examples").glob("*.py")):
        assert "usage" in run_example(script.name, flag, timeout=120)
