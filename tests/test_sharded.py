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
def threshold_attention_matches_one_device():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from asoftmax import sharded, topk
  B, Q, N, d, dv = 2, 3, 37, 8, 4  # 37 keys: padded on 2, 4 and 8 devices
  ks = jax.random.split(jax.random.key(0), 4)
  q = 2 * jax.random.normal(ks[0], (B, Q, d))
  K, V = jax.random.normal(ks[1], (B, N, d)), jax.random.normal(ks[2], (B, N, dv))
  qpos, kv = jnp.array([5, 20, 36]), jax.random.uniform(ks[3], (B, N)) > 0.1
  V = jnp.where(kv[..., None], V, jnp.nan)  # unfilled cache slots hold garbage
  logits = jnp.einsum("bqd,bnd->bqn", q, K) / np.sqrt(d)
  valid = kv[:, None, :] & (jnp.arange(N)[None, None, :] <= qpos[None, :, None])  # causal on global positions
  eps = 0.05
  p, k, tv = topk.threshold_topk_probs(logits, valid, eps)
  out = jnp.einsum("bqn,bnd->bqd", p, jnp.where(kv[..., None], V, 0.0))
  for S in SIZES:
    r = sharded.threshold_attention(q, K, V, eps, sharded.make_mesh((S,), ("seq",)), key_valid=kv, q_positions=qpos)
    np.testing.assert_array_equal(r.k, k)
    assert bool((r.tv <= eps).all())
    np.testing.assert_allclose(r.tv, tv, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r.out, out, rtol=1e-5, atol=1e-5)
  mesh = sharded.make_mesh((4,), ("seq",))
  r = sharded.threshold_attention(q[0], K[0], V[0], eps, mesh, key_valid=kv[0])  # 2-D, not causal
  p0, k0, _ = topk.threshold_topk_probs(logits[0], kv[0], eps)
  np.testing.assert_array_equal(r.k, k0)
  f = jax.jit(lambda e: sharded.threshold_attention(q, K, V, e, mesh, key_valid=kv, q_positions=qpos))
  bad = f(1.5)  # a traced epsilon outside (0, 1): every row flagged
  assert bool(jnp.isnan(bad.tv).all()) and int(bad.k.max()) == 0
  try:
    sharded.threshold_attention(q, K, V, eps, mesh, axis="vocab")
  except ValueError as e:
    assert "axis='vocab'" in str(e)
  else:
    raise AssertionError("no error for a bad axis")


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
