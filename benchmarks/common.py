"""Timing helpers shared by the benchmarks.

Every benchmark compares a candidate with a baseline measured in the same
process, and reports the ratio of their median times; absolute times depend
on the machine, ratios much less.
"""

import json
import os
import platform
import statistics
import time

import keras
import numpy as np


def machine():
    """A short description of where the numbers were measured."""
    info = {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    backend = info["backend"]
    if backend == "jax":
        import jax

        info["jax"] = jax.__version__
        info["device"] = str(jax.devices()[0])
    elif backend == "tensorflow":
        import tensorflow as tf

        info["tensorflow"] = tf.__version__
        gpus = tf.config.list_physical_devices("GPU")
        info["device"] = "gpu" if gpus else "cpu"
    else:
        import torch

        info["torch"] = torch.__version__
        info["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return info


def time_function(fn, warmup=2, repeats=5):
    """Median and spread of the wall time of `fn()` after `warmup` calls.

    `fn` must block until its work is done (return NumPy values or call
    `keras.ops.convert_to_numpy` on its result).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": repeats,
    }


def time_interleaved(functions, warmup=2, repeats=5):
    """`time_function` for several functions, timed in turns.

    Each round times every function once, so that a change of the
    machine's load during the run affects them alike.

    Args:
        functions: dict from name to function (see `time_function`).
        warmup: untimed calls of each function first.
        repeats: timed rounds.

    Returns:
        A dict from name to `time_function`'s result.
    """
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {
        name: {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "max_s": max(values),
            "repeats": repeats,
        }
        for name, values in times.items()
    }


def train_step_timer(model, x, y, loss="mse", jit=True):
    """A function that runs one training step of `model` on `(x, y)`."""
    model.compile(
        optimizer=keras.optimizers.SGD(1e-3),
        loss=loss,
        jit_compile=jit and keras.backend.backend() != "torch",
    )

    def step():
        logs = model.train_on_batch(x, y, return_dict=True)
        return float(np.asarray(next(iter(logs.values()))))

    return step


def predict_timer(model, x):
    """A function that runs one compiled forward pass of `model` on `x`."""

    def forward():
        return keras.ops.convert_to_numpy(
            keras.tree.flatten(model.predict_on_batch(x))[0]
        )

    return forward


def ratio_row(name, candidate, baseline, limit=None):
    """One result row: the two timings and their ratio.

    `limit`, when given, is the ratio the work alone would give (such as
    the fraction of multiply-adds the candidate computes): the time ratio
    can approach it but not pass it, and the row also holds the time ratio
    over it.
    """
    ratio = candidate["median_s"] / baseline["median_s"]
    row = {
        "name": name,
        "candidate": candidate,
        "baseline": baseline,
        "ratio": ratio,
    }
    if limit is not None:
        row["limit"] = limit
        row["ratio_over_limit"] = ratio / limit
    return row


def print_table(title, rows):
    print(f"\n{title} (backend: {keras.backend.backend()})")
    print(
        "| case | candidate median (ms) | baseline median (ms) | ratio "
        "| work-ratio limit |"
    )
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        limit = row.get("limit")
        print(
            f"| {row['name']} | {1e3 * row['candidate']['median_s']:.1f} | "
            f"{1e3 * row['baseline']['median_s']:.1f} | {row['ratio']:.3f} | "
            f"{'-' if limit is None else f'{limit:.3f}'} |"
        )


def write_json(path, benchmark, rows, **extra):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(
            {
                "benchmark": benchmark,
                "machine": machine(),
                "rows": rows,
                **extra,
            },
            f,
            indent=2,
            default=_plain,
        )


def _plain(value):
    """NumPy scalars (such as a comparison's bool) as plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {value!r}")
