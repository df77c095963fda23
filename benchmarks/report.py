"""Turns pytest-benchmark JSON into the markdown table of RESULTS.md.

    python benchmarks/report.py benchmarks/results/cpu.json
"""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as handle:
        data = json.load(handle)
    rows = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        rows[info["case"]][info["engine"]] = (bench["stats"]["min"], info["steps"])
    machine = data.get("machine_info", {})
    print(f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, "
          f"{machine.get('cpu', {}).get('count', '?')} cores; {data.get('datetime', '')[:10]}")
    print()
    print("| case | engine | seconds (min) | µs / greedy step | vs numpy-careful | vs official-style |")
    print("|---|---|---:|---:|---:|---:|")
    for case, engines in rows.items():
        base = engines.get("numpy-careful", (None,))[0]
        official = engines.get("official-style", (None,))[0]
        for engine, (seconds, steps) in sorted(engines.items(), key=lambda kv: kv[1][0]):
            ratio = f"{base / seconds:.1f}×" if base else "–"
            ratio_official = f"{official / seconds:.0f}×" if official else "–"
            print(f"| {case} | {engine} | {seconds:.3f} | {seconds / steps * 1e6:.1f} | "
                  f"{ratio} | {ratio_official} |")


if __name__ == "__main__":
    main(sys.argv[1])
