"""Writes docs/benchmarks.md from the JSON results of the benchmarks.

python benchmarks/run.py --quick && python benchmarks/report.py
"""

import argparse
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
TITLES = {
    "trained_gates": "Trained gates on CIFAR-10 test images: sparse "
    "inference and the pruned export",
    "deepmoe_train_step": "(a, e) DeepMoE train step vs the same backbone "
    "without gating; cost of the embedding and gating heads",
    "patch_moe_vs_masked_dense": "(b) PatchExpertChoiceMoE forward + "
    "backward vs the masked dense formulation",
    "wrn_pmoe_train_step": "(c) WRN-pMoE vs WRN train step",
    "sparse_inference": "(d) Sparse inference vs dense",
    "packed_channels": "(d2) Per-example channels in one batched call vs "
    "the dense block",
    "pmoe_halo_vs_authors": "(f) PatchExpertChoiceMoE with the halo "
    "placement vs the authors' masked pMoE layer",
}
INTRO = """# Benchmarks

Measured by the scripts in `benchmarks/` (`python benchmarks/run.py
--quick`, then `python benchmarks/report.py` writes this page). Each number
is a ratio against a baseline timed in the same process: the median of
repeated timings after warm-up (the spread, min to max, is in the JSON
files under `benchmarks/results/`). The ratio is the candidate's time over
the baseline's: below 1, the candidate is faster. Absolute times depend on
the machine, named above each table; ratios much less, but on a CPU with
few cores small kernels are dominated by per-operation overhead, which
favours whichever side launches fewer operations.
"""


def machine_line(machine):
    versions = ", ".join(
        f"{k} {machine[k]}"
        for k in ("keras", "jax", "tensorflow", "torch")
        if k in machine
    )
    return (
        f"{machine['backend']} backend on {machine.get('device', 'cpu')}, "
        f"{machine['cpu_count']} CPU cores ({machine['processor']}); "
        f"{versions}; Python {machine['python']}"
    )


def fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def section(benchmark, results):
    lines = [f"## {TITLES.get(benchmark, benchmark)}", ""]
    for result in results:
        lines.append(f"*{machine_line(result['machine'])}*")
        lines.append("")
        if benchmark == "trained_gates":
            lines += trained_gates_lines(result)
        elif benchmark == "sparse_inference":
            lines += [
                "| case | dense (ms) | sparse (ms) | speed-up | FLOP "
                "reduction | speed-up / reduction | eager speed-up / "
                "reduction | first sparse call (s) |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for row in result["rows"]:
                eager = row.get("eager", {})
                eager_ratio = eager.get("speedup_over_flop_reduction")
                lines.append(
                    f"| {row['name']} | "
                    f"{1e3 * row['baseline']['median_s']:.1f} | "
                    f"{1e3 * row['candidate']['median_s']:.1f} | "
                    f"{row['speedup']:.2f}x | {row['flop_reduction']:.2f}x | "
                    f"{row['speedup_over_flop_reduction']:.2f} | "
                    f"{fmt(eager_ratio, 2)} | "
                    f"{fmt(row.get('first_call_s'), 1)} |"
                )
        else:
            lines += [
                "| case | candidate (ms) | baseline (ms) | ratio | "
                "limit set by the work |",
                "| --- | --- | --- | --- | --- |",
            ]
            for row in result["rows"]:
                lines.append(
                    f"| {row['name']} | "
                    f"{1e3 * row['candidate']['median_s']:.1f} | "
                    f"{1e3 * row['baseline']['median_s']:.1f} | "
                    f"{fmt(row['ratio'])} | {fmt(row.get('limit'))} |"
                )
            extra = [
                row for row in result["rows"] if "embedding_fraction" in row
            ]
            if extra:
                lines.append("")
                for row in extra:
                    lines.append(
                        f"- {row['name']}: the embedding and gating heads "
                        f"cost {row['embedding_and_gating_mmacs']:.2f} "
                        f"M multiply-adds, "
                        f"{100 * row['embedding_fraction']:.1f}% of "
                        f"the base network's "
                        f"{row['base_network_mmacs']:.0f} M (the "
                        "paper: about 2%)."
                    )
            limits = [row for row in result["rows"] if "work_ratio" in row]
            if limits:
                lines.append("")
                for row in limits:
                    lines.append(
                        f"- {row['name']}: the limit is the work ratio "
                        f"l/n = {row['work_ratio']:.3f} (ratio / limit "
                        f"{row['ratio_over_limit']:.2f}); outputs on the "
                        "selected patches agree to "
                        f"{row['max_abs_difference_on_selected']:.1e}."
                    )
            checked = [
                row["max_abs_difference"]
                for row in result["rows"]
                if "max_abs_difference" in row
            ]
            if checked or result.get("skipped"):
                lines.append("")
            if checked:
                lines.append(
                    "- Largest difference from the baseline's outputs: "
                    f"{max(checked):.1e}."
                )
            for entry in result.get("skipped", []):
                lines.append(
                    f"- {entry['case']}: {entry['name']} skipped "
                    f"({entry['reason']})."
                )
            flops = [row for row in result["rows"] if "flop_ratio" in row]
            if flops:
                lines.append("")
                for row in flops:
                    lines.append(
                        f"- {row['name']}: WRN-pMoE has "
                        f"{row['flop_ratio']:.3f} of WRN's forward FLOPs "
                        f"({row['pmoe_gflops']:.2f} vs "
                        f"{row['wrn_gflops']:.2f} GFLOPs per image) and "
                        f"{row['pmoe_parameters']:,} vs "
                        f"{row['wrn_parameters']:,} parameters."
                    )
        lines.append("")
    return lines


def trained_gates_lines(result):
    lines = [
        "| case | passes | reduction per example | reduction by the "
        "passes | dense (ms) | sparse (ms) | speed-up | speed-up / "
        "per-example reduction |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    export = []
    for row in result["rows"]:
        if "per_example_reduction" not in row:
            export.append(row)
            continue
        lines.append(
            f"| {row['name']} ({row['examples']} images) | {row['passes']} | "
            f"{row['per_example_reduction']:.2f}x | "
            f"{row['strategy_reduction']:.2f}x | "
            f"{1e3 * row['baseline']['median_s']:.0f} | "
            f"{1e3 * row['candidate']['median_s']:.0f} | "
            f"{row['speedup']:.2f}x | "
            f"{row['speedup_over_per_example_reduction']:.2f} |"
        )
    pruned = result.get("pruned_export")
    if pruned:
        lines += [
            "",
            f"Pruned export (calibrated on {pruned['calibration_examples']:,}"
            " training images): "
            f"{pruned['original_parameters']:,} -> "
            f"{pruned['pruned_parameters']:,} parameters; dense "
            f"multiply-adds {pruned['original_dense_mmacs']:.1f} M -> "
            f"{pruned['pruned_dense_mmacs']:.1f} M per image "
            f"({pruned['pruned_effective_mmacs']:.1f} M with its gates); "
            "time against the original, both run densely: "
            + ", ".join(
                f"{row['ratio']:.2f} ({row['name'].split(', ')[-1]})"
                for row in export
            )
            + "; largest difference of the logits "
            f"{pruned['max_abs_difference_calibration']:.1e} on the "
            f"calibration images and {pruned['max_abs_difference_test']:.1e}"
            f" on {pruned['test_examples']} test images (test accuracy "
            f"{pruned['test_accuracy_original']:.3f} -> "
            f"{pruned['test_accuracy_pruned']:.3f}).",
        ]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    parser.add_argument(
        "--output",
        default=os.path.join(HERE, "..", "docs", "benchmarks.md"),
    )
    parser.add_argument("--notes", help="a markdown file appended to the page")
    args = parser.parse_args(argv)
    by_benchmark = {}
    for path in sorted(
        glob.glob(os.path.join(args.results_dir, "*", "*.json"))
    ):
        with open(path) as f:
            result = json.load(f)
        by_benchmark.setdefault(result["benchmark"], []).append(result)
    lines = [INTRO]
    for benchmark in TITLES:
        if benchmark in by_benchmark:
            lines += section(benchmark, by_benchmark[benchmark])
    if args.notes:
        with open(args.notes) as f:
            lines.append(f.read())
    with open(args.output, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
