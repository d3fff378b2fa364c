"""Host-side argument checks for `asoftmax.rff` (skipped for traced values inside `jax.jit`)."""

from __future__ import annotations

import jax
import numpy as np


def is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def finite(name: str, x, ndim: int | None = None):
  """Checks x is a floating array (of `ndim` dims if given) with finite entries."""
  shape = getattr(x, "shape", None)
  dtype = getattr(x, "dtype", None)
  if shape is None or dtype is None:
    raise ValueError(f"{name} must be an array, got {type(x).__name__}")
  if ndim is not None and len(shape) != ndim:
    raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(shape)}")
  if not np.issubdtype(np.dtype(dtype), np.floating):
    raise ValueError(f"{name} must have a floating dtype, got {dtype}")
  if any(s == 0 for s in shape):
    raise ValueError(f"{name} must be non-empty, got shape {tuple(shape)}")
  if not is_traced(x) and not bool(np.isfinite(np.asarray(x)).all()):
    raise ValueError(f"{name} contains NaN or inf")
  return x


def unit_rows(name: str, x, ndim: int | None = None, atol: float = 1e-3):
  """Checks every row of x (last axis) has unit L2 norm within `atol`."""
  finite(name, x, ndim)
  if not is_traced(x):
    norms = np.linalg.norm(np.asarray(x, np.float64), axis=-1)
    bad = np.abs(norms - 1.0) > atol
    if bad.any():
      raise ValueError(
          f"{name} must have unit-norm rows (L2 norm 1 within {atol}); got norms in "
          f"[{norms.min():.4g}, {norms.max():.4g}] ({int(bad.sum())} rows off). Normalize first.")
  return x


def pos_int(name: str, v, lo: int = 1) -> int:
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
    raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
  if int(v) < lo:
    raise ValueError(f"{name} must be >= {lo}, got {v}")
  return int(v)


def pos_float(name: str, v, allow_zero: bool = False) -> float:
  try:
    f = float(v)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a positive number, got {v!r}") from None
  ok = (f >= 0.0 if allow_zero else f > 0.0) and np.isfinite(f)
  if not ok:
    raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {v!r}")
  return f
