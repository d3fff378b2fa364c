"""asoftmax.checks: one tracer-safe policy (shape/dtype always, values only when concrete)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asoftmax import checks


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_low_precision_floats_are_floating(dtype):
  x = jnp.ones((3, 4), dtype)
  assert checks.floating_array("x", x, (2,)) is x
  checks.logits(x)
  checks.unit_rows("u", jnp.full((2, 4), 0.5, dtype))


def test_bfloat16_nan_is_caught_when_concrete():
  with pytest.raises(ValueError, match="x contains NaN or inf"):
    checks.floating_array("x", jnp.array([1.0, jnp.nan], jnp.bfloat16))
  with pytest.raises(ValueError, match="logits contains NaN"):
    checks.logits(jnp.array([1.0, jnp.nan], jnp.bfloat16))


def test_shape_and_dtype_checked_under_jit_values_not():
  def f(x, v):
    checks.floating_array("x", x, (2,))
    checks.logits(x)
    checks.valid(v, x.shape)
    checks.open_unit("epsilon", x[0, 0])  # traced: passes through
    return x.sum()

  nan = jnp.array([[jnp.nan, 1.0]])
  assert np.isnan(jax.jit(f)(nan, jnp.array([[False, False]])))  # values of tracers are not checked
  with pytest.raises(ValueError, match="x must have 2 dimensions"):
    jax.jit(f)(jnp.ones(3), jnp.ones(3, bool))
  with pytest.raises(ValueError, match="x must have a floating dtype"):
    jax.jit(f)(jnp.ones((2, 2), jnp.int32), jnp.ones((2, 2), bool))
  with pytest.raises(ValueError, match="valid must have dtype bool"):
    jax.jit(f)(jnp.ones((2, 2)), jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="no valid key"):
    f(jnp.ones((1, 2)), np.array([[False, False]]))  # concrete: the value is checked


def test_numbers_always_checked():
  assert checks.open_unit("delta", 0.5) == 0.5
  with pytest.raises(ValueError, match="delta must be in"):
    checks.open_unit("delta", 1.0)
  with pytest.raises(ValueError, match="epsilon"):
    checks.open_unit("epsilon", np.array([0.1, 0.0]))
  with pytest.raises(ValueError, match="m must be >= 1"):
    checks.int_in_range("m", 0)
  with pytest.raises(ValueError, match="m must be an integer >= 1"):
    checks.int_in_range("m", 2.0)
  assert checks.int_in_range("head_size", 0, lo=0) == 0
  with pytest.raises(ValueError, match="k must be an integer"):
    checks.int_in_range("k", True, 1, 3)
  with pytest.raises(ValueError, match=r"k must be in \[1, 3\], got 4"):
    checks.int_in_range("k", np.int32(4), 1, 3)
  with pytest.raises(ValueError, match="nu must be positive"):
    checks.positive("nu", -1.0)
  with pytest.raises(ValueError, match="nu must be positive"):
    checks.positive("nu", float("inf"))
  assert checks.positive("kappa", 0.0, allow_zero=True) == 0.0
  with pytest.raises(ValueError, match="kappa must be >= 0"):
    checks.positive("kappa", -0.5, allow_zero=True)
  with pytest.raises(ValueError, match="mode must be one of"):
    checks.one_of("mode", "x", {"a", "b"})


def test_one_name_per_check():
  """Issue 30: `pos_float`, `epsilon`, `finite` and `pos_int` were second names of `positive`, `open_unit`,
  `floating_array` and `int_in_range`; none is left, and nothing calls them."""
  import pathlib
  import re
  for gone in ("pos_float", "epsilon", "finite", "pos_int"):
    assert not hasattr(checks, gone), gone
  root = pathlib.Path(checks.__file__).resolve().parents[1]
  callers = sorted(str(p.relative_to(root)) for d in ("asoftmax", "experiments", "scripts", "tests")
                   for p in (root / d).rglob("*.py")
                   if re.search(r"checks\.(pos_int|pos_float|epsilon|finite)\(", p.read_text()))
  assert callers == [], callers


def test_not_an_array():
  with pytest.raises(ValueError, match="x must be an array, got list"):
    checks.floating_array("x", [1.0, 2.0])


def test_boolean_rejects_truthy_non_bools():
  assert checks.boolean("flag", True) is True and checks.boolean("flag", np.bool_(False)) is False
  assert checks.boolean("flag", np.array(True)) is True
  for bad in ("yes", "False", 1, 0, None, 1.0, np.array([True])):
    with pytest.raises(ValueError, match="flag must be a bool"):
      checks.boolean("flag", bad)
  with pytest.raises(ValueError, match="flag must be a Python bool"):
    jax.jit(lambda b: checks.boolean("flag", b))(True)


def test_checks_folded_from_module_helpers():
  """Issue 30: the checks that lived as `_check_*` helpers in topk / rff / adaptive modules."""
  f32 = np.ones((2, 3), np.float32)
  assert checks.vectors("keys", f32) is f32
  with pytest.raises(ValueError, match=r"keys must have shape \(\.\.\., L, d\), got \(3,\)"):
    checks.vectors("keys", f32[0], "(..., L, d)")
  with pytest.raises(ValueError, match="h has dimension 3, class_vectors has 4"):
    checks.same_dim("h", f32, 4, "class_vectors")
  assert checks.float_in_range("rho", np.array([0.0, 1.0]), 0.0, 1.0) is not None
  with pytest.raises(ValueError, match=r"sigma must be in \(0.0, 1.0\]"):
    checks.float_in_range("sigma", np.array([0.0]), 0.0, 1.0, lo_open=True)
  jax.jit(lambda x: checks.float_in_range("rho", x, 0.0, 0.5))(jnp.ones(2))  # traced: unchecked (caller flags)
  lq = np.log(np.full((2, 4), 0.25, np.float32))
  assert checks.log_probs("log_q", lq, (2, 4)) is lq
  with pytest.raises(ValueError, match="log_q must have logits' shape"):
    checks.log_probs("log_q", lq, (2, 5))
  with pytest.raises(ValueError, match="log_q must hold log probabilities"):
    checks.log_probs("log_q", -lq, (2, 4))
  key = jax.random.key(0)
  assert checks.prng_key("key", key) is key
  assert checks.prng_key("key", jax.random.PRNGKey(0)).shape == (2,)
  with pytest.raises(ValueError, match="key must be a PRNG key"):
    checks.prng_key("key", np.zeros(3, np.uint32))
  assert checks.open_unit_tuple("epsilons", [0.1, 0.2]) == (0.1, 0.2)
  for bad in ((), (0.0,), 0.1, "0.1"):
    with pytest.raises(ValueError, match="epsilons"):
      checks.open_unit_tuple("epsilons", bad)
  assert checks.dtype_in("stat_dtype", "bfloat16", (jnp.float32, jnp.bfloat16)) == jnp.bfloat16
  with pytest.raises(ValueError, match="stat_dtype must be float32 or bfloat16, got 'int8'"):
    checks.dtype_in("stat_dtype", "int8", (jnp.float32, jnp.bfloat16))
  assert checks.boolean("precompute", "auto", also=("auto",)) == "auto"
  with pytest.raises(ValueError, match="precompute must be a bool \\(True or False\\) or 'auto'"):
    checks.boolean("precompute", "yes", also=("auto",))


def _private_reach_ins(root) -> list[str]:
  """`file: name` for every private name (`_x`) a file takes from another asoftmax package: imported
  (`from asoftmax.topk import _core`) or read as an attribute of a module imported from there (`prog._search`)."""
  import ast

  out = []
  for d in ("asoftmax", "experiments", "scripts"):
    for path in sorted((root / d).rglob("*.py")):
      rel = path.relative_to(root)
      parts = rel.parts
      own = parts[1] if parts[0] == "asoftmax" and len(parts) > 2 else None  # None: top-level module or not library
      tree = ast.parse(path.read_text())
      foreign = set()  # local names bound to modules of another package
      for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("asoftmax"):
          mod = node.module.split(".")
          pkg = mod[1] if len(mod) > 1 else None
          for a in node.names:
            target_pkg = pkg if pkg is not None else a.name  # `from asoftmax import topk`: the package is the name
            if target_pkg == own and own is not None:
              continue
            if a.name.startswith("_") or (len(mod) > 2 and mod[2].startswith("_")):
              out.append(f"{rel}: {node.module}.{a.name}")
            foreign.add(a.asname or a.name)
      for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in foreign):
          out.append(f"{rel}: {node.value.id}.{node.attr}")
  return sorted(set(out))


def test_no_private_names_across_packages():
  """Issue 30's API rule: a package's private names stay inside it (asoftmax.sharded used topk's `_core`,
  `progressive._progressive`, `_stage_edges` and `_check_prepared`; they are now public checks or the public
  `topk.progressive_search`)."""
  import pathlib

  root = pathlib.Path(checks.__file__).resolve().parents[1]
  assert _private_reach_ins(root) == []


def test_stage_edges_names_its_argument():
  """`topk.prepare_keys(blocks=...)` said "stages must be ..." for bad blocks; the shared check names the argument."""
  assert checks.stage_edges("blocks", (4, 8), 8) == (4, 8)
  for bad in ((8, 4), (4, 6), (), (0, 8)):
    with pytest.raises(ValueError, match="blocks must be increasing positive coordinate counts ending at d = 8"):
      checks.stage_edges("blocks", bad, 8)
  assert checks.rounding_margin(1024) > checks.rounding_margin(2) > 0
  assert bool(checks.open_unit_ok(0.5)) and not bool(checks.open_unit_ok(float("nan")))
