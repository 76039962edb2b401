"""Per-example channels inside one batched call, against the dense block.

DeepMoE's gates differ from example to example: on the trained CIFAR-10
network (`bench_trained_gates.py`) each image keeps 5-20% of the channels
of every gated layer, but the union over a batch of 128 keeps most of
them, so a pass per batch saves little and a pass per example pays a whole
network call per image. This benchmark measures the remaining option:
every example computes its own channels, all examples in one batched call,
with kernels gathered per example (padded to the same count `K`).

The block is a wide DeepMoE-ResNet basic block, as in the wide
DeepMoE-ResNet-20 for CIFAR: a 3x3 convolution from `C` to `2C` channels,
batch normalization (inference: a scale and a shift), ReLU, the gates (zero
except `K` channels per example), a 3x3 convolution back to `C`, the
residual and ReLU. Three ways to compute it:

- `dense`: both convolutions in full, the zero gates multiplied in (the
  baseline).
- `packed matmul`: each convolution as the patches of its input (9
  shifted copies side by side) times a kernel gathered per example, one
  batched matrix product (`einsum`) for the whole batch: conv1 computes
  only the `K` channels each example keeps, conv2 reads only those.
- `packed grouped`: the batch folded into the channels and one grouped
  convolution with one group per example, each group with its own
  gathered kernel.

Every row gives the packed time over the dense time and, as its limit, the
work ratio `K / 2C` (the fraction of the block's multiply-adds the packed
versions do), and the largest difference between the packed and the dense
outputs, which must stay within 1e-4 (the script fails otherwise). Both
sides are compiled the same way: `jax.jit` on jax, XLA (`jit_compile=True`)
on tensorflow, eager on torch (no autograd). Only the grouped form may be
skipped, on a backend whose convolution has no groups (tensorflow 2.21 runs
it on CPU, with XLA and without); the reason is printed and stored in the
JSON under `skipped`.

Weights, inputs and each example's `K` active channels are random. The
full run is batch 128, the three stages of the network ((32x32, C=16),
(16x16, C=32), (8x8, C=64)) and K in {2, 4, 8}; `--quick` only checks that
the script works (batch 16, K=4, 2 timed rounds), its ratios say little.

    KERAS_BACKEND=jax python benchmarks/bench_packed_channels.py
    KERAS_BACKEND=jax python benchmarks/bench_packed_channels.py --quick
"""

import argparse
import os
import sys

import keras
import numpy as np
from keras import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

STAGES = ((32, 16), (16, 32), (8, 64))  # (map size, block channels C)


