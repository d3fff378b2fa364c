"""Tests for asoftmax.adaptive: exactness at full budget, PAC success statistics, jit/vmap, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asoftmax import adaptive, stats
from asoftmax.adaptive import core, synthetic


def _np_topk(A, x, k, beta=1.0):
  mu = beta * (np.asarray(A, np.float64) @ np.asarray(x, np.float64))
  idx = np.argsort(-mu)[:k]
  log_z = np.log(np.exp(mu - mu.max()).sum()) + mu.max()
  return idx, np.exp(mu[idx] - log_z), log_z


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("order", ["importance", "uniform"])
@pytest.mark.parametrize("mode", ["certified", "paper"])
def test_full_budget_equals_exact(k, order, mode):
  """With a warm-up of d pulls every estimate is exact: results equal the numpy reference."""
  n, d = 40, 64
  A = jax.random.normal(jax.random.key(0), (n, d)) / 4
  x = jax.random.normal(jax.random.key(1), (d,))
  res = adaptive.adaptive_softmax(jax.random.key(2), A, x, k=k, order=order, warmup=d, mode=mode, exact_below=0)
  idx, p, log_z = _np_topk(A, x, k)
  np.testing.assert_array_equal(np.asarray(res.indices), idx)
  np.testing.assert_allclose(np.asarray(res.probs), p, rtol=2e-5)
  np.testing.assert_allclose(float(res.log_z), log_z, rtol=1e-5)
  assert int(res.samples) == n * d
  ex = adaptive.softmax_topk(A, x, k)
  np.testing.assert_array_equal(np.asarray(ex.indices), idx)
  np.testing.assert_allclose(np.asarray(ex.probs), p, rtol=2e-5)


# Several tests below need "some sampled problem" for a claim that holds at any size; they share this shape and
# the static configuration (k = 2, one query or a batch of 6, certified, exact_below=0), so that they share one
# compiled program of the core (each distinct (n, d, batch, options) is a multi-second compile).
N_SHARED, D_SHARED = 50, 300


def test_sparse_query_costs_at_most_n_nnz():
  """Zero coordinates are never read: a query with nnz(x) = 10 costs at most n * 10 samples, exactly."""
  n, d = N_SHARED, D_SHARED
  A = jax.random.normal(jax.random.key(0), (n, d))
  x = jnp.zeros((d,)).at[jnp.arange(0, 100, 10)].set(jax.random.normal(jax.random.key(1), (10,)))
  res = adaptive.adaptive_softmax(jax.random.key(2), A, x, k=2, exact_below=0)
  idx, p, _ = _np_topk(A, x, 2)
  assert int(res.samples) <= n * 10
  np.testing.assert_array_equal(np.asarray(res.indices), idx)
  np.testing.assert_allclose(np.asarray(res.probs), p, rtol=1e-4)


def test_fallback_trades_rounds_for_one_exact_product():
  """With exact_below > 0 (the default), when the warm-up's survivors are predicted to read more than one `A @ x`
  costs, the call finishes with that product: on a planted problem that certified mode reads in full round by round
  no round runs and the answer is exact; on Fig. 2's gaussian (elimination works) it does not fire, and reading the
  warm-up's leader in full (`core._leaders`, with exact winners) costs no more samples than without the fallback."""
  A, x = synthetic.planted_problem(jax.random.key(0), 100, 40_000, k=1)
  ex = adaptive.softmax_topk(A, x, k=1)
  fb = adaptive.adaptive_softmax(jax.random.key(1), A, x, exact_below=1)  # fallback on, the problem not "small"
  no = adaptive.adaptive_softmax(jax.random.key(1), A, x, exact_below=0)
  assert int(fb.rounds) == 0 < int(no.rounds)
  for r in (fb, no):  # exact products; the probability is the bracket's (float32 rounding margin at d = 40,000)
    assert int(r.indices[0]) == int(ex.indices[0]) and bool(r.certified)
    np.testing.assert_allclose(float(r.probs[0]), float(ex.probs[0]), rtol=2e-3)
  A, x = adaptive.gaussian_problem(jax.random.key(0), 100, 40_000)  # the same shape: the same two programs
  fb = adaptive.adaptive_softmax(jax.random.key(1), A, x, exact_below=1)
  no = adaptive.adaptive_softmax(jax.random.key(1), A, x, exact_below=0)
  assert int(fb.rounds) > 0 and int(fb.samples) <= int(no.samples) < 0.2 * 100 * 40_000
  assert int(fb.indices[0]) == int(no.indices[0]) == 0


