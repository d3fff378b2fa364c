"""Batch-shared and without-replacement negatives, against TensorFlow's conventions re-implemented in numpy.

TensorFlow is not installed; `_tf_sampled_softmax` below transcribes `tf.nn.sampled_softmax_loss`
(`_compute_sampled_logits` with num_true = 1, `compute_accidental_hits`, softmax cross-entropy) and
`_tf_expected_count` transcribes `ExpectedCountHelper` (tensorflow/core/kernels/range_sampler.cc).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from asoftmax import rff
from asoftmax.rff import negatives
from asoftmax.rff import tree as tree_lib
from asoftmax.rff import features as features_lib

FLT_MAX = np.finfo(np.float32).max


def _unit(key, shape):
  return rff.normalize(jax.random.normal(jax.random.key(key), shape))


def _tf_expected_count(p, m, num_tries):
  p = np.asarray(p, np.float64)
  if num_tries == m:
    return p * m
  return -np.expm1(num_tries * np.log1p(-p))


def _np_norm(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _tf_sampled_softmax(h, C, t, sampled, true_expected, sampled_expected, tau, subtract_log_q=True,
                        remove_accidental_hits=True):
  """float64 numpy transcription of tf.nn.sampled_softmax_loss (shared sampled ids [m]); returns loss, dL/dh, dL/dC."""
  h, C = np.asarray(h, np.float64), np.asarray(C, np.float64)
  B, m = h.shape[0], len(sampled)
  hn, Cn = _np_norm(h), _np_norm(C)
  true_logits = tau * (hn * Cn[t]).sum(1)
  sampled_logits = tau * hn @ Cn[sampled].T
  if remove_accidental_hits:
    pos = {}
    for j, s in enumerate(sampled):  # a hash map from id to position: the last position wins
      pos[int(s)] = j
    for b in range(B):
      if int(t[b]) in pos:
        sampled_logits[b, pos[int(t[b])]] += -FLT_MAX
  if subtract_log_q:
    true_logits = true_logits - np.log(true_expected)
    sampled_logits = sampled_logits - np.log(sampled_expected)[None, :]
  x = np.concatenate([true_logits[:, None], sampled_logits], 1)
  lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
  loss = lse - x[:, 0]
  g = np.exp(x - lse[:, None])  # dL/dx
  g[:, 0] -= 1.0
  # back through o = tau * hn . cn and the normalisations
  ghn = tau * (g[:, :1] * Cn[t] + g[:, 1:] @ Cn[sampled])
  gCn = np.zeros_like(C)
  np.add.at(gCn, t, tau * g[:, :1] * hn)
  np.add.at(gCn, sampled, tau * g[:, 1:].T @ hn)
  def back(x, xn, gxn):
    return (gxn - xn * (xn * gxn).sum(-1, keepdims=True)) / np.linalg.norm(x, axis=-1, keepdims=True)
  return loss, back(h, hn, ghn), back(C, Cn, gCn)


def _ours_x64(h, C, t, ids, log_exp, tau, **kw):
  with jax.enable_x64(True):
    f = lambda h, C: rff.corrected_sampled_loss(h, C, jnp.asarray(t), jnp.asarray(ids), jnp.asarray(log_exp), tau,
                                                **kw)
    loss = f(jnp.asarray(h, jnp.float64), jnp.asarray(C, jnp.float64))
    gh, gC = jax.grad(lambda h, C: f(h, C).sum(), argnums=(0, 1))(jnp.asarray(h, jnp.float64),
                                                                  jnp.asarray(C, jnp.float64))
    assert loss.dtype == jnp.float64
    return np.asarray(loss), np.asarray(gh), np.asarray(gC)


def _problem(n=20, d=6, B=5, seed=0):
  rng = np.random.default_rng(seed)
  C = rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=(n, 1))
  h = rng.normal(size=(B, d))
  counts = rng.integers(0, 50, size=n).astype(np.float64)
  return C, h, counts


def test_shared_with_replacement_matches_tf_sampled_softmax():
  n, m, tau = 20, 30, 5.0
  C, h, counts = _problem(n)
  s = rff.unigram_sampler(counts)
  st = s.init()
  ids, lq = s.sample(st, jax.random.key(0), rff.normalize(jnp.asarray(h, jnp.float32)), m, shared=True)
  ids = np.array(ids)
  assert ids.shape == (m,)
  # make accidental hits certain: row 0's true class is sampled at least twice, row 1's exactly once
  ids[7] = ids[0]
  occ = np.bincount(ids, minlength=n)
  once, never = np.flatnonzero(occ == 1), np.flatnonzero(occ == 0)
  assert len(once) and len(never)
  t = np.array([ids[0], once[0], never[0], once[-1], ids[3]])
  p_all = (counts + 1.0) / (counts + 1.0).sum()
  q = p_all[ids]
  neg = negatives.expected_count(jnp.log(q), m, m, False)
  np.testing.assert_allclose(np.exp(neg), m * q, rtol=1e-6)
  # TF defaults: subtract log(m q_t) from the true logit, mask the last occurrence only
  ref = _tf_sampled_softmax(h, C, t, ids, m * p_all[t], m * q, tau)
  got = _ours_x64(h, C, t, ids, np.log(m * q), tau, log_expected_true=np.log(m * p_all[t]), accidental_hits="last")
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  # the paper's form = TF with true_expected_count = 1 on rows whose true class is sampled at most once
  ref1 = _tf_sampled_softmax(h, C, t, ids, np.ones(5), m * q, tau)
  got1 = _ours_x64(h, C, t, ids, np.log(m * q), tau)
  multi = occ[t] >= 2
  assert multi[0] and not multi[1:4].any()
  np.testing.assert_allclose(got1[0][~multi], ref1[0][~multi], rtol=1e-10)
  # a true class sampled twice or more: masking all (ours, unbiased) vs the last one (TF) differs
  assert np.all(np.abs(got1[0][multi] - ref1[0][multi]) > 1e-6)  # float64 agreement elsewhere is 1e-10
  got_last = _ours_x64(h, C, t, ids, np.log(m * q), tau, accidental_hits="last")
  np.testing.assert_allclose(got_last[0], ref1[0], rtol=1e-10)
  # float32 path agrees with the float64 reference to float32 precision
  l32 = rff.corrected_sampled_loss(jnp.asarray(h, jnp.float32), jnp.asarray(C, jnp.float32), jnp.asarray(t),
                                   jnp.asarray(ids), jnp.log(m * jnp.asarray(q, jnp.float32)), tau,
                                   log_expected_true=jnp.log(m * jnp.asarray(p_all[t], jnp.float32)),
                                   accidental_hits="last")
  np.testing.assert_allclose(l32, ref[0], rtol=2e-5)


def _np_rejection_loop(stream, m):
  kept, used = [], 0
  for j, s in enumerate(stream):
    if s not in kept:
      kept.append(int(s))
      if len(kept) == m:
        return kept, j + 1
  return kept, len(stream)


@pytest.mark.parametrize("K", [3, 8, 40])
def test_chunked_unique_equals_one_at_a_time_loop(K):
  rng = np.random.default_rng(K)
  m = 6
  for trial in range(20):
    stream = rng.integers(0, 9, size=200)  # many repeats
    kept_ref, T_ref = _np_rejection_loop(stream, m)
    kept, klq, count, T = None, None, 0, 0
    for c in range(0, 200, K):
      chunk = jnp.asarray(stream[c:c + K], jnp.int32)
      kept, klq, count, used = negatives.unique_from_stream(chunk, -jnp.asarray(chunk, jnp.float32), m, kept, klq,
                                                            count)
      T += int(used)
      if int(count) == m:
        break
    assert list(np.asarray(kept)) == kept_ref and T == T_ref
    np.testing.assert_allclose(np.asarray(klq), -np.asarray(kept_ref, np.float32))


def _inclusion_probs(p, m):
  """Exact inclusion probabilities of successive sampling without replacement (= TF's rejection loop)."""
  n = len(p)
  incl = np.zeros(n)
  for seq in itertools.permutations(range(n), m):
    pr, left = 1.0, 1.0
    for s in seq:
      pr *= p[s] / left
      left -= p[s]
    incl[list(seq)] += pr
  return incl


def test_unique_draws_have_successive_sampling_inclusion_and_tf_expected_counts():
  n, m, R = 7, 3, 3000
  counts = np.array([30.0, 10, 5, 3, 1, 0, 8])
  s = rff.unigram_sampler(counts)
  st = s.init()
  h = _unit(0, (2, 4))
  draw = jax.jit(jax.vmap(lambda k: negatives.draw_negatives(s, st, k, h, m, shared=True, unique=True, chunk=4)))
  neg = draw(jax.random.split(jax.random.key(1), R))
  ids, T = np.asarray(neg.ids), np.asarray(neg.num_tries)
  assert all(len(set(r)) == m for r in ids) and (T >= m).all() and (T > m).any() and (T == m).any()
  p = (counts + 1) / (counts + 1).sum()
  freq = np.bincount(ids.reshape(-1), minlength=n) / R
  incl = _inclusion_probs(p, m)
  assert np.all(np.abs(freq - incl) <= 4.5 * np.sqrt(incl * (1 - incl) / R) + 1e-9), (freq, incl)
  # expected counts are TF's ExpectedCountHelper with the number of tries actually used
  for r in range(0, R, 97):
    np.testing.assert_allclose(np.exp(np.asarray(neg.log_expected[r], np.float64)),
                               _tf_expected_count(p[ids[r]], m, int(T[r])), rtol=1e-5)
  np.testing.assert_allclose(np.exp(np.asarray(neg.log_q, np.float64)), p[ids], rtol=1e-5)


def test_unique_shared_loss_matches_tf_sampled_softmax():
  n, m, tau = 25, 12, 4.0
  C, h, counts = _problem(n, seed=3)
  s = rff.unigram_sampler(counts)
  st = s.init()
  neg = negatives.draw_negatives(s, st, jax.random.key(5), rff.normalize(jnp.asarray(h, jnp.float32)), m,
                                 shared=True, unique=True, num_classes=n)
  ids, T = np.asarray(neg.ids), int(neg.num_tries)
  assert len(set(ids)) == m
  p = (counts + 1) / (counts + 1).sum()
  t = np.array([ids[2], ids[5], 0, 1, 2])
  e_s, e_t = _tf_expected_count(p[ids], m, T), _tf_expected_count(p[t], m, T)
  log_e_t = negatives.expected_count(jnp.log(jnp.asarray(p[t], jnp.float32)), neg.num_tries, m, True)
  np.testing.assert_allclose(np.exp(np.asarray(log_e_t, np.float64)), e_t, rtol=1e-5)
  ref = _tf_sampled_softmax(h, C, t, ids, e_t, e_s, tau)
  got = _ours_x64(h, C, t, ids, np.log(e_s), tau, log_expected_true=np.log(e_t))
  for a, b in zip(got, ref):  # unique ids: masking all or last is the same
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_per_query_unique_rff_draws_are_distinct_with_exact_log_q():
  n, d, B, m = 40, 6, 4, 9
  C, h = _unit(1, (n, d)), _unit(2, (B, d))
  s = rff.rff_sampler(jax.random.key(3), 16, 2.0)
  st = s.init(C)
  neg = negatives.draw_negatives(s, st, jax.random.key(4), h, m, unique=True, num_classes=n)
  ids = np.asarray(neg.ids)
  assert ids.shape == (B, m) and all(len(set(r)) == m for r in ids) and ((0 <= ids) & (ids < n)).all()
  lp = np.asarray(s.log_probs(st, h))
  np.testing.assert_allclose(np.asarray(neg.log_q), np.take_along_axis(lp, ids, 1), atol=1e-4)
  with pytest.raises(ValueError, match="distinct"):
    negatives.draw_negatives(s, st, jax.random.key(4), h, n + 1, unique=True, num_classes=n)


def test_shared_proposals_are_the_batch_mixtures():
  n, d, B = 30, 5, 6
  C, h = _unit(6, (n, d)), _unit(7, (B, d))
  tau = 4.0
  ex = rff.exact_sampler(tau)
  p = np.asarray(jax.nn.softmax(tau * h @ C.T, -1), np.float64)
  np.testing.assert_allclose(np.exp(np.asarray(ex.log_probs(ex.init(C), h, shared=True))), p.mean(0), rtol=1e-5)
  qd = rff.quadratic_sampler(alpha=50.0, bucket=4)
  k = 50.0 * np.asarray(h @ C.T, np.float64) ** 2 + 1
  np.testing.assert_allclose(np.exp(np.asarray(qd.log_probs(qd.init(C), h, shared=True))),
                             k.sum(0) / k.sum(), rtol=1e-4)
  rf = rff.rff_sampler(jax.random.key(8), 32, 2.0, kappa=0.05)
  st = rf.init(C)
  psi_bar = features_lib.rff_map(h, st.W).mean(0, keepdims=True)
  ref, _ = tree_lib.tree_log_probs(psi_bar, st.tree, 0.05)
  lq = np.asarray(rf.log_probs(st, h, shared=True), np.float64)
  np.testing.assert_allclose(lq, np.asarray(ref[0, :n]), atol=1e-6)
  np.testing.assert_allclose(np.exp(lq).sum(), 1.0, rtol=1e-5)
  for smp, stt in ((rf, st), (qd, qd.init(C)), (ex, ex.init(C))):
    lps = np.asarray(smp.log_probs(stt, h, shared=True), np.float64)
    ids, lqs = smp.sample(stt, jax.random.key(9), h, 30000, shared=True)
    assert ids.shape == (30000,)
    np.testing.assert_allclose(np.asarray(lqs), lps[np.asarray(ids)], atol=1e-4)
    obs = np.bincount(np.asarray(ids), minlength=n)
    assert scipy.stats.chisquare(obs, np.exp(lps) / np.exp(lps).sum() * 30000).pvalue > 1e-3


def test_shared_rff_negatives_estimate_each_query_partition_function_without_bias():
  """E[sum_j e^{o_bs_j} 1(s_j != t_b) / (m qbar_s_j)] = Z_{t_b} for every query b of the batch (4 SE)."""
  n, d, B, m, R, tau = 60, 6, 4, 8, 6000, 6.0
  C, h = _unit(10, (n, d)), _unit(11, (B, d))
  t = np.array([0, 5, 9, 30])
  s = rff.rff_sampler(jax.random.key(12), 16, 3.0, kappa=0.01)
  st = s.init(C)
  draw = jax.jit(jax.vmap(lambda k: s.sample(st, k, h, m, shared=True)))
  ids, lq = (np.asarray(x, np.float64) for x in draw(jax.random.split(jax.random.key(13), R)))
  ids = ids.astype(int)
  e = np.exp(tau * np.asarray(h @ C.T, np.float64))  # [B, n]
  for b in range(B):
    w = e[b][ids] * (ids != t[b]) / (m * np.exp(lq))
    est = w.sum(1)
    Z = e[b].sum() - e[b, t[b]]
    assert abs(est.mean() - Z) <= 4 * est.std() / np.sqrt(R), (b, est.mean(), Z)


# ------------------------------------------------------------------------------------------- no hangs (issue 18)
# Each trigger used to make `draw_negatives(..., unique=True)` loop forever (Ctrl-C could not stop it). They run in
# one subprocess with a timeout, each reporting as it ends, so a regression fails here instead of hanging the suite.
_HANG_SCRIPT = r'''
import os, threading, jax, jax.numpy as jnp, numpy as np
from asoftmax import rff

def _run(name, fn):
  try:
    neg = fn()
    ids, lq, le = (np.asarray(x) for x in (neg.ids, neg.log_q, neg.log_expected))
    inrange = bool((ids >= 0).all() and (ids < 12).all())
    flagged = bool(np.isnan(lq).any() and np.isnan(le).any())
    print("RESULT", name, "flagged" if flagged and inrange else f"unflagged ids={ids.tolist()}", flush=True)
  except ValueError as e:
    print("RESULT", name, "ValueError:", str(e).replace("\n", " "), flush=True)
  except Exception as e:
    print("RESULT", name, "other:", type(e).__name__, str(e)[:200].replace("\n", " "), flush=True)

def report(name, fn, timeout=30):
  t = threading.Thread(target=_run, args=(name, fn), daemon=True)  # a hung XLA loop cannot be interrupted
  t.start()
  t.join(timeout)
  if t.is_alive():
    print("RESULT", name, f"hang: > {timeout} s", flush=True)
    os._exit(1)  # the hung loop keeps a core busy: give up on the rest

h = rff.normalize(jax.random.normal(jax.random.key(0), (3, 4)))
C = rff.normalize(jax.random.normal(jax.random.key(1), (12, 4)))
uni = rff.uniform_sampler(12)
zero = rff.unigram_sampler(np.array([5.0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), smoothing=0.0)
rf = rff.rff_sampler(jax.random.key(2), 8, 1.0)
rst = rf.init(C)
key = jax.random.key(3)
report("m_gt_n", lambda: rff.draw_negatives(uni, uni.init(), key, h, 13, unique=True))
report("zero_mass", lambda: rff.draw_negatives(zero, zero.init(), key, h, 4, unique=True, num_classes=12))
report("zero_mass_shared", lambda: rff.draw_negatives(zero, zero.init(), key, h, 4, shared=True, unique=True))
report("zero_mass_jit", lambda: jax.jit(lambda st: rff.draw_negatives(zero, st, key, h, 4, unique=True))(zero.init()))
bad = np.asarray(h).copy(); bad[1, 0] = np.nan
report("nan_query_jit", lambda: jax.jit(lambda hh: rff.draw_negatives(rf, rst, key, hh, 4, unique=True))(bad))
report("nan_query_jit_shared",
       lambda: jax.jit(lambda hh: rff.draw_negatives(rf, rst, key, hh, 4, shared=True, unique=True))(bad))
os._exit(0)
'''

_HANG_CASES = {"m_gt_n": "m", "zero_mass": "m", "zero_mass_shared": "m", "zero_mass_jit": None,
               "nan_query_jit": None, "nan_query_jit_shared": None}


@pytest.fixture(scope="module")
def hang_report():
  import os
  import subprocess
  import sys
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  try:
    out = subprocess.run([sys.executable, "-c", _HANG_SCRIPT], capture_output=True, text=True, timeout=240,
                         env=env).stdout
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
  return {l.split(" ", 2)[1]: l.split(" ", 2)[2] for l in out.splitlines() if l.startswith("RESULT ")}, out


@pytest.mark.parametrize("case", sorted(_HANG_CASES))
def test_unique_draws_never_hang(case, hang_report):
  """A set of m distinct classes that cannot be drawn gives a ValueError naming m (concrete input) or a flagged
  result (log q and log expected count NaN, ids in range) -- never an endless rejection loop."""
  results, out = hang_report
  assert case in results, f"{case} not reached (an earlier case hung); subprocess output:\n{out[-2000:]}"
  verdict = results[case]
  arg = _HANG_CASES[case]
  if verdict.startswith("ValueError"):
    assert arg is not None and arg in verdict.split(":", 1)[1], verdict
  else:
    assert verdict == "flagged", verdict
