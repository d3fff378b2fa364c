"""AdaptiveSoftmax under the user's `jax.jit` (issue 25): traced bad values come back flagged (NaN probabilities,
`certified=False`), never as a confident answer; numpy weights closed over work; `grad` and bad keys/options
get clear errors. The code of e2de223 failed the first five: a traced beta < 0 or paper-mode fudge <= 0 gave a
wrong top-1 with certified=True, a numpy A closed over raised TracerArrayConversionError, grad raised an
undocumented while_loop error, key=0 an unrelated TypeError."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asoftmax import adaptive
from asoftmax.adaptive import synthetic

KEY = jax.random.key(1)


@pytest.fixture(scope="module")
def problem():
  """(A, x, prepared A): the 40 x 300 planted problem of these tests (drawn when a test of this module first runs,
  not when pytest imports it: every xdist worker imports every module)."""
  A, x = synthetic.planted_problem(jax.random.key(0), 40, 300)
  return A, x, adaptive.prepare_matrix(A)


@pytest.mark.parametrize("mode", ["certified", "paper"])
def test_traced_scalar_out_of_range_is_flagged(mode, problem):
  """One compiled call per mode; each scalar in turn out of range (NaN too), the others valid."""
  _, X, PREP = problem
  f = jax.jit(lambda s, x: adaptive.adaptive_softmax(KEY, PREP, x, mode=mode, epsilon=s[0], beta=s[1],
                                                     **({"fudge_bandit": s[2], "fudge_z": s[3]} if mode == "paper" else {}), exact_below=0))
  valid = np.array([0.3, 1.0, 1.0, 1.0], np.float32)
  good = f(jnp.asarray(valid), X)
  assert bool(good.certified) and np.isfinite(np.asarray(good.probs)).all()
  cases = [(0, 1.5), (0, 0.0), (1, -1.0), (1, np.nan)] + ([(2, -0.5), (3, 0.0), (2, np.inf)] if mode == "paper" else [])
  for i, v in cases:
    s = valid.copy()
    s[i] = v
    res = f(jnp.asarray(s), X)
    assert not bool(res.certified), (i, v)
    assert np.isnan(np.asarray(res.probs)).all() and np.isnan(float(res.log_z)), (i, v)


@pytest.mark.parametrize("shared", [False, True])
def test_non_finite_query_under_jit_is_flagged_per_query(shared, problem):
  _, X, PREP = problem
  Xb = jnp.stack([X, X.at[3].set(jnp.nan), X.at[7].set(jnp.inf)])
  res = jax.jit(lambda x: adaptive.adaptive_softmax(KEY, PREP, x, shared_order=shared, exact_below=0))(Xb)
  cert = np.asarray(res.certified)
  if not shared:
    assert cert[0] and np.isfinite(np.asarray(res.probs[0])).all()
  assert not cert[1:].any() and np.isnan(np.asarray(res.probs[1:])).all()


def test_numpy_matrix_closed_over_by_jit(problem):
  A, X, _ = problem
  A_np, x_np = np.asarray(A), np.asarray(X)
  eager = adaptive.adaptive_softmax(KEY, A_np, x_np, exact_below=0)
  jitted = jax.jit(lambda x: adaptive.adaptive_softmax(KEY, A_np, x, exact_below=0))(jnp.asarray(x_np))
  np.testing.assert_array_equal(np.asarray(eager.indices), np.asarray(jitted.indices))
  np.testing.assert_allclose(np.asarray(eager.probs), np.asarray(jitted.probs), rtol=1e-6)


def test_grad_raises_a_clear_error(problem):
  _, X, PREP = problem
  with pytest.raises(TypeError, match="not differentiable"):
    jax.grad(lambda x: adaptive.adaptive_softmax(KEY, PREP, x, exact_below=0).probs[0])(X)


@pytest.mark.parametrize("key", [0, np.uint32(3), "key", jnp.zeros((3,), jnp.uint32)])
def test_key_must_be_a_prng_key(key, problem):
  _, X, PREP = problem
  with pytest.raises(ValueError, match="key must be a PRNG key"):
    adaptive.adaptive_softmax(key, PREP, X, exact_below=0)


@pytest.mark.parametrize("name", ["shared_order", "exact_winners", "exact_rows", "check_finite"])
def test_boolean_options_must_be_bools(name, problem):
  _, X, PREP = problem
  with pytest.raises(ValueError, match=name):
    adaptive.adaptive_softmax(KEY, PREP, X, **{name: "yes"}, exact_below=0)


def test_legacy_uint32_key_is_accepted():
  from asoftmax import checks
  key = jax.random.PRNGKey(1)
  assert checks.prng_key("key", key) is key
