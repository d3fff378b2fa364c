"""The launcher: CLI overrides, outputs, determinism, registry errors, atomic writes."""

import json
import os
import subprocess
import sys

import pytest

from asoftmax import results
from experiments import registry, run, tables

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _cli(*args, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("ASOFTMAX_DATA_DIR", None)
  return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_writes_outputs_with_overrides(tmp_path):
  p = _cli("--config", "configs/adaptive/synthetic.py:smoke", "--workdir", str(tmp_path),
           "--config.trials=3", "--config.datasets=('toy',)")
  assert p.returncode == 0, p.stderr[-2000:]
  cfg = json.loads((tmp_path / "config.json").read_text())
  assert cfg["trials"] == 3 and cfg["datasets"] == ["toy"]
  res = json.loads((tmp_path / "results.json").read_text())
  assert {r["dataset"] for r in res["rows"]} == {"toy"}
  assert all(r["trials"] == 3 for r in res["rows"])
  assert (tmp_path / "table.md").exists() and (tmp_path / "samples_vs_d.png").exists()


def test_cli_rejects_unknown_field(tmp_path):
  p = _cli("--config", "configs/adaptive/synthetic.py:smoke", "--workdir", str(tmp_path), "--config.trails=3")
  assert p.returncode != 0
  assert "trails" in p.stderr
  assert not (tmp_path / "results.json").exists()


def test_same_seed_same_numbers(tmp_path):
  cfg = registry.load_config("configs/adaptive/synthetic.py:smoke")
  a = run.execute(cfg, str(tmp_path / "a"))
  b = run.execute(cfg, str(tmp_path / "b"))
  strip = lambda rows: [{k: v for k, v in r.items()} for r in rows]  # noqa: E731
  assert strip(a["rows"]) == strip(b["rows"])


def test_default_workdir():
  assert run.default_workdir("configs/adaptive/llm.py:model=smollm2,data=ptb") == os.path.join(
      "results", "adaptive_llm-model=smollm2_data=ptb")
  assert run.default_workdir("configs/adaptive/synthetic.py") == os.path.join("results", "adaptive_synthetic")


def test_registry_unknown_name_lists_known():
  with pytest.raises(ValueError, match="adaptive_synthetic"):
    registry.get("adaptive_synthetc")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
  path = tmp_path / "results.json"
  results.write_json(str(path), {"rows": [1]})

  class Boom:
    def tolist(self):
      raise RuntimeError("crash while serializing")

  with pytest.raises(RuntimeError):
    results.write_json(str(path), {"rows": [Boom()]})
  assert json.loads(path.read_text()) == {"rows": [1]}
  assert [p.name for p in tmp_path.iterdir()] == ["results.json"], "no temp files left behind"


def test_markdown_table_renders_missing_as_dash():
  t = tables.markdown_table([{"a": 1, "b": 0.5}, {"a": 2}], ["a", "b"])
  assert t.splitlines()[0] == "| a | b |"
  assert t.splitlines()[3] == "| 2 | – |"


def test_list_prints_configs_variants_and_modules():
  text = run.list_text()
  for path in registry.config_paths():
    assert path in text
  line = next(l for l in text.splitlines() if l.startswith("configs/adaptive/synthetic.py"))
  assert all(v in line for v in (":full", ":toy", ":gaussian", ":smoke"))
  assert "-> topk_bert (experiments.topk.bert)" in text
  assert "args: model=smollm2 data=both" in text


def test_show_config_prints_fields_with_comments():
  cfg = registry.load_config("configs/adaptive/synthetic.py:smoke")
  text = run.show_config_text(cfg, "configs/adaptive/synthetic.py")
  assert "num_d" in text and "log-spaced points between d_min and d_max" in text
  assert "trials" in text and "= 5" in text.split("trials", 1)[1].splitlines()[0]


def test_cli_list_needs_no_config():
  p = _cli("--list")
  assert p.returncode == 0, p.stderr[-2000:]
  assert "configs/topk/bert.py" in p.stdout
