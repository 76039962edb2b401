"""Sparse inference and pruning of a trained DeepMoE network on real images.

The network is the wide DeepMoE-ResNet-20 trained on CIFAR-10 at lambda 32
(`benchmarks/weights/`, see its README), run on CIFAR-10 test images. Its
gates are those it computes on each image: nothing is synthetic.

For each strategy of `keras_moe.models.SparsePredictor` and batch size:

- the multiply-add reduction the gates allow per example (dense over
  effective multiply-adds of the whole network, every example with its own
  gates): the most any strategy can save;
- the reduction the strategy's passes allow (every example's gates replaced
  by the union over its pass, `SparsePredictor.passes`);
- the wall-clock speed-up against the dense model, compiled the same way
  (`predict_on_batch`: `jax.jit` on jax, XLA on tensorflow, eager torch),
  timed in turns in the same process;
- the speed-up over the per-example reduction: 1.0 would be every
  multiply-add the gates switch off saved as time.

Then the pruned export (`prune_inactive_channels`, calibrated on
`--calibration-examples` training images): its parameters, multiply-adds and
latency against the original, and whether its outputs equal the original's
on the calibration images and the test images.

    KERAS_BACKEND=jax python benchmarks/bench_trained_gates.py \\
        --data-dir path/to/cifar10 --output results.json

`--data-dir` is an image folder with `train/<class>/` and `test/<class>/`
(as `keras_moe.data.load_dataset("image_folder")` reads it). Without it the
script says so and exits.
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(
    HERE, "weights", "wide_deepmoe_resnet20_cifar10_lambda32.keras"
)


def parse(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-dir", help="CIFAR-10 as an image folder")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=".keras file")
    parser.add_argument(
        "--examples",
        type=int,
        default=512,
        help="test images for the batch-128 measurements",
    )
    parser.add_argument(
        "--single-examples",
        type=int,
        default=64,
        help="test images for the batch-1 measurements",
    )
    parser.add_argument(
        "--calibration-examples",
        type=int,
        default=2000,
        help="training images the pruned export is calibrated on",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--output", help="JSON file for the results")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if not args.data_dir:
        print(
            "bench_trained_gates.py needs real images: pass --data-dir "
            "(CIFAR-10 as an image folder). Nothing measured."
        )
        return 0
    import keras
    import numpy as np

    sys.path.insert(0, HERE)
    import common

    import keras_moe  # noqa: F401  (registers the layers for loading)
    from keras_moe.analysis import collect_gates
    from keras_moe.analysis import flop_report
    from keras_moe.data import load_dataset
    from keras_moe.models import SparsePredictor
    from keras_moe.models import prune_inactive_channels

    repeats = 3 if args.quick else args.repeats
    model = keras.saving.load_model(args.model)
    if keras.backend.backend() == "tensorflow":
        model.jit_compile = True  # XLA for both sides, as jax compiles
    needed = max(args.examples, args.single_examples)
    train, test, _ = load_dataset(
        "image_folder",
        data_dir=args.data_dir,
        batch_size=128,
        augment=False,
        max_train_examples=args.calibration_examples,
        max_test_examples=needed,
        seed=0,
    )
    images = np.concatenate([np.asarray(x) for x, _ in test])[:needed]
    labels = np.concatenate([np.asarray(y) for _, y in test])[:needed]
    calibration = np.concatenate([np.asarray(x) for x, _ in train])

    def logits_of(outputs):
        if isinstance(outputs, dict):
            return np.asarray(keras.ops.convert_to_numpy(outputs["logits"]))
        flat = keras.tree.flatten(outputs)
        return np.asarray(keras.ops.convert_to_numpy(flat[0]))

    def reduction(x, gates):
        report = flop_report(model, gates=gates)
        return report.dense_macs / report.effective_macs, report

    def union_gates(gates, passes):
        merged = [np.zeros_like(g) for g in gates]
        for rows in passes:
            for m, g in zip(merged, gates):
                m[rows] = np.any(g[rows] != 0, axis=0)
        return merged

    def timer(network, x, batch_size):
        """Compiled inference on `x`, batch by batch."""

        def run():
            out = None
            for start in range(0, len(x), batch_size):
                out = network.predict_on_batch(x[start : start + batch_size])
            return logits_of(out)

        return run

    rows = []
    dense_logits = logits_of(model.predict(images, batch_size=128, verbose=0))
    accuracy = float(np.mean(np.argmax(dense_logits, -1) == labels))
    cases = [
        (1, "union", args.single_examples, None),
        (128, "union", args.examples, None),
        (128, "grouped", args.examples, 2),
        (128, "grouped", args.examples, 4),
        (128, "grouped", args.examples, 8),
        (128, "per_example", args.examples, None),
    ]
    for batch_size, strategy, count, groups in cases:
        x = images[:count]
        gates, _ = collect_gates(model, x)
        per_example, report = reduction(x, gates)
        predictor = SparsePredictor(
            model, strategy=strategy, max_cached=1024, max_groups=groups or 8
        )
        passes = predictor.passes(x, batch_size=batch_size)
        strategy_reduction, _ = reduction(x, union_gates(gates, passes))
        start = time.perf_counter()
        sparse = predictor.predict(x, batch_size=batch_size)  # compiles
        first_s = time.perf_counter() - start
        error = float(np.max(np.abs(logits_of(sparse) - dense_logits[:count])))
        times = common.time_interleaved(
            {
                "sparse": lambda: logits_of(
                    predictor.predict(x, batch_size=batch_size)
                ),
                "dense": timer(model, x, batch_size),
            },
            warmup=1,
            repeats=repeats,
        )
        speedup = times["dense"]["median_s"] / times["sparse"]["median_s"]
        label = f"{strategy} ({groups} groups)" if groups else strategy
        row = common.ratio_row(
            f"batch {batch_size}, {label}", times["sparse"], times["dense"]
        )
        row.update(
            {
                "examples": count,
                "passes": len(passes),
                "per_example_reduction": per_example,
                "strategy_reduction": strategy_reduction,
                "speedup": speedup,
                "speedup_over_per_example_reduction": speedup / per_example,
                "speedup_over_strategy_reduction": speedup / strategy_reduction,
                "dense_mmacs": report.dense_macs / 1e6,
                "effective_mmacs": report.effective_macs / 1e6,
                "first_call_s": first_s,
                "compiled_networks": predictor.cache_info()["compiled"],
                "max_abs_difference": error,
            }
        )
        rows.append(row)
        print(
            f"{row['name']}: {count} images in {len(passes)} passes; "
            f"reduction per example {per_example:.2f}x, by the passes "
            f"{strategy_reduction:.2f}x; speed-up {speedup:.2f}x "
            f"({speedup / per_example:.2f} of the per-example reduction); "
            f"dense {1e3 * times['dense']['median_s']:.0f} ms, sparse "
            f"{1e3 * times['sparse']['median_s']:.0f} ms; first call "
            f"{first_s:.1f} s, {row['compiled_networks']} networks; "
            f"max |sparse - dense| {error:.1e}",
            flush=True,
        )

    # The pruned export, calibrated on training images.
    pruned = prune_inactive_channels(model, calibration)
    if keras.backend.backend() == "tensorflow":
        pruned.jit_compile = True
    original_report = flop_report(model)
    pruned_report = flop_report(pruned)
    calibration_error = float(
        np.max(
            np.abs(
                logits_of(pruned.predict(calibration, verbose=0))
                - logits_of(model.predict(calibration, verbose=0))
            )
        )
    )
    pruned_logits = logits_of(pruned.predict(images, verbose=0))
    test_error = float(np.max(np.abs(pruned_logits - dense_logits)))
    pruned_accuracy = float(np.mean(np.argmax(pruned_logits, -1) == labels))
    x = images[: args.examples]
    latency = {}
    for batch_size, count in ((1, args.single_examples), (128, len(x))):
        timed = common.time_interleaved(
            {
                "pruned": timer(pruned, x[:count], batch_size),
                "original": timer(model, x[:count], batch_size),
            },
            warmup=1,
            repeats=repeats,
        )
        row = common.ratio_row(
            f"pruned export, batch {batch_size}",
            timed["pruned"],
            timed["original"],
        )
        latency[batch_size] = row["ratio"]
        rows.append(row)
    gates, _ = collect_gates(pruned, images)
    pruned_effective = flop_report(pruned, gates=gates).effective_macs
    export = {
        "calibration_examples": len(calibration),
        "original_parameters": model.count_params(),
        "pruned_parameters": pruned.count_params(),
        "original_dense_mmacs": original_report.dense_macs / 1e6,
        "pruned_dense_mmacs": pruned_report.dense_macs / 1e6,
        "pruned_effective_mmacs": pruned_effective / 1e6,
        "latency_ratio_batch_1": latency[1],
        "latency_ratio_batch_128": latency[128],
        "max_abs_difference_calibration": calibration_error,
        "max_abs_difference_test": test_error,
        "test_accuracy_original": accuracy,
        "test_accuracy_pruned": pruned_accuracy,
        "test_examples": len(images),
    }
    print(
        "pruned export: parameters {original_parameters:,} -> "
        "{pruned_parameters:,}; dense multiply-adds "
        "{original_dense_mmacs:.1f} M -> {pruned_dense_mmacs:.1f} M; "
        "latency ratio {latency_ratio_batch_1:.2f} (batch 1), "
        "{latency_ratio_batch_128:.2f} (batch 128); max |pruned - original| "
        "{max_abs_difference_calibration:.1e} on the calibration images, "
        "{max_abs_difference_test:.1e} on the test images; test accuracy "
        "{test_accuracy_original:.3f} -> {test_accuracy_pruned:.3f}".format(
            **export
        )
    )
    if args.output:
        common.write_json(
            args.output,
            "trained_gates",
            rows,
            model=os.path.basename(args.model),
            test_accuracy=accuracy,
            pruned_export=export,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
