"""Host-side argument checks for the public `asoftmax.topk` entry points (run before tracing)."""

from __future__ import annotations

import jax
import numpy as np


def is_traced(*xs) -> bool:
  """True if any argument is a jax tracer (inside jit/vmap): value checks are then skipped."""
  return any(isinstance(x, jax.core.Tracer) for x in xs)


def epsilon(eps) -> None:
  if is_traced(eps):
    return
  e = np.asarray(eps, dtype=np.float64)
  if not np.all(np.isfinite(e)) or np.any(e <= 0.0) or np.any(e >= 1.0):
    raise ValueError(f"epsilon must lie in the open interval (0, 1), got {eps!r}")


def logits(s, name: str = "logits") -> None:
  shape = getattr(s, "shape", None)
  if shape is None or len(shape) < 1 or shape[-1] == 0:
    raise ValueError(f"{name} must be an array with a non-empty last (key) axis, got shape {shape}")
  if not np.issubdtype(np.dtype(s.dtype), np.floating):
    raise ValueError(f"{name} must have a floating dtype, got {s.dtype}")
  if is_traced(s):
    return
  a = np.asarray(s)
  if np.isnan(a).any():
    raise ValueError(f"{name} contains NaN")
  if np.isposinf(a).any():
    raise ValueError(f"{name} contains +inf")


def valid(v, shape, name: str = "valid") -> None:
  """`v` must be boolean, broadcastable to `shape`, with at least one True key per row."""
  if v is None:
    return
  vshape = getattr(v, "shape", None)
  if vshape is None:
    raise ValueError(f"{name} must be a boolean array, got {type(v).__name__}")
  if np.dtype(v.dtype) != np.bool_:
    raise ValueError(f"{name} must have dtype bool, got {v.dtype}")
  try:
    np.broadcast_shapes(tuple(vshape), tuple(shape))
  except ValueError:
    raise ValueError(f"{name} of shape {tuple(vshape)} does not broadcast to {tuple(shape)}") from None
  if len(vshape) == 0 or vshape[-1] != shape[-1]:
    raise ValueError(f"{name} must have a key axis of size {shape[-1]}, got shape {tuple(vshape)}")
  if is_traced(v):
    return
  if not np.asarray(v).any(axis=-1).all():
    raise ValueError(f"{name} has a row with no valid key (every key masked)")
