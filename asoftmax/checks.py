"""Argument checks shared by every public entry point: clear `ValueError`s naming the argument.

One policy for all packages (`adaptive`, `rff`, `topk`), safe under `jax.jit` / `jax.vmap` in the
style of optax's `optax/_src/utils.py`:

* shape and dtype are always checked (they are static, even for traced arrays);
* values of arrays (finite, in range, unit-norm rows, at least one valid key) are checked only when
  the array is concrete, never for a `jax.core.Tracer`;
* Python numbers (`k`, `m`, `delta`, ...) are always checked.

Under `jax.jit` the policy is a **validity flag in the result**, not `checkify`: a result computed from invalid
values carries a NaN in a floating output (topk: k = 0 and certificate / tail mass / probabilities NaN for the row;
rff: log q and losses NaN, sampled ids kept in range), and out-of-range ids in an update are dropped. Each
function's docstring says which field carries the flag. Concrete bad values raise even inside `jax.jit` (a numpy
array closed over by the jitted function is concrete). Options that pick code paths (sizes, `boolean` flags) must
be static: a traced one raises. `tests/test_bad_input.py` checks this contract for every public function.

Floating means `jnp.issubdtype(dtype, jnp.floating)`, so bfloat16 and float16 are accepted wherever
float32 is (numpy's own `issubdtype` rejects bfloat16).

>>> import numpy as np
>>> from asoftmax import checks
>>> checks.open_unit("delta", 0.1)
0.1
>>> checks.floating_array("x", np.array([1.0, np.nan]), (1,))
Traceback (most recent call last):
  ...
ValueError: x contains NaN or inf
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


# ------------------------------------------------------------------------------------------ helpers
def is_traced(*xs: Any) -> bool:
  """True if any argument is a jax tracer (inside jit/vmap/grad): value checks are then skipped."""
  return any(isinstance(x, jax.core.Tracer) for x in xs)


def as_array(x: Any) -> Any:
  """`jnp.asarray(x)`, without compiling anything for a numpy array: `jax.device_put` (the same dtype rules).

  jax 0.10's `jnp.asarray` of a numpy array stages it through an identity program compiled once per new shape and
  dtype (~25 ms on CPU); a library that converts its inputs at every new shape pays that on each first call.

  >>> import numpy as np
  >>> from asoftmax import checks
  >>> checks.as_array(np.arange(3.0)).dtype
  dtype('float32')
  """
  if type(x) is np.ndarray and x.dtype != object:
    return jax.device_put(x)
  return jnp.asarray(x)


def is_floating(dtype: Any) -> bool:
  """True for every floating dtype jax knows, bfloat16 and float16 included."""
  try:
    return bool(jnp.issubdtype(dtype, jnp.floating))
  except TypeError:
    return False


def _shape_dtype(name: str, value: Any) -> tuple[tuple[int, ...], Any]:
  shape = getattr(value, "shape", None)
  dtype = getattr(value, "dtype", None)
  if shape is None or dtype is None:
    raise ValueError(f"{name} must be an array, got {type(value).__name__}")
  return tuple(shape), dtype


def _all_finite(value: Any) -> bool:
  a = np.asarray(value)
  if a.dtype.kind not in "fc":  # bfloat16 and other ml_dtypes: compare in float32
    a = a.astype(np.float32)
  return bool(np.isfinite(a).all())


# ------------------------------------------------------------------------------------------ arrays
def floating_array(name: str, value: Any, ndims: Sequence[int] | int | None = None, *,
                   finite: bool = True) -> Any:
  """Checks `value` is a non-empty floating array with one of `ndims` dimensions (and finite entries).

  Args:
    name: the argument's name, used in the error message.
    value: a numpy or jax array (traced arrays are accepted: their values are not checked).
    ndims: allowed numbers of dimensions (an int, a sequence, or None for any).
    finite: if True and `value` is concrete, NaN and inf are rejected.

  Returns:
    `value`, unchanged.

  Raises:
    ValueError: naming `name`.
  """
  shape, dtype = _shape_dtype(name, value)
  if ndims is not None:
    ndims = (ndims,) if isinstance(ndims, int) else tuple(ndims)
    if len(shape) not in ndims:
      raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimensions, got shape {shape}")
  if not is_floating(dtype):
    raise ValueError(f"{name} must have a floating dtype, got {dtype}")
  if any(s == 0 for s in shape):
    raise ValueError(f"{name} must be non-empty, got shape {shape}")
  if finite and not is_traced(value) and not _all_finite(value):
    raise ValueError(f"{name} contains NaN or inf")
  return value


def unit_rows(name: str, x: Any, ndim: int | None = None, atol: float = 1e-3) -> Any:
  """Checks `x` is a finite floating array whose rows (last axis) have unit L2 norm within `atol`."""
  floating_array(name, x, ndim)
  atol = max(atol, 2.0 * float(jnp.finfo(x.dtype).eps))  # bfloat16 rounds a unit row to within ~2^-7
  if not is_traced(x):
    norms = np.linalg.norm(np.asarray(x, np.float64), axis=-1)
    bad = np.abs(norms - 1.0) > atol
    if bad.any():
      raise ValueError(
          f"{name} must have unit-norm rows (L2 norm 1 within {atol}); got norms in "
          f"[{norms.min():.4g}, {norms.max():.4g}] ({int(bad.sum())} rows off). Normalize first.")
  return x


def logits(s: Any, name: str = "logits") -> None:
  """Checks `s` is a floating array with a non-empty last (key) axis, without NaN or +inf when concrete.

  -inf is allowed (a masked key).
  """
  shape = getattr(s, "shape", None)
  if shape is None or len(shape) < 1 or shape[-1] == 0:
    raise ValueError(f"{name} must be an array with a non-empty last (key) axis, got shape {shape}")
  if not is_floating(s.dtype):
    raise ValueError(f"{name} must have a floating dtype, got {s.dtype}")
  if is_traced(s):
    return
  a = np.asarray(s)
  if a.dtype.kind != "f":
    a = a.astype(np.float32)
  if np.isnan(a).any():
    raise ValueError(f"{name} contains NaN")
  if np.isposinf(a).any():
    raise ValueError(f"{name} contains +inf")


def valid(v: Any, shape: Sequence[int], name: str = "valid", against: str = "logits") -> None:
  """`v` (or None) must be boolean, broadcastable to `shape` (the shape of `against`), with at least one True key per
  row when concrete."""
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
    raise ValueError(
        f"{name} of shape {tuple(vshape)} does not broadcast to {against}'s shape {tuple(shape)}") from None
  if len(vshape) == 0 or vshape[-1] != shape[-1]:
    raise ValueError(f"{name} must have a key axis of size {shape[-1]} ({against}'s), got shape {tuple(vshape)}")
  if is_traced(v):
    return
  if not np.asarray(v).any(axis=-1).all():
    raise ValueError(f"{name} has a row with no valid key (every key masked)")


def index_array(name: str, value: Any, n: int, ndims: Sequence[int] | int | None = None) -> Any:
  """Checks `value` is an integer array (of one of `ndims` dimensions) with entries in [0, n) when concrete.

  Under `jax.jit` the range cannot be checked: callers drop or flag out-of-range ids (see their docstrings).
  """
  shape, dtype = _shape_dtype(name, value)
  if ndims is not None:
    ndims = (ndims,) if isinstance(ndims, int) else tuple(ndims)
    if len(shape) not in ndims:
      raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimensions, got shape {shape}")
  if not jnp.issubdtype(dtype, jnp.integer) or np.dtype(dtype) == np.bool_:
    raise ValueError(f"{name} must have an integer dtype, got {dtype}")
  if not is_traced(value):
    a = np.asarray(value)
    if a.size and (a.min() < 0 or a.max() >= n):
      raise ValueError(f"{name} must be in [0, {n}), got values in [{a.min()}, {a.max()}]")
  return value


def int_array(name: str, value: Any, lo: int, hi: int | None = None, *, shape: Sequence[int] | None = None) -> Any:
  """Checks `value` is an integer array (of `shape`, if given) with entries in [lo, hi] when concrete (hi None: no
  upper end). Under `jax.jit` the range cannot be checked: callers flag or clip (see their docstrings)."""
  vshape, dtype = _shape_dtype(name, value)
  if shape is not None and tuple(vshape) != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(vshape)}")
  if not jnp.issubdtype(dtype, jnp.integer) or np.dtype(dtype) == np.bool_:
    raise ValueError(f"{name} must have an integer dtype, got {dtype}")
  if not is_traced(value):
    a = np.asarray(value)
    if a.size and (a.min() < lo or (hi is not None and a.max() > hi)):
      top = "inf" if hi is None else hi
      raise ValueError(f"{name} must be in [{lo}, {top}], got values in [{a.min()}, {a.max()}]")
  return value


def vectors(name: str, value: Any, shape: str = "(..., N, d)", *, finite: bool = True) -> Any:
  """Checks `value` is a non-empty floating array of vectors: at least 2 dimensions, the last the vector dim.

  `shape` is how the error message spells the expected shape, e.g. "(..., L, d)".

  >>> import numpy as np
  >>> from asoftmax import checks
  >>> checks.vectors("keys", np.ones(4, np.float32))
  Traceback (most recent call last):
    ...
  ValueError: keys must have shape (..., N, d), got (4,)
  """
  floating_array(name, value, finite=finite)
  if len(value.shape) < 2:
    raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
  return value


def same_dim(name: str, value: Any, d: int, other: str) -> Any:
  """Checks the last dimension of `value` equals `d`, the last dimension of `other` (named in the message)."""
  if value.shape[-1] != d:
    raise ValueError(f"{name} has dimension {value.shape[-1]}, {other} has {d}")
  return value


def float_in_range(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> Any:
  """Checks every entry of a concrete `value` lies in [lo, hi] (or (lo, hi] with `lo_open`); a traced value is
  returned unchecked (the caller flags it)."""
  if is_traced(value):
    return value
  a = np.asarray(value, np.float32)
  below = (a <= lo) if lo_open else (a < lo)
  if (below | (a > hi)).any():
    raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got values in "
                     f"[{float(a.min())}, {float(a.max())}]")
  return value


def log_probs(name: str, value: Any, shape: Sequence[int], against: str = "logits") -> Any:
  """Checks `value` has `shape` (that of `against`) and, when concrete, holds log probabilities: <= 0 (up to
  1e-4), no NaN; -inf is allowed (probability zero)."""
  vshape, _ = _shape_dtype(name, value)
  if tuple(vshape) != tuple(shape):
    raise ValueError(f"{name} must have {against}' shape {tuple(shape)}, got {tuple(vshape)}")
  if not is_traced(value):
    a = np.asarray(value, np.float32)
    if np.isnan(a).any() or (a > 1e-4).any():
      raise ValueError(f"{name} must hold log probabilities (<= 0, no NaN)")
  return value


def prng_key(name: str, key: Any) -> Any:
  """Checks `key` is a PRNG key: new-style `jax.random.key(seed)` (a 0-d key array) or legacy uint32[2].

  >>> import jax
  >>> from asoftmax import checks
  >>> checks.prng_key("key", 0)
  Traceback (most recent call last):
    ...
  ValueError: key must be a PRNG key from jax.random.key(seed), got int
  """
  dt = getattr(key, "dtype", None)
  if dt is not None and jnp.issubdtype(dt, jax.dtypes.prng_key) and key.ndim == 0:
    return key
  if dt is not None and dt == jnp.uint32 and tuple(key.shape) == (2,):
    return key
  raise ValueError(f"{name} must be a PRNG key from jax.random.key(seed), got {type(key).__name__} "
                   f"{getattr(key, 'shape', '')} {dt if dt is not None else ''}".rstrip())


# ------------------------------------------------------------------------------------------ numbers
def open_unit(name: str, value: Any) -> Any:
  """Checks 0 < value < 1 (a number, or every entry of a concrete array); returns a float for numbers.

  A traced value is returned unchecked.
  """
  if is_traced(value):
    return value
  if getattr(value, "ndim", 0):
    e = np.asarray(value, dtype=np.float64)
    if not (np.all(np.isfinite(e)) and np.all(e > 0.0) and np.all(e < 1.0)):
      raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return value
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number in (0, 1), got {value!r}") from None
  if not (0.0 < v < 1.0) or math.isnan(v):
    raise ValueError(f"{name} must be in (0, 1), got {value!r}")
  return v


def open_unit_tuple(name: str, values: Any) -> tuple[float, ...]:
  """Checks `values` is a non-empty sequence of static Python numbers in (0, 1); returns them as a tuple of floats.

  For options that fix a program's shape (one output column per value), so traced values are rejected.
  """
  if is_traced(values) or isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
    raise ValueError(f"{name} must be a sequence of Python numbers in (0, 1), got {values!r}")
  vals = tuple(values)
  if not vals:
    raise ValueError(f"{name} must hold at least one value")
  if is_traced(*vals):
    raise ValueError(f"{name} must be Python numbers (static), got a traced value")
  return tuple(float(open_unit(name, v)) for v in vals)


def positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
  """Checks `value` is a finite number > 0 (>= 0 with `allow_zero`) and returns it as a float.

  >>> from asoftmax import checks
  >>> checks.positive("tau", 2)
  2.0
  >>> checks.positive("kappa", 0.0, allow_zero=True)
  0.0
  """
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a positive number, got {value!r}") from None
  ok = (v >= 0.0 if allow_zero else v > 0.0) and math.isfinite(v)
  if not ok:
    raise ValueError(f"{name} must be {'>= 0' if allow_zero else 'positive'} and finite, got {value!r}")
  return v


def _is_int(value: Any) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def int_in_range(name: str, value: Any, lo: int = 1, hi: int | None = None) -> int:
  """Checks `value` is an integer (not a bool) with lo <= value (<= hi unless hi is None); returns it as an int.

  The default range [1, inf) is a positive count (sizes, chunk lengths, sample counts).

  >>> from asoftmax import checks
  >>> checks.int_in_range("m", 5)
  5
  >>> checks.int_in_range("k", 3, 1, 2)
  Traceback (most recent call last):
    ...
  ValueError: k must be in [1, 2], got 3
  """
  if not _is_int(value):
    bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
  v = int(value)
  if hi is None and v < lo:
    raise ValueError(f"{name} must be >= {lo}, got {v}")
  if hi is not None and not lo <= v <= hi:
    raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
  return v


def boolean(name: str, value: Any, *, also: Sequence[str] = ()) -> bool | str:
  """Checks `value` is a bool (Python or numpy; a concrete 0-d bool array too) and returns it as a Python bool.

  A truthy object such as the string "yes", 1 or None is rejected: a typo must not silently switch an option on.
  A traced value is rejected too (boolean options choose code paths, so they must be static). A string listed in
  `also` (e.g. "auto" for a tri-state option) is returned as is.
  """
  if isinstance(value, str) and value in also:
    return value
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if is_traced(value):
    raise ValueError(f"{name} must be a Python bool (a static option), got a traced value")
  if getattr(value, "shape", None) == () and np.dtype(getattr(value, "dtype", object)) == np.bool_:
    return bool(value)
  extra = "".join(f" or {a!r}" for a in also)
  raise ValueError(f"{name} must be a bool (True or False){extra}, got {value!r}")


def dtype_in(name: str, value: Any, dtypes: Sequence[Any]) -> Any:
  """Checks `value` names one of `dtypes` (a dtype, its name or type); returns it as a `jnp.dtype`."""
  try:
    dt = jnp.dtype(value)
  except TypeError:
    dt = None
  allowed = [jnp.dtype(t) for t in dtypes]
  if dt not in allowed:
    raise ValueError(f"{name} must be {', '.join(str(t) for t in allowed[:-1])} or {allowed[-1]}, got {value!r}")
  return dt


def one_of(name: str, value: Any, choices) -> Any:
  """Checks `value` is one of `choices`."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
  return value


