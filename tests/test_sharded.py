"""Sharded methods on 1, 2, 4 and 8 forced host devices (issue 29), MaxText style.

pytest-xdist workers already hold one device, so the checks run in **one** subprocess started with
`XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu` (`python tests/test_sharded.py`), which
runs every function registered with `@check`, and writes one line per check; each pytest case below reads its line.
Tiny shapes (compiles dominate). Each check compares the sharded result with one device's on meshes of 1, 2, 4
and 8 devices, with shapes not divisible by the device count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import pytest

CHECKS = {}
SIZES = (1, 2, 4, 8)


def check(fn):
  CHECKS[fn.__name__] = fn
  return fn


# ------------------------------------------------------------------------------------------------ checks (subprocess)
@check
def exact_topk_matches_one_device():
  import jax
  import numpy as np
  from asoftmax import adaptive, sharded
  A = jax.random.normal(jax.random.key(0), (37, 16))  # 37 rows: padded on 2, 4 and 8 devices
  X = jax.random.normal(jax.random.key(1), (5, 16))
  ref = adaptive.softmax_topk(A, X, k=4)
  for S in SIZES:
    mesh = sharded.make_mesh((S,), ("vocab",))
    r = sharded.softmax_topk(A, X, mesh, k=4)
    np.testing.assert_array_equal(r.indices, ref.indices)
    np.testing.assert_allclose(r.log_z, ref.log_z, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(r.probs, ref.probs, rtol=1e-5)
    np.testing.assert_allclose(sharded.logsumexp(A, X[2], mesh), ref.log_z[2], rtol=1e-6, atol=1e-5)
  mesh = sharded.make_mesh((2, 4), ("data", "vocab"))  # 5 queries over 2: padded batch
  r = sharded.softmax_topk(A, X, mesh, k=4, data_axis="data")
  np.testing.assert_array_equal(r.indices, ref.indices)
  explicit = jax.make_mesh((4,), ("vocab",))  # jax.make_mesh's default Explicit axes, inside the user's jit
  r = jax.jit(lambda a, x: sharded.softmax_topk(a, x, explicit, k=4))(A, X)
  np.testing.assert_array_equal(r.indices, ref.indices)


@check
def bad_mesh_and_axis_names():
  import jax.numpy as jnp
  from asoftmax import sharded
  mesh = sharded.make_mesh((2,), ("vocab",))
  A, x = jnp.ones((4, 3)), jnp.ones((3,))
  for kwargs, word in (({"axis": "classes"}, "axis='classes'"), ({"data_axis": "batch"}, "data_axis='batch'"),
                       ({"data_axis": "vocab"}, "data_axis")):
    try:
      sharded.softmax_topk(A, x, mesh, **kwargs)
    except ValueError as e:
      assert word in str(e), str(e)
    else:
      raise AssertionError(f"no error for {kwargs}")
  for bad in ("mesh", None):
    try:
      sharded.softmax_topk(A, x, bad)
    except ValueError as e:
      assert "mesh" in str(e), str(e)
    else:
      raise AssertionError("no error for a bad mesh")
  for args in (((16,), ("vocab",)), ((2,), ("a", "b")), ((2, 2), ("a", "a"))):
    try:
      sharded.make_mesh(*args)
    except ValueError:
      pass
    else:
      raise AssertionError(f"no error for make_mesh{args}")


def _run_checks(names):
  out = {}
  for name in names:
    try:
      CHECKS[name]()
      out[name] = "ok"
    except Exception:  # noqa: BLE001 -- reported to the pytest case of this check
      out[name] = traceback.format_exc()
  return out


# ------------------------------------------------------------------------------------------------ pytest side
@pytest.fixture(scope="module")
def results(tmp_path_factory):
  path = tmp_path_factory.mktemp("sharded") / "results.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(path)], env=env, cwd=root,
                        capture_output=True, text=True, timeout=300)
  if not path.exists():
    pytest.fail(f"the sharded subprocess failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return json.loads(path.read_text())


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_sharded(results, name):
  assert results.get(name) == "ok", results.get(name, "not run")


if __name__ == "__main__":
  import jax
  assert len(jax.devices()) >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  names = sys.argv[2:] or sorted(CHECKS)
  res = _run_checks(names)
  with open(sys.argv[1], "w") as f:
    json.dump(res, f)
  print(json.dumps({k: v if v == "ok" else v[-2000:] for k, v in res.items()}, indent=1))
