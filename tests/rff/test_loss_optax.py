"""RF-softmax for optax users (issue 26 item 2): sampled logits for any logit function, samplers that survive
buffer donation and optimizers that move every class row, and the jit flag for unnormalised queries.

Tiny shapes (n = 64 classes, d = 8, D = 16): the whole file runs in seconds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from asoftmax import rff

N, DIM, B, M = 64, 8, 6, 5


def _data(seed=0):
  r = np.random.default_rng(seed)
  C = r.normal(size=(N, DIM)).astype(np.float32)
  h = r.normal(size=(B, DIM)).astype(np.float32)
  t = r.integers(0, N, size=B).astype(np.int32)
  return C, h, t


_MAKERS = {
    "unigram": lambda: rff.unigram_sampler(np.arange(1.0, N + 1)),
    "rff": lambda: rff.rff_sampler(jax.random.key(3), 16, nu=4.0),
    "exact": lambda: rff.exact_sampler(4.0),
    "rff_bucket": lambda: rff.rff_bucket_sampler(jax.random.key(3), 16, nu=4.0, bucket=4),
}


@functools.lru_cache(maxsize=None)
def _sampler(name):
  """One instance per kind (a new instance has new jitted closures: it would recompile)."""
  return _MAKERS[name]()


# ------------------------------------------------------------------------------------------- sampled_logits
@pytest.mark.parametrize("shared", [False, True])
def test_sampled_logits_with_optax_equal_corrected_sampled_loss(shared):
  C, h, t = _data(1)
  ids = np.random.default_rng(2).integers(0, N, size=(M,) if shared else (B, M)).astype(np.int32)
  ids[..., 0] = t[0]  # an accidental hit (query 0's target sampled)
  log_e = np.log(M / N) + np.zeros(ids.shape, np.float32)
  logits = rff.sampled_logits(rff.cosine_logit_fn(C, 5.0), h, t, ids, log_e)
  assert logits.shape == (B, M + 1)
  assert np.isneginf(np.asarray(logits)[0, 1])  # the accidental hit is masked
  ours = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.zeros((B,), jnp.int32))
  ref = rff.corrected_sampled_loss(h, C, t, ids, log_e, 5.0)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_sampled_logits_linear_head_with_bias_and_gradients():
  C, h, t = _data(3)
  r = np.random.default_rng(4)
  kernel, bias = jnp.asarray(C.T), jnp.asarray(r.normal(size=(N,)).astype(np.float32))  # nnx.Linear layout
  ids = r.integers(0, N, size=(B, M)).astype(np.int32)
  log_q = np.full((B, M), -np.log(N), np.float32)

  def loss(kernel, bias):
    logits = rff.sampled_logits(rff.linear_logit_fn(kernel, bias), h, t, ids, log_q + np.log(M))
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.zeros((B,), jnp.int32)).mean()

  logits = rff.sampled_logits(rff.linear_logit_fn(kernel, bias), h, t, ids, log_q + np.log(M))
  full = h @ C.T + np.asarray(bias)  # unnormalised logits of every class
  expect = np.concatenate([full[np.arange(B), t][:, None],
                           np.take_along_axis(full, ids, 1) - (log_q + np.log(M))], 1)
  expect[:, 1:][ids == t[:, None]] = -np.inf
  np.testing.assert_allclose(np.asarray(logits), expect, rtol=1e-5, atol=1e-5)
  gk, gb = jax.jit(jax.grad(loss, argnums=(0, 1)))(kernel, bias)
  assert np.isfinite(np.asarray(gk)).all() and np.isfinite(np.asarray(gb)).all()
  touched = np.zeros(N, bool)
  touched[np.concatenate([t, ids.ravel()])] = True
  assert (np.asarray(gb)[~touched] == 0).all()  # only the true and sampled classes get gradient


def test_sampled_logits_rejects_bad_input():
  C, h, t = _data(5)
  fn = rff.cosine_logit_fn(C, 5.0)
  ids = np.zeros((B, M), np.int32)
  with pytest.raises(ValueError, match="log_expected"):
    rff.sampled_logits(fn, h, t, ids, np.full((B, M), np.nan, np.float32))
  with pytest.raises(ValueError, match="targets"):
    rff.sampled_logits(fn, h, t[:-1], ids, np.zeros((B, M), np.float32))
  with pytest.raises(ValueError, match="logit_fn"):
    rff.sampled_logits(lambda h, i: jnp.zeros((B,)), h, t, ids, np.zeros((B, M), np.float32))


# ------------------------------------------------------------------------------------------- donation
@functools.lru_cache(maxsize=None)
def _make_step(name):
  """(sampler, optax.adam, a jitted training step that donates params, optimizer state and sampler state)."""
  sampler = _sampler(name)
  opt = optax.adam(5e-2)

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(C, opt_state, sstate, h, t, key):
    ids, log_q = sampler.sample(sstate, key, rff.normalize(h), M)

    def loss(C):
      logits = rff.sampled_logits(rff.cosine_logit_fn(C, 5.0), h, t, ids, log_q + jnp.log(float(M)))
      return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.zeros_like(t)).mean()

    g = jax.grad(loss)(C)
    upd, opt_state = opt.update(g, opt_state, C)
    C = optax.apply_updates(C, upd)
    return C, opt_state, rff.refresh(sampler, sstate, C), ids

  return sampler, opt, step


@pytest.mark.parametrize("name", ["unigram", "rff"])  # closure arrays (unigram's init) and a tree state
def test_donated_sampler_state_survives_steps_and_reinit(name):
  C0, h, t = _data(6)
  sampler, opt, step = _make_step(name)
  for _ in range(2):  # a second run re-inits from the same sampler: init must return fresh arrays
    C = jnp.asarray(C0)
    opt_state, sstate = opt.init(C), sampler.init(C)
    for i in range(3):
      C, opt_state, sstate, _ = step(C, opt_state, sstate, h, t, jax.random.key(i))
    assert np.isfinite(np.asarray(C)).all()


# ------------------------------------------------------------------------------------------- Adam + refresh
def test_adam_with_refresh_keeps_the_tree_equal_to_a_rebuild():
  C0, _, _ = _data(7)
  sampler, opt, step = _make_step("rff")
  C = jnp.asarray(C0)
  opt_state, sstate = opt.init(C), sampler.init(C)
  old = sampler.init(C)  # the pre-issue-26 practice: sampler.update on the classes each step touched
  r = np.random.default_rng(8)
  for i in range(8):
    h = r.normal(size=(B, DIM)).astype(np.float32)
    t = r.integers(0, N, size=B).astype(np.int32)
    C, opt_state, sstate, ids = step(C, opt_state, sstate, h, t, jax.random.key(i))
    old = sampler.update(old, jnp.concatenate([ids.ravel(), jnp.asarray(t)]), C)
  ref = sampler.init(C).tree
  rel = float(jnp.max(jnp.abs(sstate.tree.nodes - ref.nodes)) / jnp.max(jnp.abs(ref.nodes)))
  assert rel <= 1e-4, rel
  # Touched-row updates leave stale leaves: Adam keeps moving rows whose gradient is zero (its moments).
  P = ref.num_buckets
  leaf_err = np.abs(np.asarray(old.tree.nodes[P:P + N] - ref.nodes[P:P + N])).max(-1)
  assert (leaf_err > 1e-3 * float(jnp.max(jnp.abs(ref.nodes)))).mean() > 0.05


# ------------------------------------------------------------------------------------------- unnormalised h
# exact and quadratic share rff's flag (samplers._flag / _flag_unit); the bucketed tree has its own sample path.
@pytest.mark.parametrize("name", ["rff", "rff_bucket"])
def test_unnormalised_queries_flagged_under_jit(name):
  C, h, _ = _data(9)
  sampler = _sampler(name)
  state = sampler.init(C)
  hn = np.asarray(rff.normalize(h))
  hb = hn.copy()
  hb[2] *= 3.0  # one unnormalised row
  with pytest.raises(ValueError, match="h"):
    sampler.sample(state, jax.random.key(0), hb, M)
  f = jax.jit(lambda h: sampler.sample(state, jax.random.key(0), h, M))
  ids, lq = f(hb)
  assert np.isnan(np.asarray(lq[2])).all() and np.isfinite(np.asarray(lq)[[0, 1, 3]]).all()
  assert ((np.asarray(ids) >= 0) & (np.asarray(ids) < N)).all()
  _, lq_shared = jax.jit(lambda h: sampler.sample(state, jax.random.key(0), h, M, shared=True))(hb)
  assert np.isnan(np.asarray(lq_shared)).all()
  lp = jax.jit(lambda h: sampler.log_probs(state, h))(hb)
  assert np.isnan(np.asarray(lp[2])).all() and np.isfinite(np.asarray(lp[0])).all()