def compiled(fn):
    """`fn` compiled the way Keras compiles a predict step."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    import torch

    def run(*args):
        with torch.no_grad():
            return fn(*args)

    return run


def patches(x):
    """The 3x3 'same' patches of `x` (B, H, W, C) as (B, H*W, 9*C)."""
    b, h, w, c = x.shape
    padded = ops.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    shifted = [
        padded[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)
    ]
    return ops.reshape(ops.stack(shifted, axis=3), (b, h * w, 9 * c))


def make_block(rng, size, channels):
    wide = 2 * channels
    weights = {
        "k1": rng.normal(0, 0.1, (3, 3, channels, wide)),
        "k2": rng.normal(0, 0.1, (3, 3, wide, channels)),
        "scale": rng.uniform(0.5, 1.5, wide),
        "shift": rng.normal(0, 0.1, wide),
    }
    weights = {
        k: ops.convert_to_tensor(v.astype("float32"))
        for k, v in weights.items()
    }

    def dense(x, gates, index):
        y = ops.conv(x, weights["k1"], padding="same")
        y = ops.relu(y * weights["scale"] + weights["shift"])
        y = y * gates[:, None, None, :]
        return ops.relu(x + ops.conv(y, weights["k2"], padding="same"))

    def packed_matmul(x, gates, index):
        b, k = index.shape
        kernel1 = ops.take(
            ops.reshape(weights["k1"], (9 * channels, wide)), index, axis=1
        )  # (9C, B, K)
        y = ops.einsum("bpc,cbk->bpk", patches(x), kernel1)
        scale = ops.take(weights["scale"], index)[:, None, :]
        shift = ops.take(weights["shift"], index)[:, None, :]
        active = ops.take_along_axis(gates, index, axis=1)[:, None, :]
        y = ops.relu(y * scale + shift) * active
        y = ops.reshape(y, (b, size, size, k))
        kernel2 = ops.take(
            ops.reshape(weights["k2"], (9, wide, channels)), index, axis=1
        )  # (9, B, K, C)
        kernel2 = ops.reshape(
            ops.transpose(kernel2, (1, 0, 2, 3)), (b, 9 * k, channels)
        )
        z = ops.einsum("bpk,bkc->bpc", patches(y), kernel2)
        return ops.relu(x + ops.reshape(z, (b, size, size, channels)))

    def packed_grouped(x, gates, index):
        b, k = index.shape
        kernel1 = ops.take(weights["k1"], index, axis=3)  # (3, 3, C, B, K)
        kernel1 = ops.reshape(kernel1, (3, 3, channels, b * k))
        folded = ops.reshape(
            ops.transpose(x, (1, 2, 0, 3)), (1, size, size, b * channels)
        )
        y = ops.conv(folded, kernel1, padding="same")  # groups = B
        y = ops.reshape(y, (size, size, b, k))
        scale = ops.take(weights["scale"], index)
        shift = ops.take(weights["shift"], index)
        active = ops.take_along_axis(gates, index, axis=1)
        y = ops.relu(y * scale + shift) * active
        kernel2 = ops.take(weights["k2"], index, axis=2)  # (3, 3, B, K, C)
        kernel2 = ops.reshape(
            ops.transpose(kernel2, (0, 1, 3, 2, 4)), (3, 3, k, b * channels)
        )
        z = ops.conv(
            ops.reshape(y, (1, size, size, b * k)), kernel2, padding="same"
        )
        z = ops.transpose(
            ops.reshape(z, (size, size, b, channels)), (2, 0, 1, 3)
        )
        return ops.relu(x + z)

    return {
        "dense": dense,
        "packed matmul": packed_matmul,
        "packed grouped": packed_grouped,
    }


TOLERANCE = 1e-4


def make_case(rng, batch, size, channels, k):
    """Inputs, gates and each example's `k` active channels (sorted)."""
    wide = 2 * channels
    x = rng.normal(size=(batch, size, size, channels)).astype("float32")
    index = np.sort(
        np.stack([rng.choice(wide, k, replace=False) for _ in range(batch)]),
        axis=1,
    ).astype("int32")
    gates = np.zeros((batch, wide), "float32")
    np.put_along_axis(gates, index, rng.uniform(0.5, 1.5, (batch, k)), axis=1)
    return tuple(ops.convert_to_tensor(v) for v in (x, gates, index))


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--batch-size", type=int, help="128; 16 with --quick")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a check that it runs: batch 16, K=4, 2 timed rounds",
    )
    parser.add_argument("--output", help="JSON file for the results")
    args = parser.parse_args(argv)
    batch = args.batch_size or (16 if args.quick else 128)
    repeats = 2 if args.quick else args.repeats
    actives = (4,) if args.quick else (2, 4, 8)
    rng = np.random.default_rng(0)
    rows, skipped = [], []
    for size, channels in STAGES:
        wide = 2 * channels
        functions = make_block(rng, size, channels)
        for k in actives:
            case = (
                f"batch {batch}, {size}x{size}, C={channels}, K={k} of {wide}"
            )
            inputs = make_case(rng, batch, size, channels, k)
            runs, errors = {}, {}
            reference = None
            for name, fn in functions.items():
                step = compiled(fn)
                try:
                    out = ops.convert_to_numpy(step(*inputs))
                except Exception as error:
                    if name != "packed grouped":
                        raise
                    # A backend whose convolution has no groups.
                    reason = f"{type(error).__name__}: {str(error)[:200]}"
                    skipped.append(
                        {"case": case, "name": name, "reason": reason}
                    )
                    print(f"{case}: {name} skipped ({reason})", flush=True)
                    continue
                if name == "dense":
                    reference = out
                else:
                    error = float(np.max(np.abs(out - reference)))
                    errors[name] = error
                    print(
                        f"{case}: max |{name} - dense| = {error:.1e}",
                        flush=True,
                    )
                    if not error <= TOLERANCE:
                        raise AssertionError(
                            f"{case}: {name} differs from dense by "
                            f"{error:.2e} (tolerance {TOLERANCE:.0e})"
                        )
                runs[name] = lambda step=step: ops.convert_to_numpy(
                    step(*inputs)
                )
            times = common.time_interleaved(runs, warmup=1, repeats=repeats)
            for name in runs:
                if name == "dense":
                    continue
                row = common.ratio_row(
                    f"{case}: {name}",
                    times[name],
                    times["dense"],
                    limit=k / wide,
                )
                row.update(
                    {
                        "map_size": size,
                        "channels": channels,
                        "active": k,
                        "strategy": name,
                        "batch_size": batch,
                        "max_abs_difference": errors[name],
                    }
                )
                rows.append(row)
    common.print_table(
        f"Per-example channels in one batched call, batch {batch}", rows
    )
    for entry in skipped:
        print(f"skipped: {entry['case']}: {entry['name']} ({entry['reason']})")
    if args.output:
        common.write_json(
            args.output,
            "packed_channels",
            rows,
            skipped=skipped,
            batch_size=batch,
            repeats=repeats,
            quick=args.quick,
            tolerance=TOLERANCE,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
