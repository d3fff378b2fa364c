"""Regression tests for the rff failures of issue 14 (each failed on the code before its fix).

Under `jax.jit` values cannot be checked, so the contract is the validity flag of `asoftmax/checks.py`: a NaN in a
floating output, ids kept in range, out-of-range update ids dropped.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asoftmax import rff

N, D = 50, 8


def _classes(seed=0):
  return rff.normalize(jax.random.normal(jax.random.key(seed), (N, D)))


SAMPLERS = {
    "rff": lambda: rff.rff_sampler(jax.random.key(3), 32, 2.0),
    "quadratic": lambda: rff.quadratic_sampler(10.0, 4),
    "exact": lambda: rff.exact_sampler(4.0),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_update_with_negative_id_leaves_the_proposal_intact(name):
  """`update(ids=[-1])` under jit: before the fix the rff tree's q summed to 0.956 and log q moved by up to 21 nats.

  Outside jit the id is rejected with a ValueError naming `ids`; under jit it is dropped (the state is unchanged).
  """
  s = SAMPLERS[name]()
  C = _classes()
  state = s.init(C)
  C2 = C.at[-1].set(-C[-1])  # class n-1 moved: a wrapped -1 would write it
  h = _classes(1)[:4]
  with pytest.raises(ValueError, match="ids"):
    s.update(state, jnp.array([-1], jnp.int32), C2)
  new = jax.jit(s.update)(state, jnp.array([-1], jnp.int32), C2)
  lq0, lq1 = np.asarray(s.log_probs(state, h)), np.asarray(s.log_probs(new, h))
  np.testing.assert_allclose(np.exp(lq1).sum(-1), 1.0, rtol=1e-4)
  np.testing.assert_allclose(lq1, lq0, atol=1e-5)


def test_tree_update_negative_bucket_id_rejected_or_dropped():
  tree = rff.build_tree(jnp.ones((8, 3)))
  delta = jnp.ones((1, 3))
  with pytest.raises(ValueError, match="bucket_ids"):
    rff.tree_update(tree, jnp.array([-1]), delta)
  new = jax.jit(rff.tree_update)(tree, jnp.array([-1]), delta)
  np.testing.assert_array_equal(np.asarray(new.nodes), np.asarray(tree.nodes))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_nan_query_under_jit_is_flagged_with_ids_in_range(name):
  """A NaN query under jit: before the fix the rff sampler returned class 63 of 50 with a finite-looking result.

  Now every id stays in [0, n) and the query's log q is NaN (the flag); the other queries are unaffected.
  """
  s = SAMPLERS[name]()
  state = s.init(_classes())
  h = _classes(1)[:3].at[1, 0].set(jnp.nan)
  ids, lq = jax.jit(s.sample, static_argnums=(3,))(state, jax.random.key(0), h, 64)
  ids, lq = np.asarray(ids), np.asarray(lq)
  assert ids.min() >= 0 and ids.max() < N, (ids.min(), ids.max())
  assert np.isnan(lq[1]).all()
  assert np.isfinite(lq[[0, 2]]).all()
  with pytest.raises(ValueError, match="h"):
    s.sample(state, jax.random.key(0), np.asarray(h), 64)


def test_losses_flag_out_of_range_ids_under_jit():
  """A target or sampled id of -1 under jit: before the fix the gather wrapped/clamped and a finite loss came back."""
  C = _classes()
  h, t = C[:3], jnp.arange(3)
  loss = jax.jit(rff.full_softmax_loss, static_argnums=(3,))(h, C, t.at[0].set(-1), 4.0)
  assert np.isnan(loss[0]) and np.isfinite(loss[1:]).all()
  ids = jnp.arange(4).at[2].set(N)
  loss = jax.jit(lambda i: rff.corrected_sampled_loss(h, C, t, i, jnp.log(4 / N), 4.0))(ids)
  assert np.isnan(loss).all()  # shared ids: every row used the bad id
  with pytest.raises(ValueError, match="ids"):
    rff.corrected_sampled_loss(h, C, t, ids, jnp.log(4 / N), 4.0)
  with pytest.raises(ValueError, match="targets"):
    rff.full_softmax_loss(h, C, t.at[0].set(N), 4.0)


def test_distribution_metrics_rejects_bad_class_and_nan_log_q():
  logits = jnp.zeros((2, 5))
  lq = jnp.full((2, 5), -np.log(5.0))
  with pytest.raises(ValueError, match="t"):
    rff.distribution_metrics(logits, lq, jnp.array([0, 5]))
  with pytest.raises(ValueError, match="log_q"):
    rff.distribution_metrics(logits, lq.at[0, 0].set(jnp.nan), jnp.array([0, 1]))


def test_distribution_metrics_requires_a_normalised_log_q():
  """A log q whose rows do not sum to 1 gives meaningless metrics (a negative KL): a ValueError naming log_q for
  concrete input, NaN metrics for the row under jit."""
  logits = jnp.array([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
  lq = jax.nn.log_softmax(logits, -1)
  t = jnp.array([1, 2])
  good = rff.distribution_metrics(logits, lq, t)
  assert np.all(np.asarray(good.kl) >= -1e-6) and np.isfinite(np.asarray(good.kl)).all()
  unnorm = lq.at[0].add(0.5)  # row 0 sums to e^0.5
  with pytest.raises(ValueError, match="log_q"):
    rff.distribution_metrics(logits, unnorm, t)
  r = jax.jit(rff.distribution_metrics)(logits, unnorm, t)
  assert np.isnan(np.asarray(r.kl)[0]) and np.isnan(np.asarray(r.tv)[0]) and np.isfinite(np.asarray(r.kl)[1])
