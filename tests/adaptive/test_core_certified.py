"""AdaptiveSoftmax's certified mode: the (epsilon, delta) guarantee on friendly and hard inputs, no tuning.

Each statistical test runs 100 *distinct* seeded problems x 5 seeds = 500 runs and asserts
success >= 1 - delta with a one-sided 99% Clopper-Pearson lower bound. Success = the top-k set is right
and every returned probability is within epsilon * p (`tuning.success_mask`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asoftmax import adaptive, stats
from asoftmax.adaptive import core, synthetic

N_PROBLEMS, SEEDS = 100, 5

# The suite compiles at XLA:CPU's optimization level 0 (tests/conftest.py: its programs are compile-bound). These
# loops run one program hundreds of times (t-distributed generators, the adaptive call), where level 0 code is up
# to 9x slower (heavy-tailed 100 x 1000 draw: 0.36 s vs 0.04 s), so they compile that one program at level 3.
_OPTIMIZED = {"xla_backend_optimization_level": 3}


@functools.cache
def _maker(family: synthetic.Family):
  return jax.jit(family.make, compiler_options=None if family in _COMPILE_BOUND else _OPTIMIZED)


# Problem p of a family is `make(key(10_000 + p))` in every test of this file. The heavy-tailed family's 100 problems
# are drawn once per process (40 MB): its Student-t(2.5) draws (`jax.random.t`'s gamma rejection sampler, ~75 ms per
# 100 x 1000 problem at level 3) were ~7.5 s of each of the three tests that use it (`make test` runs a module's tests
# in one worker: tests/conftest.py, scheduling).
@functools.lru_cache(maxsize=100)
def _heavy_tailed_problem(p: int):
  return _maker(FAMILIES["heavy_tailed"])(jax.random.key(10_000 + p))


def problem(family: synthetic.Family, p: int):
  """(A, x) of problem `p` of `family`: `family.make(jax.random.key(10_000 + p))`, compiled at level 3."""
  if family is FAMILIES["heavy_tailed"]:
    return _heavy_tailed_problem(p)
  return _maker(family)(jax.random.key(10_000 + p))


def _adaptive_call(key, A, X, options):
  return adaptive.adaptive_softmax(key, A, X, **dict(options), exact_below=0)


_adaptive = jax.jit(_adaptive_call, static_argnames=("options",), compiler_options=_OPTIMIZED)
_adaptive_level0 = jax.jit(_adaptive_call, static_argnames=("options",))  # for the families in _COMPILE_BOUND


@jax.jit
def _exact_logits(A, X):
  """`adaptive.exact_logits_batched(A, X)` (the same float32 product) as one compiled program: the library
  function builds a new `jax.jit` per call, which re-traces and re-compiles (~20 ms, 2-3 s per 100 problems).
  `success_counts` checks on its first problem that both agree exactly."""
  return X @ A.T


def success_counts(family: synthetic.Family, *, delta: float, epsilon: float = 0.3, n_problems: int = N_PROBLEMS,
                   seeds: int = SEEDS, **options):
  """(successes, identified, trials, mean samples / dense) over `n_problems` x `seeds` runs."""
  ok_total = ident_total = trials = 0
  frac = []
  opts = dict(family.options)
  opts.update(options, k=family.k, epsilon=epsilon, delta=delta)
  opts = tuple(sorted(opts.items()))
  for p in range(n_problems):
    A, x = problem(family, p)
    X = jnp.tile(x, (seeds, 1))
    res = (_adaptive_level0 if family in _COMPILE_BOUND else _adaptive)(jax.random.key(p), A, X, opts)
    logits = np.asarray(_exact_logits(A, X), np.float32)
    if p == 0:
      np.testing.assert_array_equal(logits, adaptive.exact_logits_batched(A, X))
    ident, ok = adaptive.success_mask(res, logits, epsilon)
    ok_total += int(ok.sum())
    ident_total += int(ident.sum())
    trials += seeds
    frac.append(np.asarray(res.samples) / (A.shape[0] * A.shape[1]))
  return ok_total, ident_total, trials, float(np.mean(frac))


def assert_pac(family, delta, **options):
  ok, ident, trials, frac = success_counts(family, delta=delta, **options)
  lower = stats.binomial_lower_bound(ok, trials, confidence=0.99)
  assert lower >= 1 - delta, f"success {ok}/{trials} (identified {ident}), 99% lower bound {lower:.3f}"
  return frac


FAMILIES = synthetic.families(n=100, d=1000)


def test_gaussian_planted():
  """Planted-gap Gaussian rows (the friendly family)."""
  assert_pac(FAMILIES["gaussian_planted"], 0.1)


def test_heavy_tailed():
  """Student-t(2.5) entries in A and x, n = 100, d = 1000.

  Measured on the code before certified mode (paper radius, fudge 1, the default then), same 500 runs:
  success 0.720 (360/500; identification 0.772), 99% lower bound 0.671: this test failed.
  """
  assert_pac(FAMILIES["heavy_tailed"], 0.1)


def test_student_t3_planted():
  """Student-t(3) rows and query with a planted top-1 gap of 1.

  Measured on the code before certified mode (paper radius, fudge 1), same 500 runs: success 0.812 (406/500).
  """
  assert_pac(FAMILIES["student_t3_planted"], 0.1)


def test_dominant_coordinate():
  """One coordinate of x multiplied by 200.

  Measured on the code before certified mode (paper radius, fudge 1, the default then), same 500 runs:
  success 0.846 (423/500; identification 0.886), 99% lower bound 0.805: this test failed.
  """
  assert_pac(FAMILIES["dominant_coordinate"], 0.1)


def test_sparse_query():
  """90 % of the query's coordinates are zero."""
  assert_pac(FAMILIES["sparse_query"], 0.1)


