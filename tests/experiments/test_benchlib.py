"""experiments/benchlib.py: the benchmark snapshot writer, and the committed benchmark snapshots it wrote."""

import doctest
import glob
import json
import os

import pytest

from experiments import benchlib, registry, report

BENCH_SNAPSHOTS = sorted(glob.glob(os.path.join(registry.ROOT, "docs", "results", "bench_*", "results.json")))


def test_doctest():
  assert doctest.testmod(benchlib, optionflags=doctest.ELLIPSIS).failed == 0


def test_write_records_machine_and_renders_through_report_include(tmp_path):
  run = benchlib.start("demo", command="python scripts/bench_demo.py --n 2")
  rows = [{"n": 1, "ms": 0.5, "ms_all": [0.5, 0.6]}, {"n": 2, "ms": 1.25, "ms_all": [1.2, 1.3]}]
  path = benchlib.write(str(tmp_path / "bench_demo"), run, {"t": benchlib.table(["n", "ms"], rows)},
                        notes={"sizes": "shrunk"})
  res = json.load(open(path))
  for key in ("bench", "device", "jax_version", "load_average", "cpu_count", "command", "date", "tables", "notes"):
    assert key in res, key
  assert len(res["load_average"]) == 2 and res["command"] == "python scripts/bench_demo.py --n 2"
  assert sorted(os.listdir(tmp_path / "bench_demo")) == ["results.json", "table.md"]  # no temporary left
  md = (tmp_path / "bench_demo" / "table.md").read_text()
  assert "| 2 | 1.25 |" in md and "**sizes**: shrunk" in md
  out = report.include_table("bench_demo where=n=2", str(tmp_path))
  assert "| 2 | 1.25 |" in out and "| 1 | 0.5 |" not in out


def test_bad_names_are_rejected():
  with pytest.raises(ValueError, match="no whitespace"):
    benchlib.table(["ms adaptive"], [])
  with pytest.raises(ValueError, match="no whitespace"):
    benchlib.write("/nonexistent", {"load_average": [0.0]}, {"a b": benchlib.table(["n"], [])})


@pytest.mark.parametrize("path", BENCH_SNAPSHOTS, ids=[os.path.basename(os.path.dirname(p)) for p in BENCH_SNAPSHOTS])
def test_committed_bench_snapshot_table_md_is_current(path):
  res = json.load(open(path))
  assert "bench" in res and res["tables"], f"{path}: not written by experiments.benchlib"
  with open(os.path.join(os.path.dirname(path), "table.md")) as f:
    assert f.read() == benchlib.render_markdown(res), f"{os.path.dirname(path)}/table.md is stale"
