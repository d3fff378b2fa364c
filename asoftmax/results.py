"""Atomic writers for results files, and the markdown table renderer.

A crashed run must never leave a half-written file that looks complete: every file is written
to a temporary file in the same directory and then renamed over the target (atomic on POSIX).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Iterable, Sequence

import numpy as np


def _atomic_write_bytes(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def to_jsonable(obj: Any) -> Any:
  """Converts numpy/jax scalars and arrays (recursively) to plain Python for json."""
  if isinstance(obj, dict):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
    return to_jsonable(np.asarray(obj).tolist())
  if isinstance(obj, float) and not math.isfinite(obj):
    return None if math.isnan(obj) else (1e308 if obj > 0 else -1e308)
  return obj


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON, atomically."""
  text = json.dumps(to_jsonable(obj), indent=2, sort_keys=False)
  _atomic_write_bytes(path, (text + "\n").encode())


def write_text(path: str, text: str) -> None:
  """Writes text atomically."""
  _atomic_write_bytes(path, text.encode())


def save_figure(fig, path: str, dpi: int = 120) -> None:
  """Saves a matplotlib figure as PNG atomically and closes it."""
  import io

  import matplotlib.pyplot as plt

  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
  plt.close(fig)
  _atomic_write_bytes(path, buf.getvalue())


def format_value(v: Any) -> str:
  if v is None:
    return "–"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, int):
    return str(v)
  if isinstance(v, float):
    if not math.isfinite(v):
      return str(v)
    a = abs(v)
    if a == 0:
      return "0"
    if a >= 1e5 or a < 1e-3:
      return f"{v:.3g}"
    if a >= 100:
      return f"{v:.1f}"
    return f"{v:.4g}"
  if isinstance(v, (list, tuple)):
    return "[" + ", ".join(format_value(x) for x in v) + "]"
  return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Iterable[dict], columns: Sequence[str]) -> str:
  """Renders rows as a GitHub markdown table with the given column order.

  Missing values render as an en dash.
  """
  rows = list(rows)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for r in rows:
    lines.append("| " + " | ".join(format_value(r.get(c)) for c in columns) + " |")
  return "\n".join(lines) + "\n"
