"""benchmarks/ab.py: a benchmark run alternately in two trees, rows matched, medians and ratios; failures reported."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks import ab

BENCH = """
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
speed = float(open(os.path.join(here, "speed")).read())
if speed < 0:
    sys.exit("this tree's benchmark fails")
with open(os.path.join(here, "order"), "a") as f:
    f.write(os.path.basename(here) + "\\n")
rows = [{"model": "t", "mode": "eager", "fused_norms": True, "train_ips": speed, "train_host_ms": 1000 / speed},
        {"model": "t", "mode": "graphed", "fused_norms": True, "train_ips": 2 * speed}]
json.dump({"rows": rows}, open(sys.argv[sys.argv.index("--json") + 1], "w"))
"""


def _tree(path, speed: float) -> str:
    path.mkdir()
    (path / "bench.py").write_text(BENCH)
    (path / "speed").write_text(str(speed))
    return str(path)


def test_two_trees_alternate_and_compare(tmp_path, capsys):
    base, new = _tree(tmp_path / "base", 100.0), _tree(tmp_path / "new", 110.0)
    out = tmp_path / "ab.json"
    assert ab.main(["--base", base, "--new", new, "--rounds", "3", "--json", str(out), "--", "bench.py"]) == 0
    # the order flips every round: neither tree always runs first
    order = [(tmp_path / name / "order").read_text().split() for name in ("base", "new")]
    assert len(order[0]) == len(order[1]) == 3
    printed = [line.split()[2] for line in capsys.readouterr().out.splitlines() if line.startswith("round")]
    assert printed[::2] == ["base", "new", "new", "base", "base", "new"]  # two rows per run, printed as it ends
    summary = {(e["row"], e["metric"]): e for e in json.loads(out.read_text())["summary"]}
    eager = summary[("model=t, mode=eager, fused_norms=True", "train_ips")]
    assert eager["base"]["median"] == 100.0 and eager["new"]["median"] == 110.0 and eager["new"]["n"] == 3
    assert eager["ratio"] == pytest.approx(1.1)
    assert summary[("model=t, mode=graphed, fused_norms=True", "train_ips")]["ratio"] == pytest.approx(1.1)
    assert summary[("model=t, mode=eager, fused_norms=True", "train_host_ms")]["ratio"] == pytest.approx(1 / 1.1)


def test_a_failing_tree_is_reported_and_the_other_still_measured(tmp_path, capsys):
    base, new = _tree(tmp_path / "base", -1.0), _tree(tmp_path / "new", 110.0)
    assert ab.main(["--base", base, "--new", new, "--rounds", "2", "--", "bench.py"]) == 0
    out = capsys.readouterr().out
    assert out.count("base: failed (exit 1: this tree's benchmark fails)") == 2
    assert "| model=t, mode=eager, fused_norms=True | train_ips | - | 110.0 (110.0–110.0, n=2) | - |" in out


def test_a_commit_is_exported_and_a_bad_base_is_one_clear_error(tmp_path, capsys):
    tree = ab.export_tree("HEAD", str(tmp_path))
    assert os.path.exists(os.path.join(tree, "README.md"))
    assert ab.main(["--base", "no-such-commit", "--", "benchmarks/throughput.py"]) == 2
    assert "neither a directory nor a commit" in capsys.readouterr().err


def test_usage_errors(tmp_path, capsys):
    for argv, message in ((["--base", "HEAD"], "no benchmark command after --"),
                          (["--base", str(tmp_path), "--", "no_such_benchmark.py"], "is not a file of the tree"),
                          (["--base", "HEAD", "--rounds", "0", "--", "bench.py"], "--rounds must be >= 1")):
        with pytest.raises(SystemExit):
            ab.main(argv)
        assert message in capsys.readouterr().err
