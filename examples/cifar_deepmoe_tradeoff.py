"""DeepMoE's accuracy against its compute on CIFAR-10, over lambda values.

    python examples/cifar_deepmoe_tradeoff.py --data-dir path/to/cifar10
    python examples/cifar_deepmoe_tradeoff.py --data-dir path/to/cifar10 \\
        --study lambda

`--study tradeoff` (the default) measures the paper's central claim on
CIFAR-10 (DeepMoE section 5.1 and figure 5): wide DeepMoE-ResNet-20 at
several values of lambda, against the plain ResNet-20 and a plain ResNet
of about the DeepMoE networks' effective cost, all with the same two-phase
schedule (the baselines train for as many epochs). It writes a table and a
plot of test accuracy against effective multiply-adds per image.

`--study lambda` measures how lambda acts on wide DeepMoE-ResNet-20 and
-56 over a fixed short schedule: the mean gate, the gate density, the
collapsed layers and the test accuracy for each of the paper's lambda
values, with `L_g` as the mean gate (the default) and, at the largest
lambda, as eq. 8's sum.

Every configuration is a run of `cifar_deepmoe.py` in its own folder under
`--output-dir`; a finished run is read back, an interrupted one resumes,
so the study can be stopped and started again. The data is an image folder
(`train/<class>/*`, `test/<class>/*`) or tensorflow-datasets' CIFAR-10.
"""

import argparse
import json
import os

STUDIES = ("tradeoff", "lambda")


# A help text that states its default in words ends with "%(default).0s",
# which prints nothing but keeps ArgumentDefaultsHelpFormatter from adding
# "(default: None)".
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--study",
        choices=STUDIES,
        default="tradeoff",
        help="what to measure (see the description above)",
    )
    parser.add_argument(
        "--data-dir",
        help="an image folder with train/<class>/* and test/<class>/*, or "
        "a tensorflow-datasets directory (without it: tfds' CIFAR-10)",
    )
    parser.add_argument(
        "--lambdas",
        type=float,
        nargs="+",
        help="lambda values of the DeepMoE runs (default: 2 4 8 for "
        "tradeoff; 0.001 0.01 0.1 1 2 8 for lambda)%(default).0s",
    )
    parser.add_argument(
        "--train-examples",
        type=int,
        help="training images, balanced over the classes (default: 8000 "
        "for tradeoff, 6400 for lambda)%(default).0s",
    )
    parser.add_argument(
        "--test-examples",
        type=int,
        help="test images (default: all 10000 for tradeoff, 2000 for "
        "lambda)%(default).0s",
    )
    parser.add_argument(
        "--joint-epochs",
        type=int,
        help="joint epochs (default: 8 for tradeoff, 1 for lambda; "
        "baselines train joint + fine-tune epochs)%(default).0s",
    )
    parser.add_argument(
        "--finetune-epochs",
        type=int,
        help="fine-tuning epochs with the gating frozen (default: 2 for "
        "tradeoff, 0 for lambda)%(default).0s",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="batch size (default: 128 for tradeoff, 64 for lambda)"
        "%(default).0s",
    )
    parser.add_argument(
        "--small-depth",
        type=int,
        default=8,
        help="depth of the small plain ResNet baseline (tradeoff)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed of every run"
    )
    parser.add_argument(
        "--output-dir",
        default="outputs/cifar_deepmoe_tradeoff",
        help="one folder per run, and the table and plot",
    )
    return parser.parse_args(argv)


