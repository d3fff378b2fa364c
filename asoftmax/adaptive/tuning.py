"""Success checks, fudge-factor tuning by binary search, and the tune-then-evaluate protocol.

Protocol of the paper's tables (Baharav et al. 2024, Sec. 5): the two fudge factors (bandit
variance, partition-function variance) are tuned by binary search on a training split of the
queries so that success on it is >= 1 - delta; the held-out queries are then evaluated with the
tuned factors. We tune to a stricter target than 1 - delta (at most `margin * delta * n_tune`
failures) because tuning exactly to 1 - delta on 200 queries overfits (the reference
implementation misses 1 - delta on held-out queries at delta = 10% for some models).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

from asoftmax import checks, stats
from asoftmax.adaptive.core import AdaptiveResult, adaptive_softmax, prepare_matrix
from asoftmax.adaptive.exact import ExactResult, softmax_topk


def exact_logits_batched(A, X, beta: float = 1.0, chunk: int = 256) -> np.ndarray:
  """(b, n) exact logits `beta * X A^T`, computed in chunks of queries (host numpy float32).

  Args:
    A: (n, d) finite floating matrix (or a PreparedMatrix).
    X: (b, d) finite floating queries.
    beta: inverse temperature, positive.
    chunk: queries per jitted product.

  Raises:
    ValueError: naming the argument (shape, dtype, NaN/inf, beta <= 0, chunk < 1).
  """
  A = checks.floating_array("A", getattr(A, "A", A), 2)
  X = checks.floating_array("X", X, 2)
  if X.shape[1] != A.shape[1]:
    raise ValueError(f"X has shape {tuple(X.shape)} but A has shape {tuple(A.shape)}: X must be (b, {A.shape[1]})")
  beta = checks.positive("beta", beta)
  chunk = checks.int_in_range("chunk", chunk)
  A = checks.as_array(A)  # on device once, not once per chunk
  out = []
  for i in range(0, X.shape[0], chunk):
    out.append(np.asarray(_scaled_products(A, X[i : i + chunk], beta), np.float32))
  return np.concatenate(out, 0)


@jax.jit
def _scaled_products(A, Xc, beta):
  """`beta * Xc A^T` in at least float32, one compiled program per shape (a fresh `jax.jit(lambda)` per call
  re-traced and re-compiled on every call; the casts in here: eagerly, each compiled once per shape)."""
  ct = jnp.promote_types(A.dtype, jnp.float32)
  return beta * (Xc.astype(ct) @ A.astype(ct).T)


def _queries(name: str, X, d: int):
  """Checks `X` is a finite floating (b, d) query matrix; returns it unchanged."""
  checks.floating_array(name, X, 2)
  if X.shape[1] != d:
    raise ValueError(f"{name} has shape {tuple(X.shape)} but A has {d} columns: {name} must be (b, {d})")
  return X


def success_mask(res: AdaptiveResult, logits: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
  """Per-query success of a batched result against exact logits.

  Args:
    res: batched AdaptiveResult with indices (b, k), probs (b, k).
    logits: (b, n) exact logits.
    epsilon: multiplicative tolerance on each probability.

  Returns:
    (identified, success): (b,) bool arrays. identified = the top-k index *set* is right;
    success = identified and every returned probability within `epsilon * p`.

  Raises:
    ValueError: `logits` not a finite floating (b, n) array matching `res` (b queries, n >= k arms), or
      `epsilon` not in (0, 1).
  """
  idx = np.asarray(res.indices)
  checks.floating_array("logits", logits, 2)
  if idx.ndim != 2:
    raise ValueError(f"res must be a batched result with indices (b, k), got shape {idx.shape}")
  if logits.shape[0] != idx.shape[0] or logits.shape[1] < idx.shape[1] or logits.shape[1] <= int(idx.max()):
    raise ValueError(f"logits must be (b, n) = ({idx.shape[0]}, n) with every returned index < n, got shape "
                     f"{tuple(logits.shape)}")
  epsilon = checks.open_unit("epsilon", epsilon)
  logits = np.asarray(logits, np.float64)
  k = idx.shape[1]
  true_top = np.argpartition(-logits, k - 1, axis=1)[:, :k] if k < logits.shape[1] else np.tile(np.arange(k), (len(idx), 1))
  # A tie at the k-th place makes either choice correct: compare logit values, not ids.
  kth = np.take_along_axis(logits, true_top, 1).min(1)
  got = np.take_along_axis(logits, idx, 1)
  distinct = np.array([len(set(r)) == k for r in idx])
  identified = distinct & (got >= kth[:, None]).all(1)
  log_z = logsumexp(logits, axis=1)
  p_true = np.exp(got - log_z[:, None])
  close = (np.abs(np.asarray(res.probs, np.float64) - p_true) <= epsilon * p_true).all(1)
  return identified, identified & close


def max_tuning_failures(n_tune: int, delta: float, *, margin: float = 0.5, confidence: float | None = None) -> int:
  """How many of `n_tune` tuning queries may fail at the tuned fudge factors.

  Two rules:
  * margin (default, `confidence=None`): `floor(margin * delta * n_tune)`, a fixed fraction of delta.
  * binomial (`confidence` in (0, 1)): the largest f such that the one-sided Clopper-Pearson lower bound on the
    success probability, at `confidence`, from `n_tune - f` successes in `n_tune` is still >= 1 - delta. This
    ties the allowance to what the tuning set can show: 0 of 60 at delta = 5 % (the margin rule allows 1, which
    overfit on SmolLM2: 224/240 held out), 1 of 100, 12 of 200 at delta = 10 % (the margin rule: 10).

  Args:
    n_tune: number of tuning queries, >= 1.
    delta: target failure probability in (0, 1).
    margin: the margin rule's fraction of delta, > 0.
    confidence: the binomial rule's confidence, or None for the margin rule.

  Returns:
    f >= 0, or -1 when even 0 failures cannot show a failure rate <= delta (binomial rule; too few queries).

  Example:
    >>> from asoftmax.adaptive.tuning import max_tuning_failures
    >>> max_tuning_failures(60, 0.05), max_tuning_failures(60, 0.05, confidence=0.95)
    (1, 0)
  """
  n_tune = checks.int_in_range("n_tune", n_tune)
  delta = checks.open_unit("delta", delta)
  if confidence is None:
    return int(math.floor(checks.positive("margin", margin) * delta * n_tune))
  confidence = checks.open_unit("confidence", confidence)
  f = -1
  while f + 1 < n_tune and stats.binomial_lower_bound(n_tune - f - 1, n_tune, confidence) >= 1.0 - delta:
    f += 1
  return f


def _search(evaluate: Callable[[float], int], max_failures: int, lo: float, hi: float, iters: int) -> float:
  """Smallest fudge in [lo, hi] (log-space bisection) with evaluate(fudge) <= max_failures.

  Assumes failures shrink as the fudge grows. Starts at 1 (the theoretical radius): if that passes,
  searches down in [lo, 1]; if it fails (the variance estimates are too optimistic, e.g. heavy-tailed
  products with a short warm-up), searches up in [1, hi]. Returns hi if even hi fails.
  """
  if evaluate(1.0) <= max_failures:
    if lo >= 1.0:
      return 1.0
    if evaluate(lo) <= max_failures:
      return lo
    a, b = math.log(lo), 0.0  # exp(a) fails, exp(b) passes
  else:
    if evaluate(hi) > max_failures:
      return hi
    a, b = 0.0, math.log(hi)
  for _ in range(iters):
    mid = 0.5 * (a + b)
    if evaluate(math.exp(mid)) <= max_failures:
      b = mid
    else:
      a = mid
  return math.exp(b)


def tune_fudge(
    key: jax.Array,
    A,
    X_tune,
    *,
    k: int = 1,
    epsilon: float = 0.3,
    delta: float = 0.1,
    beta: float = 1.0,
    margin: float = 0.5,
    confidence: float | None = None,
    lo: float = 1e-3,
    hi: float = 64.0,
    iters: int = 8,
    logits: np.ndarray | None = None,
    **kwargs,
) -> tuple[float, float]:
  """Binary-searches the two fudge factors on tuning queries.

  First the bandit factor (with fudge_z = 1) so that identification fails on at most
  `floor(margin * delta * n_tune)` queries, then the normalization factor so that full success
  does. Smaller factors mean narrower confidence intervals, fewer samples. The paper tunes
  factors <= 1; we also search above 1 when the theoretical radius (factor 1) already fails on
  the tuning queries, which happens when the variance estimate from a short warm-up is too
  optimistic (measured on SmolLM2's head: 5/200 failures at delta = 1% with factor 1).

  Args:
    key: PRNG key (the same per-query keys are used at every step, so the search is monotone
      up to the algorithm's own non-monotonicity).
    A: (n, d) matrix or PreparedMatrix.
    X_tune: (b, d) tuning queries.
    k, epsilon, delta, beta, **kwargs: as in `adaptive_softmax`.
    margin: fraction of delta allowed as tuning-failure rate. When `margin * delta * n_tune < 1` the
      tuning set cannot reveal a delta-rate violation, and factors are not shrunk below 1.
    confidence: None (the margin rule) or the confidence of the binomial rule of `max_tuning_failures`: at most
      as many tuning failures as keep the Clopper-Pearson bound on success >= 1 - delta. When even 0 failures
      cannot, factors are not shrunk below 1 and the widening search allows none.
    lo: smallest fudge considered.
    hi: largest fudge considered (> 1 widens the theoretical radii).
    iters: bisection steps per factor.
    logits: optional precomputed (b, n) exact logits.

  Returns:
    (fudge_bandit, fudge_z).
  """
  prep = prepare_matrix(A)
  X_tune = _queries("X_tune", X_tune, prep.A.shape[1])
  k = checks.int_in_range("k", k, 1, prep.A.shape[0])
  epsilon, delta = checks.open_unit("epsilon", epsilon), checks.open_unit("delta", delta)
  margin, lo, hi = checks.positive("margin", margin), checks.positive("lo", lo), checks.positive("hi", hi)
  if not lo <= hi:
    raise ValueError(f"lo must be <= hi, got lo={lo}, hi={hi}")
  iters = checks.int_in_range("iters", iters)
  X_tune = checks.as_array(X_tune)
  if logits is None:
    logits = exact_logits_batched(prep, X_tune, beta)
  max_fail = max_tuning_failures(X_tune.shape[0], delta, margin=margin, confidence=confidence)
  if max_fail < 0 or (confidence is None and margin * delta * X_tune.shape[0] < 1.0):
    # Too few tuning queries to see a delta-rate violation (e.g. 100 queries at delta = 1 %): shrinking
    # the radii below theory would overfit (measured on SmolLM2: 0/100 tuning failures, 5/200 held out).
    # Keep the theoretical radius or wider.
    lo = 1.0
    max_fail = max(max_fail, 0)
  if kwargs.pop("mode", "paper") != "paper":
    raise ValueError("tune_fudge tunes mode='paper' only (certified mode has no fudge factors)")
  run = lambda fb, fz: adaptive_softmax(  # noqa: E731
      key, prep, X_tune, k=k, epsilon=epsilon, delta=delta, beta=beta, fudge_bandit=fb, fudge_z=fz,
      mode="paper", check_finite=False, **kwargs,
  )

  def fails_bandit(fb):
    ident, _ = success_mask(run(fb, 1.0), logits, epsilon)
    return int((~ident).sum())

  fb = _search(fails_bandit, max_fail, lo, hi, iters)

  def fails_all(fz):
    _, ok = success_mask(run(fb, fz), logits, epsilon)
    return int((~ok).sum())

  fz = _search(fails_all, max_fail, lo, hi, iters)
  return fb, fz


def conformal_fudge(
    key: jax.Array,
    A,
    X_tune,
    *,
    k: int = 1,
    epsilon: float = 0.3,
    delta: float = 0.1,
    beta: float = 1.0,
    grid: tuple[float, float, int] = (1e-3, 64.0, 25),
    logits: np.ndarray | None = None,
    **kwargs,
) -> tuple[float, np.ndarray]:
  r"""Split-conformal calibration of one fudge factor (both `fudge_bandit` and `fudge_z`) on tuning queries.

  Each tuning query i gets the score `s_i` = the smallest factor f of a log-spaced grid such that the query
  succeeds (top-k right, every probability within epsilon) at f and at every larger grid value (`inf` if it
  fails at the largest). The calibrated factor is the `ceil((m + 1)(1 - delta))`-th smallest of the m scores.
  For a new query exchangeable with the tuning queries (same distribution, its own key), the rank argument of
  split conformal prediction (Vovk et al. 2005; Lei et al. 2018, "Distribution-free predictive inference for
  regression", JASA 113(523), Theorem 2.2) gives `P(s_new <= f_hat) >= 1 - delta`, and `s_new <= f_hat` means
  success at `f_hat`: so the held-out success rate is >= 1 - delta in expectation over the tuning draw. It needs
  `m >= 1/delta - 1` tuning queries; with fewer (or a score of `inf` at that rank) the factor is `inf`, which the
  caller should read as "cannot calibrate" (`tune_and_evaluate` then falls back to the theoretical factor 1).

  Args:
    key: PRNG key (query i of the batch uses `split(key, m)[i]` at every grid value).
    A: (n, d) matrix or PreparedMatrix.
    X_tune: (m, d) tuning queries.
    k, epsilon, delta, beta, **kwargs: as in `adaptive_softmax` (mode is "paper").
    grid: (lo, hi, number of points) of the log-spaced grid of factors.
    logits: optional precomputed (m, n) exact logits.

  Returns:
    (f_hat, scores (m,)).

  Example:
    >>> import math
    >>> from asoftmax.adaptive.tuning import conformal_rank
    >>> conformal_rank(59, 0.05), conformal_rank(18, 0.05)
    (57, 19)
  """
  prep = prepare_matrix(A)
  X_tune = jnp.asarray(_queries("X_tune", X_tune, prep.A.shape[1]))
  delta = checks.open_unit("delta", delta)
  epsilon = checks.open_unit("epsilon", epsilon)
  lo, hi, num = grid
  values = np.exp(np.linspace(math.log(checks.positive("grid lo", lo)), math.log(checks.positive("grid hi", hi)),
                              checks.int_in_range("grid points", num, lo=2)))
  if logits is None:
    logits = exact_logits_batched(prep, X_tune, beta)
  if kwargs.pop("mode", "paper") != "paper":
    raise ValueError("conformal_fudge calibrates mode='paper' only (certified mode has no fudge factors)")
  ok = np.stack([success_mask(adaptive_softmax(key, prep, X_tune, k=k, epsilon=epsilon, delta=delta, beta=beta,
                                               fudge_bandit=float(f), fudge_z=float(f), mode="paper",
                                               check_finite=False, **kwargs), logits, epsilon)[1]
                 for f in values])  # (G, m)
  # s_i: the smallest grid value from which every larger one succeeds.
  tail_ok = np.flip(np.logical_and.accumulate(np.flip(ok, 0), 0), 0)
  first = np.where(tail_ok.any(0), tail_ok.argmax(0), len(values))
  scores = np.where(first < len(values), values[np.minimum(first, len(values) - 1)], np.inf)
  r = conformal_rank(len(scores), delta)
  f_hat = float(np.sort(scores)[r - 1]) if r <= len(scores) else math.inf
  return f_hat, scores


def conformal_rank(m: int, delta: float) -> int:
  """`ceil((m + 1)(1 - delta))`: the rank of the split-conformal quantile among m calibration scores."""
  return int(math.ceil((m + 1) * (1.0 - delta) - 1e-12))


class TuneResult(NamedTuple):
  """What `tune_and_evaluate` measured on the held-out queries (`r.success`, ...; `r._asdict()` for a dict)."""

  fudge_bandit: float  # tuned factors (1 in certified mode)
  fudge_z: float
  n_eval: int  # held-out queries
  successes: int
  success: float  # successes / n_eval
  success_lo: float  # 95% Clopper-Pearson interval
  success_hi: float
  identified: float  # rate of exact top-k sets
  max_rel_error: float  # max |p_hat / p - 1| over returned probabilities
  samples_mean: float
  samples_std: float
  samples_median: float
  samples: list  # per held-out query
  phase_samples_mean: list  # mean products read per phase, in the order of `core.PHASES`
  mode: str
  naive_dense: int  # n*d
  naive_nnz_mean: float  # mean n*nnz(x)
  gain_dense: float  # n*d / mean samples
  gain_nnz: float  # mean n*nnz(x) / mean samples
  split: str = "random"  # how tuning queries were chosen: "random" (seeded) or "sequential" (the first n_tune)
  rule: str = ""  # the tuning rule: "margin 0.5", "binomial 0.95", "conformal" ("" in certified mode)
  tune_indices: list | None = None  # the tuning queries' indices in X


def tune_and_evaluate(
    key: jax.Array,
    A,
    X,
    *,
    k: int = 1,
    epsilon: float = 0.3,
    delta: float = 0.1,
    n_tune: int = 200,
    beta: float = 1.0,
    batch: int = 256,
    progress: Callable[[int, int], None] | bool | None = None,
    tune_confidence: float | None = None,
    rule: str = "binary",
    split: str = "random",
    **kwargs,
) -> TuneResult:
  """The paper's protocol: tune fudge factors on n_tune queries, evaluate on the others.

  Args:
    key: PRNG key; split into a tuning key and an evaluation key.
    A: (n, d) matrix or PreparedMatrix.
    X: (q, d) queries, q > n_tune.
    n_tune: number of tuning queries.
    batch: evaluation batch size (queries per jitted call).
    progress: optional `progress(done, total)` called after every evaluation batch (held-out queries done);
      a bool is accepted and ignored (the library draws no progress bars).
    tune_confidence: None (the margin rule) or the binomial rule's confidence (`tune_fudge`'s `confidence`).
    rule: "binary" (`tune_fudge`: binary search of the two factors under the margin or binomial rule) or
      "conformal" (`conformal_fudge`: one factor, split-conformal rank; a guarantee for exchangeable queries).
    split: "random" (default: the tuning queries are a uniformly random subset, drawn from `key` and returned in
      `tune_indices`) or "sequential" (the first n_tune, the paper's code). Windows from one part of a text do not
      represent the rest: measured on SmolLM2/WikiText-2 (300 windows, 60 tune, delta 5 %, binomial rule), a
      sequential split gave held-out success 0.892, a random split of the same queries 0.992.
    k, epsilon, delta, beta, **kwargs: as in `adaptive_softmax`.

  Returns:
    A `TuneResult` (with `mode` in **kwargs = "paper" (default) the fudge factors are tuned on X[:n_tune];
    with "certified" nothing is tuned and fudge_bandit = fudge_z = 1). It also answers `r["gain_dense"]`.
  """
  prep = prepare_matrix(A)
  n, d = prep.A.shape
  X = np.asarray(_queries("X", X, d))
  if X.shape[0] < 2:
    raise ValueError(f"X must hold at least 2 queries (tuning + held out), got shape {X.shape}")
  n_tune = checks.int_in_range("n_tune", n_tune, 1, X.shape[0] - 1)
  k = checks.int_in_range("k", k, 1, n)
  epsilon, delta = checks.open_unit("epsilon", epsilon), checks.open_unit("delta", delta)
  batch = checks.int_in_range("batch", batch)
  checks.one_of("rule", rule, ("binary", "conformal"))
  checks.one_of("split", split, ("random", "sequential"))
  k_tune, k_eval = jax.random.split(key)
  if split == "random":
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0x5E7), X.shape[0]))
    tune_idx, eval_idx = np.sort(perm[:n_tune]), np.sort(perm[n_tune:])
  else:
    tune_idx, eval_idx = np.arange(n_tune), np.arange(n_tune, X.shape[0])
  logits = exact_logits_batched(prep, X, beta)
  mode = kwargs.pop("mode", "paper")
  rule_name = ""
  if mode == "paper" and rule == "conformal":
    # With fewer than 1/delta - 1 tuning queries the conformal rank exceeds their count: the factor is inf whatever
    # the scores are, so the grid of calls is skipped.
    f = (conformal_fudge(k_tune, prep, X[tune_idx], k=k, epsilon=epsilon, delta=delta, beta=beta,
                         logits=logits[tune_idx], **kwargs)[0]
         if conformal_rank(len(tune_idx), delta) <= len(tune_idx) else math.inf)
    fb = fz = f if math.isfinite(f) else 1.0
    rule_name = "conformal" if math.isfinite(f) else "conformal (too few tuning queries: factor 1)"
  elif mode == "paper":
    fb, fz = tune_fudge(k_tune, prep, X[tune_idx], k=k, epsilon=epsilon, delta=delta, beta=beta,
                        logits=logits[tune_idx], confidence=tune_confidence, **kwargs)
    rule_name = f"binomial {tune_confidence:g}" if tune_confidence else "margin 0.5"
  else:  # certified: no tuning at all; the held-out split is the same as paper mode's.
    fb = fz = 1.0
  kwargs["mode"] = mode
  X_eval, L_eval = X[eval_idx], logits[eval_idx]
  samples, phases, ok_all, ident_all, rel = [], [], [], [], []
  starts = range(0, X_eval.shape[0], batch)
  for i in starts:
    res = adaptive_softmax(jax.random.fold_in(k_eval, i), prep, X_eval[i : i + batch], k=k, epsilon=epsilon,
                           delta=delta, beta=beta, fudge_bandit=fb, fudge_z=fz, check_finite=False, **kwargs)
    ident, ok = success_mask(res, L_eval[i : i + batch], epsilon)
    samples.append(np.asarray(res.samples))
    phases.append(np.asarray(res.phase_samples))
    ok_all.append(ok)
    ident_all.append(ident)
    lg = L_eval[i : i + batch].astype(np.float64)
    lz = logsumexp(lg, axis=1)
    p_true = np.exp(np.take_along_axis(lg, np.asarray(res.indices), 1) - lz[:, None])
    rel.append(np.abs(np.asarray(res.probs) / p_true - 1).max(1))
    if callable(progress):
      progress(min(i + batch, X_eval.shape[0]), X_eval.shape[0])
  samples = np.concatenate(samples).astype(np.int64)
  ok_all = np.concatenate(ok_all)
  succ = int(ok_all.sum())
  lo_, hi_ = stats.binomial_interval(succ, len(ok_all))
  nnz = (X_eval != 0).sum(1)
  naive_nnz = float((n * nnz).mean())
  return TuneResult(**{
      "fudge_bandit": fb,
      "fudge_z": fz,
      "n_eval": int(len(ok_all)),
      "successes": succ,
      "success": succ / len(ok_all),
      "success_lo": lo_,
      "success_hi": hi_,
      "identified": float(np.concatenate(ident_all).mean()),
      "max_rel_error": float(np.concatenate(rel).max()),
      "samples_mean": float(samples.mean()),
      "samples_std": float(samples.std()),
      "samples_median": float(np.median(samples)),
      "samples": samples.tolist(),
      # Mean products read per phase, in the order of `core.PHASES` (warm-up, elimination, winners, Z).
      "phase_samples_mean": np.concatenate(phases).mean(0).tolist(),
      "mode": kwargs["mode"],
      "naive_dense": int(n * d),
      "naive_nnz_mean": naive_nnz,
      "gain_dense": float(n * d / samples.mean()),
      "gain_nnz": float(naive_nnz / samples.mean()),
      "split": split,
      "rule": rule_name,
      "tune_indices": tune_idx.tolist(),
  })
