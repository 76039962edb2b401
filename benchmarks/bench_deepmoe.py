"""DeepMoE training cost against the same backbone without gating.

(a) One training step of a wide DeepMoE-ResNet (embedding, gating heads,
    gated convolutions, the three-term loss) against the plain ResNet of the
    same widths, trained with plain cross entropy and the same optimizer,
    timed in turns. The multiply-adds of the embedding and heads set the
    ratio the work alone would give (the limit column).
(e) The cost of the shallow embedding and the gating heads as a fraction of
    the base network's multiply-adds (the paper: about 2%).

    KERAS_BACKEND=jax python benchmarks/bench_deepmoe.py --quick
"""

import argparse
import os
import sys

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

from keras_moe.analysis import flop_report  # noqa: E402
from keras_moe.models import DeepMoEResNet  # noqa: E402
from keras_moe.training import DeepMoETrainer  # noqa: E402


def train_step(model, x, y, deepmoe):
    """One compiled training step of `model`, with the same optimizer for
    both sides (SGD with momentum, as the paper trains)."""
    loss = None
    if not deepmoe:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=loss,
        jit_compile=keras.backend.backend() != "torch",
    )

    def step():
        logs = model.train_on_batch(x, y, return_dict=True)
        return float(np.asarray(logs["loss"]))

    return step


def embedding_fraction(network):
    report = flop_report(network)
    gating = sum(
        r["dense_macs"]
        for r in report.layers
        if r["type"] in ("ShallowEmbedding", "SparseGatingHeads")
    )
    base = report.dense_macs - gating
    return gating / base, base, gating


def run(quick, output):
    depths = [20] if quick else [20, 56]
    batch = 32 if quick else 128
    repeats = 3 if quick else 10
    rows = []
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=batch)
    for depth in depths:
        keras.utils.set_random_seed(0)
        deepmoe = DeepMoETrainer(
            DeepMoEResNet(depth, num_classes=10, variant="wide"),
            lambda_gate=1e-3,
        )
        plain = DeepMoEResNet(
            depth, num_classes=10, variant="wide", gated=False
        )
        times = common.time_interleaved(
            {
                "deepmoe": train_step(deepmoe, x, y, deepmoe=True),
                "plain": train_step(plain, x, y, deepmoe=False),
            },
            repeats=repeats,
        )
        t_moe, t_plain = times["deepmoe"], times["plain"]
        fraction, base, gating = embedding_fraction(deepmoe.network)
        row = common.ratio_row(
            f"wide DeepMoE-ResNet-{depth} vs wide ResNet-{depth} "
            f"(batch {batch})",
            t_moe,
            t_plain,
            limit=1.0 + fraction,
        )
        row.update(
            {
                "embedding_and_gating_mmacs": gating / 1e6,
                "base_network_mmacs": base / 1e6,
                "embedding_fraction": fraction,
            }
        )
        rows.append(row)
    common.print_table(
        "DeepMoE train step vs the same backbone without gating", rows
    )
    for row in rows:
        print(
            f"{row['name']}: embedding + gating heads "
            f"{row['embedding_and_gating_mmacs']:.2f} M multiply-adds = "
            f"{100 * row['embedding_fraction']:.1f}% of the base network "
            f"({row['base_network_mmacs']:.0f} M; the paper: about 2%)"
        )
    common.write_json(output, "deepmoe_train_step", rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    output = args.output or os.path.join(
        "benchmarks", "results", keras.backend.backend(), "deepmoe.json"
    )
    run(args.quick, output)


if __name__ == "__main__":
    main()
