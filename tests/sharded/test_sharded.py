"""Sharded methods on 1, 2, 4 and 8 forced host devices (issue 29), MaxText style.

pytest-xdist workers already hold one device, so the checks run in **one** subprocess started with
`XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu` (`python tests/sharded/test_sharded.py`), which
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
def threshold_attention_matches_one_device(sizes=SIZES):
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
  for S in sizes:
    r = sharded.threshold_attention(q, K, V, eps, sharded.make_mesh((S,), ("seq",)), key_valid=kv, q_positions=qpos)
    np.testing.assert_array_equal(r.k, k)
    assert bool((r.tv <= eps).all())
    np.testing.assert_allclose(r.tv, tv, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r.out, out, rtol=1e-5, atol=1e-5)
  try:
    sharded.threshold_attention(q, K, V, eps, sharded.make_mesh((2,), ("seq",)), axis="vocab")
  except ValueError as e:
    assert "axis='vocab'" in str(e)
  else:
    raise AssertionError("no error for a bad axis")


def _adaptive_case():
  import jax
  import jax.numpy as jnp
  from asoftmax import adaptive
  n, d, b = 61, 256, 6  # 61 rows: padded on 2, 4 and 8 devices
  A, x = adaptive.gaussian_problem(jax.random.key(0), n, d)
  X = jnp.stack([x] + [0.3 * jax.random.normal(jax.random.key(i), (d,)) for i in range(1, b)])
  return A, X, adaptive.softmax_topk(A, X, k=2)


def _assert_adaptive(r, ref, eps):
  import numpy as np
  np.testing.assert_array_equal(r.indices, ref.indices)  # exact merge of the shards' exact winners
  assert bool(r.certified.all())
  assert bool(((r.log_z_lo <= ref.log_z + 1e-5) & (ref.log_z <= r.log_z_hi + 1e-5)).all())  # the summed bracket
  assert float(np.max(np.abs(r.probs / ref.probs - 1))) <= eps
  assert bool((r.max_shard_samples <= r.samples).all())


@check
def adaptive_vocab_and_data_sharded():
  import jax
  from asoftmax import sharded
  A, X, ref = _adaptive_case()
  mesh = sharded.make_mesh((2, 4), ("data", "vocab"))  # 6 queries over 2, 61 rows over 4
  prep = sharded.prepare_matrix(A, mesh)
  r = sharded.adaptive_softmax(jax.random.key(5), prep, X, mesh, k=2, epsilon=0.3, delta=0.1, data_axis="data", exact_below=0)
  _assert_adaptive(r, ref, 0.3)
  for bad, word in (({"data_axis": "batch"}, "data_axis"), ({"shared_order": True}, "shared_order"),
                    ({"k": 0}, "k"), ({"delta": 1.0}, "delta")):
    try:
      sharded.adaptive_softmax(jax.random.key(5), prep, X, mesh, **bad, exact_below=0)
    except ValueError as e:
      assert word in str(e), str(e)
    else:
      raise AssertionError(f"no error for {bad}")


@check
def slow_adaptive_on_1_2_4_8_devices():
  import jax
  import numpy as np
  from asoftmax import adaptive, sharded
  A, X, ref = _adaptive_case()
  for S in SIZES:
    mesh = sharded.make_mesh((S,), ("vocab",))
    r = sharded.adaptive_softmax(jax.random.key(5), sharded.prepare_matrix(A, mesh), X, mesh, k=2, exact_below=0)
    _assert_adaptive(r, ref, 0.3)
  # Data-parallel only: every query's key comes from its global index, so the answer is one device's batch call.
  one = adaptive.adaptive_softmax(jax.random.key(5), adaptive.prepare_matrix(A), X, k=2, exact_below=0)
  mesh = sharded.make_mesh((8, 1), ("data", "vocab"))
  r = sharded.adaptive_softmax(jax.random.key(5), sharded.prepare_matrix(A, mesh), X, mesh, k=2, data_axis="data", exact_below=0)
  np.testing.assert_array_equal(r.indices, one.indices)
  np.testing.assert_array_equal(r.samples, one.samples)
  np.testing.assert_allclose(r.probs, one.probs, rtol=1e-5)
  # Success over distinct seeded problems, near ties and planted gaps (hard inputs), 61 rows over 8 devices: the
  # certified statement (top-1 right, every probability within epsilon) is not significantly below 1 - delta.
  from asoftmax import stats
  from asoftmax.adaptive import synthetic
  mesh = sharded.make_mesh((8,), ("vocab",))
  ok, trials = 0, 0
  for seed in range(12):
    for make in (synthetic.near_tie_problem, adaptive.planted_problem):
      A, x = make(jax.random.key(100 + seed), 61, 256)
      ref = adaptive.softmax_topk(A, x, k=1)
      r = sharded.adaptive_softmax(jax.random.key(seed), sharded.prepare_matrix(A, mesh), x, mesh, k=1,
                                   epsilon=0.3, delta=0.1, exact_below=0)
      good = int(r.indices[0]) == int(ref.indices[0]) and abs(float(r.probs[0]) / float(ref.probs[0]) - 1) <= 0.3
      ok, trials = ok + int(good and bool(r.certified)), trials + 1
  print(f"adaptive success on 8 devices: {ok}/{trials}", flush=True)
  assert stats.binomial_interval(ok, trials)[1] >= 0.9, (ok, trials)


def _rff_checks(sizes, with_loss):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from scipy import stats
  from asoftmax import rff, sharded
  n, d, D, m = 45, 6, 16, 3000  # 45 classes: a 64-bucket tree, padding in the last block
  C = rff.normalize(jax.random.normal(jax.random.key(0), (n, d)))
  sampler = rff.rff_sampler(jax.random.key(1), D, 4.0, kappa=0.01)
  state = sampler.init(C)
  h = rff.normalize(jax.random.normal(jax.random.key(2), (2, d)))
  psi = rff.rff_features(h, state.W)
  lq1, _ = rff.tree_log_probs(psi, state.tree, 0.01)  # one device's q
  for S in sizes:
    mesh = sharded.make_mesh((S,), ("classes",))
    t = sharded.build_tree(rff.rff_features(C, state.W), mesh)
    lq = sharded.tree_log_probs(psi, t, 0.01, mesh)
    np.testing.assert_array_equal(np.isfinite(lq), np.isfinite(lq1))
    np.testing.assert_allclose(np.where(np.isfinite(lq1), lq, 0), np.where(np.isfinite(lq1), lq1, 0), atol=2e-5)
    ids, lqs = sharded.tree_sample(jax.random.key(3 + S), psi, t, m, 0.01, mesh)
    np.testing.assert_allclose(lqs, jnp.take_along_axis(lq1, ids, 1), atol=2e-5)  # exact log q of each draw
    for b in range(2):  # chi-square goodness of fit against one device's q (cells with expected count >= 5 pooled)
      e = m * np.exp(np.asarray(lq1[b], np.float64))
      cnt = np.bincount(np.asarray(ids[b]), minlength=e.size)
      big = e >= 5
      obs = np.append(cnt[big], cnt[~big].sum())
      exp = np.append(e[big], e[~big].sum())
      p = stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue
      assert p > 1e-3, (S, b, p)
  if not with_loss:
    return
  # The sampled loss and its gradient (owners' rows), vocab-only and data-parallel on a (data, classes) mesh.
  h4 = rff.normalize(jax.random.normal(jax.random.key(4), (4, d)))
  ids, lqs = sampler.sample(state, jax.random.key(5), h4, 7)
  tg = jnp.array([0, 5, 44, 20])
  loss = lambda c: rff.sampled_softmax_loss(h4, c, tg, ids, lqs, 5.0)  # noqa: E731
  ref, gref = loss(C), jax.grad(lambda c: loss(c).mean())(C)
  for shape, names, da in (((2, 4), ("data", "classes"), "data"),):
    mesh = sharded.make_mesh(shape, names)
    f = lambda c: sharded.sampled_softmax_loss(h4, c, tg, ids, lqs, 5.0, mesh, data_axis=da)  # noqa: E731
    np.testing.assert_allclose(f(C), ref, atol=1e-5)
    np.testing.assert_allclose(jax.grad(lambda c: f(c).mean())(C), gref, atol=1e-5)
  try:
    sharded.build_tree(rff.rff_features(C, state.W), sharded.make_mesh((2, 3), ("x", "classes")))
  except ValueError as e:
    assert "divide" in str(e), str(e)
  else:
    raise AssertionError("no error for 3 class shards of a 64-bucket tree")


@check
def rff_tree_sampler_and_loss_match_one_device():
  _rff_checks((1, 8), with_loss=True)


@check
def slow_rff_tree_sampler_on_2_and_4_devices():
  _rff_checks((2, 4), with_loss=False)


@check
def slow_threshold_attention_2d_and_jit_flag():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from asoftmax import sharded, topk
  N, d = 37, 8
  ks = jax.random.split(jax.random.key(0), 4)
  q, K, V = 2 * jax.random.normal(ks[0], (3, d)), jax.random.normal(ks[1], (N, d)), jax.random.normal(ks[2], (N, 4))
  kv = jax.random.uniform(ks[3], (N,)) > 0.1
  eps = 0.05
  mesh = sharded.make_mesh((4,), ("seq",))
  r = sharded.threshold_attention(q, K, V, eps, mesh, key_valid=kv)  # 2-D, not causal
  p0, k0, _ = topk.threshold_topk_probs((q @ K.T) / np.sqrt(d), kv, eps)
  np.testing.assert_array_equal(r.k, k0)
  f = jax.jit(lambda e: sharded.threshold_attention(q, K, V, e, mesh, key_valid=kv, q_positions=jnp.arange(3) + 30))
  bad = f(1.5)  # a traced epsilon outside (0, 1): every row flagged
  assert bool(jnp.isnan(bad.tv).all()) and int(bad.k.max()) == 0
  try:
    sharded.threshold_attention(q, K, V, eps, mesh, axis="vocab")
  except ValueError as e:
    assert "axis='vocab'" in str(e)
  else:
    raise AssertionError("no error for a bad axis")


def _progressive_checks(sizes):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from asoftmax import sharded, topk
  N, d, Q = 75, 8, 4  # 75 keys: padded on 2, 4 and 8 devices
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  K, Qs, V = 2 * jax.random.normal(k1, (N, d)), jax.random.normal(k2, (Q, d)), jax.random.normal(k4, (N, 3))
  held = 2 * jax.random.normal(k3, (64, d))
  basis = topk.fit_basis(held, held, jnp.ones(64, bool), jnp.ones(64, bool))
  pk, qr = topk.prepare_keys(K, basis, (4, 8)), topk.rotate_queries(Qs, basis)
  qpos = jnp.array([10, 40, 60, 74])
  valid = jnp.arange(N)[None] <= qpos[:, None]
  p = jax.nn.softmax(jnp.where(valid, (Qs @ K.T) / np.sqrt(d), -jnp.inf), -1)  # the true attention
  one = topk.progressive_search(qr, pk, valid, 0.1, d ** -0.5, (4, 8)) if 1 in sizes else None
  for S in sizes:
    r = sharded.progressive_attention(qr, pk, V, 0.1, sharded.make_mesh((S,), ("seq",)), scale=d ** -0.5,
                                      stages=(4, 8), q_positions=qpos)
    if S == 1:
      np.testing.assert_array_equal(r.k, one.k)
      np.testing.assert_allclose(r.certificate, one.certificate, rtol=1e-6)
    tv = jnp.sum(jnp.where(r.head, 0.0, p), -1)  # the realised TV of the union head
    assert bool((tv <= r.certificate + 1e-6).all() and (r.certificate <= 0.1).all()), (S, tv, r.certificate)
    np.testing.assert_array_equal(r.k, jnp.sum(r.head & valid, -1))
    ph = jnp.where(r.head, p, 0.0)
    np.testing.assert_allclose(r.out, (ph / ph.sum(-1, keepdims=True)) @ V, atol=1e-5)


@check
def progressive_attention_certifies():
  _progressive_checks((8,))


@check
def slow_progressive_attention_on_1_2_4_devices():
  _progressive_checks((1, 2, 4))


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
  # Built on a 2-device axis, used on a 4-device one (the shapes alone would pass: 8 rows, 8 buckets).
  import jax
  mesh4 = sharded.make_mesh((4,), ("vocab",))
  A8 = jax.random.normal(jax.random.key(0), (8, 3))
  for call, word in ((lambda: sharded.adaptive_softmax(jax.random.key(1), sharded.prepare_matrix(A8, mesh), x, mesh4),
                      "prep"),
                     (lambda: sharded.tree_log_probs(jnp.ones((1, 3)), sharded.build_tree(
                         jnp.abs(A8), mesh, axis="vocab"), 0.01, mesh4), "tree")):
    try:
      call()
    except ValueError as e:
      assert word in str(e) and "shards" in str(e), str(e)
    else:
      raise AssertionError(f"no error for a {word} built on another mesh size")
  for args in (((16,), ("vocab",)), ((2,), ("a", "b")), ((2, 2), ("a", "a"))):
    try:
      sharded.make_mesh(*args)
    except ValueError:
      pass
    else:
      raise AssertionError(f"no error for make_mesh{args}")


def _run_checks(names):
  import time
  out = {}
  for name in names:
    t0 = time.process_time()
    try:
      CHECKS[name]()
      out[name] = "ok"
      print(f"{name}: {time.process_time() - t0:.1f} s CPU", flush=True)
    except Exception:  # noqa: BLE001 -- reported to the pytest case of this check
      out[name] = traceback.format_exc()
  return out


# ------------------------------------------------------------------------------------------------ pytest side
def _subprocess(tmp_path_factory, names):
  path = tmp_path_factory.mktemp("sharded") / "results.json"
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip(), JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(path)] + names, env=env, cwd=root,
                        capture_output=True, text=True, timeout=600)
  if not path.exists():
    pytest.fail(f"the sharded subprocess failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return json.loads(path.read_text())


FAST = sorted(n for n in CHECKS if not n.startswith("slow_"))
SLOW = sorted(n for n in CHECKS if n.startswith("slow_"))


@pytest.fixture(scope="module")
def fast_results(tmp_path_factory):
  return _subprocess(tmp_path_factory, FAST)


@pytest.fixture(scope="module")
def slow_results(tmp_path_factory):
  return _subprocess(tmp_path_factory, SLOW)


@pytest.mark.parametrize("name", FAST)
def test_sharded(fast_results, name):
  assert fast_results.get(name) == "ok", fast_results.get(name, "not run")


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_sharded_slow(slow_results, name):
  assert slow_results.get(name) == "ok", slow_results.get(name, "not run")


# ------------------------------------------------------------------------------------------------ multi-host
def _multihost_worker(pid, port, out):
  """One of two processes on this machine (2 CPU devices each): `jax.distributed` over localhost, gloo collectives,
  a 4-device mesh spanning both processes, the exact top-k and the sharded attention end to end."""
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid,
                             initialization_timeout=60)
  import numpy as np
  from asoftmax import sharded
  assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2
  rng = np.random.default_rng(0)  # the same inputs in both processes
  A, X = rng.standard_normal((37, 16)).astype(np.float32), rng.standard_normal((5, 16)).astype(np.float32)
  mesh = sharded.make_mesh((4,), ("vocab",))
  r = sharded.softmax_topk(A, X, mesh, k=4)
  np.testing.assert_array_equal(np.asarray(r.indices), np.argsort(-(X @ A.T), 1, kind="stable")[:, :4])
  K, V = rng.standard_normal((1, 37, 16)).astype(np.float32), rng.standard_normal((1, 37, 3)).astype(np.float32)
  a = sharded.threshold_attention(X[None], K, V, 0.05, sharded.make_mesh((4,), ("seq",)))
  s = (X @ K[0].T) / 4.0
  p = np.exp(s - s.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  tail = np.array([np.sort(row)[:-int(k)].sum() for row, k in zip(p, np.asarray(a.k[0]))])
  assert (tail <= 0.05 + 1e-6).all(), tail
  with open(out, "w") as f:
    f.write("ok")


def test_multihost_two_processes(tmp_path):
  """Two processes with `jax.distributed.initialize` on localhost (CPU collectives): 60 s limit each."""
  import socket
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip(), JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--multihost", str(i), str(port),
                             str(tmp_path / f"ok{i}")], env=env, cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=90)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i in range(2):
    assert (tmp_path / f"ok{i}").exists(), f"process {i} failed:\n" + "\n".join(x[-3000:] for x in logs)


if __name__ == "__main__" and sys.argv[1] == "--multihost":
  _multihost_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
elif __name__ == "__main__":
  import jax
  assert len(jax.devices()) >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  names = sys.argv[2:] or sorted(CHECKS)
  res = _run_checks(names)
  with open(sys.argv[1], "w") as f:
    json.dump(res, f)
  print(json.dumps({k: v if v == "ok" else v[-2000:] for k, v in res.items()}, indent=1))
