"""A/B speed of two trees of this repository on one machine: a benchmark run in a baseline tree and in this one,
alternately, several rounds, each run a fresh process; then per row and metric the median, the spread and the
ratio of the two.

Why: the host of a GPU machine sets the speed of eager training, and it varies — the same code trained
Spatial-Mamba-T at 879 to 1174 img/s on H100 machines of one kind, with 85 to 153 ms of host time per step.
A figure is only worth its baseline measured beside it, on the same machine, in alternating processes (the
order flips every round, so neither tree always runs first).

    python benchmarks/ab.py --base 06e47c2 -- benchmarks/throughput.py --models t --modes eager --no-baselines
    python benchmarks/ab.py --base ../old-checkout --rounds 5 -- benchmarks/throughput.py --models t --no-infer

--base: a commit (exported with `git archive` into a temporary directory) or a directory holding another
checkout; --new: the other tree (default: this one). The command after `--` is run as `python COMMAND` in each
tree, with `--json FILE` appended; it must write {"rows": [...]} or a list of rows there (as
`benchmarks/throughput.py` and `benchmarks/ddp_scaling.py` do). Rows are matched between the trees by their
text and boolean fields; the metrics compared are the numeric fields named by --metrics. Each result is printed
as it comes (a run cut short leaves the finished ones on the screen), then a table; --json keeps everything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_METRICS = "train_ips,infer_ips,train_host_ms,infer_host_ms"


class ABError(Exception):
    """A wrong argument (base, command): reported in one line, without a traceback."""


def export_tree(base: str, into: str) -> str:
    """A directory holding `base`: the directory itself, or the commit exported there with `git archive`."""
    if os.path.isdir(base):
        return os.path.abspath(base)
    archive = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", base], capture_output=True)
    if archive.returncode != 0:
        raise ABError(f"--base {base!r} is neither a directory nor a commit of {ROOT}: "
                      f"{archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    return into


def row_id(row: dict) -> str:
    """A row's identity: its text and boolean fields (model, backend, mode, ...), in the row's order."""
    return ", ".join(f"{k}={v}" for k, v in row.items() if isinstance(v, (str, bool)))


def read_rows(path: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    rows = data.get("rows", []) if isinstance(data, dict) else data
    return [r for r in rows if isinstance(r, dict)]


def run_once(tree: str, command: list[str], timeout: float, env: dict) -> tuple[list[dict], str]:
    """(rows, error): one run of `command` in `tree`; error is "" or why no rows came back."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        try:
            done = subprocess.run([sys.executable, *command, "--json", out], cwd=tree, env=env, timeout=timeout,
                                  capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return [], f"timed out after {timeout:.0f} s"
        if done.returncode != 0 or not os.path.exists(out):
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return [], f"exit {done.returncode}: " + " | ".join(tail)
        return read_rows(out), ""


def summarize(results: dict[str, list[list[dict]]], metrics: list[str]) -> list[dict]:
    """Per row identity and metric: medians, minima and maxima of both trees and the ratio of the medians."""
    values: dict[tuple[str, str], dict[str, list[float]]] = {}
    for tree, runs in results.items():
        for rows in runs:
            for row in rows:
                for metric in metrics:
                    v = row.get(metric)
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
                        values.setdefault((row_id(row), metric), {}).setdefault(tree, []).append(float(v))
    table = []
    for (rid, metric), by_tree in values.items():
        entry = dict(row=rid, metric=metric)
        for tree in ("base", "new"):
            vs = by_tree.get(tree, [])
            entry[tree] = dict(n=len(vs), median=statistics.median(vs) if vs else None,
                               min=min(vs) if vs else None, max=max(vs) if vs else None, values=vs)
        b, n = entry["base"]["median"], entry["new"]["median"]
        entry["ratio"] = n / b if b and n is not None else None
        table.append(entry)
    return table


def markdown(table: list[dict]) -> str:
    def cell(s: dict) -> str:
        if s["median"] is None:
            return "-"
        return f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f}, n={s['n']})"

    lines = ["| row | metric | base: median (min–max) | new: median (min–max) | new ÷ base |",
             "|---|---|---|---|---:|"]
    for e in table:
        ratio = f"{e['ratio']:.3f}" if e["ratio"] is not None else "-"
        lines.append(f"| {e['row']} | {e['metric']} | {cell(e['base'])} | {cell(e['new'])} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="a commit of this repository or a directory (another tree)")
    parser.add_argument("--new", default=ROOT, help="the tree compared with the base (default: this one)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tree, alternating")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a run may take")
    parser.add_argument("--metrics", default=DEFAULT_METRICS, help="numeric row fields to compare")
    parser.add_argument("--json", default=None, help="write every run's rows and the summary to this file")
    parser.usage = "ab.py --base COMMIT|DIR [options] -- BENCHMARK [ARGS ...]"
    args = parser.parse_args(argv[:cut])
    command = argv[cut + 1:]
    if not command:
        parser.error("no benchmark command after --")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if not os.path.isdir(args.new):
        parser.error(f"--new {args.new!r} is not a directory")
    metrics = [m for m in args.metrics.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            trees = {"base": export_tree(args.base, tmp), "new": os.path.abspath(args.new)}
        except ABError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not os.path.exists(os.path.join(trees["new"], command[0])):
            parser.error(f"{command[0]!r} is not a file of the tree {trees['new']}")
        results: dict[str, list[list[dict]]] = {"base": [], "new": []}
        failures = []
        for i in range(args.rounds):
            for tree in ("base", "new") if i % 2 == 0 else ("new", "base"):
                # each tree imports its own `src` (the benchmarks put their tree first on sys.path; so does this)
                env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                    filter(None, [trees[tree], os.environ.get("PYTHONPATH")])))
                start = time.perf_counter()
                rows, error = run_once(trees[tree], command, args.timeout, env)
                took = time.perf_counter() - start
                if error:
                    failures.append(dict(round=i + 1, tree=tree, error=error))
                    print(f"round {i + 1} {tree}: failed ({error})", flush=True)
                    continue
                results[tree].append(rows)
                for row in rows:
                    shown = ", ".join(f"{m} {row[m]:.1f}" for m in metrics if isinstance(row.get(m), (int, float)))
                    print(f"round {i + 1} {tree} ({took:.0f} s): {row_id(row)}: {shown}", flush=True)
    table = summarize(results, metrics)
    print()
    print(markdown(table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(base=args.base, new=args.new, command=command, rounds=args.rounds, runs=results,
                           failures=failures, summary=table), f, indent=1)
    return 1 if failures and not any(results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
