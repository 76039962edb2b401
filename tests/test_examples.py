"""Every example's smoke mode runs end to end on the current backend."""

import contextlib
import importlib.util
import io
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_example(name):
    """Imports `examples/<name>.py` as a module (its `main` not run)."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        spec = importlib.util.spec_from_file_location(
            name, ROOT / "examples" / f"{name}.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return module


def run_example(script, *args):
    """Runs `main(args)` of an example in this process; returns its output.

    In-process runs share the imported backend; that the scripts also run
    as programs is checked by `test_examples_have_a_cli`.
    """
    module = load_example(script.removesuffix(".py"))
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        module.main(list(args))
    return output.getvalue()


def exit_message(script, *args):
    """The message an example exits with (it must exit, not crash)."""
    with pytest.raises(SystemExit) as exit_info:
        run_example(script, *args)
    assert exit_info.value.code not in (0, None)
    return str(exit_info.value.code)


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
    # Ten classes: chance is 0.1; both networks learn.
    assert moe["test_accuracy"] > 0.3 and dense["test_accuracy"] > 0.3
    assert set(results["specialisation"]) == {"layer_1", "layer_2"}
    assert (tmp_path / "specialisation.png").stat().st_size > 1000


def test_examples_have_a_cli():
    scripts = sorted(
        p.name
        for p in (ROOT / "examples").glob("*.py")
        if not p.name.startswith("_")
    )
    # One interpreter for all scripts: importing the backend once.
    program = (
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'examples')!r})\n"
        f"for script in {scripts!r}:\n"
        "    sys.argv = [script, '--help']\n"
        "    try:\n"
        f"        runpy.run_path({str(ROOT / 'examples')!r} + '/' + script,"
        " run_name='__main__')\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, (script, exit.code)\n"
        "    print('==', script)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KERAS_BACKEND": keras.backend.backend()},
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    helps = result.stdout.split("== ")
    assert len(helps) == len(scripts) + 1
    for text, script in zip(helps, scripts):
        assert "usage" in text, script


def test_help_imports_no_keras():
    """`--help` answers without importing Keras, keras_moe or TensorFlow."""
    scripts = sorted(
        p.name
        for p in (ROOT / "examples").glob("*.py")
        if not p.name.startswith("_")
    )
    program = (
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'examples')!r})\n"
        f"for script in {scripts!r}:\n"
        "    sys.argv = [script, '--help']\n"
        "    try:\n"
        f"        runpy.run_path({str(ROOT / 'examples')!r} + '/' + script,"
        " run_name='__main__')\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = {'keras', 'keras_moe', 'tensorflow', 'jax', 'torch'}\n"
        "print('IMPORTED', sorted(heavy & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IMPORTED []" in result.stdout
    assert "(default: None) (default" not in result.stdout


def test_preset_names_in_the_help_are_the_presets():
    from keras_moe.models import DEEPMOE_DRN_PRESETS
    from keras_moe.models import DEEPMOE_RESNET_PRESETS

    cifar = load_example("cifar_deepmoe")
    imagenet = load_example("imagenet_deepmoe")
    cityscapes = load_example("cityscapes_deepmoe_drn")
    names = set(DEEPMOE_RESNET_PRESETS)
    assert set(cifar.CIFAR_PRESETS) == {n for n in names if "cifar" in n}
    assert set(imagenet.PRESETS) == {n for n in names if "imagenet" in n}
    assert set(cityscapes.PRESETS) == set(DEEPMOE_DRN_PRESETS)
    from keras_moe import data

    assert cityscapes.IGNORE == data.CITYSCAPES_IGNORE_LABEL


@pytest.mark.parametrize(
    "model", ["wide_deepmoe_resnet20_cifar10", "resnet20_cifar10"]
)
def test_cifar_deepmoe_smoke_and_resume(tmp_path, model):
    args = ["--smoke", "--model", model, "--output-dir", str(tmp_path)]
    out = run_example("cifar_deepmoe.py", *args)
    assert "test accuracy" in out and "multiply-adds per image" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["backend"] == keras.backend.backend()
    # Ten classes: chance is 0.1; the smoke run learns.
    assert 0.5 < results["test_accuracy"] <= 1.0
    assert results["effective_mmacs"] <= results["dense_mmacs"]
    assert (tmp_path / "curves.png").exists()
    if "deepmoe" in model:
        assert results["history"]["phase"] == [1, 1, 1, 2]  # 3 + 1 epochs
        assert set(results["gate_density"]["per_layer"]) == {
            "block1_conv2",
            "block2_conv2",
            "block3_conv2",
        }
        assert (tmp_path / "gate_density.png").exists()
        assert (tmp_path / "class_gates.png").exists()
    # A second run finds every epoch done, says so and only reports.
    again = run_example("cifar_deepmoe.py", *args)
    assert "Training already complete in" in again
    assert "Epoch 1/" not in again and "test accuracy" in again
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["history"] == results["history"]
    # Other options (or another backend): the run is not resumed, and the
    # error says which option differs and names --output-dir.
    message = exit_message("cifar_deepmoe.py", *args, "--learning-rate", "0.05")
    assert "--output-dir" in message
    assert "learning_rate 0.1 (this run: 0.05)" in message
    if "deepmoe" not in model:
        # The trained baseline, converted to DeepMoE and fine-tuned.
        converted = tmp_path / "converted"
        out = run_example(
            "cifar_deepmoe.py",
            "--smoke",
            "--from-model",
            str(tmp_path / "model.keras"),
            "--output-dir",
            str(converted),
        )
        assert "before conversion: test accuracy" in out
        after = json.loads((converted / "results.json").read_text())
        # The conversion keeps the function: before fine-tuning, the
        # converted network scores what the baseline scored.
        for key in ("accuracy_before_conversion", "accuracy_at_conversion"):
            assert after[key] == pytest.approx(
                results["test_accuracy"], abs=1e-6
            )
        assert len(after["gate_density"]["per_layer"]) == 3


def test_cifar_deepmoe_without_data_says_what_to_do(tmp_path):
    message = exit_message(
        "cifar_deepmoe.py",
        "--dataset",
        "image_folder",
        "--data-dir",
        str(tmp_path / "no-such-folder"),
        "--output-dir",
        str(tmp_path / "out"),
    )
    assert "train/<class>" in message
    assert "--smoke" in message and "--dataset digits" in message
    # A run without data leaves no output folder behind.
    assert not (tmp_path / "out").exists()


def test_imagenet_deepmoe_smoke(tmp_path):
    out = run_example(
        "imagenet_deepmoe.py", "--smoke", "--output-dir", str(tmp_path)
    )
    assert "top-5 accuracy" in out and "multiply-adds per image" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["backend"] == keras.backend.backend()
    # Ten classes: chance is 0.1 (top-1) and 0.5 (top-5).
    assert 0.5 < results["top1_accuracy"] <= results["top5_accuracy"] <= 1.0
    # The paper's ImageNet schedule: joint training only.
    assert results["history"]["phase"] == [1, 1, 1, 1]
    assert results["mu"] == 0.0
    assert results["effective_mmacs"] <= results["dense_mmacs"]
    assert len(results["gate_density"]["per_layer"]) == 3
    assert "val_top5_accuracy" in results["history"]
    for figure in ("curves.png", "gate_density.png", "class_gates.png"):
        assert (tmp_path / figure).stat().st_size > 1000


def test_cityscapes_deepmoe_drn_smoke(tmp_path):
    out = run_example(
        "cityscapes_deepmoe_drn.py", "--smoke", "--output-dir", str(tmp_path)
    )
    assert "mean IoU" in out and "multiply-adds per image" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["backend"] == keras.backend.backend()
    assert results["history"]["phase"] == [1, 1, 1, 2]
    assert "mean_iou" in results["history"]
    # Trained on crops, evaluated on whole frames.
    assert results["crop_size"] == [32, 32]
    assert results["image_size"] == [32, 48]
    per_class = results["per_class_iou"]
    assert list(per_class) == ["background", "rectangle 1", "rectangle 2"]
    ious = [v for v in per_class.values() if v is not None]
    assert results["mean_iou"] == pytest.approx(np.mean(ious), abs=1e-5)
    assert 0.0 <= results["pixel_accuracy"] <= 1.0
    # Labelling every pixel background scores its IoU over three classes
    # (below 0.3): the smoke run does better on each rectangle class.
    assert results["mean_iou"] > 0.4
    assert per_class["rectangle 1"] > 0.1 and per_class["rectangle 2"] > 0.1
    # Four bottleneck-A blocks, two gated convolutions each.
    assert len(results["gate_density"]["per_layer"]) == 8
    assert results["effective_mmacs"] <= results["dense_mmacs"]
    assert (tmp_path / "gate_density.png").exists()


@pytest.mark.parametrize(
    "name, archive",
    [
        ("imagenet_deepmoe", "ILSVRC2012_img_train.tar"),
        ("cityscapes_deepmoe_drn", "leftImg8bit_trainvaltest.zip"),
    ],
)
def test_without_data_the_examples_say_what_to_do(tmp_path, name, archive):
    pytest.importorskip("tensorflow_datasets")
    message = exit_message(
        f"{name}.py",
        "--data-dir",
        str(tmp_path / "tfds"),
        "--output-dir",
        str(tmp_path / "out"),
    )
    assert message.startswith("error:") and "manual_dir" in message
    assert archive in message and "--smoke" in message
    assert not (tmp_path / "out").exists()


def test_pmoe_synthetic_mnist_smoke(tmp_path):
    out = run_example(
        "pmoe_synthetic_mnist.py", "--smoke", "--output-dir", str(tmp_path)
    )
    assert "| pMoE (separate training) |" in out and "| CNN |" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["backend"] == keras.backend.backend()
    assert set(results["summary"]) == {"separate", "joint", "cnn"}
    separate = results["runs"]["separate"]["200"][0]
    # Two classes: chance is 0.5.
    assert separate["test_accuracy"] > 0.75
    # The top-8 patches of a router hold its class digit at least as often
    # as its top patch.
    assert separate["routing"]["top_8"] >= separate["routing"]["top_1"]
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


def test_pmoe_synthetic_mnist_without_data_says_what_to_do(tmp_path):
    message = exit_message(
        "pmoe_synthetic_mnist.py",
        "--mnist-path",
        str(tmp_path / "missing.npz"),
        "--output-dir",
        str(tmp_path),
    )
    assert "No MNIST file" in message and "--smoke" in message


@pytest.mark.parametrize(
    "script, args, num_classes, pmoe_parameters",
    [
        # WRN-10-1: 4 experts of 1x1x64x16 (+ bias), routers on 1x1x64.
        ("cifar_wrn_pmoe.py", [], 10, 4 * (64 * 16 + 16) + 64 * 4),
        # The authors' network: a batch normalization (4 x 64) in each
        # expert, 16 patches each; the efficient placement.
        (
            "cifar_wrn_pmoe.py",
            ["--architecture", "authors", "--placement", "halo"],
            10,
            4 * (4 * 64 + 64 * 16 + 16) + 64 * 4,
        ),
        # 8 experts of 3x3x64x8 (+ bias), routers on 4x4x64 patches.
        (
            "celeba_wrn_pmoe.py",
            ["--task", "smiling_eyeglasses"],
            4,
            8 * (3 * 3 * 64 * 8 + 8) + 4 * 4 * 64 * 8,
        ),
    ],
)
def test_wrn_pmoe_smoke(tmp_path, script, args, num_classes, pmoe_parameters):
    out = run_example(script, "--smoke", *args, "--output-dir", str(tmp_path))
    assert "| training images | WRN | WRN-pMoE |" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["backend"] == keras.backend.backend()
    assert results["num_classes"] == num_classes
    assert results["models"]["wrn_pmoe"]["pmoe"]["parameters"] == (
        pmoe_parameters
    )
    architecture = "authors" if "authors" in args else "paper"
    for kind in ("wrn", "wrn_pmoe"):
        assert results["models"][kind]["architecture"] == architecture
    placement = "halo" if "halo" in args else "patch"
    assert results["models"]["wrn_pmoe"]["pmoe"]["placement"] == placement
    for kind in ("wrn", "wrn_pmoe"):
        sizes = results["summary"][kind]
        assert len(sizes) == 1
        # Far above chance (1 / num_classes).
        assert all(2.5 / num_classes < s["mean"] <= 1.0 for s in sizes.values())
    # Class-balanced training sets of the requested sizes.
    assert sorted({r["train_size"] for r in results["runs"]}) == [
        int(s) for s in sorted(sizes, key=int)
    ]
    assert 0.0 < results["routing"]["coverage"] <= 1.0
    for figure in ("accuracy", "selection_frequency", "patch_selection"):
        assert (tmp_path / f"{figure}.png").stat().st_size > 1000


def test_celeba_wrn_pmoe_without_data_says_what_to_do(tmp_path):
    message = exit_message(
        "celeba_wrn_pmoe.py",
        "--data-dir",
        str(tmp_path / "no-such-tfds-dir"),
        "--no-download",
        "--output-dir",
        str(tmp_path),
    )
    assert "celeb_a" in message and "--data-dir" in message


def test_cifar_smoke_runs_without_tensorflow(tmp_path):
    # The quickstart on a jax-only or torch-only install: the digits come
    # as NumPy batches and nothing imports TensorFlow.
    backend = "torch" if keras.backend.backend() == "torch" else "jax"
    code = (
        "import runpy, sys\n"
        "sys.path.insert(0, 'examples')\n"
        "sys.modules['tensorflow'] = None\n"
        "sys.argv = ['cifar_deepmoe.py', '--smoke', '--output-dir', "
        f"{str(tmp_path)!r}]\n"
        "runpy.run_path('examples/cifar_deepmoe.py', run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "KERAS_BACKEND": backend},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["backend"] == backend
    assert results["test_accuracy"] > 0.5  # ten classes