def test_elimination_keeps_the_arms_with_the_largest_lower_bounds():
  """An exact arm's bounds are one number computed twice; rounded one ulp apart (hi just below lo), the plain rule
  `hi >= k-th largest lo` eliminated every arm and the winner was arbitrary (a certified wrong answer at XLA:CPU
  optimization level 0). The k arms holding the largest lower bounds stay."""
  lo = jnp.asarray([[1.0, 0.5, 0.8, 0.2]])
  hi = jnp.asarray([[np.nextafter(np.float32(1.0), np.float32(0.0)), 0.6, 0.9, 1.5]])
  alive = jnp.asarray([[True, True, True, True]])
  np.testing.assert_array_equal(np.asarray(core._elimination_rule(lo, hi, alive, 1)), [[True, False, False, True]])
  np.testing.assert_array_equal(np.asarray(core._elimination_rule(lo, hi, alive, 2)), [[True, False, True, True]])
  dead = alive.at[0, 0].set(False)  # an eliminated arm's bound does not count
  np.testing.assert_array_equal(np.asarray(core._elimination_rule(lo, hi, dead, 1)), [[False, False, True, True]])


def test_a_prepared_matrix_with_a_short_order_is_rejected():
  """A read step slices `big_chunk(n)` positions of the extended order; a shorter extension (a PreparedMatrix from
  another version) would make XLA clamp the slice and read the wrong columns silently: rejected, naming A."""
  prep = adaptive.prepare_matrix(jnp.ones((4, 300)))
  short = prep._replace(perm=prep.perm[: 300 + 16], At=prep.At[: 300 + 16], Ap=prep.Ap[:, : 300 + 16])
  with pytest.raises(ValueError, match="A is a PreparedMatrix"):
    adaptive.adaptive_softmax(jax.random.key(0), short, jnp.ones((300,)), exact_below=0)


def test_fallback_sees_paper_mode_on_an_llm_like_head():
  """Paper mode's radii are tuned narrow, but on an LLM-like head the largest of n noisy warm-up estimates is high by
  chance: projected from it, elimination looked cheap, rounds ran and the per-round check switched after three of
  them (about twice the exact product's time). With the warm-up's leader read in full (`core._leaders`) the
  prediction's boundary is its exact logit: the fallback fires after the warm-up, no round, same answer."""
  A, X = synthetic.llm_head_problem(jax.random.key(0), 4000, 1024, 3)
  prep = adaptive.prepare_matrix(A)
  for x in X[1:]:
    ex = adaptive.softmax_topk(A, x, k=1)
    fb = adaptive.adaptive_softmax(jax.random.key(1), prep, x, mode="paper", fudge_bandit=0.2, fudge_z=0.001,
                                   exact_below=1)
    assert int(fb.rounds) == 0 and int(fb.samples) == 4000 * 1024
    assert int(fb.indices[0]) == int(ex.indices[0])
    np.testing.assert_allclose(float(fb.probs[0]), float(ex.probs[0]), rtol=1e-4)


def test_fallback_fires_where_certified_intervals_cannot_separate():
  """On an LLM-like head (a few massive hidden dimensions: the range bound R is ~100x a typical product) certified
  mode reads every product round by round; the fallback's prediction must see that after the warm-up (the radii at
  the later levels, not only their 1/sqrt(m) shrinkage) and finish with one exact product: no round, same answer."""
  A, X = synthetic.llm_head_problem(jax.random.key(0), 4000, 1024, 2)
  prep = adaptive.prepare_matrix(A)
  for x in X:
    ex = adaptive.softmax_topk(A, x, k=1)
    fb = adaptive.adaptive_softmax(jax.random.key(1), prep, x, exact_below=1)
    assert int(fb.rounds) == 0 and int(fb.samples) == 4000 * 1024
    assert int(fb.indices[0]) == int(ex.indices[0]) and bool(fb.certified)