class PathNotFoundError(FileNotFoundError, ValueError):
  """A file or directory argument that does not exist: a ValueError naming the argument (the input contract), and a
  FileNotFoundError so that experiments turn it into a "not run: ..." row."""


def existing_path(name: str, path: Any, what: str = "file") -> str:
  """Checks `path` is a string naming an existing file (`what="file"`) or directory (`what="directory"`).

  >>> from asoftmax import checks
  >>> checks.existing_path("path", "/no/such.gguf")
  Traceback (most recent call last):
    ...
  asoftmax.checks.PathNotFoundError: path: file not found: '/no/such.gguf'
  """
  if not isinstance(path, (str, os.PathLike)) or not str(path):
    raise ValueError(f"{name} must be a path (a non-empty string), got {path!r}")
  ok = os.path.isdir(path) if what == "directory" else os.path.exists(path)
  if not ok:
    raise PathNotFoundError(f"{name}: {what} not found: {str(path)!r}")
  return str(path)


def string(name: str, value: Any, *, optional: bool = False) -> str | None:
  """Checks `value` is a `str` (or None with `optional`) and returns it: a text argument given bytes, a list or a
  number fails here with its name instead of deep inside a parser."""
  if (value is None and optional) or isinstance(value, str):
    return value
  raise ValueError(f"{name} must be a string{' or None' if optional else ''}, got {type(value).__name__}")


