"""Formatting shared by the AdaptiveSoftmax experiments."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import jax

from asoftmax import adaptive


def median_ms(fn, repeats: int) -> float:
  """Median wall-clock (ms) of fn(i), i = 1..repeats, after a warm-up call fn(0) (compile excluded)."""
  jax.block_until_ready(fn(0))
  ts = []
  for i in range(1, repeats + 1):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(i))
    ts.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(ts)


@jax.jit
def exact_topk(A, x):
  """The exact baseline every wall-clock is compared with: `A @ x` (a GEMV), its top-1 and logsumexp."""
  z = A @ x
  return jax.lax.top_k(z, 1), jax.nn.logsumexp(z)


def phase_split(phase_means: Sequence[float]) -> str:
  """Percent of the samples read in each phase (`adaptive.PHASES`), as "warm-up/elimination/winners/Z".

  >>> phase_split([10.0, 60.0, 20.0, 10.0])
  '10/60/20/10'
  """
  total = float(sum(phase_means)) or 1.0
  return "/".join(f"{100.0 * v / total:.0f}" for v in phase_means[: len(adaptive.PHASES)])
