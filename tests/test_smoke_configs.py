"""Every `configs/<paper>/*.py` has a `smoke` variant that runs end to end on a fresh clone (no data dir)."""

import glob
import json
import os

import pytest

from experiments import registry, run, tables

CONFIGS = registry.config_paths()


def test_there_are_configs():
  assert "configs/adaptive/synthetic.py" in CONFIGS and len(CONFIGS) >= 8


@pytest.mark.parametrize("path", CONFIGS, ids=[p[len("configs/"):] for p in CONFIGS])
def test_smoke_config_runs(path, tmp_path, monkeypatch):
  monkeypatch.delenv("ASOFTMAX_DATA_DIR", raising=False)
  config = registry.load_config(path, "smoke")
  assert config.experiment in registry.names(), f"{path}: experiment {config.experiment!r} not registered"
  assert config.data_dir == "", "smoke must not depend on ASOFTMAX_DATA_DIR"
  res = run.execute(config, str(tmp_path), config_name=path + ":smoke")
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert saved["experiment"] == config.experiment
  assert len(saved["rows"]) == len(res["rows"]) > 0
  assert (tmp_path / "config.json").exists()
  table = (tmp_path / "table.md").read_text()
  assert table.count("\n|") >= 2  # header + at least one row
  exp = registry.get(config.experiment)
  for t in exp.tables:  # a declared column that no row ever fills (paper_*, reference_* and status may be empty)
    mine = [r for r in saved["rows"] if r["table"] == t.name]
    unfilled = [c for c in tables.empty_columns(mine, t)
                if not c.startswith(("paper", "reference")) and c != "status"]
    assert not mine or not unfilled or all(r.get("status") for r in mine), f"{t.name}: never filled: {unfilled}"
  if exp.plot is not None:
    assert glob.glob(str(tmp_path / "*.png")), "experiment has a plot function but wrote no PNG"