def test_exact_arms_carry_no_rounding_margin():
  """An arm whose whole row was read is as exact as `A @ x`: the float32 margin (2u sqrt(d) sum_j |x_j| M_j, which
  heavy tails make wide) widens sampled intervals only. On a heavy-tailed problem whose call falls back to the exact
  product, the probability is the exact one (it was the margin's bracket, 3.5 % off at d = 1e5, 70x at d = 1e6)."""
  A, x = synthetic.heavy_tailed_problem(jax.random.key(0), 100, 100_000, df=2.5)
  ex = adaptive.softmax_topk(A, x, k=1)
  res = adaptive.adaptive_softmax(jax.random.key(1), A, x, exact_below=1)
  assert int(res.samples) == 100 * 100_000 and bool(res.certified)
  assert int(res.indices[0]) == int(ex.indices[0])
  np.testing.assert_allclose(float(res.probs[0]), float(ex.probs[0]), rtol=1e-4)


def test_polar_student_t_matches_the_t_distribution():
  """The large-problem Student-t sampler (Bailey's polar method) against scipy's t(2.5) CDF (KS, 200k draws), and
  the blocked (n, d) path is used above `_T_CHUNK` entries."""
  from scipy import stats as sps

  v = np.asarray(synthetic._polar_t(jax.random.key(3), 2.5, (200_000,)), np.float64)
  assert sps.kstest(v, sps.t(2.5).cdf).pvalue > 1e-3
  assert sps.kstest(v, sps.norm(scale=v.std()).cdf).pvalue < 1e-6  # the test can tell t from a normal
  A = synthetic._student_t(jax.random.key(4), 2.5, 5, synthetic._T_CHUNK // 4 + 1)  # 5 rows, blocks of 3
  assert A.shape == (5, synthetic._T_CHUNK // 4 + 1) and bool(jnp.all(jnp.isfinite(A)))
  assert not np.array_equal(np.asarray(A[0, :100]), np.asarray(A[3, :100]))


def test_small_problem_is_exact_by_default():
  """n * d <= exact_below (default `core.EXACT_BELOW`): one exact product, no rounds, exact answers; a NaN query is
  flagged; exact_below=0 samples the same problem; the exact program holds no while loop (its cost is the GEMV)."""
  n, d = N_SHARED, D_SHARED
  A, x = synthetic.planted_problem(jax.random.key(0), n, d, k=2)
  x = x.at[:7].set(0.0)
  X = jnp.stack([x, -x, x.at[20].set(jnp.nan)])
  res = adaptive.adaptive_softmax(jax.random.key(1), A, X, k=2, check_finite=False)
  for i in range(2):
    idx, p, log_z = _np_topk(A, X[i], 2)
    np.testing.assert_array_equal(np.asarray(res.indices[i]), idx)
    np.testing.assert_allclose(np.asarray(res.probs[i]), p, rtol=2e-5)
    np.testing.assert_allclose(float(res.log_z[i]), log_z, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(res.samples), [n * d] * 3)  # the GEMV computes every product
  np.testing.assert_array_equal(np.asarray(res.phase_samples[:, 0]), np.asarray(res.samples))
  np.testing.assert_array_equal(np.asarray(res.rounds), 0)
  np.testing.assert_array_equal(np.asarray(res.certified), [True, True, False])
  assert np.isnan(np.asarray(res.probs[2])).all()
  sampled = adaptive.adaptive_softmax(jax.random.key(1), A, x, k=2, exact_below=0)
  assert int(sampled.rounds) > 0  # the algorithm ran (certified mode may still read everything here)
  prep = adaptive.prepare_matrix(A)
  hlo = jax.jit(lambda v: adaptive.adaptive_softmax(jax.random.key(1), prep, v).probs).lower(x).as_text()
  assert "while" not in hlo
  assert "while" in jax.jit(lambda v: adaptive.adaptive_softmax(jax.random.key(1), prep, v, exact_below=0).probs
                            ).lower(x).as_text()
  assert core.make_config(n, d).exact and not core.make_config(n, d, exact_below=n * d - 1).exact
  with pytest.raises(ValueError, match="exact_below"):
    adaptive.adaptive_softmax(jax.random.key(1), A, x, exact_below=-1)


def _success_rate(order, k, n_problems=10, per_problem=50, n=100, d=1000, delta=0.1, epsilon=0.3):
  ok_total, ident_total, samples = 0, 0, []
  for s in range(n_problems):
    A, x = adaptive.planted_problem(jax.random.key(100 + s), n, d, k=k, gap=1.0, spread=1.0)
    X = jnp.tile(x, (per_problem, 1))
    res = adaptive.adaptive_softmax(jax.random.key(s), A, X, k=k, epsilon=epsilon, delta=delta, order=order,
                                    mode="paper", exact_below=0)
    logits = adaptive.exact_logits_batched(A, X)
    ident, ok = adaptive.success_mask(res, logits, epsilon)
    ok_total += int(ok.sum())
    ident_total += int(ident.sum())
    samples.append(np.asarray(res.samples))
  return ok_total, ident_total, n_problems * per_problem, np.concatenate(samples)


@pytest.mark.parametrize("order,k", [("importance", 1), ("importance", 3), ("uniform", 1), ("uniform", 3)])
def test_paper_mode_pac_success_over_500_seeded_queries(order, k):
  """Paper mode (fudge 1) on the friendly planted family: success >= 1 - delta, one-sided 99% Clopper-Pearson
  lower bound over 500 runs. The certified mode's tests on hard families are in tests/adaptive/test_core_certified.py."""
  delta = 0.1
  ok, ident, trials, samples = _success_rate(order, k, delta=delta)
  lower = stats.binomial_lower_bound(ok, trials, confidence=0.99)
  assert lower >= 1 - delta, f"success {ok}/{trials} (identified {ident}), 99% lower bound {lower:.3f}"
  # And it is adaptive: fewer samples than the exact n*d on these planted-gap problems.
  assert samples.mean() < 100 * 1000


def test_batched_equals_per_query_and_no_recompile():
  n, d, b = N_SHARED, D_SHARED, 6
  A = adaptive.prepare_matrix(jax.random.normal(jax.random.key(0), (n, d)) / 3)
  X = jax.random.normal(jax.random.key(1), (b, d))
  key = jax.random.key(7)
  batched = adaptive.adaptive_softmax(key, A, X, k=2, exact_below=0)
  keys = jax.random.split(key, b)
  for i in range(b):
    single = adaptive.adaptive_softmax(keys[i], A, X[i], k=2, exact_below=0)
    np.testing.assert_array_equal(np.asarray(single.indices), np.asarray(batched.indices[i]))
    np.testing.assert_allclose(np.asarray(single.probs), np.asarray(batched.probs[i]), rtol=1e-5)
    assert int(single.samples) == int(batched.samples[i])
  before = core._batched._cache_size()
  X2 = jax.random.normal(jax.random.key(3), (b, d))
  adaptive.adaptive_softmax(jax.random.key(8), A, X2, k=2, epsilon=0.2, exact_below=0)
  assert core._batched._cache_size() == before, "same shapes/static config must not recompile"


def test_same_seed_same_numbers():
  A, x = adaptive.planted_problem(jax.random.key(0), N_SHARED, D_SHARED, k=2)
  r1 = adaptive.adaptive_softmax(jax.random.key(5), A, x, k=2, exact_below=0)
  r2 = adaptive.adaptive_softmax(jax.random.key(5), A, x, k=2, exact_below=0)
  assert int(r1.samples) == int(r2.samples)
  np.testing.assert_array_equal(np.asarray(r1.probs), np.asarray(r2.probs))


def test_tuning_reduces_samples_and_keeps_success():
  # d = 1000 (was 2000): 21 calls on 60 queries at the suite's -O0 took 12 s at d = 2000; at 1000 the same claim
  # holds with more margin (measured: success 0.93 vs 0.90, gain 1.65x vs 1.18x, fudge 0.17 / 0.03).
  n, d = 100, 1000
  A, _ = adaptive.planted_problem(jax.random.key(0), n, d, k=1)
  # Queries: the planted x plus small perturbations, so problems differ slightly.
  _, x = adaptive.planted_problem(jax.random.key(0), n, d, k=1)
  X = x[None] + 0.05 * jax.random.normal(jax.random.key(1), (120, d))
  row = adaptive.tune_and_evaluate(jax.random.key(2), A, X, k=1, delta=0.1, n_tune=60, progress=False, exact_below=0)
  assert row.n_eval == 60
  assert row.fudge_bandit <= 1.0 and row.fudge_z <= 1.0
  assert row.success >= 0.9
  assert row.gain_dense > 1.0
  assert len(row.samples) == 60


A_OK = np.ones((4, 3), np.float32)
X_OK = np.ones((3,), np.float32)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(A=np.ones((4,), np.float32)), "A must have 2"),
        (dict(A=np.ones((4, 3), np.int32)), "A must have a floating dtype"),
        (dict(A=np.full((4, 3), np.nan, np.float32)), "A contains NaN"),
        (dict(A=np.full((4, 3), np.inf, np.float32)), "A contains NaN or inf"),
        (dict(x=np.ones((5,), np.float32)), "x has shape"),
        (dict(x=np.ones((3,), np.int32)), "x must have a floating dtype"),
        (dict(x=np.array([1.0, np.nan, 0.0], np.float32)), "x contains NaN"),
        (dict(x=np.ones((2, 2, 3), np.float32)), "x must have 1 or 2"),
        (dict(k=0), "k must be in"),
        (dict(k=5), "k must be in"),
        (dict(k=1.5), "k must be an integer"),
        (dict(epsilon=0.0), "epsilon must be in"),
        (dict(epsilon=1.0), "epsilon must be in"),
        (dict(delta=-0.1), "delta must be in"),
        (dict(delta=1.5), "delta must be in"),
        (dict(beta=0.0), "beta must be positive"),
        (dict(order="random"), "order must be one of"),
        (dict(warmup=0), "warmup must be in"),
        (dict(warmup=1.5), "warmup must be an integer"),
        (dict(mode="exact"), "mode must be one of"),
    ],
)
def test_bad_input_raises(kwargs, match):
  args = dict(A=A_OK, x=X_OK)
  args.update({k: v for k, v in kwargs.items() if k in ("A", "x")})
  opts = {k: v for k, v in kwargs.items() if k not in ("A", "x")}
  with pytest.raises(ValueError, match=match):
    adaptive.adaptive_softmax(jax.random.key(0), args["A"], args["x"], **opts, exact_below=0)


