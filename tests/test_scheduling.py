"""The test suite's own scheduling: GPU tests marked `minutes(n)` head the shares that pytest-xdist's worksteal
scheduler first sends each worker, so that the long compiles start together instead of queueing behind each
other (see `pytest_collection_modifyitems` in conftest.py)."""

import types

import pytest

from tests.conftest import pytest_collection_modifyitems


class Item:
    def __init__(self, name, minutes=None):
        self.name, self.minutes = name, minutes

    def get_closest_marker(self, name):
        assert name == "minutes"
        return pytest.mark.minutes(self.minutes).mark if self.minutes is not None else None


def order(n, long, workers):
    items = [Item(i, long.get(i)) for i in range(n)]
    config = types.SimpleNamespace(workerinput={"workercount": workers}) if workers else types.SimpleNamespace()
    pytest_collection_modifyitems(config, items)
    return items


def shares(n, workers):
    """The worksteal scheduler's first split: each idle worker in turn gets len(pending) // workers_left."""
    heads, left = [], n
    for i in range(workers):
        heads.append(n - left)
        left -= left // (workers - i)
    return heads


def test_long_tests_head_the_workers_shares_longest_first():
    long = {3: 2.5, 10: 1.25, 11: 0.5, 20: 1.0, 40: 0.75}
    items = order(53, long, workers=8)
    assert sorted(item.name for item in items) == list(range(53))  # every test once
    heads = shares(53, 8)
    assert [items[h].name for h in heads[:5]] == [3, 10, 20, 40, 11]
    assert all(items[h + 1].minutes is None for h in heads)  # a short test queued behind each long one
    rest = [item.name for item in items if item.minutes is None]
    assert rest == sorted(rest)  # the others keep their collected order


def test_more_long_tests_than_workers_put_the_rest_last():
    long = {i: 1.0 + i for i in range(0, 12, 3)}  # 4 long tests, 2 workers
    items = order(12, long, workers=2)
    assert sorted(item.name for item in items) == list(range(12))
    assert [items[0].name, items[6].name] == [9, 6]
    assert [item.name for item in items[-2:]] == [3, 0]  # where idle workers take queued tests first


@pytest.mark.parametrize("workers", [None, 1])
def test_one_process_keeps_the_collected_order(workers):
    items = order(10, {5: 1.0, 7: 2.0}, workers)
    assert [item.name for item in items] == list(range(10))


def test_fewer_tests_than_workers():
    items = order(3, {2: 1.0}, workers=8)
    assert [item.name for item in items] == [2, 0, 1]


def test_the_marker_is_registered():
    from pathlib import Path
    import tomllib

    config = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert any(marker.startswith("minutes(n):") for marker in config["markers"])


@pytest.mark.parametrize("numprocesses,dist,expected", [(8, "no", "worksteal"), ("auto", "no", "worksteal"),
                                                        (8, "load", "load"), (0, "no", "no"), (None, "no", "no")])
def test_workers_steal_unless_told_otherwise(numprocesses, dist, expected):
    from tests.conftest import pytest_cmdline_main

    config = types.SimpleNamespace(option=types.SimpleNamespace(numprocesses=numprocesses, dist=dist))
    pytest_cmdline_main(config)
    assert config.option.dist == expected


def test_without_xdist_nothing_is_set():
    from tests.conftest import pytest_cmdline_main

    config = types.SimpleNamespace(option=types.SimpleNamespace())
    pytest_cmdline_main(config)
    assert not hasattr(config.option, "dist")


@pytest.mark.slow
def test_pytest_xdist_schedules_by_work_stealing():
    """End to end: `pytest -n 2` (one cheap test of this file) reports pytest-xdist's worksteal scheduler."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("xdist")
    root = Path(__file__).parents[1]
    out = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-v", "-p", "no:cacheprovider",
                          f"{Path(__file__).name}::test_fewer_tests_than_workers"],
                         cwd=root / "tests", capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "WorkStealingScheduling" in out.stdout, out.stdout[-2000:]
