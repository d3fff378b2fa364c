"""Argument checks shared by the public entry points: clear `ValueError`s naming the argument.

These run on the host, outside `jax.jit`, before any tracing.
"""

from __future__ import annotations

import math

import numpy as np


def floating_array(name: str, value, ndims: tuple[int, ...]) -> np.ndarray | object:
  """Checks `value` is a floating array with one of `ndims` and only finite entries.

  Returns the value unchanged (numpy or jax array). Raises ValueError naming `name`.
  """
  shape = getattr(value, "shape", None)
  dtype = getattr(value, "dtype", None)
  if shape is None or dtype is None:
    raise ValueError(f"{name} must be an array, got {type(value).__name__}")
  if len(shape) not in ndims:
    raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimensions, got shape {tuple(shape)}")
  if not np.issubdtype(np.dtype(dtype), np.floating):
    raise ValueError(f"{name} must have a floating dtype, got {dtype}")
  if any(s == 0 for s in shape):
    raise ValueError(f"{name} must be non-empty, got shape {tuple(shape)}")
  if not bool(np.isfinite(np.asarray(value)).all()):
    raise ValueError(f"{name} contains NaN or inf")
  return value


def open_unit(name: str, value) -> float:
  """Checks 0 < value < 1 and returns it as a float."""
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number in (0, 1), got {value!r}") from None
  if not (0.0 < v < 1.0) or math.isnan(v):
    raise ValueError(f"{name} must be in (0, 1), got {value!r}")
  return v


def positive(name: str, value) -> float:
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a positive number, got {value!r}") from None
  if not (v > 0.0 and math.isfinite(v)):
    raise ValueError(f"{name} must be positive and finite, got {value!r}")
  return v


def int_in_range(name: str, value, lo: int, hi: int) -> int:
  """Checks `value` is an integer with lo <= value <= hi."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  if not lo <= int(value) <= hi:
    raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
  return int(value)


def one_of(name: str, value, choices) -> str:
  if value not in choices:
    raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
  return value