@pytest.mark.parametrize("n_tune,delta", [(60, 0.05), (100, 0.05), (200, 0.1), (1000, 0.01), (300, 0.01)])
def test_binomial_tuning_rule_bounds_the_failure_rate(n_tune, delta):
  """With `confidence`, the allowed tuning failures f are the most whose one-sided Clopper-Pearson bound keeps
  the success rate >= 1 - delta, and f + 1 would not (the margin rule allowed 1 of 60 at delta = 5%: on SmolLM2
  that overfit, 224/240 held out)."""
  from asoftmax.adaptive import tuning

  f = tuning.max_tuning_failures(n_tune, delta, confidence=0.95)
  assert f >= 0
  assert stats.binomial_lower_bound(n_tune - f, n_tune, 0.95) >= 1 - delta
  assert stats.binomial_lower_bound(n_tune - f - 1, n_tune, 0.95) < 1 - delta
  assert tuning.max_tuning_failures(60, 0.05) == 1 and tuning.max_tuning_failures(60, 0.05, confidence=0.95) == 0


def test_binomial_tuning_rule_too_few_queries_keeps_theory():
  """Too few tuning queries for the bound (f < 0): -1, and tune_fudge then never shrinks a radius below theory."""
  from asoftmax.adaptive import tuning

  assert tuning.max_tuning_failures(100, 0.01, confidence=0.95) == -1
  n, d = 60, 400
  A, x = adaptive.planted_problem(jax.random.key(3), n, d, k=1)
  X = x[None] + 0.05 * jax.random.normal(jax.random.key(4), (10, d))
  fb, fz = adaptive.tune_fudge(jax.random.key(5), A, X, k=1, delta=0.01, confidence=0.95, iters=2, exact_below=0)
  assert fb >= 1.0 and fz >= 1.0


