"""Every `configs/*.py` has a `smoke` variant that runs end to end on a fresh clone (no data dir)."""

import glob
import importlib.util
import json
import os

import pytest

from experiments import registry, run

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py")))


def load_config(path, arg):
  spec = importlib.util.spec_from_file_location("cfg_" + os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_there_are_configs():
  assert any(p.endswith("adaptive_synthetic.py") for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_smoke_config_runs(path, tmp_path, monkeypatch):
  monkeypatch.delenv("ASOFTMAX_DATA_DIR", raising=False)
  config = load_config(path, "smoke")
  assert config.experiment in registry.names(), f"{path}: experiment {config.experiment!r} not registered"
  assert config.data_dir == "", "smoke must not depend on ASOFTMAX_DATA_DIR"
  res = run.execute(config, str(tmp_path), config_name=os.path.basename(path) + ":smoke")
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert saved["experiment"] == config.experiment
  assert len(saved["rows"]) == len(res["rows"]) > 0
  assert (tmp_path / "config.json").exists()
  table = (tmp_path / "table.md").read_text()
  assert table.count("\n|") >= 2  # header + at least one row
  exp = registry.get(config.experiment)
  if exp.plot is not None:
    assert glob.glob(str(tmp_path / "*.png")), "experiment has a plot function but wrote no PNG"
