"""Sparse execution of a gated network against its dense computation.

A wide DeepMoE-style ResNet for 32x32 inputs (three stages of two residual
blocks, whose inner convolution is a `GatedConv2D` with twice the block
width) is run with gates that are zero for a given fraction of the channels
of every gated layer. The dense path computes everything and multiplies by
zero; `keras_moe.models.SparsePredictor` (what `sparse_predict` uses)
computes only the active channels (and only the active outputs of the
convolutions that produce them) with a pruned network, compiled and cached.

Both sides run compiled the same way: Keras' `predict_on_batch` (`jax.jit`
on jax; on tensorflow with XLA, `jit_compile=True`, for both; torch
predicts eagerly). The speed-up is dense over sparse time; the FLOP
reduction is its limit, and their ratio says how much of the saved work
shows as time (1.0 at best). Each row also times the
eager paths (the model called directly, and `sparse_predict(...,
compiled=False)`, which walks the graph layer by layer) and the first
sparse call, which builds and compiles the pruned network.

Zero patterns: `shared`, the same channels off for every example (as after
freezing the gates of a class, or pruning); and `random`, each example with
its own channels off, where the union over a batch of 32 keeps nearly
everything and only per-example execution saves work.

    KERAS_BACKEND=torch python benchmarks/bench_sparse_inference.py --quick
"""

import argparse
import os
import sys
import time

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

from keras_moe.layers import GatedConv2D  # noqa: E402
from keras_moe.models import SparsePredictor  # noqa: E402
from keras_moe.models import sparse_predict  # noqa: E402

STAGES = (32, 64, 128)


def gated_resnet(blocks_per_stage=2):
    images = keras.Input((32, 32, 3))
    gate_inputs = []
    x = keras.layers.Conv2D(STAGES[0], 3, padding="same", use_bias=False)(
        images
    )
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    for stage, width in enumerate(STAGES):
        for block in range(blocks_per_stage):
            strides = 2 if stage > 0 and block == 0 else 1
            inner = 2 * width
            gates = keras.Input((inner,))
            gate_inputs.append(gates)
            y = keras.layers.Conv2D(
                inner, 3, strides=strides, padding="same", use_bias=False
            )(x)
            y = keras.layers.ReLU()(keras.layers.BatchNormalization()(y))
            y = GatedConv2D(width, 3, padding="same", use_bias=False)(y, gates)
            y = keras.layers.BatchNormalization()(y)
            if strides > 1 or x.shape[-1] != width:
                x = keras.layers.Conv2D(
                    width, 1, strides=strides, use_bias=False
                )(x)
            x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    logits = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model([images, *gate_inputs], logits), gate_inputs


def conv_flops(layer):
    """FLOPs (2 per multiply-add) of a convolution computed densely."""
    out, kernel = layer.output.shape, layer.kernel.shape
    return 2.0 * out[1] * out[2] * float(np.prod(kernel))


def flop_reduction(model, channels):
    """Dense over effective convolution FLOPs per example.

    `channels` is what `sparse_predict(..., return_channels=True)` reports:
    for each pass, the computed and total channels of every layer it
    thinned.
    """
    convs = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D)
    ]
    dense = sum(conv_flops(layer) for layer in convs)
    effective = np.mean(
        [
            sum(
                conv_flops(layer)
                * (
                    computed[layer.name][0] / computed[layer.name][1]
                    if layer.name in computed
                    else 1.0
                )
                for layer in convs
            )
            for computed in channels
        ]
    )
    return dense / effective


def make_gates(gate_inputs, batch, zero_fraction, pattern, rng):
    gates = []
    for g in gate_inputs:
        width = g.shape[-1]
        off = int(round(zero_fraction * width))
        values = rng.uniform(0.5, 1.5, size=(batch, width)).astype("float32")
        if pattern == "shared":
            values[:, rng.permutation(width)[:off]] = 0.0
        else:
            for row in values:
                row[rng.permutation(width)[:off]] = 0.0
        gates.append(values)
    return gates


