"""Turns pytest-benchmark JSON into the markdown tables (and log-log plots) of RESULTS.md.

    python benchmarks/report.py benchmarks/results/cpu.json            # print the tables
    python benchmarks/report.py benchmarks/results/scaling.json --plots benchmarks/plots
    python benchmarks/report.py --update benchmarks/RESULTS.md         # regenerate RESULTS.md

``--update`` rewrites every block of RESULTS.md between ``<!-- begin generated: NAME -->`` and
``<!-- end generated: NAME -->`` from ``benchmarks/results/NAME.json`` (and redraws the
scaling plots), leaving the prose around them alone.

Every record needs extra_info with engine, case, M, d and steps (what the bench files store).
"""

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from dqkernels.core.atomic import atomic_output

BASELINE = "numpy-careful"
OFFICIAL = "official-style"


def load_records(path):
    with open(path) as handle:
        data = json.load(handle)
    records = []
    for bench in data["benchmarks"]:
        info = dict(bench["extra_info"])
        info["seconds"] = bench["stats"]["min"]
        records.append(info)
    cpu = data.get("machine_info", {}).get("cpu", {})
    header = (
        f"Machine: {cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cores; "
        f"{data.get('datetime', '')[:10]}"
    )
    return header, records


def comparison_table(records) -> str:
    """One row per (case, engine): seconds, µs per greedy step, speed-up over the baselines."""
    by_case = defaultdict(dict)
    for rec in records:
        by_case[rec["case"]][rec["engine"]] = rec
    lines = [
        "| case | engine | seconds | µs / greedy step | peak MB added | vs numpy-careful | vs official-style |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for case, engines in by_case.items():
        base = engines.get(BASELINE, {}).get("seconds")
        official = engines.get(OFFICIAL, {}).get("seconds")
        for engine, rec in sorted(engines.items(), key=lambda kv: kv[1]["seconds"]):
            seconds = rec["seconds"]
            peak = rec.get("peak_added_mb")
            lines.append(
                f"| {case} | {engine} | {seconds:.3f} | {seconds / rec['steps'] * 1e6:.1f} | "
                f"{'–' if peak is None else peak} | "
                f"{f'{base / seconds:.1f}×' if base else '–'} | "
                f"{f'{official / seconds:.0f}×' if official else '–'} |"
            )
    return "\n".join(lines)


def growth_table(records) -> str:
    """Exponent k of seconds ∝ M^k per (engine, d), fitted on the sizes with M >= 2000."""
    series = defaultdict(list)
    for rec in records:
        series[(rec["engine"], rec["d"])].append((rec["M"], rec["seconds"]))
    lines = ["| engine | d | sizes fitted | exponent k (seconds ∝ M^k) |", "|---|---:|---|---:|"]
    for (engine, d), points in sorted(series.items()):
        points = sorted(p for p in points if p[0] >= 2000)
        if len(points) < 2:
            continue
        m, t = np.log([p[0] for p in points]), np.log([p[1] for p in points])
        slope = np.polyfit(m, t, 1)[0]
        sizes = ", ".join(str(p[0]) for p in points)
        lines.append(f"| {engine} | {d} | {sizes} | {slope:.2f} |")
    return "\n".join(lines)


def plot_scaling(records, out_dir: Path) -> list:
    """One log-log PNG per d: seconds against M, one line per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for d in sorted({rec["d"] for rec in records}):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        engines = sorted({rec["engine"] for rec in records if rec["d"] == d})
        for engine in engines:
            points = sorted((r["M"], r["seconds"]) for r in records if r["d"] == d and r["engine"] == engine)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=engine)
        ax.set(xscale="log", yscale="log", xlabel="samples M", ylabel="seconds (10 bins)",
               title=f"GraphCut bins, d = {d}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        path = out_dir / f"scaling_d{d}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _global(records):
    return [rec for rec in records if rec["case"].startswith("global")]


def report(records) -> str:
    """The comparison table, and the growth table when the global cases span several sizes."""
    text = comparison_table(records)
    if len({rec["M"] for rec in _global(records)}) > 2:
        text += "\n\nGrowth exponents (least squares on log seconds against log M):\n\n"
        text += growth_table(_global(records))
    return text


def update_results(results_md: Path) -> None:
    """Regenerates the generated blocks of ``results_md`` from the JSON beside it."""
    pattern = re.compile(r"(<!-- begin generated: (\w+) -->\n).*?(<!-- end generated: \2 -->)", re.S)
    results_dir = results_md.parent / "results"

    def regenerate(match):
        name = match.group(2)
        header, records = load_records(results_dir / f"{name}.json")
        if len({rec["M"] for rec in _global(records)}) > 2:
            plot_scaling(_global(records), results_md.parent / "plots")
        return f"{match.group(1)}{header}\n\n{report(records)}\n{match.group(3)}"

    text = pattern.sub(regenerate, results_md.read_text())
    with atomic_output(results_md, "w") as handle:
        handle.write(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="?", help="pytest-benchmark --benchmark-json output")
    parser.add_argument("--plots", type=Path, help="write log-log PNGs into this directory")
    parser.add_argument("--update", type=Path, metavar="RESULTS_MD",
                        help="regenerate the generated blocks of this RESULTS.md")
    args = parser.parse_args()
    if args.update:
        update_results(args.update)
        return
    if not args.json:
        parser.error("give a JSON file, or --update RESULTS_MD")
    header, records = load_records(args.json)
    print(header)
    print()
    print(report(records))
    if args.plots:
        for path in plot_scaling(records, args.plots):
            print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