def _defaults(args):
    tradeoff = args.study == "tradeoff"
    defaults = dict(
        lambdas=[2.0, 4.0, 8.0] if tradeoff else [0.001, 0.01, 0.1, 1, 2, 8],
        train_examples=8000 if tradeoff else 6400,
        test_examples=None if tradeoff else 2000,
        joint_epochs=8 if tradeoff else 1,
        finetune_epochs=2 if tradeoff else 0,
        batch_size=128 if tradeoff else 64,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def runs(args):
    """`(name, cifar_deepmoe.py arguments, description)` of every run."""
    total = args.joint_epochs + args.finetune_epochs
    # The paper divides the rate by 10 at 150 and 250 of 350 epochs.
    boundaries = sorted({max(1, round(total * f)) for f in (3 / 7, 5 / 7)})
    common = [
        "--dataset",
        "image_folder" if args.data_dir else "cifar10",
        "--joint-epochs",
        str(args.joint_epochs),
        "--finetune-epochs",
        str(args.finetune_epochs),
        "--batch-size",
        str(args.batch_size),
        "--max-train-examples",
        str(args.train_examples),
        "--seed",
        str(args.seed),
        "--lr-boundaries",
        *(str(b) for b in boundaries if b < total),
    ]
    if args.data_dir:
        common += ["--data-dir", args.data_dir]
    if args.test_examples:
        common += ["--max-test-examples", str(args.test_examples)]
    planned = []
    depths = (20,) if args.study == "tradeoff" else (20, 56)
    for depth in depths:
        model = f"wide_deepmoe_resnet{depth}_cifar10"
        reductions = [("mean", args.lambdas)]
        if args.study == "lambda":
            reductions.append(("sum", [max(args.lambdas)]))
        for reduction, lambdas in reductions:
            for value in lambdas:
                name = f"wide{depth}_{reduction}_lambda{value:g}"
                planned.append(
                    (
                        name,
                        [
                            "--model",
                            model,
                            "--lambda-gate",
                            str(value),
                            "--gate-reduction",
                            reduction,
                        ],
                        dict(
                            model=f"wide DeepMoE-ResNet-{depth}",
                            depth=depth,
                            lambda_gate=value,
                            gate_reduction=reduction,
                        ),
                    )
                )
    if args.study == "tradeoff":
        for depth in (20, args.small_depth):
            planned.append(
                (
                    f"resnet{depth}",
                    ["--model", "resnet20_cifar10", "--depth", str(depth)],
                    dict(model=f"ResNet-{depth}", depth=depth),
                )
            )
    return [(name, extra + common, info) for name, extra, info in planned]


def run_all(args):
    import cifar_deepmoe
    import keras

    rows = []
    for name, argv, info in runs(args):
        folder = os.path.join(args.output_dir, name)
        path = os.path.join(folder, "results.json")
        if os.path.exists(path):
            print(f"{name}: done, reading {path}")
        else:
            print(f"{name}: cifar_deepmoe.py {' '.join(argv)}")
            cifar_deepmoe.main(argv + ["--output-dir", folder])
            keras.utils.clear_session()
        with open(path) as f:
            result = json.load(f)
        rows.append({"name": name, **info, **_summary(result)})
    return rows


def _summary(result):
    history = result["history"]
    gates = result.get("gate_density") or {}
    return {
        "test_accuracy": result["test_accuracy"],
        "dense_mmacs": result["dense_mmacs"],
        "effective_mmacs": result["effective_mmacs"],
        "parameters": result["parameters"],
        "gate_density": gates.get("overall"),
        "mean_gate": result.get("mean_gate"),
        "collapsed_layers": result.get("collapsed_layers"),
        "gated_layers": len(gates.get("per_layer", {})) or None,
        "seconds_per_epoch": result["seconds_per_epoch"],
        "epochs": len(history.get("epoch", [])),
        "train_examples": result["train_examples"],
        "test_examples": result["test_examples"],
    }


def _cell(value, spec):
    return "-" if value is None else format(value, spec)


def table(rows, study):
    if study == "lambda":
        lines = [
            "| network | L_g | lambda | mean gate | gate density | "
            "collapsed layers | test accuracy | effective MMACs |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in rows:
            lines.append(
                f"| {row['model']} | {row['gate_reduction']} | "
                f"{row['lambda_gate']:g} | {_cell(row['mean_gate'], '.3f')} | "
                f"{_cell(row['gate_density'], '.3f')} | "
                f"{row['collapsed_layers']} of {row['gated_layers']} | "
                f"{row['test_accuracy']:.4f} | "
                f"{row['effective_mmacs']:.1f} of {row['dense_mmacs']:.1f} |"
            )
        return "\n".join(lines)
    lines = [
        "| network | lambda | test accuracy | effective MMACs | dense MMACs "
        "| gate density | parameters |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {_cell(row.get('lambda_gate'), 'g')} | "
            f"{row['test_accuracy']:.4f} | {row['effective_mmacs']:.1f} | "
            f"{row['dense_mmacs']:.1f} | "
            f"{_cell(row['gate_density'], '.3f')} | {row['parameters']:,} |"
        )
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    moe = [r for r in rows if r.get("lambda_gate") is not None]
    plain = [r for r in rows if r.get("lambda_gate") is None]
    ax.plot(
        [r["effective_mmacs"] for r in moe],
        [100 * r["test_accuracy"] for r in moe],
        "o-",
        color="tab:orange",
        label="wide DeepMoE-ResNet-20",
    )
    for r in moe:
        ax.annotate(
            f"$\\lambda$={r['lambda_gate']:g}",
            (r["effective_mmacs"], 100 * r["test_accuracy"]),
            textcoords="offset points",
            xytext=(5, -12),
            fontsize=8,
        )
    ax.plot(
        [r["effective_mmacs"] for r in plain],
        [100 * r["test_accuracy"] for r in plain],
        "s",
        color="tab:blue",
        label="plain ResNet",
    )
    for r in plain:
        ax.annotate(
            r["model"],
            (r["effective_mmacs"], 100 * r["test_accuracy"]),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    ax.set_xlabel("multiply-adds per image (millions, effective)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = _defaults(parse_args(argv))
    os.makedirs(args.output_dir, exist_ok=True)
    rows = run_all(args)
    text = table(rows, args.study)
    with open(os.path.join(args.output_dir, f"{args.study}.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.output_dir, f"{args.study}.json"), "w") as f:
        json.dump(rows, f, indent=2)
    written = [f"{args.study}.md", f"{args.study}.json"]
    if args.study == "tradeoff":
        plot(rows, os.path.join(args.output_dir, "tradeoff.png"))
        written.append("tradeoff.png")
    print()
    print(text)
    print(f"wrote {', '.join(written)} in {args.output_dir}")
    return rows


if __name__ == "__main__":
    main()
