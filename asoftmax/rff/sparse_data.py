"""Loader for extreme-classification datasets in the standard sparse text format.

The format of the Extreme Classification Repository (AmazonCat-13K, Delicious-200K, WikiLSHTC-325K, used
in the experiments of Rawat et al., NeurIPS 2019): a header line `num_points num_features num_labels`, then one
line per point, `l1,l2,... f1:v1 f2:v2 ...` (labels may be empty, so a line can start with a space).
These files are not available offline here; the loader is tested on a generated file.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from asoftmax import checks


class SparseDataset(NamedTuple):
  features: sp.csr_matrix  # [N, F] float32
  labels: sp.csr_matrix  # [N, L] float32 0/1
  num_features: int
  num_labels: int


def load_sparse(path: str) -> SparseDataset:
  """Reads one split file; raises ValueError (with the line number) on malformed content."""
  path = checks.existing_path("path", path)
  with open(path) as f:
    header = f.readline().split()
    if len(header) != 3:
      raise ValueError(f"{path}: header must be 'num_points num_features num_labels', got {header}")
    N, F, L = (int(x) for x in header)
    fr, fc, fv, lr, lc = [], [], [], [], []
    row = 0
    for lineno, line in enumerate(f, start=2):
      line = line.rstrip("\n")
      if not line.strip():
        continue
      parts = line.split(" ")
      first = parts[0]
      rest = parts[1:]
      if ":" in first:  # no labels and no leading space
        rest, first = parts, ""
      for lab in filter(None, first.split(",")):
        j = int(lab)
        if not 0 <= j < L:
          raise ValueError(f"{path}:{lineno}: label {j} outside [0, {L})")
        lr.append(row)
        lc.append(j)
      for tok in filter(None, rest):
        k, _, v = tok.partition(":")
        k = int(k)
        if not 0 <= k < F:
          raise ValueError(f"{path}:{lineno}: feature {k} outside [0, {F})")
        fr.append(row)
        fc.append(k)
        fv.append(float(v))
      row += 1
  if row != N:
    raise ValueError(f"{path}: header says {N} points, found {row}")
  feats = sp.csr_matrix((np.asarray(fv, np.float32), (fr, fc)), shape=(N, F))
  labels = sp.csr_matrix((np.ones(len(lr), np.float32), (lr, lc)), shape=(N, L))
  return SparseDataset(feats, labels, F, L)


def precision_at_k(scores: np.ndarray, labels: sp.csr_matrix, k: int) -> float:
  """Mean precision@k: fraction of the top-k scored labels that are true, averaged over points.

  scores: [N, L] finite floating; labels: [N, L] sparse 0/1; k in [1, L].
  """
  from asoftmax import checks

  checks.floating_array("scores", scores, 2)
  if tuple(labels.shape) != tuple(scores.shape):
    raise ValueError(f"labels must have the shape of scores {scores.shape}, got {labels.shape}")
  k = checks.int_in_range("k", k, 1, scores.shape[1])
  top = np.argsort(-scores, axis=1)[:, :k]
  lab = labels.toarray().astype(bool)
  return float(np.take_along_axis(lab, top, 1).sum(1).mean() / k)
