"""PatchExpertChoiceMoE against the masked dense formulation.

The masked dense formulation (as in the pMoE authors' public code) runs
every expert on every patch and multiplies the result by a mask that holds
the gating value at the selected patches and zero elsewhere. Both compute
the same function; the benchmark checks that their outputs agree, then times
a forward and backward pass (one training step) of each, at the CelebA
configuration of WRN-pMoE (16x16x640 map, 4x4 patches, n=16, k=8, l=2, 3x3
experts with 80 filters) and the CIFAR-10 one (8x8x640 map, 1x1 patches,
n=64, k=4, l=16, 1x1 experts with 160 filters).

    KERAS_BACKEND=jax python benchmarks/bench_patch_moe.py --quick
"""

import argparse
import os
import sys

import keras
import numpy as np
from keras import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

from keras_moe.layers import PatchExpertChoiceMoE  # noqa: E402

CONFIGS = {
    "celeba": dict(
        map_shape=(16, 16, 640),
        patch_size=4,
        num_experts=8,
        patches_per_expert=2,
        expert_filters=80,
        expert_kernel_size=3,
    ),
    "cifar10": dict(
        map_shape=(8, 8, 640),
        patch_size=1,
        num_experts=4,
        patches_per_expert=16,
        expert_filters=160,
        expert_kernel_size=1,
    ),
}


class MaskedDensePatchMoE(keras.layers.Layer):
    """Every expert on every patch, multiplied by the routing mask.

    Shares the routers and experts of a `PatchExpertChoiceMoE` (its public
    `route` and `expert_layers`), so both compute the same function.
    """

    def __init__(self, moe, **kwargs):
        super().__init__(**kwargs)
        self.moe = moe

    def call(self, inputs):
        moe = self.moe
        grid_h, grid_w = moe.grid_shape
        ph, pw = moe.patch_size
        n = moe.num_patches
        channels = inputs.shape[-1]
        x = ops.reshape(inputs, (-1, grid_h, ph, grid_w, pw, channels))
        patches = ops.reshape(
            ops.transpose(x, (0, 1, 3, 2, 4, 5)), (-1, ph, pw, channels)
        )
        routing = moe.route(inputs)
        # (batch, k, n): the gate at selected patches, zero elsewhere.
        mask = ops.sum(
            ops.one_hot(routing["indices"], n)
            * ops.cast(routing["gates"], inputs.dtype)[..., None],
            axis=2,
        )
        outputs = []
        for s, expert in enumerate(moe.expert_layers):
            y = expert(patches)
            y = ops.reshape(y, (-1, n, ph, pw, y.shape[-1]))
            outputs.append(y * mask[:, s, :, None, None, None])
        if moe.combine == "concat":
            y = ops.concatenate(outputs, axis=-1)
        else:
            y = sum(outputs)
        y = ops.reshape(y, (-1, grid_h, grid_w, ph, pw, y.shape[-1]))
        y = ops.transpose(y, (0, 1, 3, 2, 4, 5))
        return ops.reshape(y, (-1, grid_h * ph, grid_w * pw, y.shape[-1]))

    def compute_output_shape(self, inputs_shape):
        return self.moe.compute_output_shape(inputs_shape)


def build(config, masked):
    inputs = keras.Input(config["map_shape"])
    moe = PatchExpertChoiceMoE(
        config["num_experts"],
        config["patches_per_expert"],
        config["patch_size"],
        expert_filters=config["expert_filters"],
        expert_kernel_size=config["expert_kernel_size"],
    )
    moe.build((None, *config["map_shape"]))
    layer = MaskedDensePatchMoE(moe) if masked else moe
    outputs = layer(inputs)
    return keras.Model(inputs, outputs), moe


def run(quick, batch_size, output):
    rows = []
    for name, config in CONFIGS.items():
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(batch_size, *config["map_shape"])).astype(
            "float32"
        )
        ours, moe = build(config, masked=False)
        masked, masked_moe = build(config, masked=True)
        masked_moe.set_weights(moe.get_weights())
        y_ours = ops.convert_to_numpy(ours(x))
        y_masked = ops.convert_to_numpy(masked(x))
        max_error = float(np.max(np.abs(y_ours - y_masked)))
        target = np.zeros_like(y_ours)
        repeats = 3 if quick else 10
        times = common.time_interleaved(
            {
                "ours": common.train_step_timer(ours, x, target),
                "masked": common.train_step_timer(masked, x, target),
            },
            repeats=repeats,
        )
        timing_ours, timing_masked = times["ours"], times["masked"]
        work_fraction = config["patches_per_expert"] / moe.num_patches
        row = common.ratio_row(
            f"{name} (batch {batch_size})",
            timing_ours,
            timing_masked,
            limit=work_fraction,
        )
        row["max_abs_difference"] = max_error
        row["work_fraction"] = work_fraction
        rows.append(row)
    common.print_table(
        "PatchExpertChoiceMoE fwd+bwd vs masked dense (ratio = ours/masked)",
        rows,
    )
    for row in rows:
        print(
            f"{row['name']}: outputs agree to {row['max_abs_difference']:.2e}"
            f"; experts do {row['work_fraction']:.3f} of the masked work"
        )
    common.write_json(output, "patch_moe_vs_masked_dense", rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    batch_size = args.batch_size or (4 if args.quick else 32)
    output = args.output or os.path.join(
        "benchmarks", "results", keras.backend.backend(), "patch_moe.json"
    )
    run(args.quick, batch_size, output)


if __name__ == "__main__":
    main()
