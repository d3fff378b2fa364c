"""Typed tables, committed snapshots and README's generated results rows."""

import glob
import json
import os
from typing import NamedTuple

import pytest

from experiments import registry, report, tables

# Experiment snapshots (docs/results/<name>/results.json); benchmark outputs (docs/results/bench_*/) are raw
# script outputs with their own schema, not launcher runs.
SNAPSHOTS = sorted(p for p in glob.glob(os.path.join(registry.ROOT, "docs", "results", "*", "results.json"))
                   if not os.path.basename(os.path.dirname(p)).startswith("bench_"))


class _Row(NamedTuple):
  n: int | None = None
  gain: float | None = None


_T = tables.Table("t", _Row, hidden=("samples",))


def test_row_rejects_undeclared_key_and_fills_columns():
  assert _T.row(n=3, samples=[1, 2]) == {"table": "t", "n": 3, "gain": None, "samples": [1, 2]}
  with pytest.raises(ValueError, match="undeclared keys \\['gian'\\]"):
    _T.row(n=3, gian=2.0)


def test_validate_rejects_unknown_table_and_undeclared_key():
  tables.validate([_T.row(n=1)], [_T])
  with pytest.raises(ValueError, match="declared tables"):
    tables.validate([{"table": "other", "n": 1}], [_T])
  with pytest.raises(ValueError, match="undeclared keys \\['speedup'\\]"):
    tables.validate([{"table": "t", "n": 1, "speedup": 2.0}], [_T])


def test_empty_columns_finds_a_declared_column_never_written():
  assert tables.empty_columns([_T.row(n=1), _T.row(n=2)], _T) == ["gain"]
  assert tables.empty_columns([_T.row(n=1, gain=2.0)], _T) == []


def test_every_experiment_declares_short_typed_tables():
  for name in registry.names():
    exp = registry.get(name)
    if not exp.tables:
      continue  # legacy single-table experiments (columns=...) are rendered as before
    for t in exp.tables:
      assert len(t.columns) <= 12, f"{name}/{t.name}: {len(t.columns)} columns"
      assert not set(t.columns) & set(t.hidden), f"{name}/{t.name}: a column is also hidden"


def test_there_are_committed_snapshots():
  assert len(SNAPSHOTS) >= 10


@pytest.mark.parametrize("path", SNAPSHOTS, ids=[os.path.basename(os.path.dirname(p)) for p in SNAPSHOTS])
def test_committed_snapshot_renders_from_results_json(path):
  """Each committed table.md is exactly what `python -m experiments.report` redraws from results.json."""
  with open(path) as f:
    res = json.load(f)
  exp = registry.get(res["experiment"])
  if exp.tables:
    tables.validate(res["rows"], exp.tables)
  with open(os.path.join(os.path.dirname(path), "table.md")) as f:
    assert f.read() == report.render_table(res, exp), (
        f"{os.path.dirname(path)}/table.md is stale: run python -m experiments.report --workdir {os.path.dirname(path)}")


def test_readme_rows_match_committed_results():
  with open(report.README) as f:
    text = f.read()
  assert report.render_readme(text, report.readme_rows()) == text, (
      "README.md's results rows differ from docs/results/*/results.json: run python -m experiments.report --readme")


def test_readme_links_exist():
  rows = report.readme_rows()
  for snap, config in report.README_SNAPSHOTS:
    assert os.path.exists(os.path.join(registry.ROOT, config)), config
    assert f"({snap}/table.md)" in rows or "no results.json committed" in rows


def test_config_in_results_json_is_optional():
  """results.json now embeds the resolved config ("config"); committed snapshots written before lack it. Both
  render the same table.md."""
  with open(SNAPSHOTS[0]) as f:
    res = json.load(f)
  exp = registry.get(res["experiment"])
  bare = {k: v for k, v in res.items() if k != "config"}
  assert report.render_table({**bare, "config": {"seed": 0, "experiment": exp.name}}, exp) == report.render_table(
      bare, exp)


def test_generated_tables_match_committed_results():
  """Every `<!-- table: ... -->` block in README.md and docs/*.md is what `experiments.report --readme` draws."""
  stale = [p for p, (text, new) in report.regenerate().items() if new != text]
  assert not stale, f"stale generated tables in {stale}: run python -m experiments.report --readme"


def test_include_renders_bench_and_experiment_snapshots(tmp_path):
  bench = {"bench": "demo", "device": "cpu", "tables": {"t": {"columns": ["n", "ms"], "rows": [
      {"n": 1, "ms": 0.5}, {"n": 2, "ms": 1.25}]}}}
  os.makedirs(tmp_path / "b")
  with open(tmp_path / "b" / "results.json", "w") as f:
    json.dump(bench, f)
  text = "x\n<!-- table: b where=n=2 -->\nold\n<!-- table:end -->\ny\n"
  out = report.render_includes(text, str(tmp_path))
  assert "| 2 | 1.25 |" in out and "| 1 | 0.5 |" not in out and "old" not in out
  assert out.startswith("x\n<!-- table: b where=n=2 -->\n") and out.endswith("<!-- table:end -->\ny\n")
  assert report.render_includes(out, str(tmp_path)) == out  # idempotent
  with pytest.raises(ValueError, match="unknown option 'sort=n'"):
    report.render_includes("<!-- table: b sort=n -->\n<!-- table:end -->", str(tmp_path))
  with pytest.raises(ValueError, match="no rows left"):
    report.render_includes("<!-- table: b where=n=3 -->\n<!-- table:end -->", str(tmp_path))
  with pytest.raises(ValueError, match="has no results.json"):
    report.render_includes("<!-- table: nowhere -->\n<!-- table:end -->", str(tmp_path))
  snap = os.path.relpath(os.path.dirname(SNAPSHOTS[0]), registry.ROOT)
  out = report.render_includes(f"<!-- table: {snap} -->\n<!-- table:end -->")
  assert out.count("\n|") >= 3 and f"({snap}/table.md)" in out
  # In docs/x.md the link to the snapshot is relative to docs/.
  out = report.render_includes("<!-- table: b -->\n<!-- table:end -->", str(tmp_path), "docs/x.md")
  assert "(../b/results.json)" in out
