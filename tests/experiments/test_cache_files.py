"""Issue 14, runs and files: weights checksums, file modes, stale outputs, user paths that do not exist.

Each test failed on the code before its fix (the old behaviour is in its docstring).
"""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from asoftmax import results
from asoftmax.models import cnn, train
from experiments import run

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _model(seed=0):
  return cnn.MnistCNN(channels=(2, 4), rngs=nnx.Rngs(seed))


def _saved(tmp_path):
  m = _model()
  path = str(tmp_path / "w.safetensors")
  train.save_params(m, path, {"steps": 1})
  return m, path


def test_flipped_weight_bytes_are_detected_and_retrained(tmp_path):
  """Before: a weights file with flipped bytes loaded silently (a table at 10 % accuracy, exit 0)."""
  _, path = _saved(tmp_path)
  with open(path, "rb") as f:
    data = bytearray(f.read())
  data[-5] ^= 0xFF  # inside the last tensor's bytes: the file still parses
  with open(path, "wb") as f:
    f.write(bytes(data))
  with pytest.raises(ValueError, match="w.safetensors.*checksum"):
    train.load_params(_model(1), path)
  calls = []
  with pytest.warns(UserWarning, match="w.safetensors"):
    _, cached = train.train_or_load(_model(1), path, lambda: calls.append(1) or {"steps": 2})
  assert not cached and calls == [1]
  train.load_params(_model(1), path)  # rewritten with a valid checksum


def test_truncated_weights_name_the_file_and_are_rebuilt(tmp_path):
  """Before: a truncated safetensors file raised SafetensorError from deep inside, without the path."""
  _, path = _saved(tmp_path)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 3])
  with pytest.raises(ValueError, match="w.safetensors.*unreadable"):
    train.load_params(_model(), path)
  with pytest.warns(UserWarning, match="w.safetensors"):
    _, cached = train.train_or_load(_model(), path, lambda: {"steps": 2})
  assert not cached


def test_atomic_writes_are_0644_under_umask_022(tmp_path):
  """Before: mkstemp's 0600 survived the rename (results.json, table.md, caches unreadable by others)."""
  old = os.umask(0o022)
  try:
    results.write_json(str(tmp_path / "r.json"), {"a": 1})
    results.write_text(str(tmp_path / "t.md"), "x")
    with results.atomic_path(str(tmp_path / "z.npz"), suffix=".npz") as tmp:
      np.savez(tmp, a=np.zeros(2))
  finally:
    os.umask(old)
  for name in ("r.json", "t.md", "z.npz"):
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name


def test_stale_outputs_listed_for_removal(tmp_path):
  """Before: only results.json and table.md were removed; a crashed run left the previous run's PNGs."""
  for name in ("results.json", "table.md", "config.json", "fig_old.png", "row_wiki_k1.json", "w.safetensors",
               "hidden.npz"):
    (tmp_path / name).write_text("x")
  stale = {os.path.basename(p) for p in run.stale_outputs(str(tmp_path))}
  assert stale == {"results.json", "table.md", "config.json", "fig_old.png"}  # caches are kept


def test_user_path_that_does_not_exist_exits_nonzero_naming_it(tmp_path):
  """Before: a misspelt matrix_path exited 0 with "not run" rows."""
  missing = str(tmp_path / "no_such_head.safetensors")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "experiments.run", "--config", "configs/adaptive/llm.py:variant=smoke,model=user",
                      "--workdir", str(tmp_path / "out"), f"--config.matrix_path={missing}",
                      f"--config.hidden_path={tmp_path / 'x.npy'}"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode != 0
  assert "no_such_head.safetensors" in p.stderr
  assert not (tmp_path / "out" / "results.json").exists()


# ------------------------------------------------------------------------------------------- table-row caches
def _fake_eval(calls):
  from asoftmax import adaptive

  def fake(*a, **k):
    calls.append(1)
    return adaptive.TuneResult(
        phase_samples_mean=[1.0, 2.0, 3.0, 4.0], n_eval=20, successes=19, gain_dense=2.0, gain_nnz=2.0,
        success=0.95, success_lo=0.8, success_hi=1.0, identified=0.95, max_rel_error=0.01, samples_mean=10.0,
        samples_median=10.0, samples_std=1.0, naive_dense=1, naive_nnz_mean=1.0, fudge_bandit=1.0, fudge_z=1.0,
        samples=[10] * 20, mode="paper")
  return fake


