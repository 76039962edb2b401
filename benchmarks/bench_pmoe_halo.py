"""The halo placement against the authors' own masked pMoE layer.

The authors' public code (nowazrabbani/pMoE_CNN, `gater_2.py` and
`wideresnet_moe.py`) computes its pMoE layer by masking: per expert, a
router convolution with the patch's size and stride, a softmax over all
patches, the top `l`, a gate map scattered to the pixels, the input map
multiplied by it, then batch normalization -> ReLU -> convolution on the
whole masked map. That is the baseline a pMoE user has; it is ported here
operation for operation to `keras.ops`, so that it runs on every backend.
`PatchExpertChoiceMoE(placement="halo")` computes the same outputs on the
selected patches (checked in inference mode) with the experts'
convolutions on `l / n` of the map: that work ratio is the limit of the
time ratio. Timed: a forward and backward pass (one training step) of
each, at the CelebA configuration of WRN-pMoE (16x16x640 map, 4x4
patches, n=16, k=8, l=2, 3x3 experts with 80 filters) and the CIFAR-10
one (8x8x640 map, 1x1 patches, n=64, k=4, l=16, 1x1 experts with 160
filters).

    KERAS_BACKEND=jax python benchmarks/bench_pmoe_halo.py --quick
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


class AuthorsGate(keras.layers.Layer):
    """One gate of the authors' `gater_2.py`, operation for operation.

    Routing values by a convolution whose kernel is the patch, strided by
    the patch; softmax over the patches; the top `l`; their values
    scattered back (a segment sum), repeated over each patch's pixels and
    channels; the input map times that.
    """

    def __init__(self, patches_per_expert, patch_size, **kwargs):
        super().__init__(**kwargs)
        self.patches_per_expert = patches_per_expert
        self.patch_size = patch_size

    def build(self, inputs_shape):
        self.kernel = self.add_weight(
            shape=(self.patch_size, self.patch_size, inputs_shape[-1], 1),
            initializer=keras.initializers.RandomNormal(stddev=1e-4),
            name="gating_kernel",
        )

    def call(self, inputs):
        p = self.patch_size
        values = ops.conv(inputs, self.kernel, strides=p, padding="valid")
        values = ops.transpose(values, (0, 3, 1, 2))
        grid_h, grid_w = values.shape[2], values.shape[3]
        n = grid_h * grid_w
        values = ops.reshape(values, (-1, 1, n))
        values = ops.softmax(values, axis=-1)
        top, indices = ops.top_k(values, self.patches_per_expert)
        indices = ops.reshape(indices, (-1, self.patches_per_expert))
        top = ops.reshape(top, (-1,))
        rows = ops.arange(ops.shape(indices)[0], dtype=indices.dtype)
        flat = ops.reshape(indices + rows[:, None] * n, (-1,))
        batch = ops.shape(indices)[0]
        gates = ops.segment_sum(top, flat, num_segments=batch * n)
        gates = ops.reshape(gates, (-1, 1, grid_h, grid_w))
        gates = ops.transpose(gates, (0, 2, 3, 1))
        gates = ops.repeat(gates, p * p * inputs.shape[-1], axis=3)
        gates = ops.reshape(gates, (-1, grid_h, grid_w, p, p, inputs.shape[-1]))
        gates = ops.transpose(gates, (0, 1, 3, 2, 4, 5))
        gates = ops.reshape(
            gates, (-1, grid_h * p, grid_w * p, inputs.shape[-1])
        )
        return inputs * gates


def authors_model(config):
    """The authors' pMoE layer: gate -> BN -> ReLU -> conv per expert,
    concatenated."""
    inputs = keras.Input(config["map_shape"])
    outputs = []
    for _ in range(config["num_experts"]):
        x = AuthorsGate(config["patches_per_expert"], config["patch_size"])(
            inputs
        )
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.Conv2D(
            config["expert_filters"],
            config["expert_kernel_size"],
            padding="same",
        )(x)
        outputs.append(x)
    return keras.Model(inputs, keras.layers.Concatenate()(outputs))


def halo_model(config):
    inputs = keras.Input(config["map_shape"])
    moe = PatchExpertChoiceMoE(
        config["num_experts"],
        config["patches_per_expert"],
        config["patch_size"],
        expert_filters=config["expert_filters"],
        expert_kernel_size=config["expert_kernel_size"],
        expert_use_pre_activation=True,
        placement="halo",
        gating="softmax_all",
        router_initializer=keras.initializers.RandomNormal(stddev=1e-4),
        expert_kernel_initializer="glorot_uniform",
    )
    return keras.Model(inputs, moe(inputs)), moe


def copy_weights(moe, authors):
    """The authors' model's weights from the pMoE layer's."""
    gates = [la for la in authors.layers if isinstance(la, AuthorsGate)]
    norms = [
        la
        for la in authors.layers
        if isinstance(la, keras.layers.BatchNormalization)
    ]
    convs = [la for la in authors.layers if isinstance(la, keras.layers.Conv2D)]
    router = ops.convert_to_numpy(moe.router)
    for s, expert in enumerate(moe.expert_layers):
        gates[s].kernel.assign(
            router[:, s].reshape(gates[s].kernel.shape).astype("float32")
        )
        bn, _, conv = expert.layers
        norms[s].set_weights(bn.get_weights())
        convs[s].set_weights(conv.get_weights())