@pytest.mark.parametrize("k", [1, 3])
def test_paper_normalization_at_full_budget_equals_exact(k):
  """Algorithm 2 (`normalization="paper"`) with every arm exact: log Z and the probabilities are exact."""
  n, d = 40, 64
  A = jax.random.normal(jax.random.key(0), (n, d)) / 4
  x = jax.random.normal(jax.random.key(1), (d,))
  res = adaptive.adaptive_softmax(jax.random.key(2), A, x, k=k, warmup=d, mode="paper", normalization="paper", exact_below=0)
  idx, p, log_z = _np_topk(A, x, k)
  np.testing.assert_array_equal(np.asarray(res.indices), idx)
  np.testing.assert_allclose(np.asarray(res.probs), p, rtol=2e-5)
  np.testing.assert_allclose(float(res.log_z), log_z, rtol=1e-5)


def test_paper_normalization_refines_heavy_arms_only():
  """Algorithm 2 gives extra pulls to the arms that carry the partition function's mass: with fudge_z -> 0 it
  reads nothing after identification, with fudge_z = 1 it reads more, but far from every arm to the top."""
  n, d = 300, 2000
  key = jax.random.key(5)
  A = jax.random.normal(key, (n, d)) / jnp.sqrt(d)
  x = 2.0 * A[0] / jnp.linalg.norm(A[0]) ** 2 * 4.0 + 0.3 * jax.random.normal(jax.random.key(6), (d,))
  kw = dict(mode="paper", normalization="paper", warmup=40)
  none = adaptive.adaptive_softmax(jax.random.key(1), A, x, fudge_z=1e-9, **kw, exact_below=0)
  some = adaptive.adaptive_softmax(jax.random.key(1), A, x, fudge_z=1.0, **kw, exact_below=0)
  assert int(none.phase_samples[3]) == 0
  assert int(some.phase_samples[3]) > 0
  # Light arms need no pulls: far less than refining every arm to the top would read. (0.25 under the Gumbel-top-d
  # order; the head + uniform tail order of issue 24 reads 20-28 % here over keys 0-4: 121k-132k of 470k.)
  unread_after_identification = n * d - int(some.samples) + int(some.phase_samples[3])
  assert int(some.phase_samples[3]) < 0.3 * unread_after_identification


