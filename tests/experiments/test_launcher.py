"""The launcher: CLI overrides, outputs, determinism, registry errors, atomic writes."""

import json
import os
import subprocess
import sys
import time

import pytest

from asoftmax import configlib, results
from experiments import registry, run, tables

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _cli(*args, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("ASOFTMAX_DATA_DIR", None)
  return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_writes_outputs_with_overrides(tmp_path):
  p = _cli("--config", "configs/adaptive/synthetic.py:smoke", "--workdir", str(tmp_path),
           "--config.trials=3", "--config.datasets=('toy',)", "--config.num_d=1")
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


def _mechanics_config():
  """The synthetic smoke config cut to one dataset and one d without timing: the launcher tests check files and
  determinism, not the table (test_smoke_configs runs the full smoke); fewer programs to compile."""
  cfg = registry.load_config("configs/adaptive/synthetic.py:smoke")
  cfg.datasets, cfg.num_d, cfg.repeats, cfg.trials = ("toy",), 1, 0, 2
  return cfg


def test_same_seed_same_numbers(tmp_path):
  cfg = _mechanics_config()
  a = run.execute(cfg, str(tmp_path / "a"))
  b = run.execute(cfg, str(tmp_path / "b"))
  # Wall-clock columns (ms_adaptive, ms_exact, speedup) are measurements of this machine, not results of the seed.
  timing = {"ms_adaptive", "ms_exact", "speedup"}
  strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
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
  assert "args: model=smollm2 (smollm2|user) data=both (both|wikitext|ptb)" in text


@pytest.mark.parametrize("path", registry.config_paths())
def test_every_config_declares_its_args_as_data(path):
  """`--list` reads ARGS; get_config rejects a variant outside it, naming the known ones."""
  spec = registry.load_config_module(path).ARGS
  assert "variant" in spec and "smoke" in spec["variant"].choices
  with pytest.raises(ValueError, match=r"unknown variant 'nosuch'.*smoke"):
    registry.load_config(path, "nosuch")


def test_parse_arg_converts_to_the_declared_type():
  spec = {"variant": configlib.choice("full", "smoke"), "window": configlib.typed(8192),
          "eps": configlib.typed(0.1), "dense": configlib.typed(False)}
  a = configlib.parse_arg("smoke,window=512,eps=0.01,dense=true", spec)
  assert a == {"variant": "smoke", "window": 512, "eps": 0.01, "dense": True}
  assert configlib.parse_arg(None, spec)["window"] == 8192
  with pytest.raises(ValueError, match="window='big'.*not a int"):
    configlib.parse_arg("window=big", spec)
  with pytest.raises(ValueError, match="unknown config arg 'size'.*known"):
    configlib.parse_arg("size=3", spec)


def test_show_config_prints_fields_with_comments():
  cfg = registry.load_config("configs/adaptive/synthetic.py:smoke")
  text = run.show_config_text(cfg, "configs/adaptive/synthetic.py")
  assert "num_d" in text and "log-spaced points between d_min and d_max" in text
  assert "trials" in text and "= 5" in text.split("trials", 1)[1].splitlines()[0]


def test_cli_list_needs_no_config():
  p = _cli("--list")
  assert p.returncode == 0, p.stderr[-2000:]
  assert "configs/topk/bert.py" in p.stdout


# ------------------------------------------------------------------------------------------- user paths (issue 18)
def _path_fields(config) -> list[str]:
  """Dotted names of the config's path fields (`*_dir`, `*_path`, `snapshot`)."""
  out = []

  def walk(prefix, d):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(prefix + k + ".", v)
      elif isinstance(v, str) and (k.endswith(("_dir", "_path")) or k == "snapshot"):
        out.append(prefix + k)

  walk("", config.to_dict())
  return out


_PATH_CASES = [(p, f) for p in registry.config_paths() for f in _path_fields(registry.load_config(p, "smoke"))]


def _set(config, dotted, value):
  *parents, last = dotted.split(".")
  for p in parents:
    config = config[p]
  config[last] = value


@pytest.mark.parametrize("path,field", _PATH_CASES, ids=[f"{p[len('configs/'):]}:{f}" for p, f in _PATH_CASES])
def test_a_missing_user_path_is_an_error_in_every_config(path, field, tmp_path, monkeypatch):
  """Before: `--config.data_dir=<missing>` exited 0 with "not run" rows (topk_decoder, topk_bert, adaptive_eurosat,
  adaptive_mnist), as did rf_bias `--config.snapshot=<missing>`; a missing tfds_dir ended in a raw AssertionError.
  The path is checked before anything runs: the call fails at once naming it, and nothing is written."""
  monkeypatch.delenv("ASOFTMAX_DATA_DIR", raising=False)
  config = registry.load_config(path, "smoke")
  missing = str(tmp_path / f"no_such_{field.replace('.', '_')}")
  _set(config, field, missing)
  t0 = time.perf_counter()
  with pytest.raises(FileNotFoundError, match=f"{field}.*no_such_"):
    run.execute(config, str(tmp_path / "out"), config_name=path + ":smoke")
  assert time.perf_counter() - t0 < 10, "the path must be checked before the experiment runs"
  assert not os.path.exists(tmp_path / "out" / "results.json") and not os.path.exists(tmp_path / "out" / "config.json")


def test_default_paths_may_still_fall_back(monkeypatch):
  """The defaults the user did not give (ASOFTMAX_DATA_DIR unset) keep today's fallback ("not run" rows, built-in
  data): e.g. rf_bias's default snapshot path, which exists only after an rf_lm run."""
  monkeypatch.delenv("ASOFTMAX_DATA_DIR", raising=False)
  for p in registry.config_paths():
    run.check_user_paths(registry.load_config(p), p)
  monkeypatch.setenv("ASOFTMAX_DATA_DIR", "/no/such/asoftmax_data")  # a path the user gave through the environment
  with pytest.raises(FileNotFoundError, match="/no/such/asoftmax_data"):
    run.check_user_paths(registry.load_config("configs/topk/decoder.py"), "configs/topk/decoder.py")


def test_cli_missing_data_dir_exits_nonzero_naming_it(tmp_path):
  missing = str(tmp_path / "no_such_data")
  p = _cli("--config", "configs/topk/decoder.py:smoke", "--workdir", str(tmp_path / "out"),
           f"--config.data_dir={missing}")
  assert p.returncode != 0 and "no_such_data" in p.stderr, p.stderr[-2000:]
  assert not (tmp_path / "out" / "results.json").exists()


# ------------------------------------------------------------------------------------------- one run per workdir
def test_a_second_run_in_a_busy_workdir_exits_naming_it(tmp_path):
  """Before: two runs in one workdir interleaved: one printed "wrote ... results.json" while none existed, another
  left its config.json beside the other run's results. Now a run holds an advisory lock on DIR/.lock."""
  import fcntl

  wd = tmp_path / "wd"
  wd.mkdir()
  (wd / "results.json").write_text('{"rows": []}')  # the other run's output: must be left alone
  cfg = _mechanics_config()
  with open(wd / ".lock", "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds the workdir
    with pytest.raises(run.WorkdirBusy, match=str(wd)):
      run.execute(cfg, str(wd))
    p = _cli("--config", "configs/adaptive/synthetic.py:smoke", "--workdir", str(wd))
  assert p.returncode != 0 and str(wd) in p.stderr, p.stderr[-2000:]
  assert (wd / "results.json").read_text() == '{"rows": []}' and not (wd / "config.json").exists()


def test_results_json_embeds_the_resolved_config(tmp_path):
  cfg = _mechanics_config()
  run.execute(cfg, str(tmp_path))
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["config"] == json.loads((tmp_path / "config.json").read_text())
  assert saved["config"]["trials"] == 2 and saved["config"]["experiment"] == "adaptive_synthetic"


def test_bool_config_fields_reject_truthy_non_bools():
  """Boolean options of the experiments are config fields: ml_collections keeps their type, so "yes" or 1 for a
  bool field is an error (from the command line too: absl rejects `--config.retrain=yes`)."""
  fields = 0
  for path in registry.config_paths():
    cfg = registry.load_config(path, "smoke")
    for k, v in cfg.items():
      if isinstance(v, bool):
        fields += 1
        for bad in ("yes", 1):
          with pytest.raises(TypeError):
            setattr(cfg, k, bad)
  assert fields >= 5


def test_show_config_comment_belongs_to_its_own_field():
  """A comment block above one field does not leak onto the fields after it (the line-regex reader attached the
  llm config's warm-up comment to every later field up to a blank line)."""
  cfg = registry.load_config("configs/adaptive/llm.py")
  lines = {ln.split("=", 1)[0].strip(): ln for ln in run.show_config_text(cfg, "configs/adaptive/llm.py").splitlines()}
  assert "Warm-up pulls per arm" in lines["warmup"]
  assert "Warm-up" not in lines["tune"] and "Warm-up" not in lines["cached_rows_only"]


def test_derived_field_follows_its_reference():
  """configs/adaptive/llm.py: n_tune is n_windows // 5 (a FieldReference) unless set itself."""
  cfg = registry.load_config("configs/adaptive/llm.py")
  assert cfg.n_tune == 200
  cfg.n_windows = 300
  assert cfg.n_tune == 60
  cfg.n_tune = 100
  assert (cfg.n_tune, cfg.n_windows) == (100, 300)
  assert registry.load_config("configs/adaptive/llm.py", "smoke").n_tune == 6
