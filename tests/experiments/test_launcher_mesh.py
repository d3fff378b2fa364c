"""The launcher's `config.mesh` (issue 29 item 6): built with `jax.make_mesh`, handed to experiments that run on a
mesh, recorded in results.json; a clear error naming `config.mesh` when it cannot be built.

The in-process checks use the one device a pytest-xdist worker holds; the sharded run of an experiment goes through
the launcher in a subprocess with 4 forced host devices (tiny: one d, two trials, one mode, ~20 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from experiments import registry, run


def _with_mesh(config, shape, names):
  config.mesh = ml_collections.ConfigDict({"shape": tuple(shape), "axis_names": tuple(names)})
  return config


def test_no_mesh_is_one_device():
  c = registry.load_config("configs/adaptive/synthetic.py", "smoke")
  assert run.build_mesh(c) is None  # the empty default
  del c["mesh"]
  assert run.build_mesh(c) is None  # configs without the field
  assert run.mesh_record(None) == {"axis_sizes": {}, "devices": 1}


def test_mesh_built_and_recorded():
  c = _with_mesh(ml_collections.ConfigDict({"experiment": "x"}), (1,), ("vocab",))
  mesh = run.build_mesh(c)
  assert mesh.axis_names == ("vocab",) and mesh.devices.size == 1
  assert run.mesh_record(mesh)["axis_sizes"] == {"vocab": 1}


@pytest.mark.parametrize("shape,names", [((4096,), ("vocab",)), ((0,), ("vocab",)), ((2, 1), ("vocab",)),
                                         ((1,), ("",)), ((1, 1), ("a", "a")), ((1.5,), ("vocab",))])
def test_bad_mesh_names_config_mesh(shape, names):
  c = _with_mesh(ml_collections.ConfigDict({"experiment": "x"}), shape, names)
  with pytest.raises(run.MeshError, match="config.mesh"):
    run.build_mesh(c)


def test_mesh_refused_for_an_experiment_without_one(tmp_path):
  c = _with_mesh(registry.load_config("configs/topk/synthetic.py", "smoke"), (1,), ("vocab",))
  with pytest.raises(run.MeshError, match="config.mesh is set but experiment 'topk_synthetic'"):
    run.execute(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()  # refused before anything ran


_SUBPROCESS = r"""
import json, sys
from experiments import registry, run
c = registry.load_config("configs/adaptive/synthetic.py", "smoke")
c.mesh.shape, c.mesh.axis_names = (4,), ("vocab",)
c.datasets, c.n, c.num_d, c.d_min, c.d_max, c.trials = ("gaussian",), 18, 1, 300, 300, 2
c.modes, c.repeats = ("certified",), 1
try:
  run.execute(c, sys.argv[1] + "/refused")
  raise SystemExit("exact_winners=False was accepted")
except ValueError as e:
  assert "exact_winners" in str(e), e
c.exact_winners = True
res = run.execute(c, sys.argv[1] + "/ok")
print(json.dumps({"mesh": res["mesh"], "rows": res["rows"]}))
"""


def test_synthetic_experiment_on_a_forced_4_device_mesh(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip(), JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", _SUBPROCESS, str(tmp_path)], env=env, cwd=root, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["mesh"]["devices"] == 4 and out["mesh"]["axis_sizes"] == {"vocab": 4}
  (row,) = out["rows"]
  assert row["mode"] == "certified" and row["success"] == 1.0 and row["samples_mean"] > 0
  assert row["ms_adaptive"] > 0 and row["ms_exact"] > 0
  with open(tmp_path / "ok" / "results.json") as f:
    assert json.load(f)["mesh"]["devices"] == 4