def methods(name: str, value: Any, required: Sequence[str]) -> Any:
  """Checks `value` has the methods `required` (a protocol object, e.g. a cache attention) and returns it."""
  missing = [m for m in required if not callable(getattr(value, m, None))]
  if missing:
    raise ValueError(f"{name} must have the method(s) {', '.join(required)}; {value!r} lacks {', '.join(missing)}")
  return value


# ------------------------------------------------------------------------------------------ the flag under jit
def flag(bad: Any, x: Any) -> Any:
  """`x` with NaN where `bad` (broadcast over x's trailing axes): the validity flag of a floating output.

  Apply it last, after every transcendental: XLA:CPU (jax 0.10) miscompiles `exp(where(p, nan, x))` into finite
  garbage, so a NaN must never be selected *into* an `exp`.
  """
  bad = jnp.reshape(bad, bad.shape + (1,) * (x.ndim - bad.ndim))
  return jnp.where(bad, jnp.nan, x)


def open_unit_ok(value: Any) -> Any:
  """Scalar bool array: 0 < value < 1 (False for NaN); the traced side of `open_unit`, for the flag."""
  e = jnp.asarray(value)
  return jnp.all((e > 0) & (e < 1))


def positive_or_traced(name: str, value: Any) -> Any:
  """`positive(name, value)` for a concrete value; a traced value is returned as is (callers flag value <= 0)."""
  return value if is_traced(value) else positive(name, value)