def test_near_tie_at_kth_place():
  """k = 3 with the 3rd and 4th logits 0.01 apart."""
  assert_pac(FAMILIES["near_tie_k3"], 0.1)


# The library's n >> d family is 50,000 x 64; `make test-slow` checks it at delta = 0.01
# (test_every_family_at_delta_001). The default suite checks the same planted problem at 4,000 x 32 (n / d = 125):
# drawing 100 problems of 3.2 M entries was most of this test's 41 s (cold, one core; 23 s at 10,000 x 64), and at
# every size the algorithm ends up reading every product (mean samples / dense = 1.0, measured). At 4,000 x 32 the
# test is compile-bound (four survivor buffers, 4,000 ... 62): its two programs are compiled at level 0, as the rest
# of the suite (measured, one core, empty compile cache: 10,000 x 64 at level 3 11.2 s, 4,000 x 32 at level 3 8.2 s,
# at level 0 6.8 s).
N_MUCH_LARGER_THAN_D = synthetic.Family(lambda key: synthetic.planted_problem(key, 4_000, 32))
_COMPILE_BOUND = (N_MUCH_LARGER_THAN_D,)


def test_n_much_larger_than_d():
  """4,000 x 32 (few coordinates, many arms); 100 distinct problems x 5 seeds."""
  assert_pac(N_MUCH_LARGER_THAN_D, 0.1)


def test_k5():
  assert_pac(FAMILIES["planted_k5"], 0.1)


def test_warmup_1():
  """A warm-up of one pull keeps the guarantee (certified intervals need no variance estimate to be valid)."""
  assert_pac(FAMILIES["warmup_1"], 0.1)


def test_estimated_winners_keep_epsilon():
  """With exact_winners=False the winners' logits are estimated and the probabilities are still within epsilon."""
  assert_pac(FAMILIES["heavy_tailed"], 0.1, exact_winners=False, warmup=16)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_at_delta_001(name):
  assert_pac(FAMILIES[name], 0.01)


@functools.partial(jax.jit, static_argnames=("cfg",), compiler_options=_OPTIMIZED)
@functools.partial(jax.vmap, in_axes=(0, None, None, None))
def _all_intervals(key, A, x, cfg):
  """(L, n) lower and upper bounds of every arm at every level (what the algorithm may ever use), per key."""
  prep = core.prepare_matrix(A)
  P = core._make_plan(key, x, prep.col_l1, prep.col_max, cfg)
  L = len(cfg.levels)
  log_terms = (jnp.log(4.0 * cfg.n * L / cfg.delta), jnp.log(20.0 * cfg.n * L / cfg.delta))
  stats_at = lambda level: core._level_stats(prep.A, level, P, 1.0, log_terms, cfg)[1:]  # noqa: E731
  return jax.lax.map(stats_at, jnp.arange(L, dtype=jnp.int32))


@pytest.mark.parametrize("name", ["heavy_tailed", "dominant_coordinate", "gaussian_planted"])
def test_every_interval_holds_simultaneously(name):
  """The union-bound event itself: on >= 1 - delta of queries, *every* interval (all arms, all levels) holds.

  100 distinct problems x 3 seeds (the problems of the success tests above); each interval is checked against the
  float64 logit.
  """
  delta = 0.1
  fam = FAMILIES[name]
  bad = trials = 0
  keys = jax.vmap(jax.random.key)(jnp.arange(3))  # seeds 0, 1, 2 for every problem (vmapped)
  for p in range(100):
    A, x = problem(fam, p)
    mu = np.asarray(A, np.float64) @ np.asarray(x, np.float64)
    cfg = core.make_config(*A.shape, k=fam.k, delta=delta)
    lo, hi = map(np.asarray, _all_intervals(keys, A, x, cfg))  # (3, L, n) each
    bad += int(((lo > mu) | (hi < mu)).any(axis=(1, 2)).sum())
    trials += 3
  upper = 1 - stats.binomial_lower_bound(trials - bad, trials, confidence=0.99)
  assert upper <= delta, f"{bad}/{trials} queries had an interval miss its logit"


