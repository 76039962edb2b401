"""Sparse execution of a gated network against its dense computation.

A wide DeepMoE-style ResNet for 32x32 inputs (three stages of two residual
blocks, whose inner convolution is a `GatedConv2D` with twice the block
width) is run with gates that are zero for a given fraction of the channels
of every gated layer. The dense path computes everything and multiplies by
zero; `keras_moe.models.sparse_predict` computes only the active channels
(and only the active outputs of the convolutions that produce them).

Zero patterns: `shared`, the same channels off for every example (as after
freezing the gates of a class, or pruning); and `random`, each example with
its own channels off, where the union over a batch of 32 keeps nearly
everything and only per-example execution saves work.

    KERAS_BACKEND=torch python benchmarks/bench_sparse_inference.py --quick
"""

import argparse
import os
import sys

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

from keras_moe.layers import GatedConv2D  # noqa: E402
from keras_moe.models import sparse_predict  # noqa: E402

TARGET = 0.7  # speed-up >= 0.7 x the FLOP reduction
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
    rng = np.random.default_rng(0)
    repeats = 3 if quick else 10
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
            sparse_out = keras.ops.convert_to_numpy(
                sparse_predict(model, inputs, strategy=strategy)
            )
            max_error = float(np.max(np.abs(sparse_out - dense_out)))

            def sparse_fn(strategy=strategy):
                return keras.ops.convert_to_numpy(
                    sparse_predict(model, inputs, strategy=strategy)
                )

            def dense_fn():
                return keras.ops.convert_to_numpy(model(inputs))

            t_sparse = common.time_function(sparse_fn, repeats=repeats)
            t_dense = common.time_function(dense_fn, repeats=repeats)
            t_compiled = common.time_function(
                common.predict_timer(model, inputs), repeats=repeats
            )
            _, channels = sparse_predict(
                model, inputs, strategy=strategy, return_channels=True
            )
            reduction = flop_reduction(model, channels)
            speedup = t_dense["median_s"] / t_sparse["median_s"]
            row = common.ratio_row(
                f"batch {batch}, {pattern} zeros, {strategy}",
                t_sparse,
                t_dense,
            )
            row.update(
                {
                    "speedup": speedup,
                    "flop_reduction": reduction,
                    "speedup_over_flop_reduction": speedup / reduction,
                    "target": TARGET,
                    "meets_target": speedup / reduction >= TARGET,
                    "compiled_dense": t_compiled,
                    "speedup_vs_compiled_dense": t_compiled["median_s"]
                    / t_sparse["median_s"],
                    "max_abs_difference": max_error,
                    "zero_fraction": zero_fraction,
                }
            )
            rows.append(row)
    print(
        f"\nsparse_predict vs dense, {zero_fraction:.0%} of gated channels "
        f"off (backend: {keras.backend.backend()})"
    )
    print(
        "| case | dense eager (ms) | sparse (ms) | speed-up | FLOP reduction"
        " | speed-up / reduction (target >= 0.7) | compiled dense (ms) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['name']} | {1e3 * row['baseline']['median_s']:.1f} | "
            f"{1e3 * row['candidate']['median_s']:.1f} | "
            f"{row['speedup']:.2f}x | {row['flop_reduction']:.2f}x | "
            f"{row['speedup_over_flop_reduction']:.2f} "
            f"({'yes' if row['meets_target'] else 'NO'}) | "
            f"{1e3 * row['compiled_dense']['median_s']:.1f} |"
        )
    for row in rows:
        print(
            f"{row['name']}: max |sparse - dense| = "
            f"{row['max_abs_difference']:.1e}"
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