def test_row_cache_content_is_verified_not_only_keyed(tmp_path, monkeypatch):
  """Before: a hand-edited `row_*.json` (its key intact) was served as if computed (README says caches are
  verified). Now the row carries a checksum of its content; a mismatch is reported naming the file and the row is
  recomputed."""
  from safetensors.numpy import save_file

  from asoftmax import adaptive
  from experiments import registry

  monkeypatch.delenv("ASOFTMAX_DATA_DIR", raising=False)
  rng = np.random.default_rng(0)
  save_file({"lm_head.weight": rng.normal(size=(30, 8)).astype(np.float32)}, str(tmp_path / "head.safetensors"))
  np.save(tmp_path / "hidden.npy", rng.normal(size=(30, 8)).astype(np.float32))
  c = registry.load_config("configs/adaptive/llm.py", "model=user")
  c.matrix_path, c.hidden_path = str(tmp_path / "head.safetensors"), str(tmp_path / "hidden.npy")
  c.n_tune, c.deltas, c.ks, c.modes = 10, (0.1,), (1,), ("paper",)
  calls = []
  monkeypatch.setattr(adaptive, "tune_and_evaluate", _fake_eval(calls))
  out = str(tmp_path / "out")
  run.execute(c, out)
  assert calls == [1]
  (cache,) = [f for f in os.listdir(out) if f.startswith("row_")]
  run.execute(c, out)
  assert calls == [1], "an intact row cache is reused"
  path = os.path.join(out, cache)
  data = json.loads(open(path).read())
  data["row"]["success"] = 1.0  # hand-edited to meet its target; ident untouched
  with open(path, "w") as f:
    json.dump(data, f)
  with pytest.warns(UserWarning, match=cache):
    res = run.execute(c, out)
  assert calls == [1, 1], "the edited row was served"
  assert res["rows"][0]["success"] == 0.95
  assert json.loads(open(path).read())["row"]["success"] == 0.95  # rebuilt


def test_keyed_json_cache_helper(tmp_path):
  path = str(tmp_path / "row_x.json")
  results.write_keyed_json(path, {"k": 1}, {"gain": 2.5})
  assert results.read_keyed_json(path, {"k": 1}) == {"gain": 2.5}
  assert results.read_keyed_json(path, {"k": 2}) is None  # another key: not this row
  assert results.read_keyed_json(str(tmp_path / "none.json"), {"k": 1}) is None
  for text in ('{"ident": {"k": 1}, "row": {"gain": 9.0}, "sha256": "0"}', '{"ident": {"k": 1}, "row": {}}', "{tru"):
    with open(path, "w") as f:
      f.write(text)
    with pytest.warns(UserWarning, match="row_x.json"):
      assert results.read_keyed_json(path, {"k": 1}) is None


# ------------------------------------------------------------------------------------------- atomic writers
class _Interrupted(Exception):
  pass


def test_rf_lm_snapshot_is_written_atomically(tmp_path, monkeypatch):
  """Before: `snapshot.npz` was written in place by np.savez: an interrupted write left a truncated file that
  rf_bias would read as the trained model."""
  import jax.numpy as jnp
  import ml_collections

  from experiments.rff import lm

  class FakeModel:
    classes = np.ones((5, 4), np.float32)

    def __call__(self, w):
      return jnp.ones(w.shape + (4,))

  def interrupted_savez(file, **arrays):
    with open(file if str(file).endswith(".npz") else f"{file}.npz", "wb") as f:
      f.write(b"PK partial")
    raise _Interrupted()

  path = tmp_path / "snapshot.npz"
  path.write_bytes(b"the previous snapshot")
  cfg = ml_collections.ConfigDict({"snapshot_windows": 2, "dim": 4, "tau": 2.0})
  monkeypatch.setattr(np, "savez", interrupted_savez)
  with pytest.raises(_Interrupted):
    lm.snapshot(FakeModel(), np.zeros((3, 6), np.int32), cfg, np.ones(5), str(path), "x")
  assert path.read_bytes() == b"the previous snapshot"
  assert sorted(os.listdir(tmp_path)) == ["snapshot.npz"], "no temp file left behind"
  monkeypatch.undo()
  lm.snapshot(FakeModel(), np.zeros((3, 6), np.int32), cfg, np.ones(5), str(path), "x")
  assert np.load(path)["h"].shape == (10, 4)


def test_generated_smoke_images_appear_whole_or_not_at_all(tmp_path, monkeypatch):
  """Before: the generated EuroSAT smoke folder was written image by image in place; a run interrupted half way
  left a partial folder that the next run took as complete (find_image_folder saw class folders)."""
  from PIL import Image

  from asoftmax.data import eurosat as eurosat_data
  from experiments.adaptive import eurosat

  saved = []
  real_save = Image.Image.save

  def interrupted_save(self, fp, *a, **k):
    if len(saved) == 5:
      raise _Interrupted()
    saved.append(fp)
    return real_save(self, fp, *a, **k)

  root = str(tmp_path / "generated_eurosat")
  monkeypatch.setattr(Image.Image, "save", interrupted_save)
  with pytest.raises(_Interrupted):
    eurosat.write_generated_folder(root, 2, n_classes=3, size=8)
  assert not os.path.exists(root) and os.listdir(tmp_path) == []
  monkeypatch.undo()
  eurosat.write_generated_folder(root, 2, n_classes=3, size=8)
  assert eurosat_data.find_image_folder(root) is not None
  assert sorted(os.listdir(root)) == ["Class0", "Class1", "Class2"]