def run(quick, zero_fraction, output):
    keras.utils.set_random_seed(0)
    model, gate_inputs = gated_resnet()
    if keras.backend.backend() == "tensorflow":
        # Compiled with XLA, as jax is; Keras leaves XLA off on CPU.
        model.jit_compile = True
    rng = np.random.default_rng(0)
    repeats = 5 if quick else 20
    rows = []
    cases = [(1, "shared"), (32, "shared"), (32, "random")]
    for batch, pattern in cases:
        x = rng.normal(size=(batch, 32, 32, 3)).astype("float32")
        gates = make_gates(gate_inputs, batch, zero_fraction, pattern, rng)
        inputs = [x, *gates]
        dense_out = keras.ops.convert_to_numpy(model(inputs))
        strategies = ["union"] + (
            ["per_example"] if pattern == "random" else []
        )
        for strategy in strategies:
            predictor = SparsePredictor(model, strategy=strategy)
            start = time.perf_counter()
            sparse_out, channels = predictor.predict(
                inputs, return_channels=True
            )
            first_call = time.perf_counter() - start
            eager_out = keras.ops.convert_to_numpy(
                sparse_predict(model, inputs, strategy, compiled=False)
            )
            max_error = float(
                max(
                    np.max(np.abs(sparse_out - dense_out)),
                    np.max(np.abs(eager_out - dense_out)),
                )
            )

            def sparse_fn(predictor=predictor):
                return predictor.predict(inputs)

            def sparse_eager_fn(strategy=strategy):
                return keras.ops.convert_to_numpy(
                    sparse_predict(model, inputs, strategy, compiled=False)
                )

            def dense_eager_fn():
                return keras.ops.convert_to_numpy(model(inputs))

            times = common.time_interleaved(
                {
                    "sparse": sparse_fn,
                    "dense": common.predict_timer(model, inputs),
                    "sparse_eager": sparse_eager_fn,
                    "dense_eager": dense_eager_fn,
                },
                repeats=repeats,
            )
            reduction = flop_reduction(model, channels)
            speedup = times["dense"]["median_s"] / times["sparse"]["median_s"]
            eager_speedup = (
                times["dense_eager"]["median_s"]
                / times["sparse_eager"]["median_s"]
            )
            row = common.ratio_row(
                f"batch {batch}, {pattern} zeros, {strategy}",
                times["sparse"],
                times["dense"],
            )
            row.update(
                {
                    "speedup": speedup,
                    "flop_reduction": reduction,
                    "speedup_over_flop_reduction": speedup / reduction,
                    "eager": {
                        "dense": times["dense_eager"],
                        "sparse": times["sparse_eager"],
                        "speedup": eager_speedup,
                        "speedup_over_flop_reduction": eager_speedup
                        / reduction,
                    },
                    "sparse_compiled_vs_dense_eager": times["dense_eager"][
                        "median_s"
                    ]
                    / times["sparse"]["median_s"],
                    "first_call_s": first_call,
                    "cache": predictor.cache_info(),
                    "max_abs_difference": max_error,
                    "zero_fraction": zero_fraction,
                }
            )
            rows.append(row)
    print(
        f"\nsparse vs dense, {zero_fraction:.0%} of gated channels off "
        f"(backend: {keras.backend.backend()})"
    )
    print(
        "| case | dense (ms) | sparse (ms) | speed-up | FLOP reduction | "
        "speed-up / reduction | eager: dense, sparse (ms), "
        "speed-up / reduction | first sparse call (s) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        eager = row["eager"]
        print(
            f"| {row['name']} | {1e3 * row['baseline']['median_s']:.1f} | "
            f"{1e3 * row['candidate']['median_s']:.1f} | "
            f"{row['speedup']:.2f}x | {row['flop_reduction']:.2f}x | "
            f"{row['speedup_over_flop_reduction']:.2f} | "
            f"{1e3 * eager['dense']['median_s']:.1f}, "
            f"{1e3 * eager['sparse']['median_s']:.1f}, "
            f"{eager['speedup_over_flop_reduction']:.2f} | "
            f"{row['first_call_s']:.1f} |"
        )
    for row in rows:
        print(
            f"{row['name']}: max |sparse - dense| = "
            f"{row['max_abs_difference']:.1e}, cache {row['cache']}"
        )
    common.write_json(output, "sparse_inference", rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--zero-fraction", type=float, default=0.5)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    output = args.output or os.path.join(
        "benchmarks",
        "results",
        keras.backend.backend(),
        "sparse_inference.json",
    )
    run(args.quick, args.zero_fraction, output)


if __name__ == "__main__":
    main()
