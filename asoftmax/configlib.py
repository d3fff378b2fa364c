"""Helpers shared by config files (configs are loaded by path, so shared code lives here)."""

from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple

DATA_DIR_ENV = "ASOFTMAX_DATA_DIR"


def default_data_dir() -> str:
  """The data directory configs default to: `$ASOFTMAX_DATA_DIR`, or '' when unset."""
  return os.environ.get(DATA_DIR_ENV, "")


class Arg(NamedTuple):
  """One argument a config understands after the colon (`--config path.py:smoke,window=512`).

  Attributes:
    default: the value when the argument is not given; its Python type (str, int, float, bool) is the
      argument's type, and a given value is converted to it.
    choices: the allowed values (empty: any value of the type).
  """

  default: Any
  choices: tuple = ()


def choice(*values) -> Arg:
  """An argument that takes one of `values`; the first is the default."""
  if not values:
    raise ValueError("choice() needs at least one value")
  return Arg(values[0], tuple(values))


def typed(default) -> Arg:
  """An argument of `default`'s type (str, int, float or bool), any value."""
  if not isinstance(default, (str, int, float, bool)):
    raise ValueError(f"typed() takes a str, int, float or bool default, got {default!r}")
  return Arg(default)


def _convert(key: str, value: str, spec: Arg, arg: str):
  kind = type(spec.default)
  try:
    if kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError
      out = value.lower() in ("true", "1")
    else:
      out = kind(value)
  except ValueError:
    raise ValueError(f"config arg {key}={value!r} in {arg!r} is not a {kind.__name__}") from None
  if spec.choices and out not in spec.choices:
    raise ValueError(f"unknown {key} {value!r} in {arg!r}; known: {', '.join(map(str, spec.choices))}")
  return out


def parse_arg(arg: str | None, spec: Mapping[str, Arg]) -> dict:
  """Parses a config arg such as ``"smoke"`` or ``"model=smollm2,data=wikitext"`` against the config's `ARGS`.

  Every config module declares its arguments as data, ``ARGS = {"variant": configlib.choice("full", "smoke"),
  "window": configlib.typed(8192)}``, so the launcher's `--list` reads them without running or parsing the
  config (big_vision's `parse_arg`, typed). A bare word ``w`` is ``variant=w``; ``key=value`` pairs set keys and
  are converted to the default's type.

  Returns:
    {name: value} for every argument in `spec`.

  Raises:
    ValueError: an unknown key (naming the known ones), a value not of the argument's type, or not one of its
      choices (naming them).
  """
  out = {k: v.default for k, v in spec.items()}
  if not arg:
    return out
  for part in arg.split(","):
    part = part.strip()
    if not part:
      continue
    key, value = part.split("=", 1) if "=" in part else ("variant", part)
    if key not in spec:
      raise ValueError(f"unknown config arg {key!r} in {arg!r}; known: {sorted(spec)}")
    out[key] = _convert(key, value, spec[key], arg)
  return out


def adaptive_protocol() -> dict:
  """The AdaptiveSoftmax evaluation protocol shared by the MNIST, EuroSAT and LLM tables, in one place.

  Baharav et al. (NeurIPS 2024), Sec. 5: epsilon = 0.3, the fudge factors tuned on `n_tune` queries and success
  reported on the held-out rest at each delta. Every mode is run on the same held-out queries: "paper" (fudge
  factors tuned by the binomial rule), "paper-conformal" (one factor, split-conformal rank; a guarantee for
  exchangeable queries) and "certified" (no tuning; intervals valid for every input). A config starts from this
  dict (`c.update(configlib.adaptive_protocol())`) and overrides what its table differs in.
  """
  return dict(
      epsilon=0.3,
      deltas=(0.1, 0.05, 0.01),
      ks=(1, 3),
      n_tune=200,
      beta=1.0,
      order="importance",
      modes=("paper", "paper-conformal", "certified"),
  )
