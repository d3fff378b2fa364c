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

ROOT = os.path.join(os.path.dirname(__file__), "..")


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
