"""Fixtures shared by the rff tests."""

import numpy as np
import pytest


def _numpy_path_probs(psi, nodes, counts, n, kappa):
  """Reference in float64: enumerate every leaf of the heap tree and multiply the clamped branch probabilities
  along its path (floor = kappa * max(psi . root, 0) / n per class)."""
  P = nodes.shape[0] // 2
  psi = np.asarray(psi, np.float64)
  nodes = np.asarray(nodes, np.float64)
  counts = np.asarray(counts, np.float64)
  floor = kappa * max(psi @ nodes[1], 0.0) / n + 1e-12
  mass = np.maximum(nodes @ psi, 0.0) + floor * counts
  q = np.zeros(P)
  for leaf in range(P):
    k, p = P + leaf, 1.0
    while k > 1:
      tot = mass[k] + mass[k ^ 1]
      p *= mass[k] / tot if tot > 0 else 0.0
      k //= 2
    q[leaf] = p
  return q


@pytest.fixture(scope="session")
def numpy_path_probs():
  """`numpy_path_probs(psi, nodes, counts, n, kappa) -> (P,)` leaf probabilities of the tree walk, enumerated."""
  return _numpy_path_probs
