"""Small statistics helpers used by experiments and tests."""

from __future__ import annotations

import numpy as np
from scipy import stats as _stats


def binomial_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
  """Two-sided Clopper-Pearson interval for a binomial proportion.

  Args:
    successes: number of successes.
    trials: number of trials (> 0).
    confidence: coverage of the interval.

  Returns:
    (lower, upper), both in [0, 1].
  """
  if trials <= 0:
    raise ValueError(f"trials must be > 0, got {trials}")
  alpha = 1.0 - confidence
  lo = 0.0 if successes == 0 else _stats.beta.ppf(alpha / 2, successes, trials - successes + 1)
  hi = 1.0 if successes == trials else _stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes)
  return float(lo), float(hi)


def binomial_lower_bound(successes: int, trials: int, confidence: float = 0.99) -> float:
  """One-sided Clopper-Pearson lower confidence bound on a success probability."""
  if trials <= 0:
    raise ValueError(f"trials must be > 0, got {trials}")
  if successes == 0:
    return 0.0
  return float(_stats.beta.ppf(1 - confidence, successes, trials - successes + 1))


def mean_std(values) -> tuple[float, float]:
  v = np.asarray(values, dtype=np.float64)
  return float(v.mean()), float(v.std())