def rounding_margin(num_keys: int, dtype: Any = "float32") -> float:
  r"""Relative safety margin $m$ for comparing a float tail mass (or a bound on it) with $\epsilon$.

  A computed tail mass $\tilde\tau$ of a row of `num_keys` shifted logits satisfies
  $|\tilde\tau - \tau| \le m\,\tau$ with $m = 64\,u\,\lceil\log_2 N + 1\rceil$ ($u$ = unit roundoff; a
  log-sum-exp scan of depth $O(\log N)$ over values of magnitude $O(\log N + |\log\epsilon|)$); measured errors
  are 10-100x smaller (tests/topk/test_library.py). Stopping rules compare with $\epsilon/(1+m)$ so that the true
  tail mass of the chosen head is $\le \epsilon$.
  """
  u = float(jnp.finfo(dtype).eps) / 2
  return 64.0 * u * (math.ceil(math.log2(max(int(num_keys), 2))) + 1)


def stage_edges(name: str, stages: Any, d: int) -> tuple[int, ...]:
  """Increasing positive coordinate counts ending at `d` (the stages or norm blocks of a progressive search)."""
  edges = [int(s) for s in stages]
  if not edges or edges[-1] != d or any(b <= a for a, b in zip([0] + edges, edges)):
    raise ValueError(f"{name} must be increasing positive coordinate counts ending at d = {d}, got {tuple(stages)}")
  return tuple(edges)
