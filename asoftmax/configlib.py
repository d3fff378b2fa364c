"""Helpers shared by config files (configs are loaded by path, so shared code lives here)."""

from __future__ import annotations

import os

DATA_DIR_ENV = "ASOFTMAX_DATA_DIR"


def default_data_dir() -> str:
  """The data directory configs default to: `$ASOFTMAX_DATA_DIR`, or '' when unset."""
  return os.environ.get(DATA_DIR_ENV, "")


def parse_arg(arg: str | None, **defaults) -> dict:
  """Parses a config arg such as ``"smoke"`` or ``"model=smollm2,data=wikitext"``.

  A bare word ``w`` becomes ``{"variant": w}``; ``key=value`` pairs set keys. Unknown keys
  raise ``ValueError`` naming the known ones.
  """
  out = dict(defaults)
  if not arg:
    return out
  for part in arg.split(","):
    part = part.strip()
    if not part:
      continue
    if "=" in part:
      key, value = part.split("=", 1)
    else:
      key, value = "variant", part
    if key not in out:
      raise ValueError(f"unknown config arg {key!r} in {arg!r}; known: {sorted(out)}")
    out[key] = value
  return out