@pytest.mark.parametrize("family", ["llm_like", "heavy_tailed"])
def test_paper_normalization_pac_success_over_distinct_queries(family):
  """Paper mode with Algorithm 2 at fudge 1 (no tuning): success >= 1 - delta, one-sided 99 % Clopper-Pearson
  lower bound over 300 distinct queries: an LLM-like head (flat softmax, top-1 p ~ U(0.2, 0.6), massive
  activations) and Student-t(2.5) rows."""
  delta, eps = 0.1, 0.3
  if family == "llm_like":
    A, X = synthetic.llm_head_problem(jax.random.key(7), 2000, 512, 300)
  else:
    A, _ = synthetic.heavy_tailed_problem(jax.random.key(8), 200, 1000, df=2.5)
    X = jax.random.t(jax.random.key(9), 2.5, (300, 1000))
  res = adaptive.adaptive_softmax(jax.random.key(10), A, X, epsilon=eps, delta=delta, mode="paper",
                                  normalization="paper", exact_below=0)
  ident, ok = adaptive.success_mask(res, adaptive.exact_logits_batched(A, X), eps)
  lower = stats.binomial_lower_bound(int(ok.sum()), ok.size, confidence=0.99)
  assert lower >= 1 - delta, f"success {int(ok.sum())}/{ok.size} (identified {int(ident.sum())}), lower {lower:.3f}"


def test_normalization_is_paper_mode_only_and_named():
  A = jnp.ones((4, 3))
  with pytest.raises(ValueError, match="normalization"):
    adaptive.adaptive_softmax(jax.random.key(0), A, jnp.ones(3), normalization="paper", exact_below=0)
  with pytest.raises(ValueError, match="normalization"):
    adaptive.adaptive_softmax(jax.random.key(0), A, jnp.ones(3), mode="paper", normalization="exactish", exact_below=0)


def test_conformal_rule_with_too_few_tuning_queries_skips_the_grid(monkeypatch):
  """Fewer than 1/delta - 1 tuning queries: the conformal factor is inf whatever the scores, so `tune_and_evaluate`
  uses the theoretical factor 1 without running the grid (it took 25 s of the LLM smoke run's 38 s)."""
  from asoftmax.adaptive import tuning

  calls = []
  monkeypatch.setattr(tuning, "conformal_fudge", lambda *a, **kw: calls.append(1) or (0.5, None))
  A, x = adaptive.planted_problem(jax.random.key(3), 30, 200, k=1)
  X = x[None] + 0.05 * jax.random.normal(jax.random.key(4), (12, 200))
  row = adaptive.tune_and_evaluate(jax.random.key(5), A, X, delta=0.1, n_tune=8, rule="conformal", progress=False,
                                   exact_below=0)
  assert not calls and row.fudge_bandit == row.fudge_z == 1.0 and "too few" in row.rule
  row = adaptive.tune_and_evaluate(jax.random.key(5), A, X, delta=0.2, n_tune=8, rule="conformal", progress=False,
                                   exact_below=0)  # rank ceil(9 * 0.8) = 8 <= 8: calibrated
  assert calls == [1] and row.fudge_bandit == row.fudge_z == 0.5 and row.rule == "conformal"
