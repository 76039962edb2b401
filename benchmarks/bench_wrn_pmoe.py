"""WRN-pMoE train step against the WRN train step.

(c) One training step (forward, backward, SGD update, cross entropy on the
    logits) of WRN-pMoE against the plain WRN of the same width, at the
    pMoE paper's two configurations: CelebA 64x64 (the last convolution
    sees 16x16x(64k); 4x4 patches, n=16, k=8 experts, l=2, 3x3 experts) and
    CIFAR-10 32x32 (8x8x(64k) map; 1x1 patches, n=64, k=4, l=16, 1x1
    experts). The FLOP ratio of the two models is the limit the work
    sets. The full run uses
    WRN-10-10 (the paper's width); `--quick` uses widening factor 4 and
    batch 8, with the experts' filters scaled so that their concatenation
    still has the block's width. The two steps are timed in turns
    (median of 5 rounds after 2 warm-up rounds in `--quick`, 10 otherwise).

    KERAS_BACKEND=jax python benchmarks/bench_wrn_pmoe.py --quick
"""

import argparse
import os
import statistics
import sys
import time

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

from keras_moe.analysis import flop_report  # noqa: E402
from keras_moe.models import WRN_PRESETS  # noqa: E402
from keras_moe.models import WideResNet  # noqa: E402

CONFIGS = {
    "celeba": ("wrn10_10_celeba", "wrn10_10_pmoe_celeba"),
    "cifar10": ("wrn10_10_cifar10", "wrn10_10_pmoe_cifar10"),
}


def build(preset, widening_factor):
    config = dict(WRN_PRESETS[preset], widening_factor=widening_factor)
    if config.get("pmoe") is not None:
        # The experts' filters follow the width (64k / num_experts).
        config["pmoe"] = {
            k: v for k, v in config["pmoe"].items() if k != "expert_filters"
        }
    return WideResNet(**config)


def interleaved_timings(steps, warmup=2, repeats=5):
    """Median and spread of each step's wall time, timed in turns.

    Each round times every step once, in turn, so that a change of load on
    a shared machine falls on all of them alike instead of on whichever was
    timed at that moment.
    """
    for _ in range(warmup):
        for step in steps:
            step()
    times = [[] for _ in steps]
    for _ in range(repeats):
        for step, measured in zip(steps, times):
            start = time.perf_counter()
            step()
            measured.append(time.perf_counter() - start)
    return [
        {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "max_s": max(t),
            "repeats": repeats,
        }
        for t in times
    ]


def run(quick, widening_factor, batch_size, output):
    repeats = 5 if quick else 10
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rows = []
    for name, (plain_preset, pmoe_preset) in CONFIGS.items():
        keras.utils.set_random_seed(0)
        plain = build(plain_preset, widening_factor)
        pmoe = build(pmoe_preset, widening_factor)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(batch_size, *plain.image_shape)).astype("float32")
        y = rng.integers(0, plain.num_classes, size=batch_size)
        timing_pmoe, timing_plain = interleaved_timings(
            [
                common.train_step_timer(pmoe, x, y, loss=loss),
                common.train_step_timer(plain, x, y, loss=loss),
            ],
            repeats=repeats,
        )
        flops_pmoe = flop_report(pmoe).dense_flops
        flops_plain = flop_report(plain).dense_flops
        row = common.ratio_row(
            f"{name}, WRN-10-{widening_factor} (batch {batch_size})",
            timing_pmoe,
            timing_plain,
            limit=flops_pmoe / flops_plain,
        )
        layer = pmoe.pmoe_layer
        row.update(
            widening_factor=widening_factor,
            batch_size=batch_size,
            flop_ratio=flops_pmoe / flops_plain,
            pmoe_gflops=flops_pmoe / 1e9,
            wrn_gflops=flops_plain / 1e9,
            pmoe_parameters=int(pmoe.count_params()),
            wrn_parameters=int(plain.count_params()),
            pmoe_layer=dict(
                num_patches=layer.num_patches,
                num_experts=layer.num_experts,
                patches_per_expert=layer.patches_per_expert,
                expert_filters=layer.expert_filters,
                expert_kernel_size=layer.expert_kernel_size,
            ),
        )
        rows.append(row)
    common.print_table(
        "WRN-pMoE vs WRN train step (ratio = WRN-pMoE / WRN)", rows
    )
    for row in rows:
        print(
            f"{row['name']}: forward FLOPs per image "
            f"{row['pmoe_gflops']:.2f} G vs {row['wrn_gflops']:.2f} G "
            f"(ratio {row['flop_ratio']:.3f}); parameters "
            f"{row['pmoe_parameters']:,} vs {row['wrn_parameters']:,}"
        )
    common.write_json(output, "wrn_pmoe_train_step", rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--widening-factor", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    widening_factor = args.widening_factor or (4 if args.quick else 10)
    batch_size = args.batch_size or (8 if args.quick else 32)
    output = args.output or os.path.join(
        "benchmarks", "results", keras.backend.backend(), "wrn_pmoe.json"
    )
    run(args.quick, widening_factor, batch_size, output)


if __name__ == "__main__":
    main()