def selected_mask(moe, indices, shape):
    """True on each expert's output channels over its selected patches."""
    batch, height, width, _ = shape
    p = moe.patch_size[0]
    grid_w = width // p
    filters = moe.expert_channels
    mask = np.zeros((batch, height, width, moe.output_channels), bool)
    for b in range(batch):
        for s in range(moe.num_experts):
            for j in indices[b, s]:
                row, col = divmod(int(j), grid_w)
                mask[
                    b,
                    row * p : (row + 1) * p,
                    col * p : (col + 1) * p,
                    s * filters : (s + 1) * filters,
                ] = True
    return mask


def run(quick, batch_size, output):
    rows = []
    for name, config in CONFIGS.items():
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(batch_size, *config["map_shape"])).astype(
            "float32"
        )
        halo, moe = halo_model(config)
        authors = authors_model(config)
        # Batch-norm statistics away from their initial values, so that
        # the comparison sees the shift the masked formulation spreads.
        for expert in moe.expert_layers:
            bn = expert.layers[0]
            channels = bn.gamma.shape[0]
            bn.moving_mean.assign(rng.normal(0, 0.1, channels))
            bn.beta.assign(rng.normal(0, 0.1, channels))
        copy_weights(moe, authors)
        y_halo = ops.convert_to_numpy(halo(x, training=False))
        y_authors = ops.convert_to_numpy(authors(x, training=False))
        indices = ops.convert_to_numpy(moe.route(x)["indices"])
        selected = selected_mask(moe, indices, y_halo.shape)
        max_error = float(
            np.max(np.abs(y_halo - y_authors)[selected], initial=0.0)
        )
        target = np.zeros_like(y_halo)
        timings = common.time_interleaved(
            {
                "halo": common.train_step_timer(halo, x, target),
                "authors": common.train_step_timer(authors, x, target),
            },
            repeats=3 if quick else 10,
        )
        row = common.ratio_row(
            f"{name} (batch {batch_size})",
            timings["halo"],
            timings["authors"],
            limit=config["patches_per_expert"] / moe.num_patches,
        )
        n = moe.num_patches
        window = (config["patch_size"] + config["expert_kernel_size"] - 1) ** 2
        row.update(
            max_abs_difference_on_selected=max_error,
            work_ratio=config["patches_per_expert"] / n,
            window_ratio=config["patches_per_expert"]
            * window
            / (n * config["patch_size"] ** 2),
        )
        rows.append(row)
    common.print_table(
        "PatchExpertChoiceMoE(placement='halo') fwd+bwd vs the authors' "
        "masked pMoE layer (ratio = halo/authors)",
        rows,
    )
    for row in rows:
        print(
            f"{row['name']}: limit (work ratio l/n) {row['work_ratio']:.3f}, "
            f"ratio / limit {row['ratio_over_limit']:.2f}; the position-wise "
            f"layers see {row['window_ratio']:.3f} of the map (halo "
            f"included); outputs on the selected patches agree to "
            f"{row['max_abs_difference_on_selected']:.2e}"
        )
    common.write_json(output, "pmoe_halo_vs_authors", rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    batch_size = args.batch_size or (4 if args.quick else 32)
    output = args.output or os.path.join(
        "benchmarks", "results", keras.backend.backend(), "pmoe_halo.json"
    )
    run(args.quick, batch_size, output)


if __name__ == "__main__":
    main()