def test_user_jit_and_vmap():
  """`jax.jit(lambda x: adaptive_softmax(key, A, x))` works and agrees with the eager call; results are pytrees.
  (The problem of tests/adaptive/test_core_jit.py, whose eager single-query call is the same program.)"""
  A, x = synthetic.planted_problem(jax.random.key(0), 40, 300)
  key = jax.random.key(1)
  eager = adaptive.adaptive_softmax(key, A, x, exact_below=0)
  jitted = jax.jit(lambda A, x: adaptive.adaptive_softmax(key, A, x, exact_below=0))(A, x)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  X = jnp.stack([x, -x, 2 * x])
  keys = jax.random.split(key, 3)
  vm = jax.jit(jax.vmap(lambda k, x: adaptive.adaptive_softmax(k, A, x, exact_below=0)))(keys, X)
  batched = adaptive.adaptive_softmax(key, A, X, exact_below=0)
  np.testing.assert_array_equal(np.asarray(vm.indices), np.asarray(batched.indices))
  np.testing.assert_allclose(np.asarray(vm.probs), np.asarray(batched.probs), rtol=1e-5)


def test_phase_samples_add_up_and_winners_exact():
  A, x = synthetic.planted_problem(jax.random.key(3), 200, 2000, k=2)
  X = jnp.stack([x, x * 1.5])
  for mode in ("certified", "paper"):
    res = adaptive.adaptive_softmax(jax.random.key(4), A, X, k=2, mode=mode, exact_below=0)
    phases = np.asarray(res.phase_samples)
    assert phases.shape == (2, len(core.PHASES)) and (phases >= 0).all()
    np.testing.assert_array_equal(phases.sum(1), np.asarray(res.samples))
    assert (phases[:, 0] == 200 * res_warmup(A, 0.1)).all()
    exact = np.asarray(X @ A.T)
    np.testing.assert_allclose(np.asarray(res.logits), np.take_along_axis(exact, np.asarray(res.indices), 1),
                               rtol=1e-5, atol=1e-5)


def res_warmup(A, delta):
  return core.default_warmup(A.shape[0], A.shape[1], delta)


def test_paper_mode_estimator_is_unbiased():
  """Paper mode's Horvitz-Thompson estimate at a fixed level averages to the exact logit.

  The inclusion probabilities must use `log w_j - t`, not the perturbed key (a bug in the first round's
  code: the estimate of a logit of 1.0 came out 0.004 on the paper's toy problem at m = 32, d = 10^4).
  """
  A, x = synthetic.toy_problem(jax.random.key(0), 5, 2000)
  prep = core.prepare_matrix(A)
  cfg = core.make_config(5, 2000, mode="paper", warmup=64)

  @jax.jit
  @jax.vmap
  def estimate(key):
    P = core._make_plan(key, x, prep.col_l1, prep.col_max, cfg)
    return core._level_stats(prep.A, jnp.int32(0), P, 1.0, 1.0, cfg)[0]

  ests = np.asarray(estimate(jax.vmap(jax.random.key)(jnp.arange(400))))  # 400 seeded plans
  exact = np.asarray(A @ x)
  se = ests.std(0) / np.sqrt(len(ests))
  assert (np.abs(ests.mean(0) - exact) < 4 * se + 1e-4).all(), (ests.mean(0), exact, se)


@pytest.mark.parametrize("warmup", [0, -5, 1.5, 1001, True])
def test_warmup_validated(warmup):
  A = jnp.ones((4, 1000))
  with pytest.raises(ValueError, match="warmup"):
    adaptive.adaptive_softmax(jax.random.key(0), A, jnp.ones((1000,)), warmup=warmup, exact_below=0)


def test_fudge_factors_are_paper_mode_only():
  A = jnp.ones((4, 10))
  with pytest.raises(ValueError, match="fudge_bandit and fudge_z apply to mode='paper'"):
    adaptive.adaptive_softmax(jax.random.key(0), A, jnp.ones((10,)), fudge_bandit=0.5, exact_below=0)
  with pytest.raises(ValueError, match="mode must be one of"):
    adaptive.adaptive_softmax(jax.random.key(0), A, jnp.ones((10,)), mode="fast", exact_below=0)
