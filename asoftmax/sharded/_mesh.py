"""Mesh plumbing shared by the sharded methods (internal): argument checks, placement, padding, offsets.

Every sharded primitive is a `jax.shard_map` over a user-supplied `jax.sharding.Mesh`. The helpers here check the
mesh and axis names (a clear `ValueError` naming the argument), pad a sharded dimension to a multiple of the axis
size, and place concrete inputs on the mesh (needed for `Explicit` axes, which `jax.make_mesh` builds by default).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from asoftmax import checks


def make_mesh(shape, axis_names, devices=None) -> Mesh:
  """A `Mesh` of `prod(shape)` devices (the first ones of `devices`, default `jax.devices()`), Auto axes.

  Args:
    shape: sizes of the mesh axes, e.g. `(8,)` or `(2, 4)`.
    axis_names: one name per axis, e.g. `("vocab",)` or `("data", "vocab")`.
    devices: devices to use (default all local and remote devices, in `jax.devices()` order).

  Example:
    >>> from asoftmax import sharded
    >>> sharded.make_mesh((1,), ("vocab",)).axis_names
    ('vocab',)
  """
  if isinstance(shape, (int, np.integer)):
    shape = (shape,)
  if not isinstance(shape, (tuple, list)) or not shape:
    raise ValueError(f"shape must be a non-empty tuple of axis sizes, e.g. (8,) or (2, 4), got {shape!r}")
  shape = tuple(checks.int_in_range("shape (each axis size)", s) for s in shape)
  names = (axis_names,) if isinstance(axis_names, str) else axis_names
  if not isinstance(names, (tuple, list)):
    raise ValueError(f"axis_names must be a tuple of names, e.g. ('vocab',), got {axis_names!r}")
  names = tuple(names)
  if len(shape) != len(names) or any(not isinstance(a, str) or not a for a in names) or len(set(names)) != len(names):
    raise ValueError(f"axis_names must hold one distinct non-empty name per mesh axis; got shape {shape} and "
                     f"axis_names {names}")
  devs = list(jax.devices() if devices is None else devices)
  need = int(np.prod(shape))
  if need > len(devs):
    raise ValueError(f"shape {shape} needs {need} devices, only {len(devs)} are available")
  return Mesh(np.array(devs[:need]).reshape(shape), names)


def check_mesh(mesh: Any) -> Mesh:
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh (e.g. sharded.make_mesh((8,), ('vocab',))), got "
                     f"{type(mesh).__name__}")
  return mesh


def check_axis(mesh: Mesh, name: str, axis: Any, optional: bool = False) -> str | None:
  """`axis` names an axis of `mesh` (or is None when optional); otherwise a ValueError naming the argument."""
  if axis is None and optional:
    return None
  if not isinstance(axis, str) or axis not in mesh.axis_names:
    raise ValueError(f"{name}={axis!r} is not an axis of the mesh (its axes: {mesh.axis_names})")
  return axis


def axis_size(mesh: Mesh, axis: str | None) -> int:
  return 1 if axis is None else int(mesh.shape[axis])


def padded(n: int, s: int) -> int:
  """Smallest multiple of s that is >= n."""
  return -(-n // s) * s


def pad_axis(x, axis: int, size: int, value=0):
  """x padded along `axis` to `size` with `value`."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def place(mesh: Mesh, x, spec: P):
  """Puts `x` on `mesh` with `spec` where the mesh has Explicit axes (Auto axes: shard_map reshards by itself)."""
  explicit = any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))
  if not explicit:
    return x
  return jax.sharding.reshard(x, NamedSharding(mesh, spec))


def shard_offset(axis: str, local: int):
  """Global index of this shard's first entry along a dimension split in blocks of `local` (inside shard_map)."""
  return jax.lax.axis_index(axis).astype(jnp.int32) * local


def finite_where(name: str, x, valid=None) -> None:
  """A concrete `x` (..., N, d) must be finite on its filled slots (`valid` (..., N); None: everywhere), else a
  ValueError naming `name`. Traced values are not checked (the caller flags them)."""
  if checks.is_traced(x) or (valid is not None and checks.is_traced(valid)):
    return
  a = np.asarray(x, np.float32)
  ok = np.isfinite(a)
  if valid is not None:
    v = np.asarray(valid, bool)
    ok = ok | ~v[..., None]
  if not ok.all():
    raise ValueError(f"{name} has NaN or inf entries" + ("" if valid is None else " in filled (valid) slots"))
