"""Runs every benchmark on every backend and collects the results.

    python benchmarks/run.py --quick          # all backends, < 10 min
    python benchmarks/run.py --backends jax   # one backend, full settings
    python benchmarks/run.py --data-dir path/to/cifar10  # with real images

Each benchmark runs in its own process with `KERAS_BACKEND` set, prints its
table and writes JSON under `benchmarks/results/<backend>/`. The driver then
prints every ratio next to the limit the work alone sets (where the
benchmark states one) and writes
`benchmarks/results/summary.json`.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# Benchmarks measured on real images: they run only with --data-dir.
NEEDS_DATA = ("bench_trained_gates.py",)
BENCHMARKS = sorted(
    os.path.basename(p) for p in glob.glob(os.path.join(HERE, "bench_*.py"))
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--backends", nargs="+", default=["jax", "tensorflow", "torch"]
    )
    parser.add_argument("--only", nargs="+", help="benchmark file names")
    parser.add_argument(
        "--data-dir",
        help="CIFAR-10 as an image folder, for bench_trained_gates.py "
        "(skipped without it)",
    )
    parser.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    names = args.only or BENCHMARKS
    failures = []
    start = time.perf_counter()
    for backend in args.backends:
        for name in names:
            output = os.path.join(
                args.results_dir, backend, name[len("bench_") : -3] + ".json"
            )
            command = [
                sys.executable,
                os.path.join(HERE, name),
                "--output",
                output,
            ]
            if args.quick:
                command.append("--quick")
            if name in NEEDS_DATA:
                if not args.data_dir:
                    print(f"\n=== {name}: skipped, needs --data-dir ===")
                    continue
                command += ["--data-dir", args.data_dir]
            print(f"\n=== {name} on {backend} ===", flush=True)
            env = {
                **os.environ,
                "KERAS_BACKEND": backend,
                "TF_CPP_MIN_LOG_LEVEL": "3",
            }
            result = subprocess.run(command, env=env)
            if result.returncode:
                failures.append(f"{name} on {backend}")
    summary = collect(args.results_dir, args.backends)
    with open(os.path.join(args.results_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\n=== summary ({time.perf_counter() - start:.0f} s) ===")
    print("| backend | benchmark | case | ratio | work-ratio limit |")
    print("| --- | --- | --- | --- | --- |")
    for row in summary:
        limit = row["limit"]
        print(
            f"| {row['backend']} | {row['benchmark']} | {row['case']} | "
            f"{row['value']:.3f} ({row['measure']}) | "
            f"{'-' if limit is None else f'{limit:.3f}'} |"
        )
    if failures:
        print("failed: " + ", ".join(failures))
        return 1
    return 0


def collect(results_dir, backends):
    """One summary row per measured ratio."""
    rows = []
    for backend in backends:
        for path in sorted(
            glob.glob(os.path.join(results_dir, backend, "*.json"))
        ):
            with open(path) as f:
                result = json.load(f)
            for row in result["rows"]:
                if "speedup_over_per_example_reduction" in row:
                    value = row["speedup_over_per_example_reduction"]
                    measure = "speed-up / per-example reduction"
                elif "speedup_over_flop_reduction" in row:
                    value = row["speedup_over_flop_reduction"]
                    measure = "speed-up / FLOP reduction"
                else:
                    value, measure = row["ratio"], "time ratio"
                rows.append(
                    {
                        "backend": backend,
                        "benchmark": result["benchmark"],
                        "case": row["name"],
                        "value": value,
                        "measure": measure,
                        "limit": row.get("limit"),
                        "machine": result["machine"],
                    }
                )
    return rows


if __name__ == "__main__":
    sys.exit(main())
