#!/usr/bin/env python3
"""Markdown table of Google Benchmark JSON results (standard library only).

    stunet_bench_layers_cpu --benchmark_out=layers.json --benchmark_out_format=json
    python3 cmake/scripts/bench_table.py layers.json [more.json ...] [--context]

One row per benchmark run (aggregates such as _mean / _median included, the
complexity fits BigO / RMS skipped): name, real time with its unit, every user
counter (the rates: GFLOP/s, GB/s, tiles/s, ...; bytes_per_second and
items_per_second too), and the label (where the stunet benchmarks name their
PyTorch anchor). Columns are the union over all rows, in order of first
appearance; a row without a counter shows an empty cell. With several files a
last column names the file each row came from, so runs of two machines or two
commits can sit in one table.
"""

import argparse
import json
import math
import os
import sys

# Keys of a benchmark entry that are not user counters (Google Benchmark's
# JSON reporter writes counters as plain keys next to these).
RESERVED = {
    "name", "family_index", "per_family_instance_index", "run_name", "run_type",
    "repetitions", "repetition_index", "threads", "iterations", "real_time",
    "cpu_time", "time_unit", "label", "aggregate_name", "aggregate_unit",
    "error_occurred", "error_message", "big_o", "rms", "cpu_coefficient",
    "real_coefficient", "complexity",
}

SI = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]


def fmt_number(value):
    """Four significant digits; SI prefixes from 10^4 up so that voxels/s
    (10^6..10^8) stay readable next to GFLOP/s (10^0..10^2)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1e4:
        for scale, prefix in SI:
            if magnitude >= scale:
                return f"{value / scale:.4g}{prefix}"
    return f"{value:.4g}"


def fmt_time(value):
    """Times keep their benchmark's unit, so no SI prefix ("12346 ms", not "12.35k ms")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and abs(value) >= 1e3:
        return f"{value:.0f}"
    return fmt_number(value)


def cell(text):
    """A markdown cell: pipes escaped, newlines flattened."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def load(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"bench_table.py: cannot read {path}: {e}")
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        sys.exit(f"bench_table.py: {path} is not Google Benchmark JSON (no 'benchmarks' list)")
    return data


def rows_of(data):
    """(name, time text, {counter: value}, label) for each run of one file."""
    rows = []
    for b in data["benchmarks"]:
        if b.get("aggregate_name") in ("BigO", "RMS"):
            continue  # complexity fits carry coefficients, not times
        name = b.get("name", "?")
        if b.get("error_occurred"):
            time = "error: " + str(b.get("error_message", ""))
        elif "real_time" in b:
            time = f"{fmt_time(b['real_time'])} {b.get('time_unit', 'ns')}"
        else:
            time = ""
        counters = {k: v for k, v in b.items() if k not in RESERVED}
        rows.append((name, time, counters, b.get("label", "")))
    return rows


def context_line(path, data):
    c = data.get("context", {})
    parts = [os.path.basename(path)]
    for key in ("date", "host_name", "num_cpus", "mhz_per_cpu", "library_build_type"):
        if key in c:
            parts.append(f"{key} {c[key]}")
    return "; ".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Markdown table of Google Benchmark JSON files.")
    parser.add_argument("files", nargs="+", help="files written with --benchmark_out=FILE --benchmark_out_format=json")
    parser.add_argument("--context", action="store_true",
                        help="print each file's machine context (date, host, CPUs, MHz) above the table")
    args = parser.parse_args(argv)

    loaded = [(path, load(path)) for path in args.files]
    several = len(loaded) > 1
    table = []  # (name, time, counters, label, file)
    counter_names = []
    for path, data in loaded:
        for name, time, counters, label in rows_of(data):
            for k in counters:
                if k not in counter_names:
                    counter_names.append(k)
            table.append((name, time, counters, label, os.path.basename(path)))

    if args.context:
        for path, data in loaded:
            print(f"- {context_line(path, data)}")
        print()

    header = ["name", "real time", *counter_names, "label"] + (["file"] if several else [])
    print("| " + " | ".join(cell(h) for h in header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (1 + len(counter_names)) + ["---"] * (2 if several else 1)) + "|")
    for name, time, counters, label, file in table:
        cells = [name, time] + [fmt_number(counters[k]) if k in counters else "" for k in counter_names] + [label]
        if several:
            cells.append(file)
        print("| " + " | ".join(cell(c) for c in cells) + " |")
    if not table:
        print("bench_table.py: no benchmark runs in the input", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
